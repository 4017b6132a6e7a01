//! Leader election between real `tally-operator` processes against a real control plane (tally-e2e): exactly one
//! holds the Lease and reconciles while the other keeps its watch caches warm; when the leader is SIGKILLed the
//! other takes the Lease over, reconciles what changed while nobody led, and what is created afterwards; a SIGTERMed leader exits 0 and releases the Lease so the follower takes over long before it
//! would expire; a leader whose Lease is taken from it stops and exits 1.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use support::{WITHIN, collector, control_plane_with_crd, create, eventually};
use tally_e2e::ControlPlane;
use tally_operator::crd::MeteringCollector;
use tally_tests::metrics::Exposition;
use tally_tests::poll::poll;
use tally_tests::ports::unused_port;

const LEASE_NAME: &str = "tally-operator";

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

/// Short timings so a takeover by expiry happens within seconds.
const FAST_LEASE: [&str; 3] = [
    "--lease-duration=3s",
    "--renew-deadline=2s",
    "--retry-period=500ms",
];

#[tokio::test]
async fn only_the_leader_reconciles_and_the_follower_takes_over_when_it_is_killed() {
    let cluster = Cluster::start().await;
    let mut a = cluster.operator("operator-a", &FAST_LEASE);
    let mut b = cluster.operator("operator-b", &FAST_LEASE);
    let first = cluster.leader_among(&[&a, &b]).await;
    let (leader, follower) = if first == a.identity {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let lease = cluster.lease().await.expect("the Lease exists");
    let transitions_before = lease.lease_transitions.unwrap_or(0);

    cluster.create_collector("first").await;
    cluster.stateful_set_appears("first").await;
    let leader_metrics = eventually("the leader counts its reconciles", || async {
        let metrics = leader.metrics().await?;
        (metric(&metrics, "tally_operator_reconciliations_total")? > 0.0).then_some(metrics)
    })
    .await;
    assert_eq!(metric(&leader_metrics, "tally_operator_leader"), Some(1.0));
    let follower_metrics = follower
        .metrics()
        .await
        .expect("the follower serves /metrics");
    assert_eq!(
        metric(&follower_metrics, "tally_operator_leader"),
        Some(0.0),
        "{follower_metrics}"
    );
    assert_eq!(
        metric(&follower_metrics, "tally_operator_reconciliations_total"),
        Some(0.0),
        "the follower reconciled: {follower_metrics}"
    );
    assert!(follower.ready().await, "a follower is ready too");
    eventually(
        "the follower caches the collector and its StatefulSet without leading",
        || async {
            let metrics = Exposition::parse(&follower.metrics().await?);
            let cached = |kind: &str| {
                metrics.value(&format!("tally_operator_cached_objects{{kind=\"{kind}\"}}"))
            };
            (cached("MeteringCollector") == 1.0 && cached("StatefulSet") == 1.0).then_some(())
        },
    )
    .await;

    leader.kill();
    // A change while nobody leads reaches the follower's cache but wakes no controller: the new leader must
    // reconcile every cached collector when it takes over.
    cluster.scale_collector("first", 3).await;
    let lease = eventually("the follower takes the Lease over", || async {
        let lease = cluster.lease().await?;
        (lease.holder_identity.as_deref() == Some(follower.identity.as_str())).then_some(lease)
    })
    .await;
    assert!(
        lease.lease_transitions.unwrap_or(0) > transitions_before,
        "leaseTransitions did not increase: {lease:?}"
    );

    cluster.stateful_set_has_replicas("first", 3).await;

    cluster.create_collector("second").await;
    cluster.stateful_set_appears("second").await;
    let metrics = follower.metrics().await.expect("the new leader's /metrics");
    assert_eq!(metric(&metrics, "tally_operator_leader"), Some(1.0));
    assert!(metric(&metrics, "tally_operator_reconciliations_total").unwrap_or(0.0) > 0.0);
}

#[tokio::test]
async fn a_terminated_leader_exits_0_and_releases_the_lease_to_the_follower() {
    let cluster = Cluster::start().await;
    // A lease far longer than the wait for the takeover: only a release can explain the new holder.
    let slow = [
        "--lease-duration=300s",
        "--renew-deadline=200s",
        "--retry-period=500ms",
    ];
    let mut a = cluster.operator("operator-a", &slow);
    let mut b = cluster.operator("operator-b", &slow);
    let first = cluster.leader_among(&[&a, &b]).await;
    let (leader, follower) = if first == a.identity {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let transitions_before = cluster
        .lease()
        .await
        .expect("the Lease exists")
        .lease_transitions
        .unwrap_or(0);
    let started = Instant::now();

    leader.terminate();
    let status = leader.exits().await;
    assert_eq!(
        status.code(),
        Some(0),
        "{status}; log: {}",
        leader.log.display()
    );
    let lease = eventually("the follower takes the released Lease", || async {
        let lease = cluster.lease().await?;
        (lease.holder_identity.as_deref() == Some(follower.identity.as_str())).then_some(lease)
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(300));
    assert_eq!(lease.lease_transitions, Some(transitions_before + 1));
    assert_eq!(lease.lease_duration_seconds, Some(300));

    cluster.create_collector("after-release").await;
    cluster.stateful_set_appears("after-release").await;
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_stops_and_exits_1() {
    let cluster = Cluster::start().await;
    let mut operator = cluster.operator("operator-a", &FAST_LEASE);
    cluster.leader_among(&[&operator]).await;

    // Someone else writes themselves into the Lease, as a replica would after a network partition.
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &cluster.operator_namespace);
    eventually("the Lease is taken from the leader", || async {
        let mut lease = leases.get(LEASE_NAME).await.ok()?;
        let now = k8s_openapi::jiff::Timestamp::now();
        lease.spec = Some(LeaseSpec {
            holder_identity: Some("intruder".into()),
            lease_duration_seconds: Some(300),
            renew_time: Some(MicroTime(now)),
            acquire_time: Some(MicroTime(now)),
            ..lease.spec.unwrap_or_default()
        });
        // A conflict means the leader renewed in between: try again.
        leases
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
            .ok()
    })
    .await;

    let status = operator.exits().await;
    assert_eq!(status.code(), Some(1), "{status}");
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(
        log.contains("lost the leader-election lease") && log.contains("intruder holds it now"),
        "the log does not say the lease was lost to the intruder:\n{log}"
    );
}

/// A control plane with the CRD, a namespace for the operators' Lease and one for collectors.
struct Cluster {
    control_plane: ControlPlane,
    client: Client,
    operator_namespace: String,
    namespace: String,
    /// `--webhook=false` when this build of the operator has a webhook (the tests need no certificates).
    extra_args: Vec<String>,
}

impl Cluster {
    async fn start() -> Self {
        let (control_plane, client, operator_namespace) = control_plane_with_crd("operator").await;
        let namespace = control_plane
            .new_namespace("collectors")
            .await
            .expect("namespace");
        let help = Command::new(env!("CARGO_BIN_EXE_tally-operator"))
            .args(["run", "--help"])
            .output()
            .expect("tally-operator run --help");
        let help = String::from_utf8_lossy(&help.stdout);
        let extra_args = if help.contains("--webhook <") || help.contains("--webhook ") {
            vec!["--webhook=false".to_string()]
        } else {
            Vec::new()
        };
        Cluster {
            control_plane,
            client,
            operator_namespace,
            namespace,
            extra_args,
        }
    }

    fn operator(&self, identity: &str, args: &[&str]) -> Operator {
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, unused_port()));
        let log = self.control_plane.dir().join(format!("{identity}.log"));
        let file = std::fs::File::create(&log).expect("operator log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally-operator"));
        tally_e2e::set_parent_death_signal(&mut command);
        let child = command
            .arg("run")
            .arg(format!("--http={http}"))
            .arg(format!("--namespace={}", self.operator_namespace))
            .arg(format!("--identity={identity}"))
            .args(args)
            .args(&self.extra_args)
            .env("KUBECONFIG", self.control_plane.kubeconfig_path())
            .env("RUST_LOG", "info,tally_operator=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("tally-operator starts");
        Operator {
            child,
            identity: identity.to_string(),
            http,
            log,
        }
    }

    async fn lease(&self) -> Option<LeaseSpec> {
        Api::<Lease>::namespaced(self.client.clone(), &self.operator_namespace)
            .get_opt(LEASE_NAME)
            .await
            .ok()??
            .spec
    }

    /// Waits until one of `operators` holds the Lease and every one of them serves /readyz; returns the holder.
    async fn leader_among(&self, operators: &[&Operator]) -> String {
        let holder = eventually("one operator holds the Lease", || async {
            let holder = self.lease().await?.holder_identity?;
            operators
                .iter()
                .any(|o| o.identity == holder)
                .then_some(holder)
        })
        .await;
        for operator in operators {
            eventually("every operator is ready", || operator.ready_or_none()).await;
        }
        holder
    }

    async fn create_collector(&self, name: &str) {
        let api = Api::<MeteringCollector>::namespaced(self.client.clone(), &self.namespace);
        create(&api, &collector(&COLLECTOR.replace("NAME", name))).await;
    }

    async fn scale_collector(&self, name: &str, replicas: i32) {
        Api::<MeteringCollector>::namespaced(self.client.clone(), &self.namespace)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": { "replicas": replicas } })),
            )
            .await
            .expect("patching the collector's replicas");
    }

    async fn stateful_set_has_replicas(&self, name: &str, replicas: i32) {
        let api = Api::<StatefulSet>::namespaced(self.client.clone(), &self.namespace);
        eventually(
            &format!("the StatefulSet {name} asks for {replicas} replicas"),
            || async {
                let spec = api.get(name).await.ok()?.spec;
                (spec.replicas == Some(replicas)).then_some(())
            },
        )
        .await;
    }

    async fn stateful_set_appears(&self, name: &str) {
        let api = Api::<StatefulSet>::namespaced(self.client.clone(), &self.namespace);
        eventually(&format!("the StatefulSet {name} exists"), || async {
            api.get_opt(name).await.ok()?
        })
        .await;
    }
}

/// A running `tally-operator run`; dropping it kills the process.
struct Operator {
    child: Child,
    identity: String,
    http: SocketAddr,
    log: PathBuf,
}

impl Operator {
    async fn metrics(&self) -> Option<String> {
        let response = reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    }

    async fn ready(&self) -> bool {
        self.ready_or_none().await.is_some()
    }

    async fn ready_or_none(&self) -> Option<()> {
        let response = reqwest::get(format!("http://{}/readyz", self.http))
            .await
            .ok()?;
        response.status().is_success().then_some(())
    }

    fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill(2) with a pid of our own child and a valid signal number.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM to {}", self.identity);
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until the process exits, failing after [`WITHIN`].
    async fn exits(&mut self) -> ExitStatus {
        let exited = poll(WITHIN, Duration::from_millis(100), async || {
            self.child.try_wait().expect("try_wait")
        })
        .await;
        exited.unwrap_or_else(|()| {
            panic!(
                "{} did not exit within {WITHIN:?}; log: {}",
                self.identity,
                self.log.display()
            )
        })
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- last lines of {} ({}) ----\n{}",
                self.identity,
                self.log.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// The value of a metric in Prometheus text, `None` when it is not exposed.
fn metric(text: &str, name: &str) -> Option<f64> {
    let exposition = Exposition::parse(text);
    exposition.exposes(name).then(|| exposition.value(name))
}
