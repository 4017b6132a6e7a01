//! The webhook as `tally-operator run` runs it on every replica (serving needs no lease): its flags, the
//! certificate Secret, the TLS server, and the MutatingWebhookConfiguration kept current. It reads the
//! MeteringCollectors from the controller's watch cache ([`CollectorView`]), which every replica keeps.
//!
//! One loop does the maintenance, on a timer and whenever a MeteringCollector changes: read (and, when due, renew)
//! the certificate Secret, then apply the configuration if its caBundle or excluded namespaces changed, then serve
//! a new certificate. Applying the caBundle before serving a certificate from a new CA keeps the API server
//! trusting the webhook throughout a rotation.
//!
//! Only the leader writes the configuration, so replicas that briefly disagree (one has seen a collector change or
//! a renewed Secret, another not yet) cannot undo each other's writes. A follower serves a renewed certificate
//! once it sees the leader's configuration trust that certificate's CA.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Client;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::certs::{self, CertificateSettings, Issued};
use super::config::{
    self, CertificateSource, FailurePolicy, WebhookEndpoint, webhook_configuration,
    with_injected_ca,
};
use super::metrics::WebhookMetrics;
use super::server::{self, CertificateSlot, Injector, MUTATE_PATH};
use super::{ALWAYS_EXCLUDED, excluded_namespaces};
use crate::caches::CollectorView;

/// Longest wait for the cache's first list of MeteringCollectors before the configuration is applied anyway (the
/// CRD may not be installed yet; the watch keeps retrying).
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(10);
/// The configuration is applied again this often even when nothing changed, to undo edits by others.
const REAPPLY_EVERY: Duration = Duration::from_secs(300);
/// Shortest accepted `--cert-validity`.
const MIN_VALIDITY: Duration = Duration::from_secs(10);

/// Flags of the sidecar-injection webhook (flattened into `tally-operator run`).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
#[command(next_help_heading = "Sidecar-injection webhook")]
pub struct WebhookArgs {
    /// Serve the sidecar-injection webhook and keep its MutatingWebhookConfiguration current.
    #[arg(long = "webhook", env = "TALLY_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub webhook: bool,
    /// Address of the webhook's HTTPS server (path /mutate).
    #[arg(
        long,
        env = "TALLY_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:9443",
        value_name = "ADDR"
    )]
    pub webhook_listen: SocketAddr,
    /// URL the API server calls, e.g. https://127.0.0.1:9443/mutate, for an operator out of cluster; its host is
    /// added to the certificate. Without it the API server calls --webhook-service.
    #[arg(long, env = "TALLY_WEBHOOK_URL", value_name = "URL")]
    pub webhook_url: Option<String>,
    /// Service (in --namespace, port 443) in front of the webhook.
    #[arg(
        long,
        env = "TALLY_WEBHOOK_SERVICE",
        default_value = "tally-operator-webhook",
        value_name = "NAME"
    )]
    pub webhook_service: String,
    /// Secret (in --namespace) holding the webhook's serving certificate, its key and the caBundle.
    #[arg(
        long,
        env = "TALLY_WEBHOOK_SECRET",
        default_value = "tally-operator-webhook-tls",
        value_name = "NAME"
    )]
    pub webhook_secret: String,
    /// Secret (in --namespace) holding the webhook's CA certificate and key, kept apart from the serving key.
    #[arg(
        long,
        env = "TALLY_WEBHOOK_CA_SECRET",
        default_value = "tally-operator-webhook-ca",
        value_name = "NAME"
    )]
    pub webhook_ca_secret: String,
    /// Name of the MutatingWebhookConfiguration the operator keeps current.
    #[arg(
        long,
        env = "TALLY_WEBHOOK_CONFIGURATION",
        default_value = "tally-operator",
        value_name = "NAME"
    )]
    pub webhook_configuration: String,
    /// What the API server does when the webhook cannot be reached: Ignore admits the pod without a sidecar.
    #[arg(long, env = "TALLY_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::Ignore)]
    pub failure_policy: FailurePolicy,
    /// Who issues the serving certificate: the operator (self-signed CA, renewed automatically) or cert-manager
    /// (a Certificate writing --webhook-secret; its CA injector fills the caBundle).
    #[arg(long, env = "TALLY_WEBHOOK_CERTIFICATES", value_enum, default_value_t = CertificateSource::Operator, value_name = "SOURCE")]
    pub webhook_certificates: CertificateSource,
    /// With --webhook-certificates cert-manager: the cert-manager Certificate (in --namespace) that writes
    /// --webhook-secret, named in the configuration's cert-manager.io/inject-ca-from annotation.
    #[arg(
        long,
        env = "TALLY_WEBHOOK_CERTIFICATE",
        default_value = "tally-operator-webhook",
        value_name = "NAME"
    )]
    pub webhook_certificate: String,
    /// Lifetime of the serving certificate; it is renewed when less than a third remains.
    #[arg(long, env = "TALLY_CERT_VALIDITY", default_value = "8760h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub cert_validity: Duration,
    /// Namespaces never injected, in addition to every injection-enabled collector's excludeNamespaces,
    /// --namespace and kube-system.
    #[arg(
        long,
        env = "TALLY_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        value_name = "NAMESPACES"
    )]
    pub exclude_namespaces: Vec<String>,
}

/// A flag value the webhook cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(
        "--webhook-url {url:?}: {problem}; write the URL the API server should call, like https://127.0.0.1:9443{MUTATE_PATH}"
    )]
    Url { url: String, problem: String },
    #[error("--cert-validity {0:?} is too short; use at least 10s (the default is 8760h)")]
    Validity(Duration),
}

impl WebhookArgs {
    /// How the API server reaches the webhook.
    pub fn endpoint(&self, namespace: &str) -> Result<WebhookEndpoint, ArgsError> {
        match &self.webhook_url {
            Some(url) => {
                url_host(url)?;
                Ok(WebhookEndpoint::Url(url.clone()))
            }
            None => Ok(WebhookEndpoint::Service {
                namespace: namespace.into(),
                name: self.webhook_service.clone(),
            }),
        }
    }

    /// What the serving certificate must say: the Service's DNS names, and the host of --webhook-url.
    pub fn certificate_settings(&self, namespace: &str) -> Result<CertificateSettings, ArgsError> {
        if self.cert_validity < MIN_VALIDITY {
            return Err(ArgsError::Validity(self.cert_validity));
        }
        let service = &self.webhook_service;
        let mut dns_names = vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ];
        let mut ip_addresses = Vec::new();
        if let Some(url) = &self.webhook_url {
            match url_host(url)? {
                Host::Ip(ip) => ip_addresses.push(ip),
                Host::Name(name) if !dns_names.contains(&name) => dns_names.push(name),
                Host::Name(_) => {}
            }
        }
        Ok(CertificateSettings {
            namespace: namespace.into(),
            secret: self.webhook_secret.clone(),
            ca_secret: self.webhook_ca_secret.clone(),
            dns_names,
            ip_addresses,
            validity: self.cert_validity,
        })
    }

    /// `--exclude-namespaces`, `namespace` (the operator's own) and kube-system.
    pub fn static_excluded(&self, namespace: &str) -> BTreeSet<String> {
        self.exclude_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .chain([namespace.to_string(), ALWAYS_EXCLUDED.to_string()])
            .collect()
    }

    /// How often the certificate Secret is read: a tenth of the validity, between 1s and 30s.
    fn poll_interval(&self) -> Duration {
        (self.cert_validity / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }
}

enum Host {
    Ip(IpAddr),
    Name(String),
}

fn url_host(url: &str) -> Result<Host, ArgsError> {
    let problem = |problem: &str| ArgsError::Url {
        url: url.into(),
        problem: problem.into(),
    };
    let uri: http::Uri = url.parse().map_err(|_| problem("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(problem("the API server calls webhooks over https only"));
    }
    if uri.query().is_some() {
        return Err(problem("webhook URLs cannot have a query"));
    }
    let host = uri.host().ok_or_else(|| problem("no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok(match bare.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(bare.to_ascii_lowercase()),
    })
}

/// Aborts a task when dropped, so the server does not outlive the webhook.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the webhook until `shutdown` resolves: certificate, server and configuration, on the `collectors` of the
/// controller's cache. Returns at once when `--webhook false`. `leading` says whether this replica holds the
/// leader-election Lease (always true without leader election); only then does it write the configuration.
pub async fn run(
    client: Client,
    collectors: CollectorView,
    namespace: String,
    args: WebhookArgs,
    metrics: Arc<WebhookMetrics>,
    mut leading: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    if !args.webhook {
        tracing::info!("the sidecar-injection webhook is disabled (--webhook false)");
        return Ok(());
    }
    let endpoint = args.endpoint(&namespace)?;
    let settings = args.certificate_settings(&namespace)?;
    let static_excluded = args.static_excluded(&namespace);
    let poll = args.poll_interval();
    tokio::pin!(shutdown);

    let from_cert_manager = args.webhook_certificates == CertificateSource::CertManager;
    let obtain = || async {
        if from_cert_manager {
            certs::read_provided(&client, &settings).await
        } else {
            certs::ensure(&client, &settings).await
        }
    };
    let mut current = loop {
        match obtain().await {
            Ok(issued) => break issued,
            Err(error) => {
                tracing::warn!(%error, "the webhook has no certificate yet; retrying");
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(poll) => {}
                }
            }
        }
    };
    metrics.certificate_expiry.set(current.not_after);
    let slot = Arc::new(CertificateSlot::new(&current.material)?);
    let listener = TcpListener::bind(args.webhook_listen)
        .await
        .with_context(|| format!("binding the webhook's address {}", args.webhook_listen))?;
    tracing::info!(listen = %args.webhook_listen, path = MUTATE_PATH, "serving the sidecar-injection webhook");
    let injector = Arc::new(Injector {
        collectors: collectors.clone(),
        static_excluded: static_excluded.clone(),
        metrics: metrics.clone(),
    });
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = AbortOnDrop(tokio::spawn(server::serve(
        listener,
        slot.clone(),
        injector,
        async move {
            let _ = server_stopped.await;
        },
    )));

    tokio::select! {
        () = &mut shutdown => return Ok(()),
        _ = tokio::time::timeout(FIRST_SYNC_WAIT, collectors.store.wait_until_ready()) => {}
    }

    let mut applied: Option<(MutatingWebhookConfiguration, Instant)> = None;
    let mut renewed: Option<Issued> = None;
    loop {
        match obtain().await {
            Ok(issued) if issued.material != current.material => renewed = Some(issued),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "checking the webhook certificate"),
        }
        let bundle = renewed
            .as_ref()
            .unwrap_or(&current)
            .material
            .ca_bundle
            .clone();
        let excluded =
            collectors.with_well_formed(|fitting| excluded_namespaces(fitting, &static_excluded));
        let mut desired = webhook_configuration(
            &args.webhook_configuration,
            &endpoint,
            &bundle,
            &excluded,
            args.failure_policy,
        );
        if from_cert_manager {
            desired = with_injected_ca(
                desired,
                &format!("{namespace}/{}", args.webhook_certificate),
            );
        }
        let leader = *leading.borrow_and_update();
        let due = leader
            && match &applied {
                Some((last, at)) => *last != desired || at.elapsed() >= REAPPLY_EVERY,
                None => true,
            };
        // With cert-manager the injector keeps the caBundle trusting the Certificate's CA.
        let mut bundle_applied = from_cert_manager || (leader && !due);
        if !from_cert_manager && !leader && renewed.is_some() {
            bundle_applied = match config::get(&client, &args.webhook_configuration).await {
                Ok(live) => live.is_some_and(|live| config::trusts(&live, &bundle)),
                Err(error) => {
                    tracing::warn!(%error, configuration = %args.webhook_configuration,
                        "reading the MutatingWebhookConfiguration failed; retrying");
                    false
                }
            };
        }
        if due {
            match config::apply(&client, &desired).await {
                Ok(_) => {
                    tracing::info!(configuration = %args.webhook_configuration,
                        excluded = ?excluded, "applied the MutatingWebhookConfiguration");
                    applied = Some((desired, Instant::now()));
                    bundle_applied = true;
                }
                Err(error) => tracing::warn!(%error, configuration = %args.webhook_configuration,
                    "applying the MutatingWebhookConfiguration failed; retrying"),
            }
        }
        // Serve a renewed certificate only once the API server has been told to trust its CA.
        if bundle_applied && let Some(issued) = renewed.take() {
            match slot.replace(&issued.material) {
                Ok(()) => {
                    tracing::info!(
                        not_after = issued.not_after,
                        "serving the renewed webhook certificate"
                    );
                    metrics.certificate_expiry.set(issued.not_after);
                    current = issued;
                }
                Err(error) => {
                    tracing::error!(%error, "the renewed webhook certificate cannot be served")
                }
            }
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = collectors.changed.notified() => {}
            Ok(()) = leading.changed() => {}
            () = tokio::time::sleep(poll) => {}
            result = &mut server.0 => {
                return match result {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the webhook server stopped unexpectedly")),
                    Ok(Err(error)) => Err(error).context("serving the webhook"),
                    Err(error) => Err(error).context("the webhook server task"),
                };
            }
        }
    }
    let _ = stop_server.send(());
    match (&mut server.0).await {
        Ok(result) => result.context("serving the webhook"),
        Err(error) => Err(error).context("the webhook server task"),
    }
}
