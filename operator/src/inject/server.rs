//! The webhook's HTTPS server: `POST /mutate` answers AdmissionReviews for pod creations.
//!
//! The certificate is looked up on every TLS handshake from a [`CertificateSlot`], so a renewed certificate is
//! served from the next connection on, and open connections are closed after the request in flight, so clients
//! verify the new one without a restart. The webhook never blocks a pod it can read: whatever goes wrong, the pod
//! is admitted unchanged (with a warning) and the failure is counted. A body that is not an AdmissionReview of a
//! Pod gets an invalid response, which the API server treats by the failure policy.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::Duration;

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::certs::TlsMaterial;
use super::metrics::WebhookMetrics;
use super::{Decision, decide};
use crate::caches::CollectorView;

/// The path the API server posts AdmissionReviews to.
pub const MUTATE_PATH: &str = "/mutate";
/// Largest AdmissionReview accepted (a pod with many large containers stays far below).
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// A client that has not finished the TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS material could not be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the webhook certificate is not readable PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("the webhook certificate Secret holds no certificate")]
    NoCertificate,
    #[error("the webhook's TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate the server presents; replaced when the Secret changes.
#[derive(Debug)]
pub struct CertificateSlot {
    current: RwLock<Arc<CertifiedKey>>,
    /// Bumped on every replacement, so open connections close and clients reconnect to the new certificate.
    generation: watch::Sender<u64>,
}

impl CertificateSlot {
    pub fn new(material: &TlsMaterial) -> Result<Self, TlsError> {
        Ok(CertificateSlot {
            current: RwLock::new(Arc::new(certified_key(material)?)),
            generation: watch::Sender::new(0),
        })
    }

    /// Serves `material` from the next handshake on.
    pub fn replace(&self, material: &TlsMaterial) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(material)?);
        *self.current.write() = key;
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        Ok(())
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn certified_key(material: &TlsMaterial) -> Result<CertifiedKey, TlsError> {
    let chain =
        CertificateDer::pem_slice_iter(material.cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(material.key.as_bytes())?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Answers AdmissionReviews from what the operator knows: the MeteringCollectors (the controller's cache) and the
/// namespaces excluded by flags.
pub struct Injector {
    pub collectors: CollectorView,
    /// `--exclude-namespaces`, the operator's own namespace and kube-system.
    pub static_excluded: BTreeSet<String>,
    pub metrics: Arc<WebhookMetrics>,
}

impl Injector {
    /// The AdmissionReview answering `body`, as sent on the wire: the patch, if any, base64-encoded (Go's
    /// encoding of `[]byte`).
    pub fn review(&self, body: &[u8]) -> serde_json::Value {
        let mut review = serde_json::to_value(self.answer(body)).unwrap_or_else(|error| {
            self.metrics.admitted("error", "encode");
            serde_json::json!({ "error": error.to_string() })
        });
        if let Some(patch) = review.pointer_mut("/response/patch") {
            let bytes: Vec<u8> = serde_json::from_value(patch.take()).unwrap_or_default();
            *patch = serde_json::Value::String(BASE64_STANDARD.encode(bytes));
        }
        review
    }

    /// The AdmissionReview answering `body`. Always allows the pod; a patch when it is injected.
    fn answer(&self, body: &[u8]) -> AdmissionReview<DynamicObject> {
        let request: AdmissionRequest<Pod> = match serde_json::from_slice::<AdmissionReview<Pod>>(
            body,
        )
        .map_err(|e| e.to_string())
        .and_then(|review| review.try_into().map_err(|e| format!("{e}")))
        {
            Ok(request) => request,
            Err(error) => {
                self.metrics.admitted("error", "invalid_review");
                tracing::warn!(%error, "the webhook received a request that is not an AdmissionReview of a Pod");
                return AdmissionResponse::invalid(format!(
                    "tally-operator expects an admission.k8s.io/v1 AdmissionReview of a Pod: {error}"
                ))
                .into_review();
            }
        };
        let response = AdmissionResponse::from(&request);
        let pod = match (&request.operation, &request.object) {
            (Operation::Create, Some(pod)) => pod,
            _ => {
                self.metrics
                    .admitted("skipped", super::SkipReason::NotPodCreate.label());
                return response.into_review();
            }
        };
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.namespace())
            .unwrap_or_default();
        let pod_name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
        let decided = self.collectors.with_well_formed(|collectors| {
            decide(pod, &namespace, collectors, &self.static_excluded)
        });
        match decided {
            Ok(Decision::Inject { collector, patch }) => match response.clone().with_patch(patch) {
                Ok(patched) => {
                    self.metrics.admitted("injected", "opted_in");
                    tracing::info!(%namespace, pod = %pod_name, %collector, "injected tally-sidecar");
                    patched.into_review()
                }
                Err(error) => self.failed(response, "patch", &error.to_string()),
            },
            Ok(Decision::Skip { reason, warning }) => {
                self.metrics.admitted("skipped", reason.label());
                tracing::debug!(%namespace, pod = %pod_name, reason = reason.label(), "not injected");
                let mut response = response;
                if let Some(warning) = warning {
                    tracing::info!(%namespace, pod = %pod_name, %warning, "not injected");
                    response.warnings = Some(vec![warning]);
                }
                response.into_review()
            }
            Err(error) => self.failed(response, "render", &error.to_string()),
        }
    }

    /// Admits the pod unchanged, counts the error and tells the client.
    fn failed(
        &self,
        mut response: AdmissionResponse,
        reason: &'static str,
        error: &str,
    ) -> AdmissionReview<DynamicObject> {
        self.metrics.admitted("error", reason);
        tracing::error!(%error, "tally-sidecar injection failed");
        response.warnings = Some(vec![format!("tally-sidecar not injected: {error}")]);
        response.into_review()
    }
}

/// Serves `POST /mutate` over TLS on `listener` until `shutdown` resolves; then open connections are closed.
///
/// The certificate reload is rustls's own: the [`CertificateSlot`] is the config's certificate resolver, swapped
/// under a lock. The server crates were weighed for this: axum-server's `RustlsConfig::reload_*` swaps the whole
/// config the same way, but leaves kept-alive connections presenting the old certificate (here they are closed
/// after their request in flight), and turns on hyper's HTTP/2 and h2 in every binary of the workspace; kubert's server reads its key and certificate from files on every connection (the certificate
/// lives in a Secret read through the API here) and takes no SEC1 keys.
pub async fn serve(
    listener: TcpListener,
    certificates: Arc<CertificateSlot>,
    injector: Arc<Injector>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(certificates.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accepting a webhook connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let injector = injector.clone();
                let mut renewed = certificates.generation.subscribe();
                connections.spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let service = service_fn(move |request| handle(request, injector.clone()));
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service);
                    tokio::pin!(connection);
                    loop {
                        tokio::select! {
                            result = connection.as_mut() => {
                                if let Err(error) = result {
                                    tracing::debug!(%peer, %error, "webhook connection ended with an error");
                                }
                                break;
                            }
                            // A renewed certificate: finish the request in flight, then close, so the client's
                            // next connection sees (and verifies) the new certificate.
                            Ok(()) = renewed.changed() => connection.as_mut().graceful_shutdown(),
                        }
                    }
                });
            }
        }
    }
    connections.shutdown().await;
    Ok(())
}

async fn handle(
    request: Request<Incoming>,
    injector: Arc<Injector>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != MUTATE_PATH {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            format!("not found; the webhook serves POST {MUTATE_PATH}"),
        ));
    }
    if request.method() != Method::POST {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{MUTATE_PATH} accepts POST only"),
        ));
    }
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            injector.metrics.admitted("error", "read_body");
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                format!(
                    "reading the AdmissionReview failed (at most {MAX_BODY_BYTES} bytes): {error}"
                ),
            ));
        }
    };
    match serde_json::to_vec(&injector.review(&body)) {
        Ok(json) => Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))),
        Err(error) => {
            injector.metrics.admitted("error", "encode");
            Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the AdmissionReview failed: {error}"),
            ))
        }
    }
}

fn plain(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
