//! Registry access through `oci-client`, and what its errors mean for the gate.
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
use oci_client::{Client, Reference};

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
    timeout: Duration,
    credentials: Credentials,
}

impl Reader {
    pub fn new(client: Client, timeout: Duration, credentials: Credentials) -> Self {
        Reader {
            client,
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

    /// Stores the registry's credentials in the client (anonymous without any), so that
    /// every later call, the referrers API included, authenticates: basic auth, or the
    /// token flow for registries that answer `Bearer` (ghcr.io and Docker Hub hand out
    /// anonymous pull tokens that way too).
    pub async fn prepare(&self, image: &Reference) {
        self.client
            .store_auth_if_needed(image.resolve_registry(), &self.auth(image))
            .await;
    }

    /// The referrers of `image` (a digest reference): the OCI 1.1 referrers API, and, when
    /// the registry answers 404 there (it does not implement it), the referrers tag schema
    /// (`oci-client` does that fallback itself, as the distribution spec prescribes).
    pub async fn referrers(&self, image: &Reference) -> Fetched<OciImageIndex> {
        self.call(
            image,
            "referrers API",
            self.client.pull_referrers(image, None),
        )
        .await
    }

    /// The referrers tag schema read directly: the index tagged `sha256-<hex>`. Used when
    /// the referrers endpoint answers with another client error than 404.
    pub async fn tag_schema_index(&self, image: &Reference, tag: &str) -> Fetched<OciImageIndex> {
        let reference = Reference::with_tag(
            image.registry().to_string(),
            image.repository().to_string(),
            tag.to_string(),
        );
        let what = format!("referrers tag {tag}");
        let Some(bytes) = self
            .raw(&reference, &what, &[OCI_IMAGE_INDEX_MEDIA_TYPE])
            .await?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Failure::Malformed(format!("{what}: not an image index: {e}")))
    }

    /// An image manifest by tag or digest (a digest reference is checked against the bytes).
    pub async fn manifest(&self, reference: &Reference) -> Fetched<OciImageManifest> {
        let what = format!("manifest {}", reference.whole());
        let Some(bytes) = self.raw(reference, &what, MANIFEST_TYPES).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Failure::Malformed(format!("{what}: not an image manifest: {e}")))
    }

    /// The image's own manifest bytes (the message of a bundle's message signature).
    pub async fn manifest_raw(&self, image: &Reference) -> Fetched<Vec<u8>> {
        let what = format!("image manifest {}", image.whole());
        self.raw(image, &what, IMAGE_TYPES).await
    }

    /// A manifest's bytes, refused past [`MAX_MANIFEST_BYTES`].
    async fn raw(&self, reference: &Reference, what: &str, accept: &[&str]) -> Fetched<Vec<u8>> {
        let auth = self.auth(reference);
        let Some((bytes, _)) = self
            .call(
                reference,
                what,
                self.client.pull_manifest_raw(reference, &auth, accept),
            )
            .await?
        else {
            return Ok(None);
        };
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(Failure::Malformed(format!(
                "{what}: {} bytes, over the {MAX_MANIFEST_BYTES}-byte manifest limit",
                bytes.len()
            )));
        }
        Ok(Some(bytes.to_vec()))
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
