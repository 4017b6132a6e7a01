//! `make bench`: the operator's reconcile latency, throughput and memory, measured with the release
//! `tally-operator` binary (leader election on, as deployed) against a local control plane (tally-e2e: etcd,
//! kube-apiserver, kube-controller-manager on 127.0.0.1). See BENCHMARKS.md, section "Operator".
//!
//! 1. Ceiling: server-side applies per second the benchmark itself gets from this API server (16 in flight),
//!    divided by the writes one new collector costs the operator (5 children + status), as collectors/s.
//! 2. Latency: 20 MeteringCollectors created one at a time; time from the create call to the StatefulSet's
//!    ADDED event on a watch opened beforehand. Median and p95; and, apart, the create call itself (the API
//!    server's share: its first create of a resource type takes about 2 s) and the time from its answer to the
//!    StatefulSet (the operator's share).
//! 3. Scale: 500 MeteringCollectors in 5 namespaces (16 creates in flight); time until every one has its
//!    StatefulSet and a status whose observedGeneration is current; reconciles/s from the operator's
//!    `tally_operator_reconciliations_total` over that interval; the operator's peak RSS (VmHWM), and its RSS once
//!    the reconcile counter has been still for 5 s.
//! 4. Failover: a second operator starts as a follower; time until its watch caches hold every collector
//!    (`tally_operator_cached_objects`); then the leader gets SIGTERM (it releases the Lease): time until the
//!    follower leads, and from then until it has reconciled every collector once, from its warm caches.
//!
//! `TALLY_BENCH_COLLECTORS` changes the count (every collector has a ClusterIP Service; tally-e2e's Service range,
//! `10.0.0.0/16`, has room for about 65,000).
//!
//! Every wait is bounded; the whole run fails with a message after [`RUN_LIMIT`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use tally_e2e::ControlPlane;
use tally_operator::crd::MeteringCollector;
use tally_tests::metrics::Exposition;
use tally_tests::poll::poll;
use tally_tests::ports::unused_port;
use tally_tests::report::{aligned_table, number};
use tokio::sync::mpsc;

/// The whole run, control plane start-up included.
const RUN_LIMIT: Duration = Duration::from_secs(600);
const LATENCY_COLLECTORS: usize = 20;
const SCALE_NAMESPACES: usize = 5;
/// Default of `TALLY_BENCH_COLLECTORS`.
const SCALE_COLLECTORS: usize = 500;
const IN_FLIGHT: usize = 16;
const CEILING_APPLIES: usize = 600;
/// Server-side applies of one new collector: ConfigMap, two Services, PodDisruptionBudget, StatefulSet, status.
const WRITES_PER_COLLECTOR: f64 = 6.0;
/// How long the reconcile counter must stand still before the steady RSS is read.
const SETTLE: Duration = Duration::from_secs(5);

const TARGET_LATENCY_P95_MS: f64 = 1000.0;
const TARGET_SCALE_SECONDS: f64 = 120.0;
const TARGET_PEAK_RSS_MIB: f64 = 256.0;

const COLLECTOR: &str = r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: NAME
spec:
  replicas: 1
  image: registry.invalid/tally-sidecar:1
  storage: { size: 1Gi }
  pipeline:
    outputs:
      targets:
        - { name: out, type: stdout }
"#;

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and must not start a long benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "tally-operator benchmark: run it with `make bench` (cargo bench -p tally-operator --bench operator)"
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("operator benchmark failed: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::time::timeout(RUN_LIMIT, run())
            .await
            .unwrap_or_else(|_| {
                bail!(
                    "did not finish within {RUN_LIMIT:?}; the operator or the control plane is stuck (see the logs \
                     named above)"
                )
            })
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("operator benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    println!("tally-operator benchmark: starting a local control plane");
    let control_plane = ControlPlane::start()
        .await
        .context("starting the control plane (e2e/k8s/build.sh builds its binaries)")?;
    let client = control_plane.client();
    install_crd(&client).await?;
    let operator_namespace = control_plane.new_namespace("tally-system").await?;

    let ceiling = apply_ceiling(&control_plane, &client).await?;

    let mut operator = OperatorProcess::start(&control_plane, &operator_namespace, "bench")?;
    println!(
        "operator pid {}, log {}",
        operator.child.id(),
        operator.log.display()
    );
    eventually(
        "the operator holds the lease",
        Duration::from_secs(60),
        || async { (operator.metric("tally_operator_leader").await? == 1.0).then_some(()) },
    )
    .await?;

    let Latencies {
        total: latencies,
        create_calls,
        after_create,
    } = latency(&control_plane, &client).await?;
    let count = match std::env::var("TALLY_BENCH_COLLECTORS") {
        Ok(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("TALLY_BENCH_COLLECTORS={text} is not a positive number"))?,
        Err(_) => SCALE_COLLECTORS,
    };
    let scale = scale(&control_plane, &client, &mut operator, count).await?;
    operator.ensure_running()?;
    let failover = failover(&control_plane, &operator_namespace, operator).await?;

    let mut figures = vec![
        Figure::new(
            "Ceiling: server-side applies/s (16 in flight)",
            ceiling,
            "/s",
            None,
        ),
        Figure::new(
            "Ceiling: new collectors/s (applies/s / 6 writes)",
            ceiling / WRITES_PER_COLLECTOR,
            "/s",
            None,
        ),
        Figure::new(
            "Create -> StatefulSet, median of 20",
            percentile(&latencies, 0.5),
            "ms",
            None,
        ),
        Figure::new(
            "Create -> StatefulSet, p95 of 20",
            percentile(&latencies, 0.95),
            "ms",
            Some(Bound::AtMost(TARGET_LATENCY_P95_MS)),
        ),
        Figure::new(
            "  of which the create call (API server), longest",
            create_calls.iter().copied().fold(0.0, f64::max),
            "ms",
            None,
        ),
        Figure::new(
            "  create answered -> StatefulSet (operator), p95",
            percentile(&after_create, 0.95),
            "ms",
            None,
        ),
        Figure::new(
            "Scale: creates done",
            scale.creates_done.as_secs_f64(),
            "s",
            None,
        ),
        Figure::new(
            "Scale: all StatefulSets + observedGeneration",
            scale.converged.as_secs_f64(),
            "s",
            Some(Bound::AtMost(TARGET_SCALE_SECONDS)),
        ),
        Figure::new(
            "Scale: collectors/s",
            scale.count as f64 / scale.converged.as_secs_f64(),
            "/s",
            Some(Bound::Ceiling(ceiling / WRITES_PER_COLLECTOR)),
        ),
        Figure::new(
            "Scale: reconciles/s (operator counter)",
            scale.reconciles / scale.converged.as_secs_f64(),
            "/s",
            None,
        ),
        Figure::new(
            "Scale: reconciles per collector",
            scale.reconciles / scale.count as f64,
            "",
            None,
        ),
        Figure::new("Scale: failed reconciles", scale.failures, "", None),
        Figure::new(
            "Operator peak RSS (VmHWM)",
            scale.peak_rss_mib,
            "MiB",
            Some(Bound::AtMost(TARGET_PEAK_RSS_MIB)),
        ),
        Figure::new(
            "Operator steady RSS after the scale run",
            scale.steady_rss_mib,
            "MiB",
            None,
        ),
    ];
    figures.push(Figure::new(
        "Reconciles/s after convergence, until 5 s still",
        scale.settled_rate,
        "/s",
        None,
    ));
    figures.extend([
        Figure::new(
            "Failover: follower start -> caches hold every collector",
            failover.warm.as_secs_f64() * 1000.0,
            "ms",
            None,
        ),
        Figure::new(
            "Failover: leader SIGTERM -> follower leads",
            failover.elected.as_secs_f64() * 1000.0,
            "ms",
            None,
        ),
        Figure::new(
            "Failover: new leader -> every collector reconciled",
            failover.caught_up.as_secs_f64() * 1000.0,
            "ms",
            None,
        ),
    ]);
    println!(
        "\nScale run: {count} MeteringCollectors in {SCALE_NAMESPACES} namespaces, {IN_FLIGHT} creates in flight"
    );
    print!("{}", table(&figures));
    let series = |values: &[f64]| {
        values
            .iter()
            .map(|l| format!("{l:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "\nlatencies (ms, in creation order): {}",
        series(&latencies)
    );
    println!("  of which the create call: {}", series(&create_calls));
    Ok(())
}

/// How many server-side applies per second this API server takes from one client with [`IN_FLIGHT`] in flight:
/// ConfigMaps of the size the operator writes, in a scratch namespace.
async fn apply_ceiling(control_plane: &ControlPlane, client: &Client) -> anyhow::Result<f64> {
    let namespace = control_plane.new_namespace("ceiling").await?;
    let api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let body = "x".repeat(600);
    let started = Instant::now();
    futures::stream::iter(0..CEILING_APPLIES)
        .map(|i| {
            let api = api.clone();
            let config_map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(format!("probe-{i}")),
                    ..ObjectMeta::default()
                },
                data: Some([("config.yaml".to_string(), body.clone())].into()),
                ..ConfigMap::default()
            };
            async move {
                api.patch(
                    &format!("probe-{i}"),
                    &PatchParams::apply("tally-bench").force(),
                    &Patch::Apply(&config_map),
                )
                .await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await
        .context("the ceiling's server-side applies")?;
    Ok(CEILING_APPLIES as f64 / started.elapsed().as_secs_f64())
}

/// The latency run's samples, in milliseconds, in creation order.
struct Latencies {
    /// From the create call to the StatefulSet's ADDED event.
    total: Vec<f64>,
    /// The create call alone, until the API server answered.
    create_calls: Vec<f64>,
    /// From the API server's answer to the StatefulSet's ADDED event.
    after_create: Vec<f64>,
}

/// Milliseconds from each create to its StatefulSet's ADDED event, and the two parts of that,
/// collectors created one at a time.
async fn latency(control_plane: &ControlPlane, client: &Client) -> anyhow::Result<Latencies> {
    let namespace = control_plane.new_namespace("latency").await?;
    let (seen, mut arrivals) = mpsc::unbounded_channel();
    let stateful_sets = Api::<StatefulSet>::namespaced(client.clone(), &namespace);
    let watch = tokio::spawn(async move {
        let mut events = watcher(stateful_sets, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            if let Ok(stateful_set) = event
                && seen
                    .send((stateful_set.name_any(), Instant::now()))
                    .is_err()
            {
                break;
            }
        }
    });
    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &namespace);
    let mut latencies = Latencies {
        total: Vec::with_capacity(LATENCY_COLLECTORS),
        create_calls: Vec::with_capacity(LATENCY_COLLECTORS),
        after_create: Vec::with_capacity(LATENCY_COLLECTORS),
    };
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1000.0;
    for i in 0..LATENCY_COLLECTORS {
        let name = format!("latency-{i}");
        let started = Instant::now();
        collectors
            .create(&PostParams::default(), &collector(&name)?)
            .await
            .with_context(|| format!("creating {namespace}/{name}"))?;
        let created = Instant::now();
        let arrived = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some((seen, at)) = arrivals.recv().await {
                if seen == name {
                    return Some(at);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .with_context(|| {
            format!("no StatefulSet {namespace}/{name} within 60 s of its collector")
        })?;
        latencies.total.push(ms(started, arrived));
        latencies.create_calls.push(ms(started, created));
        latencies.after_create.push(ms(created, arrived));
    }
    watch.abort();
    Ok(latencies)
}

struct Scale {
    count: usize,
    creates_done: Duration,
    converged: Duration,
    reconciles: f64,
    failures: f64,
    peak_rss_mib: f64,
    steady_rss_mib: f64,
    settled_rate: f64,
}

async fn scale(
    control_plane: &ControlPlane,
    client: &Client,
    operator: &mut OperatorProcess,
    count: usize,
) -> anyhow::Result<Scale> {
    let mut namespaces = Vec::new();
    for _ in 0..SCALE_NAMESPACES {
        namespaces.push(control_plane.new_namespace("scale").await?);
    }
    let reconciles_before = operator
        .metric("tally_operator_reconciliations_total")
        .await
        .context("reading the operator's /metrics")?;
    let failures_before = operator.failures().await;
    let started = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let namespace = &namespaces[i % SCALE_NAMESPACES];
            let api = Api::<MeteringCollector>::namespaced(client.clone(), namespace);
            let name = format!("scale-{i}");
            async move {
                api.create(&PostParams::default(), &collector(&name)?)
                    .await
                    .with_context(|| format!("creating {namespace}/{name}"))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    let creates_done = started.elapsed();
    println!(
        "created {count} collectors in {:.1} s; waiting for the operator",
        creates_done.as_secs_f64()
    );

    let mut last_report = Instant::now();
    let converged = loop {
        let (stateful_sets, current) = progress(client, &namespaces).await?;
        if stateful_sets == count && current == count {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "after 300 s only {stateful_sets} of {count} StatefulSets exist and {current} statuses are \
                 current; the operator's last warnings:\n{}",
                operator.warnings(10)
            );
        }
        operator.ensure_running()?;
        if last_report.elapsed() > Duration::from_secs(10) {
            println!(
                "  {:.0} s: {stateful_sets} StatefulSets, {current} statuses current",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let reconciles_after = operator
        .metric("tally_operator_reconciliations_total")
        .await
        .context("reading the operator's /metrics")?;
    let failures = operator.failures().await - failures_before;
    let peak_rss_mib = operator.proc_status_kib("VmHWM")? / 1024.0;

    // Steady: the counter has not moved for SETTLE (the StatefulSet controller's pod creations re-trigger
    // reconciles for a while).
    let settle_started = Instant::now();
    let mut still_since = Instant::now();
    let mut last = reconciles_after;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = operator
            .metric("tally_operator_reconciliations_total")
            .await
            .context("reading the operator's /metrics")?;
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= SETTLE {
            break;
        }
        if settle_started.elapsed() > Duration::from_secs(120) {
            println!(
                "the reconcile counter did not stand still for {SETTLE:?} within 120 s; reading RSS anyway"
            );
            break;
        }
    }
    let settled_rate = (last - reconciles_after) / settle_started.elapsed().as_secs_f64();
    let steady_rss_mib = operator.proc_status_kib("VmRSS")? / 1024.0;
    Ok(Scale {
        count,
        creates_done,
        converged,
        reconciles: reconciles_after - reconciles_before,
        failures,
        peak_rss_mib,
        steady_rss_mib,
        settled_rate,
    })
}

/// What the failover phase measured.
struct Failover {
    warm: Duration,
    elected: Duration,
    caught_up: Duration,
}

/// Starts a follower, waits until its caches hold every collector the leader sees, SIGTERMs the leader, and times
/// the follower's election and its first reconcile of every collector.
async fn failover(
    control_plane: &ControlPlane,
    namespace: &str,
    leader: OperatorProcess,
) -> anyhow::Result<Failover> {
    let collectors = leader
        .metric("tally_operator_collectors")
        .await
        .context("reading the leader's /metrics")?;
    let started = Instant::now();
    let mut follower = OperatorProcess::start(control_plane, namespace, "bench-follower")?;
    println!(
        "follower pid {}, log {}",
        follower.child.id(),
        follower.log.display()
    );
    let cached = r#"tally_operator_cached_objects{kind="MeteringCollector"}"#;
    eventually(
        "the follower's caches hold every collector",
        Duration::from_secs(120),
        || async {
            let text = follower.metrics().await?;
            (Exposition::parse(&text).value(cached) >= collectors).then_some(())
        },
    )
    .await?;
    let warm = started.elapsed();
    follower.ensure_running()?;
    if follower.metric("tally_operator_leader").await != Some(0.0) {
        bail!("the follower leads while the leader runs");
    }

    let terminated = Instant::now();
    leader.terminate()?;
    eventually_every(
        "the follower leads",
        Duration::from_secs(60),
        Duration::from_millis(10),
        || async { (follower.metric("tally_operator_leader").await? == 1.0).then_some(()) },
    )
    .await?;
    let elected_at = Instant::now();
    let elected = elected_at - terminated;
    eventually_every(
        "the new leader reconciles every collector",
        Duration::from_secs(300),
        Duration::from_millis(10),
        || async {
            let reconciled = follower
                .metric("tally_operator_reconciliations_total")
                .await?;
            (reconciled >= collectors).then_some(())
        },
    )
    .await?;
    let caught_up = elected_at.elapsed();
    follower.ensure_running()?;
    Ok(Failover {
        warm,
        elected,
        caught_up,
    })
}

/// StatefulSets, and collectors whose status.observedGeneration equals their generation, in `namespaces`.
async fn progress(client: &Client, namespaces: &[String]) -> anyhow::Result<(usize, usize)> {
    let mut stateful_sets = 0;
    let mut current = 0;
    for namespace in namespaces {
        stateful_sets += Api::<StatefulSet>::namespaced(client.clone(), namespace)
            .list_metadata(&ListParams::default())
            .await
            .with_context(|| format!("listing StatefulSets in {namespace}"))?
            .items
            .len();
        current += Api::<MeteringCollector>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await
            .with_context(|| format!("listing MeteringCollectors in {namespace}"))?
            .items
            .iter()
            .filter(|c| {
                c.metadata.generation.is_some()
                    && c.status.as_ref().and_then(|s| s.observed_generation)
                        == c.metadata.generation
            })
            .count();
    }
    Ok((stateful_sets, current))
}

/// The release operator binary, as a process with its own lease namespace and HTTP port.
struct OperatorProcess {
    child: Child,
    http: SocketAddr,
    log: PathBuf,
}

impl OperatorProcess {
    fn start(
        control_plane: &ControlPlane,
        namespace: &str,
        identity: &str,
    ) -> anyhow::Result<Self> {
        let binary = env!("CARGO_BIN_EXE_tally-operator");
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, unused_port()));
        let help = Command::new(binary)
            .args(["run", "--help"])
            .output()
            .with_context(|| format!("running {binary} run --help"))?;
        let help = String::from_utf8_lossy(&help.stdout);
        let webhook: &[&str] = if help.contains("--webhook <") || help.contains("--webhook ") {
            &["--webhook=false"]
        } else {
            &[]
        };
        let log = control_plane
            .dir()
            .join(format!("tally-operator-{identity}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(binary);
        tally_e2e::set_parent_death_signal(&mut command);
        let child = command
            .arg("run")
            .arg(format!("--http={http}"))
            .arg(format!("--namespace={namespace}"))
            .arg(format!("--identity={identity}"))
            .args(webhook)
            .env("KUBECONFIG", control_plane.kubeconfig_path())
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("opening the log twice")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        Ok(OperatorProcess { child, http, log })
    }

    /// The last `n` warning and error lines of the operator's log.
    fn warnings(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM: the operator stops reconciling, releases the Lease and exits.
    fn terminate(&self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("the operator's pid")?;
        // SAFETY: kill(2) with the pid of our own child and a valid signal number.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!(
                "SIGTERM to the operator: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("checking the operator")? {
            bail!("the operator exited ({status}); see {}", self.log.display());
        }
        Ok(())
    }

    async fn metrics(&self) -> Option<String> {
        let response = reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .ok()?;
        response.text().await.ok()
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let exposition = Exposition::parse(&self.metrics().await?);
        exposition.exposes(name).then(|| exposition.value(name))
    }

    /// The sum of every series of the reconcile failure counter.
    async fn failures(&self) -> f64 {
        match self.metrics().await {
            Some(text) => Exposition::parse(&text).value("tally_operator_reconcile_failures_total"),
            None => 0.0,
        }
    }

    fn proc_status_kib(&self, field: &str) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|line| {
                line.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .with_context(|| format!("no {field} in {path}"))
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collector(name: &str) -> anyhow::Result<MeteringCollector> {
    serde_yaml::from_str(&COLLECTOR.replace("NAME", name))
        .context("the benchmark's collector fixture")
}

async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.create(&PostParams::default(), &MeteringCollector::crd())
        .await
        .context("installing the MeteringCollector CRD")?;
    eventually(
        "the CRD is established",
        Duration::from_secs(60),
        || async {
            let crd = crds.get(MeteringCollector::crd_name()).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await?;
    // The type is served a moment after it is established.
    let probe = Api::<MeteringCollector>::all(client.clone());
    eventually("the CRD is served", Duration::from_secs(60), || async {
        probe
            .list(&ListParams::default().limit(1))
            .await
            .ok()
            .map(drop)
    })
    .await
}

async fn eventually<T>(
    what: &str,
    within: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    eventually_every(what, within, Duration::from_millis(100), check).await
}

async fn eventually_every<T>(
    what: &str,
    within: Duration,
    interval: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    poll(within, interval, check)
        .await
        .map_err(|()| anyhow!("timed out after {within:?} waiting until {what}"))
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// What a figure is compared with.
#[derive(Clone, Copy)]
enum Bound {
    /// A target the figure must stay under.
    AtMost(f64),
    /// What this machine allows at most; the ratio says how much of it is used.
    Ceiling(f64),
}

struct Figure {
    label: &'static str,
    value: f64,
    unit: &'static str,
    bound: Option<Bound>,
}

impl Figure {
    fn new(label: &'static str, value: f64, unit: &'static str, bound: Option<Bound>) -> Self {
        Figure {
            label,
            value,
            unit,
            bound,
        }
    }
}

/// The figures as an aligned text table, in the sidecar benchmark's layout.
fn table(figures: &[Figure]) -> String {
    let rows: Vec<[String; 5]> = figures
        .iter()
        .map(|f| {
            let (bound, ratio, verdict) = match f.bound {
                Some(Bound::AtMost(t)) => (
                    format!("target <= {} {}", number(t), f.unit),
                    format!("{:.2}", f.value / t),
                    if f.value <= t { "ok" } else { "MISSED" },
                ),
                Some(Bound::Ceiling(c)) => (
                    format!("ceiling {} {}", number(c), f.unit),
                    format!("{:.2}", f.value / c),
                    "",
                ),
                None => (String::new(), String::new(), ""),
            };
            [
                f.label.to_string(),
                format!("{} {}", number(f.value), f.unit)
                    .trim_end()
                    .to_string(),
                bound,
                ratio,
                verdict.to_string(),
            ]
        })
        .collect();
    aligned_table(&rows)
}
