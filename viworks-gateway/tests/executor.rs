//! The executor end to end: real shell scripts written into a throwaway `scripts_root`, run
//! through [`Executor::execute`] exactly as the agent runs a host's command.
//!
//! Orphaned processes are normally reparented to PID 1, which in a container may never reap
//! them; this test binary makes itself their subreaper so it can see them die.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::time::Instant;
use viworks_core::wire::{Command, CommandId, CommandResult, ResultStatus, Verb};
use viworks_gateway::executor::{Executor, ExecutorConfig};

/// The output cap the tests run with: the recommended 64 KiB per stream.
const CAP: usize = 64 * 1024;

/// The largest serialized result the executor may send.
const MAX_RESULT_BYTES: usize = 768 * 1024;

/// A `scripts_root` in a temporary directory, with the files the scripts leave behind.
struct Scripts {
    dir: TempDir,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts { dir: tempfile::tempdir().expect("a temporary directory") }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A file in the directory, for a script to write and the test to read.
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the script `name` with `body` after a `#!/bin/sh` line, mode 755.
    fn write(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.file(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script written");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("script made executable");
    }

    fn executor(&self) -> Executor {
        executor(self.root(), Vec::new(), Duration::from_secs(600))
    }
}

fn executor(scripts_root: &Path, exec_allow: Vec<PathBuf>, max_timeout: Duration) -> Executor {
    Executor::new(ExecutorConfig {
        scripts_root: scripts_root.to_path_buf(),
        exec_allow,
        max_timeout,
        output_cap: CAP,
        docker_socket: None,
    })
}

fn command(verb: &str, args: Value, timeout_ms: u64) -> Command {
    Command {
        command_id: CommandId::new("cmd-1").expect("a valid id"),
        verb: Verb::new(verb).expect("a valid verb"),
        args,
        timeout_ms,
        attempt: 1,
    }
}

/// Runs `command`. A script written by this test binary can fail to start with ETXTBSY when
/// another test forks while the file is still open for writing; that is the test harness,
/// not the executor, so the start is tried again.
async fn execute(executor: &Executor, command: &Command) -> CommandResult {
    for _ in 0..20 {
        let result = executor.execute(command).await;
        let busy = error_code(&result) == Some("spawn_failed")
            && result.error.as_ref().is_some_and(|e| e.message.as_str().contains("Text file busy"));
        if !busy {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the script stayed busy");
}

fn error_code(result: &CommandResult) -> Option<&str> {
    result.error.as_ref().map(|error| error.code.as_str())
}

fn stdout(result: &CommandResult) -> &str {
    result.output["stdout"].as_str().expect("a process result has stdout")
}

fn read_pid(path: &Path) -> Pid {
    let text = std::fs::read_to_string(path).expect("the script wrote its pid");
    Pid::from_raw(text.trim().parse().expect("a pid"))
}

/// Makes this test process the reaper of every orphan its children leave.
fn adopt_orphans() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER"));
}

/// Whether `pid` has ended within a few seconds: reaped here (it was orphaned to this
/// process) or no longer present at all.
async fn ends_soon(pid: Pid) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return true,
            // Not our child (its parent reaped it, or it was never orphaned to us).
            Err(_) if kill(pid, None) == Err(Errno::ESRCH) => return true,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_hanging_script_is_killed_with_its_whole_group_at_the_timeout() {
    adopt_orphans();
    let scripts = Scripts::new();
    let leader = scripts.file("leader.pid");
    let child = scripts.file("child.pid");
    scripts.write(
        "delete_vpn_user",
        &format!("echo $$ > '{}'\nsleep 600 &\necho $! > '{}'\nsleep 600", leader.display(), child.display()),
    );
    let started = Instant::now();
    let result = execute(&scripts.executor(), &command("delete_vpn_user", json!({"username": "alice"}), 1_000)).await;
    let took = started.elapsed();

    assert_eq!(result.status, ResultStatus::TimedOut, "{result:?}");
    assert_eq!(error_code(&result), Some("timed_out"));
    assert_eq!(result.exit_code, None);
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(4), "took {took:?}");
    assert!(result.duration_ms >= 1_000, "{}", result.duration_ms);
    assert!(ends_soon(read_pid(&leader)).await, "the script itself still runs");
    assert!(ends_soon(read_pid(&child)).await, "the script's background child still runs");
}

#[tokio::test]
async fn the_machine_maximum_caps_a_longer_timeout() {
    let scripts = Scripts::new();
    scripts.write("delete_user", "sleep 600");
    let executor = executor(scripts.root(), Vec::new(), Duration::from_secs(1));
    let started = Instant::now();
    // Far above both the machine's maximum (1 s) and the verb's (120 s).
    let result = execute(&executor, &command("delete_user", json!({"username": "alice"}), 3_600_000)).await;
    assert_eq!(result.status, ResultStatus::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_script_printing_100_mb_is_cut_at_the_cap_and_still_counted() {
    let scripts = Scripts::new();
    scripts.write("add_vpn_user", "head -c 104857600 /dev/zero | tr '\\0' x\necho done >&2");
    let result = execute(&scripts.executor(), &command("add_vpn_user", json!({"username": "alice"}), 120_000)).await;

    assert_eq!(result.status, ResultStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.exit_code, Some(0));
    let out = stdout(&result);
    assert_eq!(out.len(), CAP);
    assert!(out.bytes().all(|b| b == b'x'));
    assert_eq!(result.output["stdout_truncated"], json!(true));
    assert_eq!(result.output["stdout_bytes"], json!(104_857_600u64));
    assert_eq!(result.output["stderr"], json!("done\n"));
    assert_eq!(result.output["stderr_truncated"], json!(false));
    assert_eq!(result.output["stderr_bytes"], json!(5));
    let size = serde_json::to_vec(&result).expect("serializes").len();
    assert!(size < MAX_RESULT_BYTES, "{size} bytes");
}

#[tokio::test]
async fn shell_metacharacters_reach_the_script_as_one_literal_argument() {
    let scripts = Scripts::new();
    let argv_file = scripts.file("argv");
    scripts.write("add_user", &format!("for a in \"$@\"; do printf '%s\\0' \"$a\"; done > '{}'", argv_file.display()));
    let marker_a = scripts.file("a");
    let marker_b = scripts.file("b");
    // Everything a full name may hold that a shell would act on (`:` and control characters
    // are refused by the verb, and it may not start with `-`).
    let full_name = format!(
        "$(touch {}) `touch {}`; rm -rf / && echo \"hi\" | cat > y; *?[x]{{a,b}}~!#\\'<>&",
        marker_a.display(),
        marker_b.display()
    );
    assert!(full_name.len() <= 128, "the temporary directory's path is too long for a full name: {full_name}");
    let stray = Path::new("/y");
    let stray_before = stray.exists();

    let args = json!({"username": "alice", "full_name": full_name});
    let result = execute(&scripts.executor(), &command("add_user", args, 10_000)).await;

    assert_eq!(result.status, ResultStatus::Succeeded, "{:?}", result.error);
    let written = std::fs::read(&argv_file).expect("the script wrote its argv");
    let mut received: Vec<&[u8]> = written.split(|&b| b == 0).collect();
    assert_eq!(received.pop(), Some(&b""[..]), "every element ends with a NUL");
    let expected = ["--username", "alice", "--full-name", full_name.as_str()];
    assert_eq!(received, expected.map(str::as_bytes));
    assert!(!marker_a.exists() && !marker_b.exists(), "a command substitution ran");
    assert_eq!(stray.exists(), stray_before, "a redirection ran");
}

#[tokio::test]
async fn the_script_environment_holds_only_path_and_lang() {
    let scripts = Scripts::new();
    // `/proc/$$/environ` is what the program was started with; `env` would add the shell's
    // own PWD.
    scripts.write("delete_user", "tr '\\0' '\\n' < /proc/$$/environ\npwd >&2");
    let result = execute(&scripts.executor(), &command("delete_user", json!({"username": "alice"}), 10_000)).await;

    assert_eq!(result.status, ResultStatus::Succeeded, "{:?}", result.error);
    let mut environment: Vec<&str> = stdout(&result).lines().collect();
    environment.sort_unstable();
    assert_eq!(environment, ["LANG=C.UTF-8", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
    assert_eq!(result.output["stderr"], json!("/\n"), "it runs in /");
}

#[tokio::test]
async fn a_failing_script_reports_its_status_and_output() {
    let scripts = Scripts::new();
    scripts.write("delete_user", "echo partial\necho 'no such user' >&2\nexit 7");
    scripts.write("delete_vpn_user", "kill -KILL $$");
    let executor = scripts.executor();

    let failed = execute(&executor, &command("delete_user", json!({"username": "alice"}), 10_000)).await;
    assert_eq!(failed.status, ResultStatus::Failed);
    assert_eq!(failed.exit_code, Some(7));
    assert_eq!(error_code(&failed), Some("exit_status"));
    assert_eq!(stdout(&failed), "partial\n");
    assert_eq!(failed.output["stderr"], json!("no such user\n"));

    let killed = execute(&executor, &command("delete_vpn_user", json!({"username": "alice"}), 10_000)).await;
    assert_eq!(killed.status, ResultStatus::Failed);
    assert_eq!(killed.exit_code, None);
    assert_eq!(error_code(&killed), Some("signaled"));
    assert!(killed.error.as_ref().is_some_and(|e| e.message.as_str().contains("SIGKILL")), "{:?}", killed.error);
}

#[tokio::test]
async fn exec_is_refused_without_an_allow_list() {
    let scripts = Scripts::new();
    let result = execute(&scripts.executor(), &command("exec", json!({"path": "/bin/echo", "args": ["hi"]}), 0)).await;
    assert_eq!(result.status, ResultStatus::Rejected);
    assert_eq!(error_code(&result), Some("exec_disabled"));
}

#[tokio::test]
async fn exec_is_refused_for_a_path_off_the_allow_list() {
    let scripts = Scripts::new();
    let executor = executor(scripts.root(), vec![PathBuf::from("/bin/echo")], Duration::from_secs(60));
    for path in ["/bin/sh", "/usr/bin/echo", "/bin/echo2"] {
        let result = execute(&executor, &command("exec", json!({"path": path, "args": ["-c", "id"]}), 0)).await;
        assert_eq!(result.status, ResultStatus::Rejected, "{path}");
        assert_eq!(error_code(&result), Some("not_allowed"), "{path}");
        assert_eq!(result.output, Value::Null, "{path}");
    }
    let dotted = execute(&executor, &command("exec", json!({"path": "/bin/../bin/echo"}), 0)).await;
    assert_eq!(dotted.status, ResultStatus::Rejected);
    assert_eq!(error_code(&dotted), Some("invalid_field"), "another spelling of an allowed path is refused");
}

#[tokio::test]
async fn exec_runs_an_allow_listed_program_with_its_arguments() {
    let scripts = Scripts::new();
    let executor = executor(scripts.root(), vec![PathBuf::from("/bin/echo")], Duration::from_secs(60));
    let args = json!({"path": "/bin/echo", "args": ["hello", "$HOME", "a  b", "*"]});
    let result = execute(&executor, &command("exec", args, 5_000)).await;
    assert_eq!(result.status, ResultStatus::Succeeded, "{:?}", result.error);
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(stdout(&result), "hello $HOME a  b *\n");
    assert_eq!(result.output["stdout_truncated"], json!(false));
    assert_eq!(result.output["stdout_bytes"], json!(19));
}

#[tokio::test]
async fn unknown_verbs_and_bad_arguments_are_rejected_with_their_codes() {
    let scripts = Scripts::new();
    scripts.write("add_user", &format!("touch '{}'", scripts.file("ran").display()));
    let executor = scripts.executor();
    let cases = [
        (command("docker.exec", json!({}), 0), "unknown_verb"),
        (command("add_user", json!("alice"), 0), "not_an_object"),
        (command("add_user", json!({"username": "alice", "uid": 0}), 0), "malformed"),
        (command("add_user", json!({"username": "$(id)"}), 0), "invalid_field"),
        (command("add_user", json!({"username": "alice", "full_name": "Eve:0:0"}), 0), "invalid_field"),
        (command("exec", json!({"path": "/bin/echo", "args": ["a\u{0}b"]}), 0), "invalid_item"),
    ];
    for (command, code) in cases {
        let result = execute(&executor, &command).await;
        assert_eq!(result.status, ResultStatus::Rejected, "{command:?}");
        assert_eq!(error_code(&result), Some(code), "{command:?}");
        assert_eq!(result.command_id, command.command_id);
    }
    assert!(!scripts.file("ran").exists(), "a rejected command ran");
}

#[tokio::test]
async fn system_health_reports_plausible_numbers() {
    let scripts = Scripts::new();
    let result = execute(&scripts.executor(), &command("get_system_health", Value::Null, 0)).await;
    assert_eq!(result.status, ResultStatus::Succeeded, "{:?}", result.error);
    let output = &result.output;
    assert!(output["memory_total_bytes"].as_u64().is_some_and(|total| total > 0), "{output}");
    assert!(output["cpu_count"].as_u64().is_some_and(|count| count > 0), "{output}");
    assert!(output["cpu_percent"].as_f64().is_some_and(|cpu| (0.0..=100.0).contains(&cpu)), "{output}");
    assert!(output["uptime_secs"].as_u64().is_some_and(|up| up > 0), "{output}");
    assert_eq!(output["load"].as_array().map(Vec::len), Some(3));
    assert!(output["disks"].is_array() && output["networks"].is_array(), "{output}");
    assert_eq!(output["containers"], Value::Null, "no engine is configured");
}

#[tokio::test]
async fn docker_verbs_without_an_engine_fail_as_unavailable() {
    let scripts = Scripts::new();
    let result = execute(&scripts.executor(), &command("docker.ps", json!({"all": true}), 0)).await;
    assert_eq!(result.status, ResultStatus::Failed);
    assert_eq!(error_code(&result), Some("unavailable"));
}

#[tokio::test]
async fn capabilities_follow_what_is_installed() {
    let names = |executor: Executor| async move {
        executor.capabilities().await.iter().map(|c| c.as_str().to_string()).collect::<Vec<_>>()
    };
    let scripts = Scripts::new();
    assert_eq!(names(scripts.executor()).await, ["system"]);

    for script in ["add_user", "delete_user", "add_vpn_user"] {
        scripts.write(script, "exit 0");
    }
    assert_eq!(names(scripts.executor()).await, ["system"], "one script is missing");
    std::fs::write(scripts.file("delete_vpn_user"), "#!/bin/sh\n").expect("written without an execute bit");
    assert_eq!(names(scripts.executor()).await, ["system"], "one script is not executable");
    scripts.write("delete_vpn_user", "exit 0");
    assert_eq!(names(scripts.executor()).await, ["system", "scripts"]);

    let with_exec = executor(scripts.root(), vec![PathBuf::from("/bin/echo")], Duration::from_secs(60));
    assert_eq!(names(with_exec).await, ["system", "scripts", "exec"]);
}
