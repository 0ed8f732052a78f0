//! Registry access through `oci-client`, and what its errors mean for the gate.
//!
//! Manifests and referrers lists are read by this module itself (with the credentials, or
//! the bearer token `oci-client` obtained for them) so that their bodies are streamed and
//! abandoned at [`MAX_MANIFEST_BYTES`]; `oci-client` reads them whole. Blobs go through
//! `oci-client` into a [`CappedBuffer`]. Authentication happens once per lookup
//! ([`Reader::prepare`]): one `GET /v2/`, and for a `Bearer` registry one token request.
//!
//! Every call is bounded by `registry_timeout`, and every failure is sorted into one of:
//! not found (the registry answered: nothing there), unreachable (no answer at all: stop
//! asking), unavailable (an answer that is not a verdict: 5xx, rate limit, credentials
//! refused) or malformed (content that cannot be a valid signature).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor,
    OciImageIndex, OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::Digest as _;

use super::MAX_MANIFEST_BYTES;
use super::credentials::Credentials;

/// Why a registry call produced no content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection or no answer in time: the registry is down or cut off.
    Unreachable(String),
    /// The registry answered, but not with content or a "not found" (5xx, 429, refused
    /// anonymous access): the question stays open.
    Unavailable(String),
    /// The registry served something that is not what it claims (bad digest, bad JSON,
    /// too large).
    Malformed(String),
}

/// `Ok(None)` is "not there", as the registry says.
pub type Fetched<T> = Result<Option<T>, Failure>;

/// How the requests of one search authenticate (see [`Reader::prepare`]).
#[derive(Clone)]
pub enum Access {
    Anonymous,
    Basic { username: String, password: String },
    Bearer(String),
}

/// A referrers list (the API's answer or the tag schema's index) as the registry served it;
/// `what` names where it came from in the refusal.
pub(crate) fn decode_index(bytes: &[u8], what: &str) -> Result<OciImageIndex, Failure> {
    serde_json::from_slice(bytes)
        .map_err(|e| Failure::Malformed(format!("{what}: not an image index: {e}")))
}

/// An image manifest (a referrer's, or the signature tag's) as the registry served it.
pub(crate) fn decode_manifest(bytes: &[u8], what: &str) -> Result<OciImageManifest, Failure> {
    serde_json::from_slice(bytes)
        .map_err(|e| Failure::Malformed(format!("{what}: not an image manifest: {e}")))
}

/// The HTTP client for manifests and referrers: bounded like the registry client, and
/// following at most a few redirects.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .map_err(|e| e.to_string())
}

/// Builds a client; credentials are given per call (see [`Reader`]). `insecure`
/// registries are spoken to over plain HTTP.
pub fn client(insecure: &[String], timeout: Option<Duration>) -> Result<Client, String> {
    let config = ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure.to_vec()),
        connect_timeout: timeout,
        read_timeout: timeout,
        ..ClientConfig::default()
    };
    Client::try_from(config).map_err(|e| e.to_string())
}

fn describe(e: &OciDistributionError) -> String {
    crate::error_text::with_causes(e)
}

/// Sorts an `oci-client` error: `None` when it only says "there is nothing there".
pub fn classify(e: &OciDistributionError) -> Option<Failure> {
    use OciDistributionError as E;
    let unavailable = || Some(Failure::Unavailable(describe(e)));
    match e {
        E::RequestError(re) if re.is_connect() || re.is_timeout() => {
            Some(Failure::Unreachable(describe(e)))
        }
        E::RequestError(_) => unavailable(),
        E::ServerError { code, .. } => match code {
            401 | 403 | 407 | 408 | 429 => unavailable(),
            400..=499 => None,
            _ => unavailable(),
        },
        E::RegistryError { envelope, .. } => {
            let refused = envelope.errors.iter().any(|err| {
                matches!(
                    err.code,
                    OciErrorCode::Unauthorized
                        | OciErrorCode::Denied
                        | OciErrorCode::Toomanyrequests
                )
            });
            if refused { unavailable() } else { None }
        }
        E::UnauthorizedError { .. }
        | E::AuthenticationFailure(_)
        | E::RegistryTokenDecodeError(_) => unavailable(),
        E::DigestError(_)
        | E::ManifestParsingError(_)
        | E::VersionedParsingError(_)
        | E::UnsupportedMediaTypeError(_)
        | E::UnsupportedSchemaVersionError(_)
        | E::SpecViolationError(_)
        | E::JsonError(_)
        | E::ManifestEncodingError(_)
        | E::HeaderValueError(_)
        | E::RegistryNoDigestError
        | E::IoError(_) => Some(Failure::Malformed(describe(e))),
        _ => unavailable(),
    }
}

/// Whether an error is the registry refusing these (or no) credentials.
fn is_refusal(e: &OciDistributionError) -> bool {
    use OciDistributionError as E;
    match e {
        E::ServerError { code, .. } => matches!(code, 401 | 403),
        E::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|err| matches!(err.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => true,
        _ => false,
    }
}

/// Whether an error only says "there is nothing there".
pub fn is_not_found(e: &OciDistributionError) -> bool {
    classify(e).is_none()
}

/// Manifest media types a signature or referrer manifest may have.
const MANIFEST_TYPES: &[&str] = &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE];
/// Media types a scanner image itself may have (a platform manifest or an index).
const IMAGE_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    oci_client::manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Reads from a registry on behalf of the gate, with the registry's credentials if any.
#[derive(Clone)]
pub struct Reader {
    client: Client,
    http: reqwest::Client,
    insecure: Vec<String>,
    timeout: Duration,
    credentials: Credentials,
}

impl Reader {
    pub fn new(
        client: Client,
        http: reqwest::Client,
        insecure: Vec<String>,
        timeout: Duration,
        credentials: Credentials,
    ) -> Self {
        Reader {
            client,
            http,
            insecure,
            timeout,
            credentials,
        }
    }

    /// What `oci-client` is given for `image`'s registry.
    fn auth(&self, image: &Reference) -> RegistryAuth {
        self.credentials.auth_for(image.resolve_registry())
    }

    /// Says why a registry refused: no credentials configured, or these refused.
    fn refusal(&self, image: &Reference) -> String {
        if self.credentials.has(image.registry()) {
            format!(
                "registry {} refused the configured credentials",
                image.registry()
            )
        } else {
            format!(
                "registry {} requires credentials and none are configured for it ([gates.provenance] docker_config or registry_credentials)",
                image.registry()
            )
        }
    }

    /// Runs one call for `image` under the timeout and sorts its failure.
    async fn call<T>(
        &self,
        image: &Reference,
        what: &str,
        fut: impl Future<Output = Result<T, OciDistributionError>>,
    ) -> Fetched<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Err(e)) if is_refusal(&e) => Err(Failure::Unavailable(format!(
                "{what}: {}: {}",
                self.refusal(image),
                describe(&e)
            ))),
            Err(_) => Err(Failure::Unreachable(format!(
                "{what}: no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(e)) => match classify(&e) {
                None => Ok(None),
                Some(Failure::Unreachable(m)) => Err(Failure::Unreachable(format!("{what}: {m}"))),
                Some(Failure::Unavailable(m)) => Err(Failure::Unavailable(format!("{what}: {m}"))),
                Some(Failure::Malformed(m)) => Err(Failure::Malformed(format!("{what}: {m}"))),
            },
        }
    }

    /// Stores the registry's credentials in the client (anonymous without any) and
    /// authenticates once for `image`: basic auth, or the token flow for registries that
    /// answer `Bearer` (ghcr.io and Docker Hub hand out anonymous pull tokens that way
    /// too). The result is used by every later request of the search.
    pub async fn prepare(&self, image: &Reference) -> Result<Access, Failure> {
        let auth = self.auth(image);
        self.client
            .store_auth_if_needed(image.resolve_registry(), &auth)
            .await;
        let token = self
            .call(
                image,
                "registry authentication",
                self.client.auth(image, &auth, RegistryOperation::Pull),
            )
            .await?
            .flatten();
        Ok(match (token, auth) {
            (Some(token), _) => Access::Bearer(token),
            (None, RegistryAuth::Basic(username, password)) => Access::Basic { username, password },
            (None, _) => Access::Anonymous,
        })
    }

    /// The referrers of `image` (a digest reference) from the OCI 1.1 referrers API;
    /// `Ok(None)` when the registry does not implement it (404, or another client error),
    /// and the caller reads the referrers tag schema instead.
    pub async fn referrers(&self, image: &Reference, access: &Access) -> Fetched<OciImageIndex> {
        let Some(digest) = image.digest() else {
            return Ok(None);
        };
        let what = "referrers API";
        let Some(bytes) = self
            .get_capped(
                image,
                access,
                &format!("referrers/{digest}"),
                &[OCI_IMAGE_INDEX_MEDIA_TYPE],
                what,
            )
            .await?
        else {
            return Ok(None);
        };
        decode_index(&bytes, what).map(Some)
    }

    /// The referrers tag schema read directly: the index tagged `sha256-<hex>`. Used when
    /// the referrers endpoint answers with a client error.
    pub async fn tag_schema_index(
        &self,
        image: &Reference,
        access: &Access,
        tag: &str,
    ) -> Fetched<OciImageIndex> {
        let reference = Reference::with_tag(
            image.registry().to_string(),
            image.repository().to_string(),
            tag.to_string(),
        );
        let what = format!("referrers tag {tag}");
        let Some(bytes) = self
            .raw(&reference, access, &what, &[OCI_IMAGE_INDEX_MEDIA_TYPE])
            .await?
        else {
            return Ok(None);
        };
        decode_index(&bytes, &what).map(Some)
    }

    /// An image manifest by tag or digest (a digest reference is checked against the bytes).
    pub async fn manifest(
        &self,
        reference: &Reference,
        access: &Access,
    ) -> Fetched<OciImageManifest> {
        let what = format!("manifest {}", reference.whole());
        let Some(bytes) = self.raw(reference, access, &what, MANIFEST_TYPES).await? else {
            return Ok(None);
        };
        decode_manifest(&bytes, &what).map(Some)
    }

    /// The image's own manifest bytes (the message of a bundle's message signature).
    pub async fn manifest_raw(&self, image: &Reference, access: &Access) -> Fetched<Vec<u8>> {
        let what = format!("image manifest {}", image.whole());
        self.raw(image, access, &what, IMAGE_TYPES).await
    }

    /// A manifest's bytes, streamed and refused past [`MAX_MANIFEST_BYTES`]; by digest,
    /// they must hash to it.
    async fn raw(
        &self,
        reference: &Reference,
        access: &Access,
        what: &str,
        accept: &[&str],
    ) -> Fetched<Vec<u8>> {
        let tag_or_digest = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_string();
        let Some(bytes) = self
            .get_capped(
                reference,
                access,
                &format!("manifests/{tag_or_digest}"),
                accept,
                what,
            )
            .await?
        else {
            return Ok(None);
        };
        if let Some(digest) = reference.digest() {
            let actual = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
            if !digest.eq_ignore_ascii_case(&actual) {
                return Err(Failure::Malformed(format!(
                    "{what}: the registry served content with digest {actual}"
                )));
            }
        }
        Ok(Some(bytes))
    }

    /// `GET /v2/<repository>/<path>` on the image's registry, under the timeout, its body
    /// read with [`crate::capped::read_capped`] at [`MAX_MANIFEST_BYTES`]. Statuses are
    /// sorted as [`classify`] sorts `oci-client`'s errors: 404 and other client errors are
    /// "not there"; refusals, rate limits and server errors are unavailable.
    async fn get_capped(
        &self,
        image: &Reference,
        access: &Access,
        path: &str,
        accept: &[&str],
        what: &str,
    ) -> Fetched<Vec<u8>> {
        let registry = image.resolve_registry();
        let scheme = if self
            .insecure
            .iter()
            .any(|r| r == registry || r == image.registry())
        {
            "http"
        } else {
            "https"
        };
        let url = format!("{scheme}://{registry}/v2/{}/{path}", image.repository());
        let mut request = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, accept.join(", "));
        request = match access {
            Access::Anonymous => request,
            Access::Basic { username, password } => request.basic_auth(username, Some(password)),
            Access::Bearer(token) => request.bearer_auth(token),
        };
        let fetch = async {
            let response = request.send().await.map_err(|e| {
                let m = format!("{what}: {}", crate::error_text::with_causes(&e));
                if e.is_connect() || e.is_timeout() {
                    Failure::Unreachable(m)
                } else {
                    Failure::Unavailable(m)
                }
            })?;
            let status = response.status().as_u16();
            match status {
                200..=299 => {}
                401 | 403 => {
                    return Err(Failure::Unavailable(format!(
                        "{what}: {}: HTTP {status}",
                        self.refusal(image)
                    )));
                }
                407 | 408 | 429 => {
                    return Err(Failure::Unavailable(format!("{what}: HTTP {status}")));
                }
                400..=499 => return Ok(None),
                _ => return Err(Failure::Unavailable(format!("{what}: HTTP {status}"))),
            }
            crate::capped::read_capped(response, MAX_MANIFEST_BYTES)
                .await
                .map(Some)
                .map_err(|e| match e {
                    crate::capped::BodyError::TooLarge { .. } => Failure::Malformed(format!(
                        "{what}: over the {MAX_MANIFEST_BYTES}-byte manifest limit"
                    )),
                    crate::capped::BodyError::Read(e) => {
                        Failure::Unavailable(format!("{what}: {e}"))
                    }
                })
        };
        match tokio::time::timeout(self.timeout, fetch).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Unreachable(format!(
                "{what}: no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// A blob of at most `limit` bytes, checked against its digest.
    pub async fn blob(
        &self,
        image: &Reference,
        layer: &OciDescriptor,
        limit: usize,
    ) -> Fetched<Vec<u8>> {
        let what = format!("blob {}", layer.digest);
        if usize::try_from(layer.size).map_or(true, |s| s > limit) {
            return Err(Failure::Malformed(format!(
                "{what}: declared size {} is over the {limit}-byte limit",
                layer.size
            )));
        }
        let mut out = CappedBuffer {
            bytes: Vec::new(),
            limit,
        };
        self.call(image, &what, self.client.pull_blob(image, layer, &mut out))
            .await
            .map(|found| found.map(|()| out.bytes))
    }
}

/// An in-memory sink that refuses to grow past `limit`: a registry lying about a blob's
/// size cannot make the signer buffer more than that.
struct CappedBuffer {
    bytes: Vec<u8>,
    limit: usize,
}

impl tokio::io::AsyncWrite for CappedBuffer {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.bytes.len().saturating_add(data.len()) > this.limit {
            return Poll::Ready(Err(std::io::Error::other(format!(
                "blob is larger than {} bytes",
                this.limit
            ))));
        }
        this.bytes.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use oci_client::errors::{OciEnvelope, OciError};

    use super::*;

    fn registry_error(code: OciErrorCode) -> OciDistributionError {
        OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: String::new(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "http://r/v2/x".into(),
        }
    }

    fn server_error(code: u16) -> OciDistributionError {
        OciDistributionError::ServerError {
            code,
            url: "http://r/v2/x".into(),
            message: String::new(),
        }
    }

    #[test]
    fn errors_are_sorted_into_not_found_unavailable_and_malformed() {
        for e in [
            registry_error(OciErrorCode::ManifestUnknown),
            registry_error(OciErrorCode::NameUnknown),
            server_error(404),
            server_error(405),
        ] {
            assert!(is_not_found(&e), "{e}");
        }
        for e in [
            registry_error(OciErrorCode::Toomanyrequests),
            registry_error(OciErrorCode::Denied),
            server_error(500),
            server_error(503),
            server_error(429),
            server_error(401),
            OciDistributionError::UnauthorizedError { url: "u".into() },
        ] {
            assert!(matches!(classify(&e), Some(Failure::Unavailable(_))), "{e}");
        }
        for e in [
            OciDistributionError::ManifestParsingError("x".into()),
            OciDistributionError::SpecViolationError("x".into()),
            OciDistributionError::IoError(std::io::Error::other("too big")),
        ] {
            assert!(matches!(classify(&e), Some(Failure::Malformed(_))), "{e}");
        }
    }

    /// A registry that answers every request with an endless chunked 200 body, counting
    /// the bytes it wrote.
    async fn endless_registry() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = written.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let _ = sock.read(&mut buf).await;
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\n\r\n";
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![b' '; 64 * 1024];
                    loop {
                        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                        framed.extend_from_slice(&chunk);
                        framed.extend_from_slice(b"\r\n");
                        if sock.write_all(&framed).await.is_err() {
                            return;
                        }
                        counter.fetch_add(chunk.len(), Ordering::SeqCst);
                    }
                });
            }
        });
        (host, written)
    }

    #[tokio::test]
    async fn an_endless_manifest_is_abandoned_at_the_manifest_limit() {
        use std::sync::atomic::Ordering;
        let (host, written) = endless_registry().await;
        let timeout = Duration::from_secs(10);
        let reader = Reader::new(
            client(std::slice::from_ref(&host), Some(timeout)).unwrap(),
            http_client(timeout).unwrap(),
            vec![host.clone()],
            timeout,
            Credentials::default(),
        );
        let reference: Reference =
            format!("{host}/stella-ops/scanner:sha256-{}.sig", "a".repeat(64))
                .parse()
                .unwrap();
        let started = std::time::Instant::now();
        let Err(Failure::Malformed(m)) = reader.manifest(&reference, &Access::Anonymous).await
        else {
            panic!("an endless manifest was not refused");
        };
        assert!(m.contains("manifest limit"), "{m}");
        assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
        // The reader stopped: the registry's writes stop a little past the cap.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = written.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            written.load(Ordering::SeqCst),
            sent,
            "the registry is still writing"
        );
        assert!(
            sent < MAX_MANIFEST_BYTES + 8 * 1024 * 1024,
            "{sent} bytes were sent"
        );
        // The referrers API is read the same way.
        let image: Reference = format!("{host}/stella-ops/scanner@sha256:{}", "a".repeat(64))
            .parse()
            .unwrap();
        assert!(matches!(
            reader.referrers(&image, &Access::Anonymous).await,
            Err(Failure::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn capped_buffer_refuses_to_grow_past_its_limit() {
        use tokio::io::AsyncWriteExt as _;
        let mut b = CappedBuffer {
            bytes: Vec::new(),
            limit: 4,
        };
        b.write_all(b"abcd").await.unwrap();
        assert!(b.write_all(b"e").await.is_err());
        assert_eq!(b.bytes, b"abcd");
    }
}
