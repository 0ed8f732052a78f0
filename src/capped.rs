//! Response bodies read with a size cap: streamed chunk by chunk and abandoned as soon as
//! they pass the cap, so a JWKS endpoint, a licensing service or a registry that answers
//! with an endless body costs at most the cap in memory, never "whatever it sends".

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body (declared or actual) is larger than the cap; reading stopped there.
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The connection failed while the body was read.
    #[error("reading the answer failed: {0}")]
    Read(#[source] reqwest::Error),
}

/// Reads `response`'s body, at most `limit` bytes. A declared `Content-Length` over the
/// limit is refused before anything is read; otherwise chunks are read until the body
/// ends or passes the limit (the rest is never read: the connection is dropped).
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Read)? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A server whose one answer is an endless chunked body (or, with `declared`, a body
    /// announced with that Content-Length). Counts the body bytes it managed to write.
    async fn endless_server(declared: Option<u64>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let written = Arc::new(AtomicUsize::new(0));
        let counter = written.clone();
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let head = match declared {
                Some(n) => format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n"),
                None => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(),
            };
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 16 * 1024];
            loop {
                let framed = if declared.is_some() {
                    chunk.clone()
                } else {
                    let mut f = format!("{:x}\r\n", chunk.len()).into_bytes();
                    f.extend_from_slice(&chunk);
                    f.extend_from_slice(b"\r\n");
                    f
                };
                if sock.write_all(&framed).await.is_err() {
                    return;
                }
                counter.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        });
        (url, written)
    }

    #[tokio::test]
    async fn an_endless_body_is_abandoned_at_the_cap() {
        let (url, written) = endless_server(None).await;
        let response = reqwest::get(&url).await.unwrap();
        let limit = 256 * 1024;
        let err = read_capped(response, limit).await.unwrap_err();
        assert!(
            matches!(err, BodyError::TooLarge { limit: l } if l == limit),
            "{err}"
        );
        // The server could write a little past the cap (socket buffers), not much more:
        // the reader stopped, so the server's writes stop too.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let sent = written.load(Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(
            written.load(Ordering::SeqCst),
            sent,
            "the server is still writing"
        );
        assert!(sent < limit + 8 * 1024 * 1024, "{sent} bytes were sent");
    }

    #[tokio::test]
    async fn a_declared_oversized_body_is_refused_unread() {
        let (url, _) = endless_server(Some(10 * 1024 * 1024)).await;
        let response = reqwest::get(&url).await.unwrap();
        assert!(matches!(
            read_capped(response, 1024).await,
            Err(BodyError::TooLarge { limit: 1024 })
        ));
    }

    #[tokio::test]
    async fn a_body_within_the_cap_is_read_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                )
                .await;
        });
        let response = reqwest::get(&url).await.unwrap();
        assert_eq!(read_capped(response, 5).await.unwrap(), b"hello");
    }
}
