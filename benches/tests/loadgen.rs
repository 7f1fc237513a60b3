//! The load generator's quick profile, end to end: a real `viworks-host` child, 200
//! synthetic agents over TLS WebSockets, every phase and the echo baseline; so that the
//! generator never rots between the hand-run full measurements.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `viworks-host` binary of the same build as the load generator. `cargo test
/// --workspace` builds it; `cargo test -p viworks-benches` alone does not, so it is built
/// here when missing.
fn host_bin() -> PathBuf {
    let loadgen = PathBuf::from(env!("CARGO_BIN_EXE_viworks-loadgen"));
    let host = loadgen.with_file_name("viworks-host");
    if !host.is_file() {
        let release = loadgen.parent().and_then(Path::file_name).is_some_and(|name| name == "release");
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", "viworks-host", "--bin", "viworks-host"]);
        if release {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cargo runs");
        assert!(status.success(), "building viworks-host failed");
    }
    host
}

#[test]
fn the_quick_profile_measures_every_phase_against_a_real_host() {
    let host = host_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("report.json");
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_viworks-loadgen"))
        .arg("--host-bin")
        .arg(&host)
        .arg("--json")
        .arg(&json)
        .args(["--max-seconds", "50", "--settle-seconds", "0.5", "--host-log-level", "warn"])
        .output()
        .expect("the load generator runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the run failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(started.elapsed() < Duration::from_secs(55), "the quick profile took {:?}", started.elapsed());

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("report written")).expect("JSON");
    let number = |pointer: &str| report.pointer(pointer).and_then(Value::as_f64).unwrap_or(-1.0);
    let agents = number("/agents");
    assert_eq!(agents, 200.0, "the quick profile is 200 agents:\n{stdout}");
    assert_eq!(number("/connect/connected"), agents, "every agent connects:\n{stdout}");
    assert!(number("/host_memory/connected_rss") > number("/host_memory/idle_rss"), "{stdout}");
    assert_eq!(number("/broadcast/commands"), agents, "the broadcast reaches every agent:\n{stdout}");
    assert_eq!(number("/broadcast/verified"), agents, "every broadcast result is in the store:\n{stdout}");
    assert!(number("/round_trip/due") > 0.0, "{stdout}");
    assert_eq!(number("/round_trip/completed"), number("/round_trip/due"), "every round trip completes:\n{stdout}");
    assert!(number("/round_trip/round_trip/p50_ms") > 0.0, "{stdout}");
    assert!(number("/sustained/completed") > 0.0, "{stdout}");
    assert!(number("/telemetry/samples") > 0.0, "{stdout}");
    assert_eq!(number("/echo/connected"), agents, "{stdout}");
    assert_eq!(number("/echo/round_trip/count"), number("/echo/sent"), "every echo comes back:\n{stdout}");
    assert!(number("/overhead/memory") > 0.0, "{stdout}");
    assert_eq!(number("/violations"), 0.0, "the host sent nothing the agents refused:\n{stdout}");
    assert_eq!(number("/lost"), 0.0, "every session is held until the end:\n{stdout}");
    assert!(stdout.contains("1. connections") && stdout.contains("7. baseline"), "{stdout}");
}
