//! Starting, using and stopping one control plane.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    ops::ControlFlow,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{
    Api, Client, Config,
    api::{ListParams, ObjectMeta, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tally_tests::poll::{API_INTERVAL, poll};
use tally_tests::ports::unused_ports;
use tempfile::TempDir;
use tokio::time::{Instant, timeout};

use crate::{
    Error,
    binaries::{Binaries, FakeNodeBinaries, kubernetes_bin_dir, kubernetes_binary},
    kubeconfig,
    node::{HOST_IP, NODE_NAME, NodeNetwork, NodeStart, RealNode, create_host_path_volumes},
    pki::Pki,
    process::ComponentProcess,
};

/// The label every namespace made by [`ControlPlane::new_namespace`] carries, with value `"true"`.
pub const NAMESPACE_LABEL: &str = "tally.dev/e2e";

/// The controllers kube-controller-manager runs: what Tally's operator relies on (StatefulSets and their PVCs,
/// Deployments, ReplicaSets, owner-reference garbage collection), namespace deletion, and the PersistentVolume
/// binder, which binds a claim to a matching PersistentVolume a test creates (the API server only resizes bound
/// claims). There is no kubelet, and no scheduler unless asked for, so Pods are created but never run.
const CONTROLLERS: &[&str] = &[
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "persistentvolume-binder-controller",
];

/// What a real node needs on top: service accounts and their CA bundle for pods, EndpointSlices for kube-proxy and
/// CoreDNS, the node lifecycle (the not-ready taint lifted once the kubelet reports Ready), Jobs, DaemonSets,
/// PodDisruptionBudgets, volume attachment and protection, and the pod garbage collector.
const REAL_NODE_CONTROLLERS: &[&str] = &[
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "endpointslice-controller",
    "endpoints-controller",
    "node-lifecycle-controller",
    "job-controller",
    "daemonset-controller",
    "disruption-controller",
    "persistentvolume-attach-detach-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
    "pod-garbage-collector-controller",
    "taint-eviction-controller",
];

/// Wide enough for the operator benchmark: every MeteringCollector has a ClusterIP Service.
pub(crate) const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/16";

const ETCD_READY_WITHIN: Duration = Duration::from_secs(30);
/// The API server is ready within a few seconds (it bootstraps RBAC roles and priority levels first); the margin is
/// for a machine busy with builds.
const APISERVER_READY_WITHIN: Duration = Duration::from_secs(120);
const CONTROLLER_MANAGER_READY_WITHIN: Duration = Duration::from_secs(60);
const SCHEDULER_READY_WITHIN: Duration = Duration::from_secs(60);
const KWOK_READY_WITHIN: Duration = Duration::from_secs(60);
/// The annotation that hands a Node to kwok (`--manage-nodes-with-annotation-selector`).
pub const FAKE_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// Pod IPs kwok hands out; apart from the Service range.
const FAKE_POD_CIDR: &str = "10.244.0.0/16";
/// Lines of each component's log printed when start-up fails.
const LOG_TAIL_LINES: usize = 40;

/// A running etcd, kube-apiserver and kube-controller-manager on 127.0.0.1, in a fresh temporary directory.
///
/// Dropping it (or calling [`ControlPlane::stop`]) kills every process and deletes the directory. Set
/// `TALLY_E2E_KEEP_DIR=1` to keep the directory (logs, certificates, kubeconfig) for inspection. The processes also
/// die with the test process, even when it is killed.
///
/// The [`kube::Client`] it hands out runs on the Tokio runtime that called [`ControlPlane::start`]; start one
/// control plane per `#[tokio::test]` (it takes about 3 s) rather than sharing one across runtimes.
pub struct ControlPlane {
    node: Option<RealNode>,
    processes: Vec<ComponentProcess>,
    client: Client,
    server: String,
    kubeconfig: PathBuf,
    dir: TempDir,
}

/// Options of a control plane; [`ControlPlane::start`] starts one with none of them.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneBuilder {
    fake_nodes: usize,
    real_node: bool,
}

impl ControlPlaneBuilder {
    /// Also run `kube-scheduler` and kwok, with `nodes` fake Nodes (`kwok-node-0`, …) that kwok manages: pods are
    /// scheduled onto them and kwok marks them Running and Ready, without any container running. Needs
    /// `e2e/kwok/build.sh` besides `e2e/k8s/build.sh`. 0 (the default) runs neither.
    pub fn with_fake_nodes(mut self, nodes: usize) -> Self {
        self.fake_nodes = nodes;
        self
    }

    /// Also run a real node ([`RealNode`]): containerd, a kubelet, kube-proxy, the CNI bridge and CoreDNS, in a
    /// network namespace of their own, with the scheduler and the controllers pods need. The API server then listens
    /// on the host's end of the node's veth pair ([`RealNode::host_ip`]) instead of 127.0.0.1, so pods reach it
    /// through the `kubernetes` Service. One real node runs on a machine at a time: a second start waits for the
    /// first to stop. Needs root, Debian's containerd, and `e2e/k8s/build.sh` and `e2e/coredns/build.sh`.
    pub fn with_real_node(mut self) -> Self {
        self.real_node = true;
        self
    }

    /// Starts the control plane (see [`ControlPlane::start`]), then the scheduler and kwok or the real node if asked
    /// for, and waits until every Node is Ready.
    pub async fn start(self) -> Result<ControlPlane, Error> {
        let fake_nodes = if self.fake_nodes > 0 {
            Some((FakeNodeBinaries::locate()?, self.fake_nodes))
        } else {
            None
        };
        ControlPlane::start_with(fake_nodes, self.real_node).await
    }
}

impl ControlPlane {
    /// Options beyond the plain control plane, such as [`ControlPlaneBuilder::with_fake_nodes`].
    pub fn builder() -> ControlPlaneBuilder {
        ControlPlaneBuilder::default()
    }

    /// Starts etcd, then kube-apiserver, then kube-controller-manager, each waited for until healthy.
    ///
    /// On failure, prints the tail of every component's log to stderr and stops what was started.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(None, false).await
    }

    async fn start_with(
        fake_nodes: Option<(FakeNodeBinaries, usize)>,
        real_node: bool,
    ) -> Result<Self, Error> {
        let binaries = Binaries::locate()?;
        let mut dir = tempfile::Builder::new()
            .prefix("tally-e2e-")
            .tempdir()
            .map_err(|e| Error::io("creating the control plane's temporary directory", e))?;
        if std::env::var_os("TALLY_E2E_KEEP_DIR").is_some_and(|v| !v.is_empty() && v != "0") {
            dir.disable_cleanup(true);
            eprintln!(
                "tally-e2e: keeping the control plane's directory {}",
                dir.path().display()
            );
        }

        // The node's network comes first: the API server binds to the host's end of it.
        let network = if real_node {
            Some(NodeNetwork::create(dir.path())?)
        } else {
            None
        };
        let listen = if real_node {
            HOST_IP
        } else {
            Ipv4Addr::LOCALHOST
        };
        let mut processes = Vec::new();
        let booted = boot(
            &binaries,
            fake_nodes.as_ref(),
            real_node,
            listen,
            dir.path(),
            &mut processes,
        )
        .await;
        let booted = match (booted, network) {
            (Ok(booted), Some(network)) => {
                let start = NodeStart {
                    dir: dir.path(),
                    pki: &booted.pki,
                    server: &booted.server,
                };
                RealNode::start(network, start, &booted.client)
                    .await
                    .map(|node| (booted, Some(node)))
            }
            (booted, _) => booted.map(|booted| (booted, None)),
        };
        match booted {
            Ok((
                Booted {
                    client,
                    server,
                    kubeconfig,
                    pki: _,
                },
                node,
            )) => Ok(ControlPlane {
                node,
                processes,
                client,
                server,
                kubeconfig,
                dir,
            }),
            Err(error) => {
                eprintln!("tally-e2e: the control plane failed to start: {error}");
                for process in &processes {
                    eprintln!("{}", process.log_summary(LOG_TAIL_LINES));
                }
                Err(error)
            }
        }
    }

    /// A client authenticated as an administrator (group `system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig, for `kubectl`, `helm` or an operator run as a process.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// The directory holding the logs (`<component>.log`), certificates and kubeconfigs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a namespace named `<prefix>-<random suffix>`, labelled [`NAMESPACE_LABEL`]`=true`, and returns its
    /// name. `prefix` must be lower-case letters, digits and `-`, starting with a letter.
    pub async fn new_namespace(&self, prefix: &str) -> Result<String, Error> {
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: Some(BTreeMap::from([(
                    NAMESPACE_LABEL.to_string(),
                    "true".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(|source| Error::Api {
                context: format!("creating a namespace named {prefix}-…"),
                source,
            })?;
        created
            .metadata
            .name
            .ok_or(Error::UnnamedObject("the namespace it created"))
    }

    /// The real node, when started [`ControlPlaneBuilder::with_real_node`].
    pub fn real_node(&self) -> Option<&RealNode> {
        self.node.as_ref()
    }

    /// Creates `count` hostPath PersistentVolumes (`<prefix>-0`, …) of `capacity` in `storage_class`, for the claims
    /// of a StatefulSet on the real node (which has no volume provisioner). Each is a directory in the control
    /// plane's directory, owned by the images' user 65532.
    pub async fn create_host_path_volumes(
        &self,
        prefix: &str,
        storage_class: &str,
        count: usize,
        capacity: &str,
    ) -> Result<Vec<String>, Error> {
        create_host_path_volumes(
            &self.client,
            self.dir.path(),
            prefix,
            storage_class,
            count,
            capacity,
        )
        .await
    }

    /// Kills every process and deletes the directory; the same as dropping the control plane.
    pub fn stop(self) {}
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The node first, while the API server still answers its last calls; it removes its mounts from the
        // directory before the directory is deleted.
        drop(self.node.take());
        // Reverse start order: nothing notices its dependency vanish and starts logging errors.
        while let Some(mut process) = self.processes.pop() {
            process.kill();
        }
    }
}

struct Booted {
    client: Client,
    server: String,
    kubeconfig: PathBuf,
    pki: Pki,
}

async fn boot(
    binaries: &Binaries,
    fake_nodes: Option<&(FakeNodeBinaries, usize)>,
    real_node: bool,
    listen: Ipv4Addr,
    dir: &Path,
    processes: &mut Vec<ComponentProcess>,
) -> Result<Booted, Error> {
    let serving_ips = if real_node {
        // The `kubernetes` Service's ClusterIP, the first of the range, for pods.
        vec![IpAddr::V4(listen), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))]
    } else {
        Vec::new()
    };
    let pki = Pki::generate(&dir.join("pki"), &serving_ips, NODE_NAME)?;
    let [
        etcd_client_port,
        etcd_peer_port,
        apiserver_port,
        controller_manager_port,
        scheduler_port,
        kwok_port,
    ] = unused_ports::<6>();
    let etcd_url = format!("http://127.0.0.1:{etcd_client_port}");
    let server = format!("https://{listen}:{apiserver_port}");

    // etcd
    let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
    let etcd_args = args([
        "--name=default".into(),
        format!("--data-dir={}", dir.join("etcd-data").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={etcd_peer_url}"),
        format!("--initial-advertise-peer-urls={etcd_peer_url}"),
        format!("--initial-cluster=default={etcd_peer_url}"),
        // The data is thrown away with the test; fsync only costs time.
        "--unsafe-no-fsync=true".into(),
    ]);
    let etcd = spawn(processes, "etcd", &binaries.etcd, &etcd_args, dir)?;
    let health_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let etcd_health = format!("{etcd_url}/health");
    wait_until_ready(etcd, ETCD_READY_WITHIN, || {
        http_ok(&health_client, &etcd_health)
    })
    .await?;

    // kube-apiserver, flags as controller-runtime's envtest sets them; with a real node, as a cluster's.
    let mut apiserver_args = args([
        format!("--advertise-address={listen}"),
        format!("--bind-address={listen}"),
        format!("--secure-port={apiserver_port}"),
        format!("--cert-dir={}", dir.join("kube-apiserver-certs").display()),
        format!("--tls-cert-file={}", pki.serving.cert.display()),
        format!("--tls-private-key-file={}", pki.serving.key.display()),
        format!("--client-ca-file={}", pki.ca_cert.display()),
        format!("--etcd-servers={etcd_url}"),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        "--allow-privileged=true".into(),
        format!("--service-account-issuer={server}"),
        format!(
            "--service-account-key-file={}",
            pki.service_account_pub.display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            pki.service_account_key.display()
        ),
    ]);
    if real_node {
        apiserver_args.extend(args([
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            // For logs and exec; the kubelet authorizes every client certificate of the CA.
            format!("--kubelet-client-certificate={}", pki.admin.cert.display()),
            format!("--kubelet-client-key={}", pki.admin.key.display()),
            // The node's name resolves nowhere; its InternalIP is the node's end of the veth pair.
            "--kubelet-preferred-address-types=InternalIP".into(),
        ]));
    } else {
        apiserver_args.extend(args([
            "--authorization-mode=RBAC".into(),
            // The endpoint reconciler publishes the advertise address as the `kubernetes` Service's endpoint and
            // refuses a loopback one; nothing runs in the cluster to use that Service.
            "--endpoint-reconciler-type=none".into(),
            // No token controller runs, so Pods must not need a service account token. Fake nodes:
            // TaintNodesByCondition would taint each new Node not-ready, and no node-lifecycle controller runs to
            // lift the taint once kwok reports it Ready, so nothing would be scheduled.
            if fake_nodes.is_some() {
                "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition".into()
            } else {
                "--disable-admission-plugins=ServiceAccount".into()
            },
        ]));
    }
    let apiserver = spawn(
        processes,
        "kube-apiserver",
        &binaries.kube_apiserver,
        &apiserver_args,
        dir,
    )?;

    let admin_kubeconfig = dir.join("admin.kubeconfig");
    kubeconfig::write(&admin_kubeconfig, &server, &pki.ca_cert, &pki.admin)?;
    let client = client_from(&admin_kubeconfig).await?;
    wait_until_ready(apiserver, APISERVER_READY_WITHIN, || {
        apiserver_ready(&client)
    })
    .await?;

    // kube-controller-manager
    let controller_manager_kubeconfig = dir.join("kube-controller-manager.kubeconfig");
    kubeconfig::write(
        &controller_manager_kubeconfig,
        &server,
        &pki.ca_cert,
        &pki.controller_manager,
    )?;
    let kubeconfig_flag = controller_manager_kubeconfig.display();
    let mut controllers = CONTROLLERS.to_vec();
    if real_node {
        controllers.extend_from_slice(REAL_NODE_CONTROLLERS);
    }
    let mut controller_manager_args = args([
        format!("--kubeconfig={kubeconfig_flag}"),
        // Its secure port (/metrics) authenticates client certificates of our CA and delegates authorization to the
        // API server. Skipping the lookup of the front-proxy CA, which this API server has none of, keeps the log
        // free of a retry loop of errors.
        format!("--authentication-kubeconfig={kubeconfig_flag}"),
        format!("--authorization-kubeconfig={kubeconfig_flag}"),
        "--authentication-skip-lookup=true".into(),
        format!("--client-ca-file={}", pki.ca_cert.display()),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={controller_manager_port}"),
        format!("--tls-cert-file={}", pki.serving.cert.display()),
        format!("--tls-private-key-file={}", pki.serving.key.display()),
        format!("--controllers={}", controllers.join(",")),
        "--leader-elect=false".into(),
        // Controllers act as the controller manager itself (system:masters), not as per-controller service
        // accounts, whose tokens nothing would issue.
        "--use-service-account-credentials=false".into(),
    ]);
    if real_node {
        // The CA bundle published to every namespace (`kube-root-ca.crt`) for pods' service account volumes.
        controller_manager_args.push(format!("--root-ca-file={}", pki.ca_cert.display()).into());
    }
    let controller_manager = spawn(
        processes,
        "kube-controller-manager",
        &binaries.kube_controller_manager,
        &controller_manager_args,
        dir,
    )?;
    let ca = reqwest::Certificate::from_pem(
        &std::fs::read(&pki.ca_cert)
            .map_err(|e| Error::io(format!("reading {}", pki.ca_cert.display()), e))?,
    )?;
    let tls_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()?;
    let controller_manager_health = format!("https://127.0.0.1:{controller_manager_port}/healthz");
    wait_until_ready(controller_manager, CONTROLLER_MANAGER_READY_WITHIN, || {
        http_ok(&tls_client, &controller_manager_health)
    })
    .await?;

    let admin = admin_kubeconfig.display();
    if fake_nodes.is_some() || real_node {
        // kube-scheduler, as the administrator (no per-component RBAC to set up), serving /healthz like the
        // controller manager.
        let scheduler_args = args([
            format!("--kubeconfig={admin}"),
            format!("--authentication-kubeconfig={admin}"),
            format!("--authorization-kubeconfig={admin}"),
            "--authentication-skip-lookup=true".into(),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={scheduler_port}"),
            format!("--tls-cert-file={}", pki.serving.cert.display()),
            format!("--tls-private-key-file={}", pki.serving.key.display()),
            "--leader-elect=false".into(),
        ]);
        let scheduler = spawn(
            processes,
            "kube-scheduler",
            &kubernetes_binary(&kubernetes_bin_dir(), "kube-scheduler")?,
            &scheduler_args,
            dir,
        )?;
        let scheduler_health = format!("https://127.0.0.1:{scheduler_port}/healthz");
        wait_until_ready(scheduler, SCHEDULER_READY_WITHIN, || {
            http_ok(&tls_client, &scheduler_health)
        })
        .await?;
    }

    if let Some((fake_node_binaries, nodes)) = fake_nodes {
        // kwok: the kubelet of the Nodes annotated for it, with the release's "fast" stages.
        let kwok_args = args([
            format!("--kubeconfig={admin}"),
            format!("--config={}", fake_node_binaries.kwok_stages.display()),
            format!("--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake"),
            format!("--cidr={FAKE_POD_CIDR}"),
            "--node-ip=127.0.0.1".into(),
            format!("--server-address=127.0.0.1:{kwok_port}"),
        ]);
        let kwok = spawn(processes, "kwok", &fake_node_binaries.kwok, &kwok_args, dir)?;
        create_fake_nodes(&client, *nodes).await?;
        let kwok_health = format!("http://127.0.0.1:{kwok_port}/healthz");
        wait_until_ready(kwok, KWOK_READY_WITHIN, || async {
            http_ok(&health_client, &kwok_health).await?;
            fake_nodes_ready(&client, *nodes).await
        })
        .await?;
    }

    Ok(Booted {
        client,
        server,
        kubeconfig: admin_kubeconfig,
        pki,
    })
}

/// Creates `kwok-node-0` … `kwok-node-<count - 1>`, annotated for kwok, with room for many pods.
async fn create_fake_nodes(client: &Client, count: usize) -> Result<(), Error> {
    let nodes = Api::<Node>::all(client.clone());
    for i in 0..count {
        let name = format!("kwok-node-{i}");
        let resources = BTreeMap::from([
            ("cpu".to_string(), Quantity("32".into())),
            ("memory".to_string(), Quantity("256Gi".into())),
            ("pods".to_string(), Quantity("110".into())),
        ]);
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                annotations: Some(BTreeMap::from([(
                    FAKE_NODE_ANNOTATION.to_string(),
                    "fake".to_string(),
                )])),
                labels: Some(BTreeMap::from([
                    ("kubernetes.io/hostname".to_string(), name.clone()),
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                    ("type".to_string(), "kwok".to_string()),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec::default()),
            // Nodes may carry their status on create; kwok keeps what is there and adds the conditions.
            status: Some(NodeStatus {
                allocatable: Some(resources.clone()),
                capacity: Some(resources),
                ..NodeStatus::default()
            }),
        };
        nodes
            .create(&PostParams::default(), &node)
            .await
            .map_err(|source| Error::Api {
                context: format!("creating the fake Node {name}"),
                source,
            })?;
    }
    Ok(())
}

async fn fake_nodes_ready(client: &Client, count: usize) -> Result<(), String> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing Nodes: {e}"))?;
    let ready = nodes
        .items
        .iter()
        .filter(|node| {
            node.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    if ready >= count {
        Ok(())
    } else {
        Err(format!(
            "{ready} of {count} fake Nodes are Ready (kwok marks them)"
        ))
    }
}

fn args<const N: usize>(flags: [String; N]) -> Vec<OsString> {
    flags.into_iter().map(OsString::from).collect()
}

fn spawn<'a>(
    processes: &'a mut Vec<ComponentProcess>,
    name: &'static str,
    program: &Path,
    args: &[OsString],
    dir: &Path,
) -> Result<&'a mut ComponentProcess, Error> {
    let process = ComponentProcess::spawn(name, program, args, dir.join(format!("{name}.log")))?;
    processes.push(process);
    let last = processes.len() - 1;
    Ok(&mut processes[last])
}

async fn client_from(kubeconfig: &Path) -> Result<Client, Error> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Client::try_from(config).map_err(|source| Error::Api {
        context: "building the admin client".into(),
        source,
    })
}

async fn apiserver_ready(client: &Client) -> Result<(), String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    client
        .request_text(request)
        .await
        .map(drop)
        .map_err(|e| format!("GET /readyz: {e}"))
}

pub(crate) async fn http_ok(client: &reqwest::Client, url: &str) -> Result<(), String> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(format!("GET {url}: {status} {body}"))
    }
}

/// Polls `probe` until it succeeds, failing as soon as the process exits or when `within` has passed.
pub(crate) async fn wait_until_ready<F, Fut>(
    process: &mut ComponentProcess,
    within: Duration,
    probe: F,
) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    wait_until_all_ready(std::slice::from_mut(process), within, probe).await
}

/// Polls `probe` until it succeeds, failing as soon as one of `processes` exits or when `within` has passed; a
/// timeout names the last process, the one the probe waits for.
pub(crate) async fn wait_until_all_ready<F, Fut>(
    processes: &mut [ComponentProcess],
    within: Duration,
    mut probe: F,
) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + within;
    let ready = poll(within, API_INTERVAL, async || {
        for process in processes.iter_mut() {
            if let Err(exited) = process.ensure_running() {
                return ControlFlow::Break(Err(exited));
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        match timeout(remaining, probe()).await {
            Ok(Ok(())) => ControlFlow::Break(Ok(())),
            Ok(Err(failure)) => ControlFlow::Continue(failure),
            Err(_) => ControlFlow::Continue("the check itself did not finish in time".to_string()),
        }
    })
    .await;
    ready.unwrap_or_else(|last_check| {
        let last = processes.last();
        Err(Error::NotReady {
            component: last.map_or("the real node", ComponentProcess::name),
            timeout: within,
            last_check,
            log: last.map(|p| p.log().to_path_buf()).unwrap_or_default(),
        })
    })
}
