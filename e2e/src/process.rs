//! One component of the control plane running as a child process, its output captured in a log file.

use std::{
    ffi::OsString,
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    thread,
};

use crate::Error;

/// A running component. Dropping it kills the process.
#[derive(Debug)]
pub(crate) struct ComponentProcess {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ComponentProcess {
    /// Starts `program` with `args`, its stdout and stderr appended to `log`.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[OsString],
        log: PathBuf,
    ) -> Result<Self, Error> {
        let log_file =
            File::create(&log).map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
        let log_file_too = log_file
            .try_clone()
            .map_err(|e| Error::io(format!("opening {} twice", log.display()), e))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_file_too);
        let child = spawn_tied_to_this_process(command)
            .map_err(|e| Error::io(format!("starting {name} ({})", program.display()), e))?;
        Ok(ComponentProcess { name, child, log })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// An error if the process has exited, so a start-up wait fails at once instead of at its deadline.
    pub fn ensure_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                component: self.name,
                status,
                log: self.log.clone(),
            }),
            Err(e) => Err(Error::io(
                format!("checking whether {} is running", self.name),
                e,
            )),
        }
    }

    /// The error lines and the last `tail` lines of the log, for a report of a failed start. A component that
    /// exits on a fatal error often logs it before a burst of unrelated lines, so the tail alone can miss it.
    pub fn log_summary(&self, tail: usize) -> String {
        let text = match fs::read(&self.log) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                return format!(
                    "---- {}: cannot read {}: {e} ----",
                    self.name,
                    self.log.display()
                );
            }
        };
        let lines: Vec<&str> = text.lines().collect();
        let errors: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|line| is_error(line))
            .collect();
        let errors = &errors[errors.len().saturating_sub(tail)..];
        let tail = &lines[lines.len().saturating_sub(tail)..];
        format!(
            "---- {name}: errors in {log} ----\n{errors}\n---- {name}: last {n} lines of {log} ----\n{tail}",
            name = self.name,
            log = self.log.display(),
            errors = errors.join("\n"),
            n = tail.len(),
            tail = tail.join("\n"),
        )
    }

    /// Kills the process and reaps it. The control plane's state is thrown away, so there is nothing to shut down
    /// gracefully.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // An error here means it exited in the meantime.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ComponentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` so that the kernel kills it when this process dies, even by SIGKILL, so an aborted test run
/// leaves no etcd or API server behind.
///
/// Linux delivers the parent-death signal when the *thread* that forked the child exits, and test harnesses run
/// each test on a short-lived thread. So every child is forked from one spawner thread that lives as long as the
/// process.
fn spawn_tied_to_this_process(mut command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<io::Result<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("tally-e2e-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(requests)
    });
    let spawner = spawner
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("spawner thread: {e}")))?;

    set_parent_death_signal(&mut command);
    let (reply, response) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawner thread has stopped"))?;
    response
        .recv()
        .map_err(|_| io::Error::other("the spawner thread has stopped"))?
}

/// Makes the kernel SIGKILL the process `command` starts when the thread that spawns it exits, even when this
/// process dies by a signal that skips every `Drop`, so no test leaves a server running. (The signal follows the
/// spawning *thread*: spawn from a thread that lives as long as the child should.)
#[cfg(target_os = "linux")]
pub fn set_parent_death_signal(command: &mut Command) {
    use std::os::unix::process::CommandExt;

    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Not available outside Linux: children are killed by `Drop` only.
#[cfg(not(target_os = "linux"))]
pub fn set_parent_death_signal(_command: &mut Command) {}

/// klog's error and fatal lines (`E1121 05:26:33.945498 ...`) and etcd's JSON ones.
fn is_error(line: &str) -> bool {
    let klog = matches!(line.as_bytes(), [b'E' | b'F', d, ..] if d.is_ascii_digit());
    let json = [
        "\"level\":\"error\"",
        "\"level\":\"fatal\"",
        "\"level\":\"panic\"",
    ]
    .iter()
    .any(|level| line.contains(level));
    klog || json
}

#[cfg(test)]
mod tests {
    use super::is_error;

    #[test]
    fn recognises_klog_and_etcd_error_lines() {
        assert!(is_error(
            r#"E1121 05:26:33.945498   12893 run.go:72] "command failed" err="cannot use public IP""#
        ));
        assert!(is_error("F1121 05:26:33.945498   12893 server.go:1] fatal"));
        assert!(is_error(
            r#"{"level":"fatal","ts":"2026-11-21T05:26:25Z","msg":"listen tcp: address already in use"}"#
        ));
        assert!(!is_error(
            "I1121 05:26:26.640311   12764 handler.go:309] Adding GroupVersion"
        ));
        assert!(!is_error(
            r#"{"level":"info","msg":"Error is only a word here"}"#
        ));
        assert!(!is_error("Error: not a klog line"));
    }
}
