//! The operator command line, run as the real binary.

use std::process::Command;

fn host() -> Command {
    Command::new(env!("CARGO_BIN_EXE_viworks-host"))
}

#[test]
fn audit_verify_passes_an_intact_chain_and_fails_on_a_row_edited_in_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let init = host().arg("init").arg("--data-dir").arg(&data).output().expect("runs");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let stdout = String::from_utf8_lossy(&init.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("admin_token=vwk_")), "{stdout}");
    let token = host().args(["token", "create", "--role", "viewer", "--data-dir"]).arg(&data).output().expect("runs");
    assert!(String::from_utf8_lossy(&token.stdout).starts_with("token=vwk_"));
    let verify = || host().args(["audit", "verify", "--data-dir"]).arg(&data).output().expect("runs");
    assert_eq!(verify().status.code(), Some(0));
    let db = rusqlite::Connection::open(data.join("viworks.db")).expect("opens");
    assert_eq!(db.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1", []).expect("edits"), 1);
    let broken = verify();
    assert_eq!(broken.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&broken.stdout).contains("broken at record 1"));
}

#[test]
fn a_log_that_is_no_terminal_is_plain_text() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    assert!(host().arg("init").arg("--data-dir").arg(&data).output().expect("runs").status.success());
    let mut serve = host()
        .args(["serve", "--api-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve starts");
    let stderr = serve.stderr.take().expect("piped");
    let (lines, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let started = line.contains("host started");
            if lines.send(line).is_err() || started {
                break;
            }
        }
    });
    let mut log = Vec::new();
    while let Ok(line) = read.recv_timeout(std::time::Duration::from_secs(20)) {
        let started = line.contains("host started");
        log.push(line);
        if started {
            break;
        }
    }
    serve.kill().expect("killed");
    let _ = serve.wait();
    assert!(log.last().is_some_and(|l| l.contains("host started")), "{log:?}");
    assert!(log.iter().all(|l| !l.contains('\u{1b}')), "colour codes in a log that is no terminal: {log:?}");
}

#[test]
fn audit_verify_of_a_missing_database_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("mistyped");
    let verify = host().args(["audit", "verify", "--data-dir"]).arg(&data).output().expect("runs");
    assert_eq!(verify.status.code(), Some(1), "{}", String::from_utf8_lossy(&verify.stdout));
    assert!(String::from_utf8_lossy(&verify.stderr).contains("no database at"));
    assert!(!data.exists(), "verify created {}", data.display());
}

#[test]
fn init_refuses_to_overwrite_and_invalid_configuration_exits_2_listing_every_problem() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    assert!(host().arg("init").arg("--data-dir").arg(&data).status().expect("runs").success());
    let again = host().arg("init").arg("--data-dir").arg(&data).output().expect("runs");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    let bad = host()
        .args(["check-config", "--store", "mysql://x"])
        .env("VIW_HOST_API_ADDR", "nonsense")
        .env("VIW_HOST_BOGUS", "1")
        .output()
        .expect("runs");
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    for key in ["VIW_HOST_BOGUS", "api.addr", "store.url"] {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
}

#[test]
fn pin_prints_the_spki_pin_of_the_host_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let init = host().arg("init").arg("--data-dir").arg(&data).output().expect("runs");
    let stdout = String::from_utf8_lossy(&init.stdout).into_owned();
    let expected = stdout.lines().find_map(|l| l.strip_prefix("host_pin=")).expect("pin printed").to_owned();
    let pin = host().arg("pin").arg(data.join("host.crt")).output().expect("runs");
    assert_eq!(String::from_utf8_lossy(&pin.stdout).trim(), expected);
}

/// The README's one-command start: a fresh data directory, the host, a local agent and the
/// first round trip printed; then a clean stop on SIGTERM. Started twice, to show that a
/// second `up` on the same directory reuses what the first made.
#[test]
fn up_starts_the_host_and_a_local_agent_and_prints_the_first_round_trip() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    for run in 0..2 {
        let mut child = host()
            .args(["up", "--api-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("VIW_HOST_LOG_LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts");
        let stdout = child.stdout.take().expect("piped");
        let (lines, seen) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut printed = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !printed.iter().any(|l: &String| l.starts_with("health ")) && std::time::Instant::now() < deadline {
            if let Ok(line) = seen.recv_timeout(std::time::Duration::from_millis(200)) {
                printed.push(line);
            }
        }
        let trip = printed.iter().find(|l| l.starts_with("first_round_trip=")).cloned().unwrap_or_default();
        assert!(trip.contains("status=succeeded"), "run {run}: {printed:?}");
        assert!(printed.iter().any(|l| l == "local_agent=local-agent"), "{printed:?}");
        assert!(printed.iter().any(|l| l.starts_with("admin_token=vwk_")), "{printed:?}");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signalled");
        let status = child.wait().expect("exits");
        assert_eq!(status.code(), Some(0), "run {run}: a clean stop");
    }
}
