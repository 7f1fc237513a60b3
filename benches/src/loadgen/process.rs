//! The child processes of a run: `viworks-host` (`init` or `token create`, then `serve`, once
//! per store) and the echo server of the baseline. Each runs with its output in a log file in
//! the data directory, inherits the raised open-file limit, is killed if the load generator
//! goes away, and is measured through `/proc/<pid>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::LoadgenError;
use super::system::{self, FileLimit, Memory};

/// How long `viworks-host init` or `token create` may take.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a child may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a child has to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// A running child process.
#[derive(Debug)]
pub struct Process {
    what: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Process {
    fn spawn(what: &'static str, mut command: Command, log: PathBuf) -> Result<Process, LoadgenError> {
        die_with_parent(&mut command);
        let file = std::fs::File::create(&log).map_err(LoadgenError::io("create", &log))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LoadgenError::Spawn { what, source })?;
        let pid = child.id().ok_or(LoadgenError::Spawn { what, source: std::io::Error::other("exited at once") })?;
        Ok(Process { what, child, pid, log })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its log file (its stderr).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its resident memory now.
    pub fn memory(&self) -> Result<Memory, LoadgenError> {
        system::memory_of(self.pid)
    }

    /// Its open-file limit.
    pub fn file_limit(&self) -> Result<FileLimit, LoadgenError> {
        system::file_limit_of(self.pid)
    }

    /// Fails if it has exited.
    pub fn check_alive(&mut self) -> Result<(), LoadgenError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                Err(LoadgenError::ChildExited { what: self.what, status: status.to_string(), log: self.log.clone() })
            }
            Err(source) => Err(LoadgenError::Io { action: "wait for", path: self.log.clone(), source }),
        }
    }

    /// Waits until something accepts TCP connections on `addr`, failing if the process exits
    /// first or a minute passes.
    pub async fn wait_listening(&mut self, addr: SocketAddr) -> Result<(), LoadgenError> {
        let started = tokio::time::Instant::now();
        loop {
            self.check_alive()?;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(LoadgenError::NotReady {
                    what: self.what,
                    addr: addr.to_string(),
                    waited: READY_TIMEOUT,
                    log: self.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks it to stop (SIGTERM) and waits up to 20 s, then kills it. Returns
    /// whether it stopped by itself.
    pub async fn stop(mut self) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else { return false };
        if kill(Pid::from_raw(pid), Signal::SIGTERM).is_err() {
            return false;
        }
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(Ok(_)) => true,
            _ => {
                let _ = self.child.kill().await;
                false
            }
        }
    }
}

/// Makes the child receive SIGKILL when the load generator dies, however it dies, so that no
/// host holding thousands of sockets outlives a killed run.
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; it makes one prctl(2) call and allocates nothing.
    unsafe {
        command.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
}

/// The `viworks-host` binary next to this executable.
pub fn default_host_bin() -> Result<PathBuf, LoadgenError> {
    let exe = std::env::current_exe().map_err(LoadgenError::io("locate", "the current executable"))?;
    Ok(exe.with_file_name("viworks-host"))
}

/// `viworks-host init`: creates the data directory with its PKI, and the store at `store`;
/// returns the admin token it prints.
pub async fn init_host(host_bin: &Path, data_dir: &Path, store: &str) -> Result<String, LoadgenError> {
    let mut command = Command::new(host_bin);
    command.arg("init").arg("--data-dir").arg(data_dir).arg("--store").arg(store);
    printed_token(host_bin, "init", command, "admin_token=").await
}

/// `viworks-host token create --role admin`: creates an admin token in the store at `store`
/// (migrating it first, as opening it does) for a host on the PKI already in `data_dir`;
/// returns the token.
pub async fn create_token(host_bin: &Path, data_dir: &Path, store: &str) -> Result<String, LoadgenError> {
    let mut command = Command::new(host_bin);
    command.args(["token", "create", "--role", "admin", "--name", "loadgen", "--data-dir"]);
    command.arg(data_dir).arg("--store").arg(store);
    printed_token(host_bin, "token create", command, "token=").await
}

/// Runs a `viworks-host` subcommand to its end (a minute at most) and returns the value of
/// the stdout line starting with `prefix`.
async fn printed_token(
    host_bin: &Path,
    what: &'static str,
    mut command: Command,
    prefix: &str,
) -> Result<String, LoadgenError> {
    if !host_bin.is_file() {
        return Err(LoadgenError::HostBinaryMissing { path: host_bin.to_path_buf() });
    }
    command.kill_on_drop(true);
    die_with_parent(&mut command);
    let output = match tokio::time::timeout(INIT_TIMEOUT, command.output()).await {
        Ok(output) => output.map_err(|source| LoadgenError::Spawn { what: "viworks-host", source })?,
        Err(_) => {
            return Err(LoadgenError::HostCommand { command: what, detail: format!("no answer in {INIT_TIMEOUT:?}") });
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let token = stdout.lines().find_map(|line| line.strip_prefix(prefix)).map(str::trim);
    match token {
        Some(token) if output.status.success() && !token.is_empty() => Ok(token.to_owned()),
        _ => Err(LoadgenError::HostCommand {
            command: what,
            detail: format!(
                "{}; stdout: {}; stderr: {}",
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }),
    }
}

/// Where a started host listens.
#[derive(Clone, Copy, Debug)]
pub struct HostAddrs {
    /// The REST API (plain HTTP).
    pub api: SocketAddr,
    /// The agent endpoint (WSS).
    pub agents: SocketAddr,
}

/// `viworks-host serve` with the configuration file `config`, listening on `addrs`, its
/// stderr to `log`; returns once the API accepts connections.
pub async fn serve_host(
    host_bin: &Path,
    data_dir: &Path,
    config: &Path,
    store: &str,
    addrs: HostAddrs,
    log: PathBuf,
) -> Result<Process, LoadgenError> {
    let mut command = Command::new(host_bin);
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--store")
        .arg(store)
        .arg("--api-addr")
        .arg(addrs.api.to_string())
        .arg("--agent-addr")
        .arg(addrs.agents.to_string());
    let mut host = Process::spawn("viworks-host serve", command, log)?;
    // The host binds the agent listener before the API's, so one answering means both are up
    // (and probing the agent endpoint would log a refused TLS handshake).
    host.wait_listening(addrs.api).await?;
    Ok(host)
}

/// The echo server child: `<echo_bin> echo-server --data-dir D --addr A --journal D/echo-journal.db`.
pub async fn serve_echo(echo_bin: &Path, data_dir: &Path, addr: SocketAddr) -> Result<Process, LoadgenError> {
    let mut command = Command::new(echo_bin);
    command.arg("echo-server").arg("--data-dir").arg(data_dir).arg("--addr").arg(addr.to_string());
    command.arg("--journal").arg(data_dir.join("echo-journal.db"));
    let mut echo = Process::spawn("the echo server", command, data_dir.join("echo.log"))?;
    echo.wait_listening(addr).await?;
    Ok(echo)
}

/// What a tracing log file holds: its size and its warnings and errors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogCounts {
    /// Bytes written.
    pub bytes: u64,
    /// Lines.
    pub lines: usize,
    /// `WARN` lines.
    pub warnings: usize,
    /// `ERROR` lines.
    pub errors: usize,
    /// The first `ERROR` line without its timestamp, shortened to 200 characters.
    pub first_error: Option<String>,
}

/// Counts the lines, warnings and errors in `log` (colour codes ignored); zero when it
/// cannot be read.
pub fn count_log(log: &Path) -> LogCounts {
    let Ok(bytes) = std::fs::read(log) else { return LogCounts::default() };
    let text = String::from_utf8_lossy(&bytes);
    let mut counts = LogCounts { bytes: bytes.len() as u64, ..LogCounts::default() };
    for line in text.lines() {
        counts.lines += 1;
        // The level is the first word after the timestamp, possibly wrapped in ANSI colours.
        let plain = strip_ansi(line);
        let level = plain.split_whitespace().nth(1).unwrap_or_default();
        match level {
            "WARN" => counts.warnings += 1,
            "ERROR" => {
                counts.errors += 1;
                if counts.first_error.is_none() {
                    let message: String = plain.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
                    counts.first_error = Some(message.chars().take(200).collect());
                }
            }
            _ => {}
        }
    }
    counts
}

/// `line` without ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_counted_with_or_without_colours() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("host.log");
        let text = "2026-11-23T18:00:00Z  INFO viworks_host: started\n\
                    \u{1b}[2m2026-11-23T18:00:01Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x: slow\n\
                    2026-11-23T18:00:02Z ERROR x: broken\n";
        std::fs::write(&log, text).expect("write");
        let counts = count_log(&log);
        assert_eq!((counts.lines, counts.warnings, counts.errors), (3, 1, 1));
        assert_eq!(counts.bytes, text.len() as u64);
        assert_eq!(counts.first_error.as_deref(), Some("ERROR x: broken"));
    }
}
