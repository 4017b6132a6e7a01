//! A real node next to the control plane: containerd and runc from the distribution, a kubelet and kube-proxy built
//! from the same `k8s.io/kubernetes` module as the API server, the CNI bridge plugin, and CoreDNS for the cluster
//! domain. Pods really run: images are imported into containerd, containers start under runc, probes are real, and
//! Services resolve and route.
//!
//! Everything the node does to the network happens inside a network namespace of its own ([`NETNS`]), joined to
//! the host by a veth pair: the host end ([`HOST_IP`]) is where the API server listens and where pods reach the
//! test (an upstream, say); the node end ([`NODE_IP`]) is the node's address. The host routes the pod and Service
//! ranges to the node, so a test reaches pod IPs and ClusterIPs directly, and the API server reaches the operator's
//! webhook through its Service. The node's IP forwarding, iptables rules (kube-proxy's `KUBE-*` chains), bridge
//! and conntrack entries all live in that namespace and vanish with it; nothing leaves the machine, because the
//! host does not forward.
//!
//! One real node runs on a machine at a time: starting one takes a machine-wide lock, and first cleans up after a
//! run that was killed before it could (containers, mounts, cgroups, the namespace).
//!
//! Host-specific workarounds, applied only where the host needs them:
//! - without `CAP_SYS_RESOURCE` (some VMs) no process may lower its `oom_score_adj`, and runc fails on the kubelet's
//!   negative values (pause -998): containerd's `restrict_oom_score_adj` clamps them to its own;
//! - on cgroup v1, Kubernetes 1.37 refuses to start unless `failCgroupV1: false`.
//!
//! The kubelet would also set six global kernel sysctls (`vm.overcommit_memory`, `kernel.panic`, …); it runs in a
//! mount namespace of its own where those files are bind mounts of plain files, so the machine keeps its values.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs::{self, File},
    io,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant as StdInstant},
};

use k8s_openapi::{
    api::core::v1::{HostPathVolumeSource, Node, PersistentVolume, PersistentVolumeSpec},
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use crate::{
    Error,
    binaries::{RealNodeBinaries, images_script},
    control_plane::{http_ok, wait_until_all_ready, wait_until_ready},
    kubeconfig,
    pki::Pki,
    process::ComponentProcess,
};

/// The network namespace of the node.
pub const NETNS: &str = "tally-e2e-node";
/// The host's end of the veth pair: the API server listens here, and pods reach the host here.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// The node's address (its end of the veth pair): the kubelet, kube-proxy's health port and CoreDNS listen here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
/// The pods' addresses, on the CNI bridge inside the node's namespace.
pub const POD_CIDR: &str = "10.214.0.0/16";
/// The name the kubelet registers.
pub const NODE_NAME: &str = "tally-node";
/// The cluster domain CoreDNS answers for.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

const HOST_IF: &str = "tallyh0";
const NODE_IF: &str = "tallyn0";
const BRIDGE: &str = "tallycni0";
/// The CNI network's name; containerd's CNI result cache names its files after it.
const CNI_NETWORK: &str = "tally-e2e";
/// The image containerd runs each pod's sandbox from, built from the module's own pause.c. Tests also run it as an
/// app container that does nothing (user 65532, so the `restricted` Pod Security Standard admits it).
pub const PAUSE_IMAGE: &str = "localhost/tally-e2e/pause:3.10";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const KUBELET_PORT: u16 = 10250;
const KUBELET_HEALTHZ_PORT: u16 = 10248;
const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;
const COREDNS_READY_PORT: u16 = 8181;
const LOCK_FILE: &str = "/run/lock/tally-e2e-node.lock";
/// Names the directory of the node that runs now, so the next start can clean up after a run that was killed.
const STATE_FILE: &str = "/run/lock/tally-e2e-node.dir";
/// Debian's packages the node needs, checked by [`RealNode::check_host`].
const HOST_PROGRAMS: [&str; 8] = [
    "containerd",
    "ctr",
    "runc",
    "nsenter",
    "unshare",
    "ip",
    "iptables",
    "conntrack",
];

/// The running node's processes and what it set up on the host; dropping it tears everything down.
pub struct RealNode {
    dir: PathBuf,
    socket: PathBuf,
    processes: Vec<ComponentProcess>,
    _lock: File,
}

/// What the control plane hands the node to start with.
pub(crate) struct NodeStart<'a> {
    pub dir: &'a Path,
    pub pki: &'a Pki,
    pub server: &'a str,
}

/// Taken before the control plane starts: the lock, a clean slate, and the network the API server binds to.
pub(crate) struct NodeNetwork {
    /// `None` once handed to the started node, which then owns the teardown.
    lock: Option<File>,
    dir: PathBuf,
}

impl NodeNetwork {
    /// Takes the machine-wide lock (waiting for another run's node to stop), cleans up after a killed run, and
    /// creates the namespace, the veth pair and the host's routes.
    pub fn create(dir: &Path) -> Result<Self, Error> {
        RealNode::check_host().map_err(Error::NodeUnavailable)?;
        let lock = File::create(LOCK_FILE)
            .map_err(|e| Error::io(format!("creating the lock file {LOCK_FILE}"), e))?;
        // SAFETY: flock on a descriptor this function owns; blocks until the previous node is torn down.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(Error::io(
                format!("locking {LOCK_FILE}"),
                io::Error::last_os_error(),
            ));
        }
        if let Ok(previous) = fs::read_to_string(STATE_FILE) {
            eprintln!(
                "tally-e2e: cleaning up after a real node that was not torn down: {previous}"
            );
            teardown(Path::new(previous.trim()));
        }
        // Nothing of a run older than the state file (or of an earlier layout) may linger either.
        teardown_host();
        fs::write(STATE_FILE, dir.as_os_str().as_encoded_bytes())
            .map_err(|e| Error::io(format!("writing {STATE_FILE}"), e))?;
        let network = NodeNetwork {
            lock: Some(lock),
            dir: dir.to_path_buf(),
        };
        let host = HOST_IP.to_string();
        let host_address = format!("{HOST_IP}/24");
        let node_address = format!("{NODE_IP}/24");
        let ip = |args: &[&str]| run("ip", args);
        ip(&["netns", "add", NETNS])?;
        ip(&[
            "link", "add", HOST_IF, "type", "veth", "peer", "name", NODE_IF, "netns", NETNS,
        ])?;
        ip(&["addr", "add", &host_address, "dev", HOST_IF])?;
        ip(&["link", "set", HOST_IF, "up"])?;
        for cidr in [POD_CIDR, crate::control_plane::SERVICE_CLUSTER_IP_RANGE] {
            ip(&["route", "add", cidr, "via", &NODE_IP.to_string()])?;
        }
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        ip(&["-n", NETNS, "addr", "add", &node_address, "dev", NODE_IF])?;
        ip(&["-n", NETNS, "link", "set", NODE_IF, "up"])?;
        ip(&["-n", NETNS, "route", "add", "default", "via", &host])?;
        // Routing between the pods and the host happens in the node's namespace only.
        in_node_namespace("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        Ok(network)
    }
}

impl RealNode {
    /// Whether this machine can run a real node: root, Debian's containerd, runc, CNI plugins and iptables, and the
    /// cached kubelet, kube-proxy, pause and CoreDNS builds. The error says what is missing and how to get it.
    pub fn check_host() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("a real node needs root (containerd, mounts, network namespaces)".into());
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let missing: Vec<&str> = HOST_PROGRAMS
            .iter()
            .copied()
            .filter(|program| !std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "a real node needs {} on PATH (`make apt` installs Debian's containerd, runc, iptables and conntrack)",
                missing.join(", ")
            ));
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            let path = Path::new(CNI_BIN_DIR).join(plugin);
            if !path.is_file() {
                return Err(format!(
                    "the CNI plugin {} is missing (`make apt` installs Debian's containernetworking-plugins)",
                    path.display()
                ));
            }
        }
        RealNodeBinaries::locate()
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Starts containerd, imports the pause image, then starts the kubelet, kube-proxy and CoreDNS, and waits until
    /// the Node is Ready and Services resolve. A failed start prints the logs of the node's processes.
    pub(crate) async fn start(
        network: NodeNetwork,
        start: NodeStart<'_>,
        client: &Client,
    ) -> Result<Self, Error> {
        let binaries = RealNodeBinaries::locate()?;
        let dir = start.dir.join("node");
        mkdirs(&dir)?;
        let socket = dir.join("containerd.sock");
        let mut network = network;
        let lock = network
            .lock
            .take()
            .ok_or_else(|| Error::Node("the node's network was handed over twice".into()))?;
        let mut node = RealNode {
            dir: dir.clone(),
            socket: socket.clone(),
            processes: Vec::new(),
            _lock: lock,
        };
        match node.boot(start, client, &binaries).await {
            Ok(()) => Ok(node),
            Err(error) => {
                eprintln!("tally-e2e: the real node failed to start: {error}");
                eprintln!("{}", node.log_summary(40));
                Err(error)
            }
        }
    }

    async fn boot(
        &mut self,
        start: NodeStart<'_>,
        client: &Client,
        binaries: &RealNodeBinaries,
    ) -> Result<(), Error> {
        let node = self;
        let dir = node.dir.clone();
        let socket = node.socket.clone();

        // containerd, in the node's network namespace so the pods' network is there too.
        let config = dir.join("containerd.toml");
        write_file(&config, &containerd_config(&dir, &socket))?;
        write_file(
            &dir.join("cni/net.d/10-tally-e2e.conflist"),
            &cni_config(&dir),
        )?;
        let containerd = node.spawn(
            "containerd",
            &binaries.nsenter,
            &node_namespace_args("containerd", &[format!("--config={}", config.display())]),
            &dir,
        )?;
        wait_until_ready(containerd, Duration::from_secs(30), || async {
            ctr(&socket, &["version"]).map(drop)
        })
        .await?;
        let pause = dir.join("pause.tar");
        image_from_binary(&binaries.pause, PAUSE_IMAGE, &pause)?;
        node.import_image(&pause)?;

        // The kubelet.
        let kubelet_dir = dir.join("kubelet");
        mkdirs(&kubelet_dir)?;
        // A shared bind mount: the volumes the kubelet mounts in its own mount namespace appear in the host's,
        // where containerd and runc run.
        run(
            "mount",
            &[
                "--bind".into(),
                path_string(&kubelet_dir)?,
                path_string(&kubelet_dir)?,
            ],
        )?;
        run(
            "mount",
            &["--make-rshared".into(), path_string(&kubelet_dir)?],
        )?;
        let kubelet_kubeconfig = dir.join("kubelet.kubeconfig");
        kubeconfig::write(
            &kubelet_kubeconfig,
            start.server,
            &start.pki.ca_cert,
            &start.pki.kubelet,
        )?;
        let kubelet_config = dir.join("kubelet.yaml");
        write_file(
            &kubelet_config,
            &kubelet_config_yaml(&dir, &start.pki.ca_cert),
        )?;
        write_file(&dir.join("resolv.conf"), "")?;
        let sysctls = dir.join("sysctls");
        mkdirs(&sysctls)?;
        let mut script = String::from("mount --make-rprivate /proc\n");
        for (file, value, target) in KUBELET_SYSCTLS {
            write_file(&sysctls.join(file), value)?;
            script.push_str(&format!("mount --bind \"$0/{file}\" /proc/sys/{target}\n"));
        }
        script.push_str("exec \"$@\"\n");
        let mut kubelet_args = vec![
            "unshare".to_string(),
            "--mount".into(),
            "--propagation".into(),
            "unchanged".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            script,
            path_string(&sysctls)?,
            path_string(&binaries.kubelet)?,
            format!("--config={}", kubelet_config.display()),
            format!("--kubeconfig={}", kubelet_kubeconfig.display()),
            format!("--root-dir={}", kubelet_dir.display()),
            format!("--cert-dir={}", dir.join("kubelet-pki").display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            "--v=1".into(),
        ];
        kubelet_args.insert(0, format!("--net=/run/netns/{NETNS}"));
        node.spawn(
            "kubelet",
            &binaries.nsenter,
            &kubelet_args
                .into_iter()
                .map(OsString::from)
                .collect::<Vec<_>>(),
            &dir,
        )?;

        // kube-proxy, as system:kube-proxy (bound to system:node-proxier by the API server's default policy).
        let proxy_kubeconfig = dir.join("kube-proxy.kubeconfig");
        kubeconfig::write(
            &proxy_kubeconfig,
            start.server,
            &start.pki.ca_cert,
            &start.pki.kube_proxy,
        )?;
        let proxy_config = dir.join("kube-proxy.yaml");
        write_file(&proxy_config, &kube_proxy_config(&proxy_kubeconfig))?;
        node.spawn(
            "kube-proxy",
            &binaries.nsenter,
            &node_namespace_args(
                &path_string(&binaries.kube_proxy)?,
                &[
                    format!("--config={}", proxy_config.display()),
                    "--v=1".into(),
                ],
            ),
            &dir,
        )?;

        // CoreDNS, reading Services and EndpointSlices as the administrator.
        let corefile = dir.join("Corefile");
        write_file(&corefile, &corefile_text(start.pki, start.server, &dir)?)?;
        node.spawn(
            "coredns",
            &binaries.nsenter,
            &node_namespace_args(
                &path_string(&binaries.coredns)?,
                &["-conf".into(), path_string(&corefile)?],
            ),
            &dir,
        )?;

        let health = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()?;
        let nodes = Api::<Node>::all(client.clone());
        let deadline = Duration::from_secs(180);
        wait_until_all_ready(&mut node.processes, deadline, || async {
            http_ok(
                &health,
                &format!("http://{NODE_IP}:{KUBELET_HEALTHZ_PORT}/healthz"),
            )
            .await?;
            node_ready(&nodes).await?;
            http_ok(
                &health,
                &format!("http://{NODE_IP}:{KUBE_PROXY_HEALTHZ_PORT}/healthz"),
            )
            .await?;
            http_ok(
                &health,
                &format!("http://{NODE_IP}:{COREDNS_READY_PORT}/ready"),
            )
            .await
        })
        .await
    }

    /// Where pods reach the host (and a test's servers bound there): the host's end of the veth pair.
    pub fn host_ip(&self) -> Ipv4Addr {
        HOST_IP
    }

    /// The Node's name.
    pub fn name(&self) -> &'static str {
        NODE_NAME
    }

    /// The node's directory: `containerd.log`, `kubelet.log`, `kube-proxy.log`, `coredns.log`, configs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Imports an OCI image archive (such as `make images` writes) into containerd's `k8s.io` namespace, where the
    /// kubelet finds it: a pod with `imagePullPolicy: IfNotPresent` or `Never` runs it without a registry.
    pub fn import_image(&self, archive: &Path) -> Result<(), Error> {
        ctr(
            &self.socket,
            &[
                "images",
                "import",
                "--no-unpack=false",
                &path_string(archive)?,
            ],
        )
        .map(drop)
        .map_err(Error::Node)
    }

    /// Builds an image of `binary` (its shared libraries, CA bundle, user 65532) with the project's
    /// `images/oci_image.py` and imports it as `reference`.
    pub fn import_binary(&self, binary: &Path, reference: &str) -> Result<(), Error> {
        let archive = self
            .dir
            .join(format!("{}.tar", reference.replace(['/', ':'], "_")));
        image_from_binary(binary, reference, &archive)?;
        self.import_image(&archive)
    }

    /// The error lines and the tail of each node process's log, for a test's failure report.
    pub fn log_summary(&self, tail: usize) -> String {
        self.processes
            .iter()
            .map(|p| p.log_summary(tail))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[OsString],
        dir: &Path,
    ) -> Result<&mut ComponentProcess, Error> {
        let process =
            ComponentProcess::spawn(name, program, args, dir.join(format!("{name}.log")))?;
        self.processes.push(process);
        let last = self.processes.len() - 1;
        Ok(&mut self.processes[last])
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // The kubelet first, so it does not restart what is being stopped; containerd last.
        while let Some(mut process) = self.processes.pop() {
            process.kill();
        }
        teardown(&self.dir);
        let _ = fs::remove_file(STATE_FILE);
    }
}

impl Drop for NodeNetwork {
    /// Only reached when the control plane failed before the node started; a started node tears down itself.
    fn drop(&mut self) {
        if self.lock.is_some() {
            teardown(&self.dir);
            let _ = fs::remove_file(STATE_FILE);
        }
    }
}

/// Creates `count` hostPath PersistentVolumes of `capacity` in `storage_class` (`<prefix>-0`, …), each a directory
/// under `dir` owned by the images' user (65532), for claims to bind to: the node has no volume provisioner.
pub(crate) async fn create_host_path_volumes(
    client: &Client,
    dir: &Path,
    prefix: &str,
    storage_class: &str,
    count: usize,
    capacity: &str,
) -> Result<Vec<String>, Error> {
    let volumes = Api::<PersistentVolume>::all(client.clone());
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("{prefix}-{i}");
        let path = dir.join("volumes").join(&name);
        mkdirs(&path)?;
        std::os::unix::fs::chown(&path, Some(65532), Some(65532))
            .map_err(|e| Error::io(format!("chown 65532 {}", path.display()), e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o770))
            .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
        let volume = PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeSpec {
                capacity: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(capacity.to_string()),
                )])),
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: Some(storage_class.to_string()),
                persistent_volume_reclaim_policy: Some("Retain".into()),
                host_path: Some(HostPathVolumeSource {
                    path: path_string(&path)?,
                    type_: Some("Directory".into()),
                }),
                ..PersistentVolumeSpec::default()
            }),
            ..PersistentVolume::default()
        };
        volumes
            .create(&PostParams::default(), &volume)
            .await
            .map_err(|source| Error::Api {
                context: format!("creating the PersistentVolume {name}"),
                source,
            })?;
        names.push(name);
    }
    Ok(names)
}

/// `(file, value, /proc/sys path)` of the sysctls the kubelet sets, each given a plain file to write instead.
const KUBELET_SYSCTLS: [(&str, &str, &str); 6] = [
    ("overcommit_memory", "1", "vm/overcommit_memory"),
    ("panic_on_oom", "0", "vm/panic_on_oom"),
    ("panic", "10", "kernel/panic"),
    ("panic_on_oops", "1", "kernel/panic_on_oops"),
    ("root_maxkeys", "1000000", "kernel/keys/root_maxkeys"),
    ("root_maxbytes", "25000000", "kernel/keys/root_maxbytes"),
];

/// Whether this process may lower an `oom_score_adj` (capability 24, `CAP_SYS_RESOURCE`, in its effective set).
fn has_cap_sys_resource() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// cgroup v2 mounts its controllers list at the root of `/sys/fs/cgroup`; v1 and hybrid hosts do not.
fn is_cgroup_v1() -> bool {
    !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

fn containerd_config(dir: &Path, socket: &Path) -> String {
    // Workaround for hosts without CAP_SYS_RESOURCE, see the module docs.
    let restrict_oom = !has_cap_sys_resource();
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = {restrict_oom}
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni/net.d"
"#,
        socket = socket.display(),
    )
}

/// A bridge in the node's namespace with the pods' default route through it (the node reaches the host and the
/// Service range); no masquerade, since the host routes the pod range back.
fn cni_config(dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.join("cni/ipam"),
                "ranges": [[{"subnet": POD_CIDR}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }],
    })
    .to_string()
}

fn kubelet_config_yaml(dir: &Path, ca: &Path) -> String {
    // Workaround for cgroup v1 hosts, see the module docs.
    let cgroup_v1 = if is_cgroup_v1() {
        "failCgroupV1: false\n"
    } else {
        ""
    };
    let d = dir.display();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: {NODE_IP}
healthzPort: {KUBELET_HEALTHZ_PORT}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
{cgroup_v1}failSwapOn: false
containerRuntimeEndpoint: unix://{d}/containerd.sock
imageServiceEndpoint: unix://{d}/containerd.sock
clusterDNS: [{NODE_IP}]
clusterDomain: {CLUSTER_DOMAIN}
resolvConf: {d}/resolv.conf
podLogsDir: {d}/pod-logs
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
"#,
        ca = ca.display(),
    )
}

fn kube_proxy_config(kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: "{kubeconfig}"
mode: iptables
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
bindAddress: {NODE_IP}
healthzBindAddress: {NODE_IP}:{KUBE_PROXY_HEALTHZ_PORT}
metricsBindAddress: 127.0.0.1:10249
iptables:
  # Service traffic between two pods of the one bridge must come back through the node to be un-NATed.
  masqueradeAll: true
  localhostNodePorts: false
# The namespace's conntrack table is the host's: leave its limits and timeouts alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = kubeconfig.display(),
    )
}

fn corefile_text(pki: &Pki, server: &str, dir: &Path) -> Result<String, Error> {
    let kubeconfig_path = dir.join("coredns.kubeconfig");
    kubeconfig::write(&kubeconfig_path, server, &pki.ca_cert, &pki.admin)?;
    Ok(format!(
        r#".:53 {{
    bind {NODE_IP}
    errors
    health {NODE_IP}:8080
    ready {NODE_IP}:{COREDNS_READY_PORT}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"#,
        kubeconfig = kubeconfig_path.display(),
    ))
}

/// `nsenter --net=/run/netns/<NETNS> <program> <args>`.
fn node_namespace_args(program: &str, args: &[String]) -> Vec<OsString> {
    let mut all = vec![
        OsString::from(format!("--net=/run/netns/{NETNS}")),
        OsString::from(program),
    ];
    all.extend(args.iter().map(OsString::from));
    all
}

fn in_node_namespace(program: &str, args: &[&str]) -> Result<(), Error> {
    let net = format!("--net=/run/netns/{NETNS}");
    let mut all = vec![net.as_str(), program];
    all.extend_from_slice(args);
    run("nsenter", &all)
}

fn ctr(socket: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io"])
        .args(args)
        .output()
        .map_err(|e| format!("running ctr: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "ctr {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn image_from_binary(binary: &Path, reference: &str, archive: &Path) -> Result<(), Error> {
    let script = images_script();
    run(
        "python3",
        &[
            path_string(&script)?,
            "--binary".into(),
            path_string(binary)?,
            "--ref".into(),
            reference.into(),
            "--out".into(),
            path_string(archive)?,
        ],
    )
}

/// Runs a set-up command; its output goes into the error when it fails.
fn run<S: AsRef<str>>(program: &str, args: &[S]) -> Result<(), Error> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let output = Command::new(program)
        .args(&args)
        .output()
        .map_err(|e| Error::io(format!("running {program}"), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Node(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

/// Runs a clean-up command, ignoring failure: what it removes may already be gone.
fn quietly(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

fn mkdirs(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        mkdirs(parent)?;
    }
    fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn path_string(path: &Path) -> Result<String, Error> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Node(format!("{} is not UTF-8", path.display())))
}

async fn node_ready(nodes: &Api<Node>) -> Result<(), String> {
    let node = nodes
        .get_opt(NODE_NAME)
        .await
        .map_err(|e| format!("GET Node {NODE_NAME}: {e}"))?
        .ok_or_else(|| format!("the kubelet has not registered Node {NODE_NAME} yet"))?;
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready");
    match ready {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err(format!(
            "Node {NODE_NAME} is not Ready: {}",
            c.message.unwrap_or_default()
        )),
        None => Err(format!("Node {NODE_NAME} reports no Ready condition yet")),
    }
}

/// Undoes what a node in `dir` left on the host: its containers' processes, the shims, the mounts under `dir`
/// (pod volumes, overlay snapshots, network namespaces of pods, the kubelet's shared root), the node's network
/// namespace, the kubelet's cgroups and the CNI cache. Every step tolerates what is already gone.
fn teardown(dir: &Path) {
    kill_cgroup_processes();
    kill_processes_naming(dir);
    unmount_under(dir);
    teardown_host();
    remove_log_links(dir);
}

/// The kubelet links every container's log into `/var/log/containers` (a fixed path) whatever its `podLogsDir`;
/// the links into `dir` go with it.
fn remove_log_links(dir: &Path) {
    let Ok(entries) = fs::read_dir("/var/log/containers") else {
        return;
    };
    for entry in entries.flatten() {
        if fs::read_link(entry.path()).is_ok_and(|target| target.starts_with(dir)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The parts of a teardown that do not depend on the node's directory.
fn teardown_host() {
    kill_cgroup_processes();
    quietly("ip", &["netns", "del", NETNS]);
    // A veth whose namespace is gone goes with it; one left by a half-done start does not.
    quietly("ip", &["link", "del", HOST_IF]);
    remove_cgroups();
    // The kubelet puts its device-plugin socket at a fixed path whatever its root dir (so a machine that runs a
    // kubelet of its own cannot host this node); the directories go only if nothing else is in them.
    let device_plugins = Path::new("/var/lib/kubelet/device-plugins");
    let _ = fs::remove_file(device_plugins.join("kubelet.sock"));
    let _ = fs::remove_dir(device_plugins);
    let _ = fs::remove_dir("/var/lib/kubelet");
    if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{CNI_NETWORK}-"))
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The cgroup hierarchies' `kubepods` trees, where the kubelet puts every pod.
fn kubepods_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for hierarchy in hierarchies.flatten() {
            let candidate = hierarchy.path().join("kubepods");
            if candidate.is_dir() {
                dirs.push(candidate);
            }
        }
    }
    let v2 = Path::new("/sys/fs/cgroup/kubepods");
    if v2.is_dir() {
        dirs.push(v2.to_path_buf());
    }
    dirs
}

fn walk_dirs(root: &Path, out: &mut Vec<PathBuf>) {
    out.push(root.to_path_buf());
    if let Ok(entries) = fs::read_dir(root) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&entry.path(), out);
            }
        }
    }
}

/// SIGKILLs every process in the kubelet's cgroups (the containers), until none is left or 10 s have passed.
fn kill_cgroup_processes() {
    let deadline = StdInstant::now() + Duration::from_secs(10);
    loop {
        let mut found = false;
        for root in kubepods_dirs() {
            let mut dirs = Vec::new();
            walk_dirs(&root, &mut dirs);
            for dir in dirs {
                let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
                    continue;
                };
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    found = true;
                    // SAFETY: kill(2) with a pid read from the cgroup; a stale pid is harmless.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if !found || StdInstant::now() >= deadline {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILLs the containerd shims (and anything else) whose command line names `dir`: they outlive containerd.
fn kill_processes_naming(dir: &Path) {
    let needle = dir.as_os_str().as_encoded_bytes();
    if needle.is_empty() {
        return;
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle)
            && let Ok(pid) = i32::try_from(pid)
        {
            // SAFETY: kill(2) on a pid just read from /proc.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first, until none is left.
fn unmount_under(dir: &Path) {
    let prefix = dir.as_os_str().as_encoded_bytes().to_vec();
    if prefix.is_empty() {
        return;
    }
    for _ in 0..10 {
        let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut targets: Vec<String> = mountinfo
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .map(unescape_mount_path)
            .filter(|target| target.as_bytes().starts_with(&prefix))
            .collect();
        if targets.is_empty() {
            return;
        }
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for target in targets {
            if let Ok(c) = std::ffi::CString::new(target) {
                // SAFETY: umount2 with a NUL-terminated path; failure (already unmounted) is ignored.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(escaped: &str) -> String {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the kubelet's cgroups, leaves first (a cgroup with children or processes cannot be removed).
fn remove_cgroups() {
    for root in kubepods_dirs() {
        let mut dirs = Vec::new();
        walk_dirs(&root, &mut dirs);
        for dir in dirs.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mount_path;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/end\04"), r"/end\04");
    }
}
