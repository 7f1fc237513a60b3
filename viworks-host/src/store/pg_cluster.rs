//! A throwaway Postgres cluster from the machine's own `initdb`/`pg_ctl`/`postgres`, in a
//! temporary directory, listening on a free loopback port (its Unix socket in that directory
//! too), trusting every local connection. Two users include this file: the store tests, which
//! share one fast cluster per test binary (`fsync=off`, started lazily, a fresh database per test
//! so that tests run in parallel), and `viworks-loadgen`, which starts a durable one (Postgres's
//! defaults) to measure the host on, and stops it itself.
//!
//! Postgres refuses to run as root, so under uid 0 its programs run as `nobody` (through
//! `runuser`, or `setpriv` where there is no `runuser`), which owns the directory.
//!
//! A watchdog shell process, in its own process group, checks once a second whether the process
//! that started the cluster is still alive; once it has exited, however it ended (success, panic,
//! abort, a signal), the watchdog stops the cluster with `pg_ctl stop -m immediate` and deletes
//! the directory. The tests' cluster is a static, never dropped, so this is how it goes away; no
//! server is left running a second or two after `cargo test` ends.
//!
//! Without Postgres binaries the tests fail with the reason and the way to install them: the
//! contract macro has no way to skip, so the message says how to leave them out
//! (`--skip contract_postgres`). Binaries are looked for on `PATH`, then under
//! `/usr/lib/postgresql/<version>/bin` (where Debian's `postgresql` package puts them), newest
//! version first.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// The superuser `initdb` creates.
const SUPERUSER: &str = "postgres";

/// The database `initdb` creates, which new databases are created from.
const MAINTENANCE_DB: &str = "postgres";

/// What a cluster gives up for speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// `fsync`, `synchronous_commit` and `full_page_writes` off: a commit returns before its
    /// WAL reaches the disk, and a crash of the machine can lose or corrupt data. For tests.
    Fast,
    /// Postgres's defaults: a commit returns once its WAL is flushed to disk, as SQLite's
    /// `synchronous=FULL` in WAL mode does. For measurements.
    #[allow(dead_code, reason = "the load generator's, which includes this file too")]
    Durable,
}

impl Durability {
    /// The server settings that say so, as `postgres -c` options.
    fn settings(self) -> &'static str {
        match self {
            Durability::Fast => "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            Durability::Durable => "-c fsync=on -c synchronous_commit=on -c full_page_writes=on",
        }
    }
}

/// Whether a missing Postgres is an error here rather than a reason to skip: under `CI=true`.
pub(crate) fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A running cluster and the watchdog that removes it once its starter has exited.
pub(crate) struct Cluster {
    port: u16,
    databases: AtomicU64,
    dir: PathBuf,
    pg_ctl: PathBuf,
    runner: Runner,
    /// Outlives this process on purpose, unless [`Cluster::stop`] ends it first.
    watchdog: Child,
}

#[cfg(test)]
static CLUSTER: std::sync::OnceLock<Result<Cluster, String>> = std::sync::OnceLock::new();

/// Creates a new, empty database on the tests' shared fast cluster (starting the cluster on
/// first use) and returns how to connect to it and its name; `None`, after printing why, when
/// this machine has no Postgres to start.
///
/// Under `CI=true` Postgres is required: a missing one panics with the reason.
#[cfg(test)]
pub(crate) async fn fresh_database() -> Option<(tokio_postgres::Config, String)> {
    let cluster = match CLUSTER.get_or_init(|| Cluster::start(Durability::Fast)) {
        Ok(cluster) => cluster,
        Err(reason) if required() => panic!("CI needs Postgres for the Postgres store tests: {reason}"),
        Err(reason) => {
            eprintln!("skipped: no Postgres for the Postgres store tests: {reason} (`apt-get install -y postgresql`)");
            return None;
        }
    };
    let name = cluster.create_database("test").await.unwrap_or_else(|e| panic!("{e}"));
    Some((cluster.config(&name), name))
}

impl Cluster {
    /// Starts a cluster of `durability` in a new temporary directory, as `nobody` when this
    /// process is root. Blocks for `initdb` and the server's start, a few seconds; fails with
    /// the reason (no binaries, no way to drop root, `initdb` or `pg_ctl` failed, with the
    /// server's log).
    pub(crate) fn start(durability: Durability) -> Result<Cluster, String> {
        let bin = binaries()?;
        let runner = Runner::for_this_process()?;
        let dir = tempfile::Builder::new()
            .prefix("viworks-pg-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?
            .keep();
        let started = Self::start_in(&bin, runner, &dir, durability);
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started
    }

    fn start_in(bin: &Path, runner: Runner, dir: &Path, durability: Durability) -> Result<Cluster, String> {
        runner.hand_over(dir)?;
        let data = dir.join("data");
        let log = dir.join("postgres.log");
        let mut initdb = runner.command(&bin.join("initdb"), dir);
        initdb.arg("-D").arg(&data).args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "-N"]);
        run(&mut initdb, "initdb")?;
        let pg_ctl = bin.join("pg_ctl");
        // A free port can be taken by someone else before the server binds it: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let options = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {} {} -c max_connections=300",
                dir.display(),
                durability.settings()
            );
            let mut start = runner.command(&pg_ctl, dir);
            start.arg("-D").arg(&data).arg("-l").arg(&log).args(["-w", "-t", "60", "-o", &options, "start"]);
            match run(&mut start, "pg_ctl start") {
                Ok(()) => {
                    let watchdog = watchdog(&runner, &pg_ctl, &data, dir)?;
                    return Ok(Cluster {
                        port,
                        databases: AtomicU64::new(0),
                        dir: dir.to_path_buf(),
                        pg_ctl,
                        runner,
                        watchdog,
                    });
                }
                Err(e) => {
                    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
                    last = format!("{e}\n{server_log}");
                }
            }
        }
        Err(last)
    }

    /// How to connect to `database` as the superuser, over TCP.
    pub(crate) fn config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(self.port).user(SUPERUSER).dbname(database);
        config
    }

    /// [`config`](Self::config) as a `postgres://` URL (there is no password).
    #[allow(dead_code, reason = "the load generator's, which includes this file too")]
    pub(crate) fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's process id, from the first line of `postmaster.pid`; `None` when it cannot
    /// be read.
    #[allow(dead_code, reason = "the load generator's, which includes this file too")]
    pub(crate) fn server_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data").join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Creates a new, empty database named `prefix_N` (N counts up from 0) and returns its
    /// name. Fails when the cluster cannot be reached or refuses.
    pub(crate) async fn create_database(&self, prefix: &str) -> Result<String, String> {
        let name = format!("{prefix}_{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let (client, connection) = self
            .config(MAINTENANCE_DB)
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot connect to the cluster: {e}"))?;
        let connection = tokio::spawn(connection);
        let created = client.batch_execute(&format!("CREATE DATABASE {name}")).await;
        drop(client);
        let closed = connection.await;
        created.map_err(|e| format!("cannot create the database {name}: {e}"))?;
        match closed {
            Ok(Ok(())) => Ok(name),
            Ok(Err(e)) => Err(format!("the connection to the cluster failed: {e}")),
            Err(e) => Err(format!("the connection task failed: {e}")),
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`, waiting for it), ends the watchdog and deletes
    /// the directory. Blocks until the server has stopped, up to a minute; the directory is
    /// deleted even when stopping failed, which is then the error.
    #[allow(dead_code, reason = "the load generator's, which includes this file too")]
    pub(crate) fn stop(mut self) -> Result<(), String> {
        let mut stop = self.runner.command(&self.pg_ctl, &self.dir);
        stop.arg("-D").arg(self.dir.join("data")).args(["-w", "-t", "60", "-m", "fast", "stop"]);
        let stopped = run(&mut stop, "pg_ctl stop");
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let removed =
            std::fs::remove_dir_all(&self.dir).map_err(|e| format!("cannot delete {}: {e}", self.dir.display()));
        stopped.and(removed)
    }
}

/// The first directory holding `initdb`, `pg_ctl` and `postgres`.
fn binaries() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
                    Some((version, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    candidates.extend(versions.into_iter().map(|(_, dir)| dir));
    candidates
        .into_iter()
        .find(|dir| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file()))
        .ok_or_else(|| "initdb, pg_ctl and postgres are neither on PATH nor under /usr/lib/postgresql/*/bin".into())
}

/// How Postgres programs are run: directly, or as `nobody` when this process is root.
enum Runner {
    Direct,
    As { uid: nix::unistd::Uid, gid: nix::unistd::Gid, via: PathBuf },
}

impl Runner {
    fn for_this_process() -> Result<Runner, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(Runner::Direct);
        }
        let user = nix::unistd::User::from_name("nobody")
            .map_err(|e| format!("cannot look up the user nobody: {e}"))?
            .ok_or("running as root, and there is no user nobody to run Postgres as")?;
        let via = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/setpriv", "/bin/setpriv"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or("running as root, and neither runuser nor setpriv is there to drop to nobody")?;
        Ok(Runner::As { uid: user.uid, gid: user.gid, via })
    }

    /// Gives `dir` to the user the programs run as.
    fn hand_over(&self, dir: &Path) -> Result<(), String> {
        match self {
            Runner::Direct => Ok(()),
            Runner::As { uid, gid, .. } => std::os::unix::fs::chown(dir, Some(uid.as_raw()), Some(gid.as_raw()))
                .map_err(|e| format!("cannot give {} to nobody: {e}", dir.display())),
        }
    }

    /// The words that run a program as the right user, before the program itself.
    fn prefix(&self) -> Vec<String> {
        match self {
            Runner::Direct => Vec::new(),
            Runner::As { uid, gid, via } if via.ends_with("setpriv") => vec![
                via.display().to_string(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ],
            Runner::As { via, .. } => vec![via.display().to_string(), "-u".into(), "nobody".into(), "--".into()],
        }
    }

    /// `program` run as the right user, in `dir`, reading nothing.
    fn command(&self, program: &Path, dir: &Path) -> Command {
        let prefix = self.prefix();
        let mut command = match prefix.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
        };
        command.current_dir(dir).stdin(Stdio::null());
        command
    }
}

/// Runs `command` to completion; its output is the error when it fails.
fn run(command: &mut Command, what: &str) -> Result<(), String> {
    // The server that pg_ctl leaves running writes to its log file, not to these pipes, so
    // waiting for their end does not wait for the server.
    let output = command.output().map_err(|e| format!("cannot run {what}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("cannot find a free port: {e}"))
}

/// Starts the process that stops the cluster and deletes `dir` once this process has exited.
fn watchdog(runner: &Runner, pg_ctl: &Path, data: &Path, dir: &Path) -> Result<Child, String> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let stop: Vec<String> = runner
        .prefix()
        .into_iter()
        .chain([pg_ctl.display().to_string(), "-D".into(), data.display().to_string()])
        .map(|word| quote(&word))
        .collect();
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} stop -m immediate; rm -rf {dir}",
        pid = std::process::id(),
        stop = stop.join(" "),
        dir = quote(&dir.display().to_string()),
    );
    let mut command = Command::new("sh");
    command.arg("-c").arg(script).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // Its own process group: a Ctrl-C to the test run does not stop the watchdog first.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command.spawn().map_err(|e| format!("cannot start the cluster's watchdog: {e}"))
}
