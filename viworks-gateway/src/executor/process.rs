//! Running one program to its end: argv passed verbatim (never a shell), a cleared
//! environment, its own process group, bounded output and a timeout that ends the whole group.
//!
//! A command owns its process group. When the program exits, or its time runs out, whatever
//! is left in the group is killed: the command is over. A script that must leave something
//! running has to hand it to a service manager (or `setsid` it), outside the group.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Instant, sleep_until, timeout};

/// The only environment a program sees.
const ENVIRONMENT: [(&str, &str); 2] = [("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), ("LANG", "C.UTF-8")];

/// How long a program has to exit after SIGTERM before the group gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for the leader to be reaped after SIGKILL before giving up on it (a
/// process stuck in uninterruptible sleep); tokio reaps it in the background later.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long to keep reading pipes after the leader exits and its group is killed. Only a
/// process that left the group (`setsid`) while holding a pipe keeps one open this long.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// The size of one read from a pipe.
const READ_CHUNK: usize = 16 * 1024;

/// The first bytes of one output stream and how many it wrote in all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Captured {
    /// The first `cap` bytes written.
    pub(crate) bytes: Vec<u8>,
    /// Every byte written, kept or not.
    pub(crate) total: u64,
}

impl Captured {
    /// Whether bytes were cut.
    pub(crate) fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }

    /// The kept bytes as text, invalid UTF-8 replaced. When the stream was cut inside a
    /// multi-byte character, the partial character is left out rather than replaced.
    pub(crate) fn text(&self) -> String {
        let mut bytes = self.bytes.as_slice();
        if self.truncated()
            && let Err(error) = std::str::from_utf8(bytes)
            && error.error_len().is_none()
        {
            bytes = &bytes[..error.valid_up_to()];
        }
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// How the program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It exited with this status.
    Exited(i32),
    /// A signal it did not send itself by timeout ended it.
    Signaled(i32),
    /// Its time ran out and its group was killed.
    TimedOut,
}

/// What a finished program left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Finished {
    /// How it ended.
    pub(crate) ending: Ending,
    /// Its standard output, cut at the cap.
    pub(crate) stdout: Captured,
    /// Its standard error, cut at the cap.
    pub(crate) stderr: Captured,
}

/// Runs `program` with `argv` until it exits or `limit` passes, keeping at most `cap` bytes
/// of each output stream while reading all of it.
///
/// Fails only when the program cannot be started (missing, not executable). Returns at most
/// about `limit` + 4.5 s after it is called (SIGTERM grace, SIGKILL grace, pipe grace).
/// Dropping the future kills the program's whole process group.
pub(crate) async fn run(program: &Path, argv: &[String], limit: Duration, cap: usize) -> io::Result<Finished> {
    let deadline = Instant::now() + limit;
    let mut child = tokio::process::Command::new(program)
        .args(argv)
        .env_clear()
        .envs(ENVIRONMENT)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    // Declared after `child`, so dropped before it: the group is killed while the unreaped
    // leader still holds its id, so the id cannot have been reused by then.
    let mut group = ProcessGroup::of(&child);
    let mut stdout = Captured::default();
    let mut stderr = Captured::default();
    let (Some(out_pipe), Some(err_pipe)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("the program's pipes were not set up"));
    };

    let ending = {
        let mut out_drain = pin!(drain(out_pipe, &mut stdout, cap));
        let mut err_drain = pin!(drain(err_pipe, &mut stderr, cap));
        let (mut out_done, mut err_done) = (false, false);
        let mut alarm = pin!(sleep_until(deadline));
        let mut stage = Stage::Running;
        let status = loop {
            tokio::select! {
                status = child.wait() => break Some(status),
                () = &mut out_drain, if !out_done => out_done = true,
                () = &mut err_drain, if !err_done => err_done = true,
                () = &mut alarm => match stage {
                    Stage::Running => {
                        group.signal(Signal::SIGTERM);
                        stage = Stage::Terminating;
                        alarm.as_mut().reset(Instant::now() + TERM_GRACE);
                    }
                    Stage::Terminating => {
                        group.signal(Signal::SIGKILL);
                        stage = Stage::Killing;
                        alarm.as_mut().reset(Instant::now() + KILL_GRACE);
                    }
                    Stage::Killing => break None,
                },
            }
        };
        // The leader is gone (or beyond reach): end what it left in its group, then collect
        // what is still in the pipes. The leader may be reaped by now, but a group id is not
        // handed out again while any process is in the group, and when none is left the id
        // would have to come round the whole pid space in the microseconds since the reaping.
        group.signal(Signal::SIGKILL);
        group.disarm();
        let rest = async {
            tokio::join!(
                async {
                    if !out_done {
                        out_drain.await;
                    }
                },
                async {
                    if !err_done {
                        err_drain.await;
                    }
                }
            )
        };
        // Past the grace, what a process outside the group still writes is not read.
        let _ = timeout(PIPE_GRACE, rest).await;
        match (stage, status) {
            (Stage::Running, Some(status)) => Ending::from(status?),
            // Past the deadline, however the leader ended; `None` only comes from `Killing`.
            _ => Ending::TimedOut,
        }
    };
    Ok(Finished { ending, stdout, stderr })
}

impl From<ExitStatus> for Ending {
    fn from(status: ExitStatus) -> Ending {
        match (status.code(), status.signal()) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(signal)) => Ending::Signaled(signal),
            // A wait status is either an exit or a signal on Unix; stopped children are not
            // reported by `wait`.
            (None, None) => Ending::Exited(-1),
        }
    }
}

/// Where a run is on its way to the deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Before the deadline.
    Running,
    /// Past the deadline; SIGTERM sent.
    Terminating,
    /// Past the SIGTERM grace; SIGKILL sent.
    Killing,
}

/// Reads `pipe` to its end, keeping the first `cap` bytes in `into` and counting the rest.
/// A read error ends the stream as if it had closed.
async fn drain(mut pipe: impl AsyncRead + Unpin, into: &mut Captured, cap: usize) {
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let n = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        into.total = into.total.saturating_add(n as u64);
        let room = cap.saturating_sub(into.bytes.len());
        into.bytes.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// A running program's process group, killed with SIGKILL when dropped while armed.
#[derive(Debug)]
struct ProcessGroup {
    id: Option<Pid>,
    armed: bool,
}

impl ProcessGroup {
    /// The group `child` leads (it was spawned with `process_group(0)`).
    fn of(child: &tokio::process::Child) -> ProcessGroup {
        let id = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
        ProcessGroup { id, armed: true }
    }

    /// Sends `signal` to every process in the group. A group already gone is not an error.
    fn signal(&self, signal: Signal) {
        if let Some(id) = self.id
            && let Err(error) = killpg(id, signal)
            && error != nix::errno::Errno::ESRCH
        {
            tracing::warn!(group = id.as_raw(), %signal, %error, "could not signal a command's process group");
        }
    }

    /// From here on the leader may be reaped and its id reused: never signal the group again.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use nix::sys::signal::kill;

    use super::*;

    fn sh(script: &str) -> (PathBuf, Vec<String>) {
        (PathBuf::from("/bin/sh"), vec!["-c".to_string(), script.to_string()])
    }

    async fn run_sh(script: &str, limit: Duration, cap: usize) -> Finished {
        let (program, argv) = sh(script);
        run(&program, &argv, limit, cap).await.expect("/bin/sh starts")
    }

    fn is_gone(pid: i32) -> bool {
        if kill(Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH) {
            return true;
        }
        // Orphans are reparented to PID 1, which may be slow (or not care) to reap them; a
        // zombie is dead all the same.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
            .unwrap_or(true)
    }

    async fn eventually_gone(pid: i32) -> bool {
        for _ in 0..40 {
            if is_gone(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn exit_status_and_both_streams_are_reported() {
        let finished = run_sh("echo out; echo err >&2; exit 3", Duration::from_secs(10), 1024).await;
        assert_eq!(finished.ending, Ending::Exited(3));
        assert_eq!(finished.stdout, Captured { bytes: b"out\n".to_vec(), total: 4 });
        assert_eq!(finished.stderr, Captured { bytes: b"err\n".to_vec(), total: 4 });
        assert!(!finished.stdout.truncated());
    }

    #[tokio::test]
    async fn a_signal_is_reported_as_such() {
        let finished = run_sh("kill -SEGV $$", Duration::from_secs(10), 1024).await;
        assert_eq!(finished.ending, Ending::Signaled(Signal::SIGSEGV as i32));
    }

    #[tokio::test]
    async fn output_beyond_the_cap_is_counted_and_dropped() {
        let finished =
            run_sh("head -c 1000000 /dev/zero; head -c 300 /dev/zero >&2", Duration::from_secs(20), 100).await;
        assert_eq!(finished.ending, Ending::Exited(0));
        assert_eq!(finished.stdout.bytes.len(), 100);
        assert_eq!(finished.stdout.total, 1_000_000);
        assert!(finished.stdout.truncated());
        assert_eq!(finished.stderr.bytes.len(), 100);
        assert_eq!(finished.stderr.total, 300);
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_start() {
        let result = run(Path::new("/nonexistent/program"), &[], Duration::from_secs(1), 10).await;
        assert_eq!(result.map(|_| ()).map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
    }

    #[tokio::test]
    async fn a_program_ignoring_sigterm_is_killed_after_the_grace() {
        let started = Instant::now();
        let finished =
            run_sh("trap '' TERM; echo ready; while :; do sleep 1; done", Duration::from_millis(300), 1024).await;
        assert_eq!(finished.ending, Ending::TimedOut);
        assert_eq!(finished.stdout.bytes, b"ready\n", "output before the timeout is kept");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) + TERM_GRACE, "{took:?}");
        assert!(took < Duration::from_millis(300) + TERM_GRACE + Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn what_the_leader_leaves_behind_is_killed_when_it_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 600 & echo $! > '{}'", pid_file.display());
        let started = Instant::now();
        let finished = run_sh(&script, Duration::from_secs(30), 1024).await;
        assert_eq!(finished.ending, Ending::Exited(0));
        assert!(started.elapsed() < Duration::from_secs(5), "the background child's pipes do not hold the run");
        let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid written").trim().parse().expect("a pid");
        assert!(eventually_gone(pid).await, "background child {pid} still runs");
    }

    #[tokio::test]
    async fn a_pipe_held_outside_the_group_does_not_hold_the_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        // `setsid` leaves the group, so the group kill cannot reach it; it holds stdout open.
        let script = format!("setsid sleep 600 & echo $! > '{}'; echo done", pid_file.display());
        let started = Instant::now();
        let finished = run_sh(&script, Duration::from_secs(30), 1024).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(finished.ending, Ending::Exited(0));
        assert_eq!(finished.stdout.bytes, b"done\n");
        let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid written").trim().parse().expect("a pid");
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("the escaped sleep still ran, and is ended now");
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 600 & echo $! > '{}'; sleep 600", pid_file.display());
        let (program, argv) = sh(&script);
        let running = run(&program, &argv, Duration::from_secs(600), 1024);
        let cut = tokio::time::timeout(Duration::from_millis(500), running).await;
        assert!(cut.is_err(), "the run was still going");
        let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid written").trim().parse().expect("a pid");
        assert!(eventually_gone(pid).await, "background child {pid} still runs");
    }

    #[test]
    fn a_character_cut_by_the_cap_is_left_out() {
        let cut = Captured { bytes: "aé".as_bytes()[..2].to_vec(), total: 3 };
        assert_eq!(cut.text(), "a");
        let invalid = Captured { bytes: vec![b'a', 0xff, b'b'], total: 3 };
        assert_eq!(invalid.text(), "a\u{fffd}b");
    }
}
