//! The operations endpoint: `/metrics` (Prometheus text), `/healthz` (the process runs),
//! `/readyz` (the replica can pull and store: see [`crate::readiness`]). A deliberately tiny HTTP/1.1 responder:
//! three GET paths, no keep-alive, nothing else to attack.

use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// What the endpoint reports.
pub trait Health: Send + Sync {
    /// `Ok`, or every reason the replica is not ready (the 503 body).
    fn ready(&self) -> Result<(), crate::readiness::NotReady>;
    fn metrics(&self) -> String;
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, health: Arc<dyn Health>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, content_type, body) = match (request.starts_with("GET "), path) {
                (true, "/metrics") => ("200 OK", "text/plain; version=0.0.4", health.metrics()),
                (true, "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                (true, "/readyz") => match health.ready() {
                    Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
                    Err(why) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("not ready: {why}\n"),
                    ),
                },
                (true, _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                (false, _) => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
