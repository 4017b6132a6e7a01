//! [`TestPostgres`]: a private PostgreSQL server from Debian's packages, one per test.
//!
//! `initdb` into a temporary directory, listening only on 127.0.0.1 on a free port, its Unix
//! socket inside that directory, trust authentication (nothing else can reach it), every other
//! setting PostgreSQL's default (fsync on). `initdb` and `postgres` refuse to run as root, so when
//! the tests run as root the server runs as the `postgres` system user that Debian's package
//! creates. The server is stopped (`pg_ctl stop -m fast`, then SIGKILL) when the value is dropped;
//! when a test panics, its log is printed and the directory kept.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use crate::poll::poll_for;
use crate::ports::unused_port;

/// The superuser `initdb` creates; trust authentication, no password.
pub const USER: &str = "tally";
/// The database the tests and the sidecar use (the one `initdb` creates).
pub const DATABASE: &str = "postgres";
/// How long a fresh server may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// The Debian package that provides the server binaries.
const INSTALL_HINT: &str = "run `make test`, which installs postgresql (Debian's `postgresql` \
                            package), or set TALLY_POSTGRES_BINDIR to a directory holding initdb, \
                            pg_ctl and postgres";

/// A running private PostgreSQL server; see the module docs.
pub struct TestPostgres {
    dir: Option<TempDir>,
    bindir: PathBuf,
    port: u16,
    /// Whether the server's commands run as the `postgres` user (the tests run as root).
    as_postgres_user: bool,
}

impl TestPostgres {
    /// Creates a cluster in a fresh temporary directory, starts it and waits until it accepts
    /// connections. Panics, saying what to install, when the binaries are missing.
    pub async fn start() -> TestPostgres {
        let bindir = server_bindir();
        let as_postgres_user = is_root();
        // The `postgres` user must be able to reach the directory: under /tmp, not under a
        // private $TMPDIR of root's.
        let parent = if as_postgres_user {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("tally-pg-")
            .tempdir_in(&parent)
            .unwrap_or_else(|e| panic!("cannot create a directory in {}: {e}", parent.display()));
        if as_postgres_user {
            let (uid, gid) = postgres_user_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", dir.path().display()));
        }
        let server = TestPostgres {
            dir: Some(dir),
            bindir,
            port: unused_port(),
            as_postgres_user,
        };
        server.init();
        server.configure();
        server.launch();
        server.wait_ready().await;
        server
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for the sidecar's `postgres` output:
    /// `postgres://tally@127.0.0.1:PORT/postgres?sslmode=disable`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{USER}@127.0.0.1:{}/{DATABASE}?sslmode=disable",
            self.port
        )
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A new client connection over TCP (its connection task runs on the current runtime).
    pub async fn client(&self) -> Client {
        self.try_client().await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to the test PostgreSQL on 127.0.0.1:{}: {e}\nserver log:\n{}",
                self.port,
                self.log()
            )
        })
    }

    /// Like [`TestPostgres::client`], returning the error instead of panicking.
    pub async fn try_client(&self) -> Result<Client, tokio_postgres::Error> {
        let config = format!(
            "host=127.0.0.1 port={} user={USER} dbname={DATABASE} connect_timeout=5",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&config, NoTls).await?;
        tokio::spawn(async move {
            // Ends when the client is dropped or the server goes away; either is fine here.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Runs SQL statements (no results), panicking with the statement on failure.
    pub async fn execute(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn dir(&self) -> &Path {
        match &self.dir {
            Some(dir) => dir.path(),
            None => unreachable!("the directory is only released on drop"),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir().join("postgres.log")
    }

    /// A command running `program` from the server binaries, as the `postgres` user when the
    /// tests run as root, from the server's directory (so it can always read its working
    /// directory).
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        };
        command.current_dir(self.dir()).stdin(Stdio::null());
        command
    }

    fn run(&self, what: &str, command: &mut Command) -> Output {
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what} ({command:?}): {e}; {INSTALL_HINT}"));
        assert!(
            output.status.success(),
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        output
    }

    fn init(&self) {
        let mut initdb = self.command("initdb");
        initdb
            .arg("--pgdata")
            .arg(self.data_dir())
            .args(["--username", USER, "--auth", "trust"])
            .args(["--encoding", "UTF8", "--locale", "C"]);
        self.run("initdb", &mut initdb);
    }

    /// Listens on 127.0.0.1 only, with the socket inside the server's directory; everything
    /// else, fsync included, keeps PostgreSQL's defaults.
    fn configure(&self) {
        let conf = self.data_dir().join("postgresql.conf");
        let settings = format!(
            "\n# tally tests\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.dir().display()
        );
        let mut text = std::fs::read_to_string(&conf)
            .unwrap_or_else(|e| panic!("reading {}: {e}", conf.display()));
        text.push_str(&settings);
        // Rewriting in place keeps the file's owner (the postgres user).
        std::fs::write(&conf, text).unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
    }

    fn launch(&self) {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("start")
            .arg("--pgdata")
            .arg(self.data_dir())
            .arg("--log")
            .arg(self.log_path())
            // Readiness is polled below, with a connection.
            .arg("--no-wait");
        self.run("pg_ctl start", &mut pg_ctl);
    }

    async fn wait_ready(&self) {
        let mut last_error = String::new();
        let ready = poll_for(READY_WITHIN, async || match self.try_client().await {
            Ok(client) => client.simple_query("SELECT 1").await.ok().map(|_| ()),
            Err(e) => {
                last_error = e.to_string();
                None
            }
        })
        .await;
        if ready.is_none() {
            panic!(
                "the test PostgreSQL did not accept connections on 127.0.0.1:{} within \
                 {READY_WITHIN:?} (last error: {last_error})\nserver log:\n{}",
                self.port,
                self.log()
            );
        }
    }

    /// The postmaster's pid, from `postmaster.pid`, while it runs.
    fn postmaster_pid(&self) -> Option<libc::pid_t> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn stop(&self) {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("stop")
            .arg("--pgdata")
            .arg(self.data_dir())
            .args(["--mode", "fast", "--timeout", "20"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let stopped = pg_ctl.status().is_ok_and(|s| s.success());
        if !stopped && let Some(pid) = self.postmaster_pid() {
            // SAFETY: kill(2) on the postmaster this value started; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let kept = self.dir.take().map(TempDir::keep);
            eprintln!(
                "----- test PostgreSQL log (last {} lines; files kept in {}) -----\n{}",
                tail.len(),
                kept.map(|p| p.display().to_string()).unwrap_or_default(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// `$TALLY_POSTGRES_BINDIR`, else the newest `/usr/lib/postgresql/<major>/bin` (Debian's layout).
fn server_bindir() -> PathBuf {
    let has_server = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("TALLY_POSTGRES_BINDIR") {
        let dir = PathBuf::from(dir);
        assert!(
            has_server(&dir),
            "TALLY_POSTGRES_BINDIR={} has no initdb, pg_ctl and postgres; {INSTALL_HINT}",
            dir.display()
        );
        return dir;
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major);
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server binaries under {}/<version>/bin; {INSTALL_HINT}",
            root.display()
        ),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of the `postgres` system user.
fn postgres_user_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `id {flag} postgres`: {e}"));
        assert!(
            output.status.success(),
            "the tests run as root, and initdb refuses root, but there is no `postgres` user to \
             run PostgreSQL as; {INSTALL_HINT} (the package creates the user)"
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("`id {flag} postgres` printed no number: {e}"))
    };
    (id("-u"), id("-g"))
}
