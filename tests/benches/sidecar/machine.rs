//! The machine the benchmark runs on: CPUs, memory, the data disk, and that disk's fsync ceiling.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

/// What the figures depend on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: Option<String>,
    pub memory_bytes: Option<u64>,
    pub kernel: Option<String>,
    /// The directory the sidecar's dataDir and the fsync probe are in.
    pub data_dir: String,
    /// `df -hT` of that directory (device, type, size, used, free).
    pub data_disk: Option<String>,
    /// That directory's block device as named in /proc/diskstats (`vda`), if it is one.
    pub data_device: Option<String>,
}

impl Machine {
    pub fn describe(data_dir: &Path) -> Self {
        let memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
        });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_owned());
        let data_disk = Command::new("df")
            .arg("-hT")
            .arg(data_dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .nth(1)
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            });
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        });
        let data_device = data_disk
            .as_deref()
            .and_then(|df| df.split_whitespace().next()?.strip_prefix("/dev/"))
            .filter(|name| disk_counters(name).is_some())
            .map(str::to_owned);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_bytes,
            kernel,
            data_dir: data_dir.display().to_string(),
            data_disk,
            data_device,
        }
    }
}

/// The load averages over 1, 5 and 15 minutes (/proc/loadavg): how busy the machine was around a
/// run, other processes included.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Small appends, each followed by fdatasync, for `duration`: syncs per second. This is the most
/// group commits per second a durable buffer on this disk can do.
pub fn fsync_ceiling(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let record = [0x5a_u8; 256];
    let started = Instant::now();
    let mut syncs = 0u64;
    while started.elapsed() < duration {
        file.write_all(&record)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("cannot fdatasync {}", path.display()))?;
        syncs += 1;
    }
    let rate = syncs as f64 / started.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}

/// A block device's cumulative I/O counters (/proc/diskstats) at one moment.
#[derive(Clone, Copy, Debug)]
pub struct DiskCounters {
    at: Instant,
    io_ms: u64,
    sectors_written: u64,
}

/// How busy a device was between two readings. Every process on the machine counts, not only
/// the benchmark's.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DiskUse {
    /// Fraction of the time the device had I/O in flight (`%util` of iostat).
    pub busy_fraction: f64,
    pub write_mib_per_second: f64,
}

/// The counters of `device` (a name in /proc/diskstats, such as `vda`).
pub fn disk_counters(device: &str) -> Option<DiskCounters> {
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    let fields: Vec<&str> = stats
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&device))?;
    // After major, minor and name: sectors written is field 7, milliseconds doing I/O field 10.
    Some(DiskCounters {
        at: Instant::now(),
        sectors_written: fields.get(9)?.parse().ok()?,
        io_ms: fields.get(12)?.parse().ok()?,
    })
}

impl DiskCounters {
    /// The use since `earlier`.
    pub fn since(&self, earlier: &DiskCounters) -> DiskUse {
        let seconds = (self.at - earlier.at).as_secs_f64().max(1e-9);
        DiskUse {
            busy_fraction: self.io_ms.saturating_sub(earlier.io_ms) as f64 / 1000.0 / seconds,
            write_mib_per_second: self.sectors_written.saturating_sub(earlier.sectors_written)
                as f64
                * 512.0
                / (1024.0 * 1024.0)
                / seconds,
        }
    }
}
