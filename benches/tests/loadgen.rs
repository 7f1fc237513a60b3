//! The load generator's quick profile, end to end: a real `viworks-host` child on SQLite and
//! another on a durable throwaway Postgres (when the machine has Postgres; under `CI=true` it
//! must), 200 synthetic agents over TLS WebSockets, every phase and the echo baseline; so that
//! the generator never rots between the hand-run full measurements.

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
fn the_quick_profile_measures_every_phase_against_a_real_host_on_both_stores() {
    let host = host_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("report.json");
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_viworks-loadgen"))
        .arg("--host-bin")
        .arg(&host)
        .arg("--json")
        .arg(&json)
        .args(["--max-seconds", "55", "--settle-seconds", "0.5", "--host-log-level", "warn"])
        .args(["--stores", "sqlite,postgres"])
        // The debug host on a durable Postgres stores a few hundred commands a second here, far
        // below the quick profile's 1,000/s round trips and 4,000 outstanding: these keep the
        // backlog each phase leaves for it to drain to about a second.
        .args(["--rate", "200", "--sustained-outstanding", "500", "--telemetry-batch", "200"])
        .output()
        .expect("the load generator runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the run failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(started.elapsed() < Duration::from_secs(60), "the quick profile took {:?}", started.elapsed());

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
    assert!(number("/echo/journaled_sent") > 0.0, "{stdout}");
    for leg in ["/echo/journaled_once/count", "/echo/journaled_twice/count"] {
        assert_eq!(number(leg), number("/echo/journaled_sent"), "every journaled echo comes back twice:\n{stdout}");
    }
    assert!(number("/overhead/durable_round_trip_p50") > 0.0, "{stdout}");
    assert!(number("/overhead/memory") > 0.0, "{stdout}");
    assert_eq!(number("/violations"), 0.0, "the host sent nothing the agents refused:\n{stdout}");
    assert_eq!(number("/lost"), 0.0, "every session is held until the end:\n{stdout}");
    assert!(stdout.contains("1. connections") && stdout.contains("7. baseline"), "{stdout}");

    let stores = report.pointer("/stores").and_then(Value::as_array).expect("every store's figures");
    let names: Vec<&str> = stores.iter().filter_map(|s| s.get("store").and_then(Value::as_str)).collect();
    assert_eq!(names, ["sqlite", "postgres"], "one host per store, in order:\n{stdout}");
    assert_eq!(
        stores[0].pointer("/sustained/per_second").and_then(Value::as_f64),
        Some(number("/sustained/per_second"))
    );
    let postgres = &stores[1];
    if let Some(reason) = postgres.get("skipped") {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "CI needs Postgres for the postgres store: {reason}");
        eprintln!("skipped the postgres store: {reason}");
        return;
    }
    let number = |pointer: &str| postgres.pointer(pointer).and_then(Value::as_f64).unwrap_or(-1.0);
    assert_eq!(number("/connect/connected"), agents, "every agent connects to the host on Postgres:\n{stdout}");
    assert_eq!(number("/broadcast/commands"), agents, "{stdout}");
    assert_eq!(number("/broadcast/verified"), agents, "every broadcast result is in Postgres:\n{stdout}");
    assert_eq!(number("/round_trip/completed"), number("/round_trip/due"), "{stdout}");
    assert!(number("/sustained/per_second") > 0.0, "commands are stored durably in Postgres:\n{stdout}");
    assert!(number("/telemetry/per_second") > 0.0, "telemetry is stored in Postgres:\n{stdout}");
    assert_eq!(number("/violations"), 0.0, "{stdout}");
    assert_eq!(number("/lost"), 0.0, "{stdout}");
    let settings = postgres.get("settings").and_then(Value::as_str).unwrap_or_default();
    assert!(settings.contains("fsync=on") && settings.contains("synchronous_commit=on"), "durable: {settings}");
    assert!(stdout.contains("Side by side"), "{stdout}");
}
