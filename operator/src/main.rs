//! The `tally-operator` binary: `crd` prints the CustomResourceDefinition, `run` runs the operator.
//!
//! `run` is: parse the command line → set up logging → connect to Kubernetes → serve /metrics, /healthz and
//! /readyz → spawn the long-running tasks (the watch caches on every replica, the reconciler behind leader election)
//! → wait until a signal or a failed task stops them all. Exit codes: 0 after SIGTERM or SIGINT, 1 on a runtime
//! error (a lost lease included), 2 on a usage error.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use prometheus_client::registry::Registry;
use tally_operator::caches;
use tally_operator::inject::WebhookArgs;
use tally_operator::inject::metrics::WebhookMetrics;
use tally_operator::leader::{self, Election};
use tally_operator::metrics::Metrics;
use tally_operator::reconcile::{self, Context};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(version, about = "Kubernetes operator for Tally metering collectors")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the MeteringCollector CustomResourceDefinition as YAML.
    Crd,
    /// Reconcile MeteringCollectors with the cluster of the current kubeconfig or service account.
    // Boxed: the flags are far larger than the other variants.
    Run(Box<RunArgs>),
}

#[derive(Args)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "TALLY_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// The operator's own namespace: the leader-election Lease and the webhook certificate Secret live here; it is
    /// never injected.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tally-system")]
    namespace: String,
    /// Leader-election identity and Event reporter instance [default: <hostname>-<pid>].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[command(flatten)]
    leader: LeaderArgs,
    #[command(flatten, next_help_heading = "Sidecar-injection webhook")]
    webhook: WebhookArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Args)]
#[command(next_help_heading = "Leader election")]
struct LeaderArgs {
    /// Run the reconciler only while holding the Lease (every replica serves the webhook regardless).
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    leader_elect: bool,
    /// Name of the coordination.k8s.io Lease in --namespace.
    #[arg(long, default_value = "tally-operator", value_name = "NAME")]
    lease_name: String,
    /// How long followers wait after the leader's last renewal before taking over.
    #[arg(long, default_value = "15s", value_parser = parse_duration, value_name = "DURATION")]
    lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives leadership up (and exits 1).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    renew_deadline: Duration,
    /// How often followers try to take the Lease and the leader renews it.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    retry_period: Duration,
}

#[derive(Args)]
#[command(next_help_heading = "Logging")]
struct LogArgs {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, like `info` or `info,tally_operator=debug`; RUST_LOG overrides it.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e}; write a number with a unit, like 500ms, 15s or 1m"))
}

/// Why `run` failed, which decides the exit code.
enum Failure {
    /// The command line is wrong (exit 2).
    Usage(String),
    /// Something failed while running (exit 1).
    Runtime(anyhow::Error),
}

fn main() -> ExitCode {
    // Clap exits 2 on a usage error it finds itself, 0 after --help.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => tally_operator::crd::crd_yaml()
            .map(|yaml| print!("{yaml}"))
            .context("rendering the CRD")
            .map_err(Failure::Runtime),
        Command::Run(args) => run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("tally-operator: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(error)) => {
            eprintln!("tally-operator: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let election = Election {
        lease_name: args.leader.lease_name.clone(),
        namespace: args.namespace.clone(),
        identity: args.identity.clone().unwrap_or_else(default_identity),
        lease_duration: args.leader.lease_duration,
        renew_deadline: args.leader.renew_deadline,
        retry_period: args.leader.retry_period,
    };
    if args.leader.leader_elect {
        election.validate().map_err(Failure::Usage)?;
    }
    if args.webhook.webhook {
        args.webhook
            .endpoint(&args.namespace)
            .and(args.webhook.certificate_settings(&args.namespace))
            .map_err(|e| Failure::Usage(e.to_string()))?;
    }
    init_tracing(&args.log).map_err(Failure::Usage)?;
    let runtime = tokio::runtime::Runtime::new()
        .context("starting the Tokio runtime")
        .map_err(Failure::Runtime)?;
    runtime
        .block_on(operate(args, election))
        .map_err(Failure::Runtime)
}

/// Connects, serves HTTP, spawns the tasks and waits for them.
async fn operate(args: RunArgs, election: Election) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signals();
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (kubeconfig or in-cluster service account)")?;
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let webhook_metrics = Arc::new(WebhookMetrics::default());
    webhook_metrics.register(&mut registry);

    let mut tasks = Tasks::new(shutdown.clone());
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding --http {}", args.http))?;
    tracing::info!(http = %args.http, "serving /metrics, /healthz and /readyz");
    tasks.spawn(
        "the HTTP server",
        serve_http(listener, Arc::new(registry), shutdown.requested()),
    );

    // Followers keep the caches too, so a new leader starts reconciling without listing anything. The webhook reads
    // the collectors from them as well.
    let (triggers, children, watches) = caches::watch(&client, &metrics, shutdown.requested());

    // Every replica serves the webhook; only the leader writes its configuration.
    let (leading, leading_rx) = tokio::sync::watch::channel(!args.leader.leader_elect);
    tasks.spawn(
        "the sidecar-injection webhook",
        tally_operator::inject::run(
            client.clone(),
            triggers.collector_view(),
            args.namespace.clone(),
            args.webhook.clone(),
            webhook_metrics,
            leading_rx,
            shutdown.requested(),
        ),
    );

    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        children,
        Some(election.identity.clone()),
    ));
    tasks.spawn("the watch caches", async move {
        watches.await;
        Ok(())
    });
    if args.leader.leader_elect {
        tasks.spawn("the elected reconciler", async move {
            leader::lead_when_elected(client, election, metrics, shutdown.requested(), |stop| {
                // A lost lease ends the process, so leadership is never taken back here.
                leading.send_replace(true);
                reconcile::run(ctx, triggers, async move {
                    let _ = stop.await;
                })
            })
            .await
            .map_err(anyhow::Error::from)
        });
    } else {
        tracing::warn!("--leader-elect=false: reconciling without a lease; run only one replica");
        metrics.leader.set(1);
        tasks.spawn("the reconciler", async move {
            reconcile::run(ctx, triggers, shutdown.requested()).await;
            Ok(())
        });
    }

    tasks.wait().await
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        // Followers are ready too: every replica serves the webhook.
        .route("/readyz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { encode_metrics(&registry) }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}

fn encode_metrics(registry: &Registry) -> impl IntoResponse + use<> {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            error.to_string(),
        ),
    }
}

fn init_tracing(log: &LogArgs) -> Result<(), String> {
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => tracing_subscriber::EnvFilter::try_new(&log.log_level)
            .map_err(|e| format!("--log-level {:?}: {e}", log.log_level))?,
    };
    // Colours only on a terminal: a log file or `kubectl logs` would show the escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match log.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// `<hostname>-<pid>`, unique among replicas on different hosts and among processes on one.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tally-operator".into());
    format!("{host}-{}", std::process::id())
}

/// The process-wide shutdown: requested by SIGTERM or SIGINT, or when a task fails.
#[derive(Clone)]
struct Shutdown(Arc<watch::Sender<bool>>);

impl Shutdown {
    fn on_signals() -> Self {
        let shutdown = Shutdown(Arc::new(watch::channel(false).0));
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            signal().await;
            tracing::info!("signal received; shutting down");
            trigger.trigger();
        });
        shutdown
    }

    fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once shutdown is requested.
    fn requested(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut requested = self.0.subscribe();
        async move {
            // An error means the sender is gone, which only happens when everything is shutting down anyway.
            let _ = requested.wait_for(|requested| *requested).await;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// The long-running tasks: when one fails, the others are asked to shut down, and the first failure is the
/// process's.
struct Tasks {
    set: JoinSet<(&'static str, anyhow::Result<()>)>,
    shutdown: Shutdown,
}

impl Tasks {
    fn new(shutdown: Shutdown) -> Self {
        Tasks {
            set: JoinSet::new(),
            shutdown,
        }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.set.spawn(async move { (name, task.await) });
    }

    async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_failure = None;
        while let Some(joined) = self.set.join_next().await {
            let failure = match joined {
                Ok((_, Ok(()))) => continue,
                Ok((name, Err(error))) => error.context(format!("{name} failed")),
                Err(error) => anyhow::anyhow!("a task panicked: {error}"),
            };
            tracing::error!(error = format!("{failure:#}"), "stopping");
            self.shutdown.trigger();
            first_failure.get_or_insert(failure);
        }
        first_failure.map_or(Ok(()), Err)
    }
}
