//! The host and the gateway as real processes: real TLS with client certificates and pins,
//! real SQLite on both sides, commands through the REST API.

mod support;

use std::time::{Duration, Instant};

use support::{Fleet, Gateway, eventually, gateway_bin, recording_script};

const ONLINE: Duration = Duration::from_secs(20);

async fn fleet_with_gateway(id: &str) -> (Fleet, Gateway) {
    let mut fleet = Fleet::new();
    let bundle = fleet.enroll(id);
    fleet.start_host().await;
    let mut gateway = Gateway::new(&fleet, bundle);
    gateway.start();
    assert!(fleet.wait_online(id, ONLINE).await, "{id} came online; its log:\n{}", gateway.log());
    (fleet, gateway)
}

#[tokio::test]
async fn a_health_round_trip_completes_and_is_persisted_in_under_two_seconds() {
    let mut fleet = Fleet::new();
    let bundle = fleet.enroll("gw-health");
    fleet.start_host().await;
    let mut gateway = Gateway::new(&fleet, bundle);
    let liveness = support::free_addr();
    gateway.set("VIW_AGENT_HEALTH_ADDR", &liveness.to_string());
    gateway.start();
    assert!(fleet.wait_online("gw-health", ONLINE).await, "{}", gateway.log());
    let started = Instant::now();
    let id = fleet.submit("gw-health", "get_system_health", serde_json::json!({}), 10).await;
    let command = fleet.result(&id, Duration::from_secs(10)).await;
    let elapsed = started.elapsed();
    assert_eq!(command["state"], "succeeded", "{command}");
    let output = &command["result"]["output"];
    assert!(output["memory_total_bytes"].as_u64().unwrap_or(0) > 0, "{output}");
    assert!(output["cpu_count"].as_u64().unwrap_or(0) > 0, "{output}");
    assert!(elapsed < Duration::from_secs(2), "round trip took {elapsed:?}");
    assert!(gateway.log().contains("session established"), "{}", gateway.log());

    // The HELLO announced what this machine has: scripts, no engine (CONTAINER_ENGINE=none).
    let agent = support::http(fleet.api, "GET", "/api/v1/agents/gw-health", Some(&fleet.admin_token), &[], None).await;
    let capabilities = agent.json()["capabilities"].clone();
    assert!(capabilities.as_array().is_some_and(|c| c.iter().any(|v| v == "scripts")), "{capabilities}");
    assert!(!capabilities.as_array().is_some_and(|c| c.iter().any(|v| v == "docker")), "{capabilities}");

    // The liveness endpoint, on loopback.
    let live = support::http(liveness, "GET", "/health", None, &[], None).await;
    assert_eq!(live.status, 200, "{}", live.body);
    assert_eq!(live.json()["agent"]["connected"], true, "{}", live.body);
    assert!(live.json()["agent"]["executed"].as_u64().unwrap_or(0) >= 1, "{}", live.body);

    // Telemetry arrives within one interval (5 s here) and is stored.
    let telemetry = async || {
        let latest =
            support::http(fleet.api, "GET", "/api/v1/telemetry/gw-health/latest", Some(&fleet.admin_token), &[], None)
                .await;
        latest.body.contains("cpu.usage_pct") && latest.body.contains("mem.used_bytes")
    };
    assert!(eventually(Duration::from_secs(15), telemetry).await, "telemetry stored");
}

#[tokio::test]
async fn a_wrong_pin_is_refused_with_a_clear_line_on_both_sides() {
    let mut fleet = Fleet::new();
    let bundle = fleet.enroll("gw-pin");
    fleet.start_host().await;
    let mut gateway = Gateway::new(&fleet, bundle);
    // A well-formed pin of some other key.
    gateway.set("VIW_AGENT_BACKEND_SPKI_PIN", "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
    gateway.start();
    assert!(
        gateway.logged("matches neither the primary nor the backup SPKI pin", ONLINE).await,
        "gateway log:\n{}",
        gateway.log()
    );
    let host = fleet.host.as_ref().expect("host");
    assert!(host.logged("agent TLS handshake refused", ONLINE).await, "host log:\n{}", host.log());
    assert!(!fleet.online("gw-pin").await);
}

#[tokio::test]
async fn a_host_certificate_from_another_ca_is_refused() {
    let mut fleet = Fleet::new();
    let bundle = fleet.enroll("gw-ca");
    fleet.start_host().await;
    // Another host's CA in the trust bundle: our host's chain does not verify against it.
    let other = Fleet::new();
    let mut gateway = Gateway::new(&fleet, bundle);
    gateway.set("VIW_AGENT_TRUST_BUNDLE", other.data_dir.join("ca.crt").to_str().expect("utf-8"));
    gateway.start();
    assert!(
        gateway.logged("does not verify against VIW_AGENT_TRUST_BUNDLE", ONLINE).await,
        "gateway log:\n{}",
        gateway.log()
    );
    let host = fleet.host.as_ref().expect("host");
    assert!(host.logged("agent TLS handshake refused", ONLINE).await, "host log:\n{}", host.log());
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused_by_the_host() {
    use viworks_core::wire::AgentId;
    use viworks_host::tls::{Pki, Validity, write_bundle_with_validity};

    let mut fleet = Fleet::new();
    let pki = Pki::load(&fleet.data_dir).expect("pki");
    let bundle = fleet.dir.path().join("bundles").join("gw-expired");
    let now = std::time::SystemTime::now();
    // Valid for the next three seconds: the agent starts with it, the host sees it expired.
    let validity = Validity { not_before: now - Duration::from_secs(3600), not_after: now + Duration::from_secs(3) };
    let id = AgentId::new("gw-expired").expect("id");
    write_bundle_with_validity(&pki, &id, "lab", &fleet.backend_url(), &bundle, validity).expect("bundle");
    let mut gateway = Gateway::new(&fleet, bundle);
    gateway.start();
    assert!(gateway.logged("agent starting", ONLINE).await, "gateway log:\n{}", gateway.log());
    tokio::time::sleep(Duration::from_secs(5)).await;
    fleet.start_host().await;
    let host = fleet.host.as_ref().expect("host");
    assert!(host.logged("agent TLS handshake refused", Duration::from_secs(40)).await, "host log:\n{}", host.log());
    assert!(host.log().to_lowercase().contains("expired"), "host log:\n{}", host.log());
    assert!(
        gateway.logged("the host refused this agent's certificate", Duration::from_secs(10)).await,
        "gateway log:\n{}",
        gateway.log()
    );
}

#[tokio::test]
async fn a_gateway_killed_mid_command_runs_nothing_twice_and_reports_it_interrupted() {
    let mut fleet = Fleet::new();
    let bundle = fleet.enroll("gw-crash");
    fleet.start_host().await;
    let mut gateway = Gateway::new(&fleet, bundle);
    gateway.set("VIW_AGENT_MAX_CONCURRENCY", "1");
    // add_user takes long enough to be killed in the middle.
    recording_script(&gateway.scripts, "add_user", "sleep 30");
    gateway.start();
    assert!(fleet.wait_online("gw-crash", ONLINE).await, "{}", gateway.log());

    let slow = fleet.submit("gw-crash", "add_user", serde_json::json!({"username": "alice"}), 60).await;
    assert!(eventually(Duration::from_secs(10), async || gateway.runs("add_user").len() == 1).await);
    // Queued behind it (one at a time).
    let queued: Vec<String> = futures_util::future::join_all(
        ["bob", "carol"].map(|user| fleet.submit("gw-crash", "delete_user", serde_json::json!({"username": user}), 30)),
    )
    .await;
    gateway.kill();
    gateway.start();

    let interrupted = fleet.result(&slow, Duration::from_secs(30)).await;
    assert_eq!(interrupted["state"], "interrupted", "{interrupted}");
    for id in &queued {
        let done = fleet.result(id, Duration::from_secs(30)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    assert_eq!(gateway.runs("add_user").len(), 1, "the interrupted command never ran again");
    assert_eq!(gateway.runs("delete_user").len(), 2, "each queued command ran once");
}

#[tokio::test]
async fn a_host_killed_and_restarted_loses_nothing_the_agent_finished() {
    let (mut fleet, mut gateway) = fleet_with_gateway("gw-restart").await;
    // Running on the agent while the host dies; its result waits in the outbox.
    recording_script(&gateway.scripts, "add_vpn_user", "sleep 2; echo made");
    let id = fleet.submit("gw-restart", "add_vpn_user", serde_json::json!({"username": "dave"}), 30).await;
    assert!(eventually(Duration::from_secs(10), async || gateway.runs("add_vpn_user").len() == 1).await);
    fleet.kill_host();
    assert!(gateway.logged("disconnected from the host", Duration::from_secs(10)).await, "{}", gateway.log());
    fleet.start_host().await;
    assert!(fleet.wait_online("gw-restart", Duration::from_secs(40)).await, "{}", gateway.log());
    let done = fleet.result(&id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["output"]["stdout"], "made\n", "{done}");
    assert_eq!(gateway.runs("add_vpn_user").len(), 1);

    // Work resumes on the new session.
    let after = fleet.submit("gw-restart", "get_system_health", serde_json::json!({}), 10).await;
    assert_eq!(fleet.result(&after, Duration::from_secs(10)).await["state"], "succeeded");
    gateway.kill();
}

#[tokio::test]
async fn shell_metacharacters_reach_the_script_as_one_literal_argument() {
    let (fleet, gateway) = fleet_with_gateway("gw-argv").await;
    let name = r#"Eve $(touch /tmp/viworks-pwned) `id` ; rm -rf / && echo "x" | cat > y 'q' * ?"#;
    let id = fleet.submit("gw-argv", "add_user", serde_json::json!({"username": "eve", "full_name": name}), 10).await;
    let done = fleet.result(&id, Duration::from_secs(10)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let runs = gateway.runs("add_user");
    assert_eq!(runs, vec![vec!["--username".to_owned(), "eve".to_owned(), "--full-name".to_owned(), name.to_owned()]]);
    assert!(!std::path::Path::new("/tmp/viworks-pwned").exists(), "nothing was executed");
}

#[tokio::test]
async fn a_hung_script_is_killed_and_a_flood_of_output_is_truncated_with_bounded_memory() {
    let (fleet, mut gateway) = fleet_with_gateway("gw-bound").await;
    recording_script(&gateway.scripts, "delete_vpn_user", "sleep 600 & sleep 600");
    recording_script(&gateway.scripts, "add_vpn_user", "head -c 104857600 /dev/zero | tr '\\0' x");

    let started = Instant::now();
    let hung = fleet.submit("gw-bound", "delete_vpn_user", serde_json::json!({"username": "hang"}), 2).await;
    let done = fleet.result(&hung, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "timed_out", "{done}");
    assert!(started.elapsed() < Duration::from_secs(15), "killed near its timeout");

    let flood = fleet.submit("gw-bound", "add_vpn_user", serde_json::json!({"username": "flood"}), 60).await;
    let done = fleet.result(&flood, Duration::from_secs(60)).await;
    let output = &done["result"]["output"];
    assert_eq!(output["stdout_truncated"], true, "{output}");
    assert_eq!(output["stdout_bytes"], 104_857_600u64);
    let peak = gateway.process.as_ref().and_then(|p| p.peak_rss()).expect("peak RSS");
    assert!(peak < 64 * 1024 * 1024, "the agent's peak RSS stayed bounded: {peak} bytes");
    gateway.kill();
}

#[test]
fn an_invalid_configuration_lists_every_problem_and_exits_2() {
    let output = std::process::Command::new(gateway_bin())
        .arg("--check-config")
        .env_clear()
        .env("VIW_AGENT_BACKEND_URL", "ws://host.example/ws/agent")
        .env("VIW_AGENT_MAX_CONCURRENCY", "0")
        .env("VIW_AGENT_SCRIPTS_ROOT", "/nonexistent")
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in [
        "VIW_AGENT_BACKEND_URL",
        "VIW_AGENT_MAX_CONCURRENCY",
        "VIW_AGENT_SCRIPTS_ROOT",
        "VIW_AGENT_BACKEND_SPKI_PIN",
        "VIW_AGENT_ID",
        "VIW_AGENT_CERT_PATH",
    ] {
        assert!(stderr.contains(needle), "{needle} is reported:\n{stderr}");
    }
}
