//! The one executor: every command the agent runs goes through [`Executor::execute`].
//!
//! A command is parsed against the verb registry, given a time limit, run (system probe,
//! Docker engine, or a program in its own process group) and answered with a result that
//! always fits in one protocol message.

pub mod docker;
mod process;
pub mod system;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use viworks_core::verbs::{Args, Exec};
use viworks_core::wire::{Capability, Command, CommandResult, ResultError, ResultStatus, Text};

pub use docker::{ContainerCounts, Docker, DockerError};
pub use system::{Snapshot, SystemProbe};

use process::{Captured, Ending, Finished};

/// The script files under [`ExecutorConfig::scripts_root`], one per script verb.
const SCRIPTS: [&str; 4] = ["add_user", "delete_user", "add_vpn_user", "delete_vpn_user"];

/// The largest serialized result sent as is. A message may be 1 MiB; this leaves room for
/// the envelope and the tag, with margin.
const MAX_RESULT_BYTES: usize = 768 * 1024;

/// How long [`Executor::capabilities`] waits for the Docker engine to answer.
const DOCKER_PROBE_LIMIT: Duration = Duration::from_secs(5);

/// What the executor may run and how.
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// Where the user and VPN-user scripts live.
    pub scripts_root: PathBuf,
    /// Absolute paths `exec` may run; empty turns `exec` off.
    pub exec_allow: Vec<PathBuf>,
    /// The longest any command may run on this machine, whatever the host asks.
    pub max_timeout: Duration,
    /// Bytes of output kept per stream (stdout, stderr, logs); the rest is cut and marked.
    pub output_cap: usize,
    /// The Docker engine's socket, or `None` when no engine is to be used.
    pub docker_socket: Option<PathBuf>,
}

/// Runs commands. Cheap to clone; clones share the probe and the engine handle.
#[derive(Clone, Debug)]
pub struct Executor {
    shared: Arc<Shared>,
}

/// What every clone of an [`Executor`] shares.
#[derive(Debug)]
struct Shared {
    config: ExecutorConfig,
    docker: Docker,
    /// Locked only on a blocking thread, for the length of one snapshot.
    probe: Mutex<SystemProbe>,
}

impl Executor {
    /// An executor with `config`.
    pub fn new(config: ExecutorConfig) -> Executor {
        let docker = Docker::new(config.docker_socket.clone());
        Executor { shared: Arc::new(Shared { config, docker, probe: Mutex::new(SystemProbe::new()) }) }
    }

    /// What this machine can run now: `system`, `scripts` when the four scripts are present
    /// and executable, `docker` when an engine answers, `exec` when an allow-list is set.
    ///
    /// Cost: four `stat` calls and one engine ping (waited for at most 5 s).
    pub async fn capabilities(&self) -> Vec<Capability> {
        let config = &self.shared.config;
        let mut names = vec!["system"];
        if scripts_present(&config.scripts_root).await {
            names.push("scripts");
        }
        if tokio::time::timeout(DOCKER_PROBE_LIMIT, self.shared.docker.available()).await.unwrap_or(false) {
            names.push("docker");
        }
        if !config.exec_allow.is_empty() {
            names.push("exec");
        }
        names.into_iter().filter_map(|name| Capability::new(name).ok()).collect()
    }

    /// Runs one command to its result. Never panics and never outlives the command's timeout
    /// (capped by [`ExecutorConfig::max_timeout`]) by more than the time to kill what it ran.
    pub async fn execute(&self, command: &Command) -> CommandResult {
        let started = Instant::now();
        let outcome = match viworks_core::verbs::parse(&command.verb, &command.args) {
            Err(error) => Outcome::rejected(error.code(), &error.to_string()),
            Ok(args) => {
                let limit = time_limit(&args, command.timeout_ms, self.shared.config.max_timeout);
                self.run(&args, limit).await
            }
        };
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let result = fit_in_a_message(outcome.into_result(command, duration_ms));
        tracing::debug!(
            command_id = %command.command_id,
            verb = %command.verb,
            status = ?result.status,
            duration_ms,
            "command finished"
        );
        result
    }

    /// The Docker engine handle.
    pub fn docker(&self) -> Docker {
        self.shared.docker.clone()
    }

    /// Runs parsed arguments within `limit`.
    async fn run(&self, args: &Args, limit: Duration) -> Outcome {
        let config = &self.shared.config;
        match args {
            Args::GetSystemHealth => within(limit, self.system_health()).await,
            Args::DockerPs(_)
            | Args::DockerInspect(_)
            | Args::DockerLogs(_)
            | Args::DockerStats(_)
            | Args::DockerStart(_)
            | Args::DockerStop(_)
            | Args::DockerRestart(_)
            | Args::DockerRm(_)
            | Args::DockerPull(_)
            | Args::DockerRun(_) => within(limit, self.docker_verb(args)).await,
            Args::Exec(exec) => match allowed(&config.exec_allow, exec) {
                Ok(program) => run_program(program, &exec.args, limit, config.output_cap).await,
                Err(refusal) => refusal,
            },
            _ => match args.script_argv() {
                Some((script, argv)) => {
                    run_program(&config.scripts_root.join(script), &argv, limit, config.output_cap).await
                }
                None => Outcome::rejected("unsupported_verb", &format!("this agent cannot run {}", args.verb())),
            },
        }
    }

    /// `get_system_health`: the probe's snapshot and the engine's container counts.
    async fn system_health(&self) -> Outcome {
        let shared = Arc::clone(&self.shared);
        let probe = tokio::task::spawn_blocking(move || {
            // A panic inside sysinfo leaves the probe's counters as they were: still usable.
            shared.probe.lock().unwrap_or_else(PoisonError::into_inner).snapshot()
        });
        let (snapshot, containers) = tokio::join!(probe, self.shared.docker.container_counts());
        let snapshot = match snapshot {
            Ok(snapshot) => snapshot,
            Err(error) => return Outcome::failed("probe_failed", &format!("the system probe failed: {error}")),
        };
        let containers = containers.map_or(
            Value::Null,
            |counts| json!({"running": counts.running, "paused": counts.paused, "stopped": counts.stopped}),
        );
        match serde_json::to_value(&snapshot) {
            Ok(Value::Object(mut output)) => {
                output.insert("containers".to_string(), containers);
                Outcome::succeeded(Value::Object(output))
            }
            _ => Outcome::failed("probe_failed", "the system snapshot could not be encoded"),
        }
    }

    /// A Docker verb, answered by the engine.
    async fn docker_verb(&self, args: &Args) -> Outcome {
        match self.shared.docker.run(args, self.shared.config.output_cap).await {
            Ok(output) => Outcome::succeeded(output),
            Err(error) => Outcome::failed(error.code(), &error.to_string()),
        }
    }
}

/// The time a command gets: what it asked for (the verb's default when it asked for 0),
/// capped by the verb's maximum and by this machine's.
fn time_limit(args: &Args, requested_ms: u64, machine_max: Duration) -> Duration {
    let spec = args.spec();
    let asked = match requested_ms {
        // The default, raised where the arguments need more (a `docker.stop` grace period).
        0 => args.timeout(None).unwrap_or(spec.default_timeout),
        ms => Duration::from_millis(ms).min(spec.max_timeout),
    };
    asked.min(machine_max)
}

/// The program `exec` may run, or the refusal: only a path spelled exactly as on the
/// allow-list runs, and nothing runs when the list is empty.
fn allowed<'a>(allow: &[PathBuf], exec: &'a Exec) -> Result<&'a Path, Outcome> {
    if allow.is_empty() {
        return Err(Outcome::rejected("exec_disabled", "exec is turned off on this agent: it has no allow-list"));
    }
    if !allow.iter().any(|entry| entry.as_os_str() == OsStr::new(&exec.path)) {
        return Err(Outcome::rejected("not_allowed", &format!("{} is not on this agent's exec allow-list", exec.path)));
    }
    Ok(Path::new(&exec.path))
}

/// Whether every script is a regular file with an execute bit set.
async fn scripts_present(root: &Path) -> bool {
    for script in SCRIPTS {
        match tokio::fs::metadata(root.join(script)).await {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {}
            _ => return false,
        }
    }
    true
}

/// `work`, or `timed_out` when it takes longer than `limit`.
async fn within(limit: Duration, work: impl Future<Output = Outcome>) -> Outcome {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| Outcome::timed_out(limit, Value::Null))
}

/// A program run to its end and reported with its output.
async fn run_program(program: &Path, argv: &[String], limit: Duration, cap: usize) -> Outcome {
    match process::run(program, argv, limit, cap).await {
        Ok(finished) => Outcome::from_process(finished, limit),
        Err(error) => Outcome::failed("spawn_failed", &format!("could not start {}: {error}", program.display())),
    }
}

/// A result without its command id and duration.
#[derive(Debug)]
struct Outcome {
    status: ResultStatus,
    exit_code: Option<i32>,
    output: Value,
    error: Option<(&'static str, String)>,
}

impl Outcome {
    fn succeeded(output: Value) -> Outcome {
        Outcome { status: ResultStatus::Succeeded, exit_code: None, output, error: None }
    }

    fn failed(code: &'static str, message: &str) -> Outcome {
        Outcome {
            status: ResultStatus::Failed,
            exit_code: None,
            output: Value::Null,
            error: Some((code, message.into())),
        }
    }

    fn rejected(code: &'static str, message: &str) -> Outcome {
        Outcome {
            status: ResultStatus::Rejected,
            exit_code: None,
            output: Value::Null,
            error: Some((code, message.into())),
        }
    }

    fn timed_out(limit: Duration, output: Value) -> Outcome {
        let message = format!("ran past its time limit of {limit:?} and was stopped");
        Outcome { status: ResultStatus::TimedOut, exit_code: None, output, error: Some(("timed_out", message)) }
    }

    fn from_process(finished: Finished, limit: Duration) -> Outcome {
        let output = process_output(&finished.stdout, &finished.stderr);
        match finished.ending {
            Ending::Exited(0) => Outcome { exit_code: Some(0), ..Outcome::succeeded(output) },
            Ending::Exited(code) => Outcome {
                status: ResultStatus::Failed,
                exit_code: Some(code),
                output,
                error: Some(("exit_status", format!("exited with status {code}"))),
            },
            Ending::Signaled(signal) => {
                let name = nix::sys::signal::Signal::try_from(signal).map_or("an unknown signal", |s| s.as_str());
                let message = format!("killed by signal {signal} ({name})");
                Outcome { status: ResultStatus::Failed, exit_code: None, output, error: Some(("signaled", message)) }
            }
            Ending::TimedOut => Outcome::timed_out(limit, output),
        }
    }

    fn into_result(self, command: &Command, duration_ms: u64) -> CommandResult {
        CommandResult {
            command_id: command.command_id.clone(),
            status: self.status,
            exit_code: self.exit_code,
            output: self.output,
            error: self
                .error
                .map(|(code, message)| ResultError { code: Text::lossy(code), message: Text::lossy(&message) }),
            duration_ms,
        }
    }
}

/// The output of a program: each stream as text, whether it was cut, and its full length.
fn process_output(stdout: &Captured, stderr: &Captured) -> Value {
    json!({
        "stdout": stdout.text(),
        "stderr": stderr.text(),
        "stdout_truncated": stdout.truncated(),
        "stderr_truncated": stderr.truncated(),
        "stdout_bytes": stdout.total,
        "stderr_bytes": stderr.total,
    })
}

/// `result`, with its output replaced by a note when it would not fit in a message.
///
/// The status and exit code stay: the command did what it did, only its output is lost.
fn fit_in_a_message(mut result: CommandResult) -> CommandResult {
    let size = serde_json::to_vec(&result).map_or(usize::MAX, |bytes| bytes.len());
    if size <= MAX_RESULT_BYTES {
        return result;
    }
    let mut message = format!("the result was {size} bytes as JSON, over the {MAX_RESULT_BYTES}-byte limit");
    if let Some(previous) = result.error.take() {
        message.push_str(&format!("; before that: {}: {}", previous.code, previous.message));
    }
    result.output = json!({"note": "output dropped: too large for one message"});
    result.error = Some(ResultError { code: Text::lossy("output_too_large"), message: Text::lossy(&message) });
    result
}

#[cfg(test)]
mod tests {
    use viworks_core::verbs::{REGISTRY, parse};
    use viworks_core::wire::{CommandId, Verb};

    use super::*;

    fn args(verb: &str, value: Value) -> Args {
        parse(&Verb::new(verb).expect("verb"), &value).expect("valid arguments")
    }

    fn command(verb: &str, args: Value, timeout_ms: u64) -> Command {
        Command {
            command_id: CommandId::new("c-1").expect("id"),
            verb: Verb::new(verb).expect("verb"),
            args,
            timeout_ms,
            attempt: 1,
        }
    }

    fn executor(exec_allow: Vec<PathBuf>) -> Executor {
        Executor::new(ExecutorConfig {
            scripts_root: PathBuf::from("/nonexistent/scripts"),
            exec_allow,
            max_timeout: Duration::from_secs(600),
            output_cap: 64 * 1024,
            docker_socket: None,
        })
    }

    #[test]
    fn the_script_files_are_the_ones_the_verbs_name() {
        let mut named: Vec<&str> = REGISTRY
            .iter()
            .filter_map(|spec| {
                let example = serde_json::from_str(spec.example).expect("the example is JSON");
                spec.parse(&example).ok()?.script_argv().map(|(script, _)| script)
            })
            .collect();
        named.sort_unstable();
        let mut ours = SCRIPTS.to_vec();
        ours.sort_unstable();
        assert_eq!(named, ours);
    }

    #[test]
    fn the_time_limit_is_capped_by_the_verb_and_the_machine() {
        let health = args("get_system_health", Value::Null);
        let spec = health.spec();
        let roomy = Duration::from_secs(3600);
        assert_eq!(time_limit(&health, 0, roomy), spec.default_timeout, "0 asks for the default");
        assert_eq!(time_limit(&health, 1500, roomy), Duration::from_millis(1500));
        assert_eq!(time_limit(&health, u64::MAX, roomy), spec.max_timeout);
        assert_eq!(time_limit(&health, 1500, Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(time_limit(&health, 0, Duration::from_secs(1)), Duration::from_secs(1));

        let stop = args("docker.stop", json!({"container": "web", "timeout_secs": 300}));
        let limit = time_limit(&stop, 0, roomy);
        assert!(limit > Duration::from_secs(300), "the default makes room for the grace period: {limit:?}");
        assert!(limit <= stop.spec().max_timeout);
    }

    #[test]
    fn exec_runs_only_an_exact_allow_list_entry() {
        let Args::Exec(echo) = args("exec", json!({"path": "/bin/echo"})) else { panic!("exec parses as exec") };
        let code = |allow: &[&str]| {
            let allow: Vec<PathBuf> = allow.iter().map(PathBuf::from).collect();
            allowed(&allow, &echo).map(Path::to_path_buf).map_err(|refusal| refusal.error.map(|(code, _)| code))
        };
        assert_eq!(code(&[]), Err(Some("exec_disabled")));
        assert_eq!(code(&["/bin/cat"]), Err(Some("not_allowed")));
        assert_eq!(code(&["/bin/echo/"]), Err(Some("not_allowed")), "a different spelling is a different path");
        assert_eq!(code(&["/usr/bin/echo"]), Err(Some("not_allowed")));
        assert_eq!(code(&["/bin/cat", "/bin/echo"]), Ok(PathBuf::from("/bin/echo")));
    }

    #[test]
    fn process_output_reports_cuts_and_totals() {
        let stdout = Captured { bytes: b"abc".to_vec(), total: 10 };
        let stderr = Captured { bytes: b"e".to_vec(), total: 1 };
        assert_eq!(
            process_output(&stdout, &stderr),
            json!({"stdout": "abc", "stderr": "e", "stdout_truncated": true, "stderr_truncated": false,
                   "stdout_bytes": 10, "stderr_bytes": 1})
        );
    }

    #[test]
    fn a_result_too_large_for_a_message_keeps_its_status_and_loses_its_output() {
        // Control characters escape to six bytes each: 200 KiB of them is 1.2 MB of JSON.
        let huge = "\u{1}".repeat(200 * 1024);
        let result = CommandResult {
            command_id: CommandId::new("c-1").expect("id"),
            status: ResultStatus::Failed,
            exit_code: Some(2),
            output: json!({"stdout": huge}),
            error: Some(ResultError { code: Text::lossy("exit_status"), message: Text::lossy("exited with status 2") }),
            duration_ms: 5,
        };
        let fitted = fit_in_a_message(result);
        assert!(serde_json::to_vec(&fitted).expect("serializes").len() < 4096);
        assert_eq!((fitted.status, fitted.exit_code), (ResultStatus::Failed, Some(2)));
        let error = fitted.error.expect("an error says why");
        assert_eq!(error.code.as_str(), "output_too_large");
        assert!(error.message.as_str().contains("exit_status"), "{}", error.message);

        let small = CommandResult {
            command_id: CommandId::new("c-2").expect("id"),
            status: ResultStatus::Succeeded,
            exit_code: Some(0),
            output: json!({"stdout": "x".repeat(700 * 1024)}),
            error: None,
            duration_ms: 5,
        };
        assert_eq!(fit_in_a_message(small.clone()), small, "a result under the limit is untouched");
    }

    #[tokio::test]
    async fn parse_failures_are_rejected_with_their_code() {
        let executor = executor(Vec::new());
        let unknown = executor.execute(&command("docker.exec", Value::Null, 0)).await;
        assert_eq!(unknown.status, ResultStatus::Rejected);
        assert_eq!(unknown.error.map(|e| e.code.as_str().to_string()).as_deref(), Some("unknown_verb"));
        let bad = executor.execute(&command("add_user", json!({"username": "root"}), 0)).await;
        assert_eq!(bad.status, ResultStatus::Rejected);
        assert_eq!(bad.error.map(|e| e.code.as_str().to_string()).as_deref(), Some("invalid_field"));
    }

    #[tokio::test]
    async fn a_missing_script_fails_to_start() {
        let result = executor(Vec::new()).execute(&command("delete_vpn_user", json!({"username": "alice"}), 0)).await;
        assert_eq!(result.status, ResultStatus::Failed);
        assert_eq!(result.error.map(|e| e.code.as_str().to_string()).as_deref(), Some("spawn_failed"));
    }

    #[tokio::test]
    async fn clones_share_one_engine_handle_and_probe() {
        let executor = executor(Vec::new());
        let clone = executor.clone();
        assert!(Arc::ptr_eq(&executor.shared, &clone.shared));
    }
}
