//! The `tally-operator` binary: `crd` prints the CustomResourceDefinition, `run` runs the reconciler.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use tally_operator::metrics::Metrics;
use tally_operator::reconcile::{self, Context};

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
    Run {
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, env = "TALLY_OPERATOR_HTTP", default_value = "0.0.0.0:8080")]
        http: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => tally_operator::crd::crd_yaml()
            .map(|yaml| print!("{yaml}"))
            .context("rendering the CRD"),
        Command::Run { http } => run(http),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tally-operator: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(http: SocketAddr) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the Tokio runtime")?;
    runtime.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (kubeconfig or in-cluster service account)")?;
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let registry = Arc::new(registry);

        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(|| async { "ok" }))
            .route(
                "/metrics",
                get(move || {
                    let registry = registry.clone();
                    async move { encode_metrics(&registry) }
                }),
            );
        let listener = tokio::net::TcpListener::bind(http)
            .await
            .with_context(|| format!("binding {http}"))?;
        tracing::info!(%http, "serving /metrics, /healthz and /readyz");
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
        });

        let ctx = Arc::new(Context::new(client, metrics));
        reconcile::run(ctx, shutdown_signal()).await;
        tracing::info!("controller stopped");
        server
            .await
            .context("the HTTP server task")?
            .context("serving HTTP")?;
        Ok(())
    })
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

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
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
