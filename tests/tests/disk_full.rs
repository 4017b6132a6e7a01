//! A full disk under the buffer: ingest refuses with 503 while nothing can be stored, accepts
//! again within seconds of space coming back without a restart, `/healthz` stays 200 all along
//! (a liveness probe must not restart a pod into the same full disk) while `/readyz` says why it
//! is not ready, SIGTERM while degraded exits 0, and a restart on a nearly full disk opens and
//! delivers. Every acknowledged event reaches the upstream.
//!
//! The disk is a real tmpfs of a few MiB mounted for the test (this needs root, as CI has), so
//! the sidecar meets a real ENOSPC from the kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::events::{id_of, padded_event};
use tally_tests::{Sidecar, TestUpstream, poll_until};

/// Size of the test filesystem.
const DISK_MIB: u64 = 48;

/// A tmpfs mounted on a temporary directory; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u64) -> SmallDisk {
        let dir = tempfile::Builder::new()
            .prefix("tally-disk-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tally-test-disk",
            ])
            .arg(dir.path())
            .status()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            status.success(),
            "mounting a {mib} MiB tmpfs on {} failed ({status}); this test needs root",
            dir.path().display()
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with a file until fewer than `leave` bytes are free.
    fn fill(&self, name: &str, leave: u64) -> PathBuf {
        let path = self.path().join(name);
        let free = self.free();
        let size = free.saturating_sub(leave);
        std::fs::write(&path, vec![0xA5u8; size as usize])
            .unwrap_or_else(|e| panic!("filling {}: {e}", path.display()));
        path
    }

    fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: statvfs(3) writes into a zeroed struct we own; the path is a valid C string.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
        assert_eq!(rc, 0, "statvfs failed");
        stat.f_bavail * stat.f_frsize
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

fn batch(prefix: &str, n: usize) -> Vec<Value> {
    (0..20)
        .map(|i| padded_event(&format!("{prefix}-{n}-{i}"), 2000))
        .collect()
}

async fn body(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_heals_without_a_restart_and_loses_nothing() {
    let disk = SmallDisk::mount(DISK_MIB);
    let upstream = TestUpstream::start().await;
    upstream.down().await;
    let mut sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("dataDir", json!(disk.path().join("data")))
        .start()
        .await;
    // Leave a few MiB, so the buffer runs into ENOSPC long before its maxBytes.
    let filler = disk.fill("filler", 6 << 20);

    let mut acked: Vec<String> = Vec::new();
    let mut refused = None;
    for n in 0..2000 {
        let events = batch("full", n);
        let response = sidecar.post_events(&events).await;
        if response.status() == 204 {
            acked.extend(events.iter().map(|e| id_of(e).to_string()));
        } else {
            refused = Some(body(response).await);
            break;
        }
    }
    let (status, detail) = refused
        .unwrap_or_else(|| panic!("2000 batches of 40 KB never filled a disk with 6 MiB free"));
    assert_eq!(status, 503, "a full disk answers 503: {detail}");
    assert!(
        !acked.is_empty(),
        "events were stored before the disk was full"
    );

    // Degraded: alive, not ready, and the reason is given.
    let (health, text) = body(sidecar.get("/healthz").await).await;
    assert_eq!(health, 200, "a full disk must not fail liveness: {text}");
    let (ready, why) = body(sidecar.get("/readyz").await).await;
    assert_eq!(ready, 503, "not ready while nothing can be stored");
    assert!(
        why.contains("refuses writes") || why.contains("full"),
        "/readyz says why: {why}"
    );

    // Space comes back: ingest accepts again within seconds, same process.
    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("removing the filler: {e}"));
    let probe = batch("healed", 0);
    poll_until(
        Duration::from_secs(15),
        "ingest to accept again after space was freed",
        async || (sidecar.post_events(&probe).await.status() == 204).then_some(()),
    )
    .await;
    acked.extend(probe.iter().map(|e| id_of(e).to_string()));
    assert!(sidecar.is_running(), "healed without a restart");

    // Full again, then SIGTERM while degraded: a clean stop, exit 0.
    let filler = disk.fill("filler", 2 << 20);
    for n in 0..2000 {
        let events = batch("again", n);
        let response = sidecar.post_events(&events).await;
        if response.status() != 204 {
            break;
        }
        acked.extend(events.iter().map(|e| id_of(e).to_string()));
    }
    let status = sidecar.terminate().await;
    assert!(
        status.success(),
        "SIGTERM while the disk is full exits 0, got {status}; stderr:\n{}",
        sidecar.stderr()
    );

    // Restart on the nearly full disk: it opens, and delivering gives the space back.
    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("removing the filler: {e}"));
    let _filler = disk.fill("filler", 18 << 20);
    upstream.up().await;
    sidecar.start().await;
    upstream
        .wait_delivered(acked.iter().map(String::as_str), Duration::from_secs(60))
        .await;
}
