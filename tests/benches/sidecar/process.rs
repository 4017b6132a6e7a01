//! A tally-sidecar process started from the release binary with a configuration written for the
//! run: its address (from the `listening on` log line), memory from /proc, metrics from /metrics.
//! Under it, [`Watched`]: any child process whose stderr is kept, with its CPU time and memory, for
//! the sidecar and for the peers of `make bench-peers`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::StatusCode;
use tally_tests::poll::poll;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::load::get;

/// The sidecar binary: `TALLY_SIDECAR_BIN`, else `<target>/release/tally-sidecar` next to this
/// benchmark's own executable (`<target>/release/deps/sidecar-<hash>`).
pub fn sidecar_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TALLY_SIDECAR_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "TALLY_SIDECAR_BIN={} does not exist; build it with `cargo build --release -p tally-sidecar`",
            path.display()
        );
    }
    let candidate = release_dir()?.join("tally-sidecar");
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "{} does not exist; build it with `cargo build --release -p tally-sidecar` (or set TALLY_SIDECAR_BIN)",
        candidate.display()
    )
}

/// `<target>/release`, from this executable's path.
pub fn release_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the benchmark executable")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("the benchmark executable is not under <target>/release/deps")
}

/// How many stderr lines are kept to explain a failure.
const STDERR_TAIL: usize = 40;

/// A child process whose stderr is drained into a tail of its last lines; dropping it kills the
/// process.
pub struct Watched {
    child: Child,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Watched {
    /// Spawns `command` with stderr piped (stdin and stdout are the caller's to set) and calls
    /// `on_line` with every line it writes there. A stdout the caller piped is kept in the same
    /// tail (for programs that log there).
    pub fn spawn(
        command: &mut Command,
        on_line: impl FnMut(&str) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let mut child = command.stderr(Stdio::piped()).spawn().with_context(|| {
            format!(
                "cannot start {}",
                Path::new(command.get_program()).display()
            )
        })?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            drain_into(pipe, stderr.clone(), on_line);
        }
        if let Some(pipe) = child.stdout.take() {
            drain_into(pipe, stderr.clone(), |_| {});
        }
        Ok(Watched { child, stderr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now (`VmRSS`) and its peak so far (`VmHWM`).
    pub fn memory(&self) -> anyhow::Result<Memory> {
        memory_of(self.pid())
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time_of(self.pid())
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Checks `ready` every millisecond until it holds; fails, naming the process `name`, when the
    /// process exits first or `timeout` passes.
    pub async fn wait_until(
        &mut self,
        name: &str,
        timeout: Duration,
        mut ready: impl AsyncFnMut() -> bool,
    ) -> anyhow::Result<()> {
        let child = &mut self.child;
        let outcome = poll(timeout, Duration::from_millis(1), async || {
            if ready().await {
                return ControlFlow::Break(None);
            }
            match child.try_wait() {
                Ok(Some(status)) => ControlFlow::Break(Some(status)),
                _ => ControlFlow::Continue(()),
            }
        })
        .await;
        match outcome {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{name} exited ({status}) before it was ready; its stderr:\n{}",
                self.stderr_tail()
            ),
            Err(()) => bail!(
                "{name} not ready within {timeout:?}; its stderr:\n{}",
                self.stderr_tail()
            ),
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit (the process is killed when dropped
    /// after a failure).
    pub async fn terminate(mut self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        // SAFETY: kill(2) with a pid this process spawned and has not reaped yet.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        let status = poll(timeout, Duration::from_millis(5), async || {
            self.child.try_wait().transpose()
        })
        .await
        .map_err(|()| anyhow::anyhow!("{name} did not exit within {timeout:?} of SIGTERM"))??;
        if !status.success() {
            bail!(
                "{name} exited with {status} after SIGTERM; its stderr:\n{}",
                self.stderr_tail()
            );
        }
        Ok(())
    }

    /// SIGKILL, as a crash or the OOM killer ends a process: no chance to flush anything. Returns
    /// once the process is gone.
    pub fn kill(mut self) -> anyhow::Result<()> {
        // Child::kill sends SIGKILL on Unix.
        self.child
            .kill()
            .with_context(|| format!("cannot send SIGKILL to {}", self.pid()))?;
        self.child
            .wait()
            .with_context(|| format!("cannot reap {}", self.pid()))?;
        Ok(())
    }

    /// The last lines the process wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr
            .lock()
            .map(|tail| tail.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// Keeps the last [`STDERR_TAIL`] lines of `pipe` in `tail`, calling `on_line` with each.
fn drain_into(
    pipe: impl std::io::Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    mut on_line: impl FnMut(&str) + Send + 'static,
) {
    // A thread, not a task: it blocks on the pipe, and it must keep draining it for the whole life
    // of the process or the process would block on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
            if let Ok(mut tail) = tail.lock() {
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    });
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running sidecar; dropping it kills the process.
pub struct SidecarProcess {
    process: Watched,
    addr: SocketAddr,
    spawned_at: Instant,
}

impl SidecarProcess {
    /// Writes `config` (YAML) to `dir/config.yaml`, starts the sidecar with it and waits for its
    /// `listening on` line.
    pub async fn start(binary: &Path, dir: &Path, config: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let spawned_at = Instant::now();
        let (addr_tx, addr_rx) = oneshot::channel();
        let mut addr_tx = Some(addr_tx);
        let process = Watched::spawn(
            Command::new(binary)
                .arg("--config")
                .arg(&config_path)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
            move |line| {
                if let Some(addr) = listening_addr(line)
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr);
                }
            },
        )?;
        let mut process = SidecarProcess {
            process,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            spawned_at,
        };
        match tokio::time::timeout(Duration::from_secs(30), addr_rx).await {
            Ok(Ok(addr)) => {
                process.addr = addr;
                Ok(process)
            }
            _ => bail!(
                "tally-sidecar did not log `listening on ADDR` within 30s (exit: {:?}); its stderr:\n{}",
                process.process.try_wait().ok().flatten(),
                process.stderr_tail()
            ),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Polls `GET /readyz` every millisecond until 200; returns the time since the process was
    /// spawned.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let addr = self.addr;
        self.process
            .wait_until("tally-sidecar", timeout, async || {
                matches!(get(addr, "/readyz").await, Ok((StatusCode::OK, _)))
            })
            .await?;
        Ok(self.spawned_at.elapsed())
    }

    /// Resident memory now (`VmRSS`) and its peak so far (`VmHWM`), in bytes.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        self.process.memory()
    }

    /// CPU time (user + system) the sidecar has used so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        self.process.cpu_time()
    }

    /// The `/metrics` exposition.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, body) = get(self.addr, "/metrics").await?;
        if status != StatusCode::OK {
            bail!("GET /metrics answered {status}");
        }
        Ok(Metrics(String::from_utf8_lossy(&body).into_owned()))
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit before killing it.
    pub async fn stop(self, timeout: Duration) -> anyhow::Result<()> {
        self.process.terminate("tally-sidecar", timeout).await
    }

    /// SIGKILL: the sidecar gets no chance to flush or to finish a request.
    pub fn kill(self) -> anyhow::Result<()> {
        self.process.kill()
    }

    /// The last lines the sidecar wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.process.stderr_tail()
    }
}

/// Resident memory now (`VmRSS`) and its peak so far (`VmHWM`) of process `pid`, in bytes, from
/// /proc/<pid>/status.
pub fn memory_of(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .with_context(|| format!("{path} has no {name} line"))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        peak_rss: field("VmHWM:")?,
    })
}

/// CPU time (user + system) process `pid` has used so far, from /proc/<pid>/stat.
pub fn cpu_time_of(pid: u32) -> anyhow::Result<Duration> {
    let stat = Stat::read(pid)?;
    ticks_to_duration(stat.utime + stat.stime)
}

/// CPU time (user + system) of process `pid`, of its live children, and of the children it has
/// already reaped. For a PostgreSQL postmaster this is the whole server: backends, background
/// workers and the autovacuum workers that came and went.
pub fn process_tree_cpu(pid: u32) -> anyhow::Result<Duration> {
    let parent = Stat::read(pid)?;
    let mut ticks = parent.utime + parent.stime + parent.cutime + parent.cstime;
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let Some(child) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exited since the listing is simply not counted here.
        if let Ok(stat) = Stat::read(child)
            && stat.ppid == pid
        {
            ticks += stat.utime + stat.stime;
        }
    }
    ticks_to_duration(ticks)
}

/// The parent of process `pid`.
pub fn parent_of(pid: u32) -> anyhow::Result<u32> {
    Ok(Stat::read(pid)?.ppid)
}

/// The fields of /proc/<pid>/stat the benchmark uses; CPU times in clock ticks.
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl Stat {
    fn read(pid: u32) -> anyhow::Result<Stat> {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        // Fields after the command name (which may hold spaces) start at field 3, `state`;
        // ppid is field 4, utime, stime, cutime and cstime fields 14 to 17.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let (Some(ppid), Some(utime), Some(stime), Some(cutime), Some(cstime)) =
            (field(1), field(11), field(12), field(13), field(14))
        else {
            bail!("{path} has no ppid/utime/stime/cutime/cstime fields");
        };
        Ok(Stat {
            ppid: ppid as u32,
            utime,
            stime,
            cutime,
            cstime,
        })
    }
}

fn ticks_to_duration(ticks: u64) -> anyhow::Result<Duration> {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        bail!("cannot read the clock tick rate");
    }
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// The address in a `... listening on 127.0.0.1:PORT ...` log line (colour codes or not).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Bytes of memory.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub rss: u64,
    pub peak_rss: u64,
}

/// A Prometheus text exposition.
pub struct Metrics(String);

impl Metrics {
    /// The sum of every sample of `name` (all label sets), if it has any.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let value = if rest.starts_with('{') {
                rest.rsplit_once('}').map(|(_, v)| v)
            } else if rest.starts_with(' ') {
                Some(rest)
            } else {
                None
            };
            if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    /// The sum of the samples of `name` labelled `output="<output>"` (any other labels), if any.
    pub fn output(&self, name: &str, output: &str) -> Option<f64> {
        let label = format!("output=\"{output}\"");
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((labels, value)) = line
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('{'))
                .and_then(|rest| rest.rsplit_once('}'))
            else {
                continue;
            };
            if !labels.split(',').any(|l| l == label) {
                continue;
            }
            if let Some(v) = value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }
}
