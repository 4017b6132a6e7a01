//! The OCI images `make images` builds (`images/oci_image.py`): the same binary gives the same
//! digest, each image is at most 15 MB compressed, runs as 65532 with a CA bundle, and the
//! sidecar's image runs under a real OCI runtime (runc from Debian) as a non-root user on a
//! read-only root filesystem, storing and forwarding an event.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::binary::sidecar_binary;
use tally_tests::ports::unused_port;
use tally_tests::{TestUpstream, event, poll_until};

/// The most an image may weigh, compressed.
const MAX_COMPRESSED: u64 = 15_000_000;
const USER: u32 = 65532;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("tests/ has a parent"))
        .to_path_buf()
}

fn operator_binary() -> PathBuf {
    std::env::var_os("TALLY_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| sidecar_binary().with_file_name("tally-operator"))
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Builds an image archive with the project's script; returns what it printed.
fn build(binary: &Path, reference: &str, out: &Path) -> Value {
    let printed = run(Command::new("python3")
        .arg(repo_root().join("images/oci_image.py"))
        .arg("--binary")
        .arg(binary)
        .args(["--ref", reference, "--out"])
        .arg(out));
    serde_json::from_str(printed.trim()).unwrap_or_else(|e| panic!("{printed}: {e}"))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An unpacked archive: its manifest, config and the path of its single layer.
struct Unpacked {
    manifest: Value,
    config: Value,
    layer: PathBuf,
}

fn unpack(archive: &Path, into: &Path) -> Unpacked {
    std::fs::create_dir_all(into).unwrap_or_else(|e| panic!("{e}"));
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into));
    let blob = |digest: &Value| {
        let digest = digest.as_str().unwrap_or_default();
        into.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index = read_json(&into.join("index.json"));
    let manifest = read_json(&blob(&index["manifests"][0]["digest"]));
    let config = read_json(&blob(&manifest["config"]["digest"]));
    let layer = blob(&manifest["layers"][0]["digest"]);
    Unpacked {
        manifest,
        config,
        layer,
    }
}

#[test]
fn images_are_reproducible_small_and_run_as_a_non_root_user() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for (name, binary) in [
        ("tally-sidecar", sidecar_binary()),
        ("tally-operator", operator_binary()),
    ] {
        let reference = format!("ghcr.io/tally-dev/{name}:{}", env!("CARGO_PKG_VERSION"));
        let first = build(
            &binary,
            &reference,
            &dir.path().join(format!("{name}-1.tar")),
        );
        let second = build(
            &binary,
            &reference,
            &dir.path().join(format!("{name}-2.tar")),
        );
        assert_eq!(
            first["digest"], second["digest"],
            "{name}: two builds of the same binary give the same image digest"
        );
        let bytes = |n: u8| {
            std::fs::read(dir.path().join(format!("{name}-{n}.tar")))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(
            bytes(1) == bytes(2),
            "{name}: the archives are byte for byte the same"
        );

        let image = unpack(
            &dir.path().join(format!("{name}-1.tar")),
            &dir.path().join(name),
        );
        let compressed = image.manifest["layers"][0]["size"]
            .as_u64()
            .unwrap_or(u64::MAX);
        println!("{name}: {compressed} bytes compressed, {}", first["digest"]);
        assert!(
            compressed <= MAX_COMPRESSED,
            "{name}: {compressed} bytes compressed, more than {MAX_COMPRESSED}"
        );
        let config = &image.config["config"];
        assert_eq!(
            config["User"],
            json!(format!("{USER}:{USER}")),
            "{name}: non-root"
        );
        assert_eq!(config["Entrypoint"], json!([format!("/usr/bin/{name}")]));
        assert_eq!(
            config["Labels"]["org.opencontainers.image.version"],
            json!(env!("CARGO_PKG_VERSION")),
            "{name}: tagged with the workspace version"
        );
        let listing = run(Command::new("tar").arg("-tvzf").arg(&image.layer));
        for wanted in [
            format!("usr/bin/{name}"),
            "etc/ssl/certs/ca-certificates.crt".to_string(),
            "etc/passwd".to_string(),
        ] {
            assert!(
                listing.lines().any(|l| l.ends_with(&wanted)),
                "{name}: the image holds {wanted}:\n{listing}"
            );
        }
    }
}

/// Runs a container with runc from a bundle directory; deleted (killed) on drop.
struct Container {
    id: String,
    bundle: PathBuf,
}

impl Container {
    fn run(id: &str, bundle: &Path) -> Container {
        let log =
            std::fs::File::create(bundle.join("container.log")).unwrap_or_else(|e| panic!("{e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let status = Command::new("runc")
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdout(log)
            .stderr(err)
            .status()
            .unwrap_or_else(|e| {
                panic!("runc (Debian's runc package; `make deps` installs it): {e}")
            });
        let container = Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
        };
        assert!(status.success(), "runc run failed:\n{}", container.log());
        container
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.bundle.join("container.log")).unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .status();
    }
}

/// The OCI runtime configuration of the sidecar: user 65532, read-only root, no capabilities,
/// its configuration read-only at /config and its buffer on a writable mount at /data, the
/// host's network (the test reaches it on loopback).
fn runtime_config(config_dir: &Path, data_dir: &Path) -> Value {
    let bind = |destination: &str, source: &Path, mode: &str| {
        json!({"destination": destination, "type": "bind", "source": source,
               "options": ["rbind", mode]})
    };
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": USER, "gid": USER},
            "args": ["/usr/bin/tally-sidecar", "--config", "/config/tally.yaml"],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "noNewPrivileges": true,
            "capabilities": {"bounding": [], "effective": [], "permitted": [], "ambient": []}
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "tally",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            bind("/config", config_dir, "ro"),
            bind("/data", data_dir, "rw")
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_image_runs_non_root_on_a_read_only_root_filesystem() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let reference = format!(
        "ghcr.io/tally-dev/tally-sidecar:{}",
        env!("CARGO_PKG_VERSION")
    );
    let archive = dir.path().join("tally-sidecar.tar");
    build(&sidecar_binary(), &reference, &archive);
    let image = unpack(&archive, &dir.path().join("image"));

    let bundle = dir.path().join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap_or_else(|e| panic!("{e}"));
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&image.layer)
        .arg("-C")
        .arg(&rootfs));
    let (config_dir, data_dir) = (dir.path().join("config"), dir.path().join("data"));
    std::fs::create_dir_all(&config_dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(&data_dir).unwrap_or_else(|e| panic!("{e}"));
    // The buffer's volume belongs to the sidecar's user, as fsGroup makes it in a pod.
    std::os::unix::fs::chown(&data_dir, Some(USER), Some(USER)).unwrap_or_else(|e| panic!("{e}"));

    let upstream = TestUpstream::start().await;
    let port = unused_port();
    std::fs::write(
        config_dir.join("tally.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\ndataDir: /data/buffer\n\
             outputs:\n  targets:\n    - {{ name: upstream, type: openmeter, url: \"{}\" }}\n",
            upstream.url()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        bundle.join("config.json"),
        runtime_config(&config_dir, &data_dir).to_string(),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let id = format!("tally-image-test-{port}");
    let container = Container::run(&id, &bundle);
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let base = format!("http://127.0.0.1:{port}");
    poll_until(
        Duration::from_secs(30),
        "the containerised sidecar to be ready",
        async || {
            let ready = http.get(format!("{base}/readyz")).send().await.ok()?;
            (ready.status() == 204 || ready.status() == 200).then_some(())
        },
    )
    .await;
    let sent = event("from-the-image");
    let response = http
        .post(format!("{base}/api/v1/events"))
        .header("content-type", "application/cloudevents+json")
        .body(sent.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("ingest: {e}\n{}", container.log()));
    assert_eq!(response.status(), 204, "{}", container.log());
    upstream
        .wait_delivered(["from-the-image"], Duration::from_secs(30))
        .await;

    // The buffer was written by the unprivileged user, nowhere but on its volume.
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(data_dir.join("buffer/CURRENT")).unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(owner, USER, "the buffer's files belong to 65532");
    drop(container);
}
