//! Writes the seed inputs under `fuzz/seeds/<target>/` from the protocol's test vectors, the
//! verb registry's examples, the example configurations and the REST API's request bodies and
//! queries (those of `docs/openapi.yaml` and `viworks-host/tests/api.rs`), in each target's
//! input format.
//!
//! Run it after changing a target's input format or the vectors, and check the result in:
//! `cargo run --manifest-path fuzz/Cargo.toml --example write_seeds`.

use std::path::Path;

use serde_json::Value;
use viworks_core::verbs::REGISTRY;
use viworks_core::wire::{Limits, encode_frame};
use viworks_fuzz::push_chunk;
use viworks_host::api::router::ROUTES;

const VECTORS: &str = include_str!("../../viworks-core/tests/vectors/v1.json");
const GATEWAY_TOML: &str = include_str!("../../deploy/viworks-gateway.example.toml");

/// A host configuration that sets every key, with the values operations.md suggests.
const HOST_TOML: &str = r#"data_dir = "/var/lib/viworks"

[api]
addr = "127.0.0.1:8080"
tls = true

[agents]
addr = "0.0.0.0:8443"
public_url = "wss://host.example:8443/ws/agent"

[store]
url = "sqlite:///var/lib/viworks/viworks.db"

[session]
heartbeat_secs = 15
liveness_secs = 45
skew_secs = 60
max_sessions = 65536
max_concurrency = 256

[dispatch]
max_commands = 1000000
per_agent_queue = 10000
retry_base_ms = 1000
retry_cap_secs = 60
retry_max_attempts = 8
queue_ttl_secs = 86400
result_grace_secs = 3600

[rate_limits]
reads_per_minute = 1200
writes_per_minute = 120
per_ip_per_minute = 2400

[log]
format = "json"
level = "info,viworks_host=debug"
"#;

/// A gateway env file that sets the settings that name no file.
const GATEWAY_ENV: &str = "# gateway settings
VIW_AGENT_BACKEND_URL=wss://host.example:8443/ws/agent
VIW_AGENT_ID=gw-fra-01
VIW_AGENT_SITE=fra
VIW_AGENT_CERT_PATH=/etc/viworks/agent.pem
VIW_AGENT_KEY_PATH=/etc/viworks/agent.key
VIW_AGENT_TRUST_BUNDLE=/etc/viworks/ca.pem
VIW_AGENT_BACKEND_SPKI_PIN=sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=
VIW_AGENT_AGENT_KEY=c982b89d42f973aab73cc82e608b6e7f79b7c3d651181a350d5dbdbd0b1322eb
VIW_AGENT_MAX_CONCURRENCY=4
VIW_AGENT_HEALTH_ADDR=127.0.0.1:9101
VIW_AGENT_EXEC_ALLOW=/usr/bin/uptime,/usr/bin/df
";

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex in the vectors")).collect()
}

/// One vector message: its name, the key it is sealed under, the JSON it covers (without the
/// version byte) and the sealed bytes.
struct Vector {
    name: String,
    key: String,
    json: Vec<u8>,
    sealed: Vec<u8>,
}

fn vectors() -> (Vec<Vector>, Vec<Vec<u8>>) {
    let root: Value = serde_json::from_str(VECTORS).expect("the vectors are JSON");
    let text = |v: &Value, field: &str| v[field].as_str().unwrap_or_default().to_owned();
    let messages = root["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| Vector {
            name: text(m, "name"),
            key: text(m, "key"),
            json: unhex(&text(m, "covered_hex"))[1..].to_vec(),
            sealed: unhex(&text(m, "sealed_hex")),
        })
        .collect();
    let rejections =
        root["rejections"].as_array().expect("rejections").iter().map(|r| unhex(&text(r, "sealed_hex"))).collect();
    (messages, rejections)
}

struct Seeds<'a> {
    root: &'a Path,
}

impl Seeds<'_> {
    fn write(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("the seeds directory can be created");
        std::fs::write(dir.join(name), bytes).expect("a seed can be written");
    }
}

/// Removes every seed this program wrote before, keeping the reproducers of fixed crashes
/// (`regression-*`), which are checked in by hand.
fn remove_generated(root: &Path) {
    let Ok(targets) = std::fs::read_dir(root) else { return };
    for target in targets {
        let dir = target.expect("the seeds directory can be listed").path();
        for seed in std::fs::read_dir(&dir).expect("a target's seeds can be listed") {
            let path = seed.expect("a target's seeds can be listed").path();
            if !path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("regression-")) {
                std::fs::remove_file(&path).expect("an old seed can be removed");
            }
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    remove_generated(&root);
    let seeds = Seeds { root: &root };
    let (messages, rejections) = vectors();

    for m in &messages {
        let mut covered = vec![1];
        covered.extend_from_slice(&m.json);
        seeds.write("envelope_decode", &m.name, &covered);
        seeds.write("envelope_decode", &format!("{}.sealed", m.name), &m.sealed);
        seeds.write("seal_open", &m.name, &m.sealed);
        let mut framed = vec![7];
        framed.extend(encode_frame(&m.sealed, Limits::default()).expect("a vector frames"));
        seeds.write("framer", &m.name, &framed);
    }
    for (n, sealed) in rejections.iter().enumerate() {
        seeds.write("envelope_decode", &format!("rejection-{n}"), sealed);
        seeds.write("seal_open", &format!("rejection-{n}"), sealed);
    }

    let from = |key: &'static str| messages.iter().filter(move |m| m.key == key);
    // An established session, then each message the peer sends, sealed with the sequence
    // number fixed up (op 2), with timeouts, polls and the driver's own calls between.
    let mut host = vec![0];
    for m in from("session.agent_to_host") {
        host.push(2);
        push_chunk(&mut host, &m.json);
        host.extend_from_slice(&[8, 6, 0, 3, 0xe8, 0x03, 8, 6, 1]);
    }
    host.extend_from_slice(&[7, 3, 0xb8, 0x0b, 8, 6, 2, 0, 0, 0, 0, 0, 0, 0, 0, 6, 3, 8]);
    seeds.write("host_session", "established", &host);
    for m in from("session.agent_to_host") {
        let mut one = vec![0, 2];
        push_chunk(&mut one, &m.json);
        one.push(8);
        seeds.write("host_session", &m.name, &one);
    }
    for m in messages.iter().filter(|m| m.name == "hello") {
        let mut sealed_by_script = vec![1, 1];
        push_chunk(&mut sealed_by_script, &m.json);
        sealed_by_script.extend_from_slice(&host[1..]);
        seeds.write("host_session", "hello-sealed", &sealed_by_script);
        let mut raw = vec![1, 0];
        push_chunk(&mut raw, &m.sealed);
        seeds.write("host_session", "hello-raw", &raw);
    }

    let mut agent = vec![0];
    for m in from("session.host_to_agent") {
        agent.push(2);
        push_chunk(&mut agent, &m.json);
        agent.extend_from_slice(&[8, 6, 0, 6, 1, 2, 0, 0x7b, 0x7d, 3, 0xe8, 0x03, 8]);
    }
    agent.extend_from_slice(&[7, 6, 2, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f, 3, 0xb8, 0x0b, 8, 6, 3, 8]);
    seeds.write("agent_session", "established", &agent);
    for m in from("session.host_to_agent") {
        let mut one = vec![0, 2];
        push_chunk(&mut one, &m.json);
        one.push(8);
        seeds.write("agent_session", &m.name, &one);
    }
    for m in messages.iter().filter(|m| m.name == "welcome" || m.name == "reject") {
        for how in [0u8, 1, 2] {
            let mut answer = vec![1, how];
            push_chunk(&mut answer, if how == 2 { &m.sealed } else { &m.json });
            answer.extend_from_slice(&agent[1..]);
            seeds.write("agent_session", &format!("{}-{how}", m.name), &answer);
        }
    }

    for (index, spec) in REGISTRY.iter().enumerate() {
        let mut seed = vec![u8::try_from(index).expect("fewer than 256 verbs")];
        seed.extend_from_slice(spec.example.as_bytes());
        seeds.write("verbs_parse", &spec.name.replace('.', "_"), &seed);
    }
    let mut unknown = vec![255];
    push_chunk(&mut unknown, b"docker.prune");
    unknown.extend_from_slice(b"{\"all\":true}");
    seeds.write("verbs_parse", "unknown_verb", &unknown);

    api_seeds(&seeds);

    seeds.write("host_config", "full.toml", HOST_TOML.as_bytes());
    seeds.write("host_config", "empty.toml", b"");
    for (format, name, text) in [(0u8, "example.toml", GATEWAY_TOML), (1, "example.env", GATEWAY_ENV)] {
        let mut seed = vec![format];
        push_chunk(&mut seed, text.as_bytes());
        seeds.write("gateway_config", name, &seed);
    }
}

/// Command submissions the API tests send, accepted and refused alike.
const SUBMISSIONS: &[(&str, &str)] = &[
    ("health", r#"{"verb": "get_system_health", "args": {}, "targets": ["gw-1"]}"#),
    (
        "health_priority_timeout",
        r#"{"verb": "get_system_health", "args": {}, "targets": ["gw-1"], "priority": 5, "timeout_secs": 30}"#,
    ),
    ("selector", r#"{"verb": "docker.ps", "selector": {"site": "lab", "capability": "docker", "status": "online"}}"#),
    ("selector_empty", r#"{"verb": "get_system_health", "args": null, "selector": {}}"#),
    ("unknown_verb", r#"{"verb": "rm_rf", "args": {}, "targets": ["gw-1"]}"#),
    ("bad_username", r#"{"verb": "add_user", "args": {"username": "x; rm -rf /"}, "targets": ["gw-1"]}"#),
    ("extra_arg", r#"{"verb": "get_system_health", "args": {"rm": true}, "targets": ["gw-1"]}"#),
    ("long_timeout", r#"{"verb": "get_system_health", "args": {}, "targets": ["gw-1"], "timeout_secs": 999999}"#),
    (
        "stop_short_timeout",
        r#"{"verb":"docker.stop","args":{"container":"web","timeout_secs":30},"targets":["gw-1"],"timeout_secs":5}"#,
    ),
    ("both", r#"{"verb": "get_system_health", "targets": ["gw-1"], "selector": {}}"#),
    ("neither", r#"{"verb": "get_system_health"}"#),
    ("bad_status", r#"{"verb": "get_system_health", "selector": {"status": "asleep"}}"#),
    ("bad_target", r#"{"verb": "get_system_health", "targets": ["gw-1", "-x"]}"#),
    ("verb_number", r#"{"verb": 1}"#),
    ("misspelt", r#"{"verb": "get_system_health", "tragets": []}"#),
    ("empty", ""),
];

/// Queries of the list routes, by the query target's operation byte.
const QUERIES: &[(u8, &str, &str)] = &[
    (0, "commands_filtered", "status=queued&agent=gw-1&verb=get_system_health"),
    (0, "commands_page", "limit=50&cursor=17"),
    (0, "commands_bad_status", "status=done"),
    (0, "commands_typo", "stauts=queued"),
    (1, "agents", "site=lab&status=online&capability=docker&limit=10&cursor=gw-1"),
    (1, "agents_revoked", "status=revoked"),
    (2, "audit", "action=api.commands.submit&actor=admin&limit=5&cursor=100"),
    (3, "dead_letters", "limit=10"),
    (4, "telemetry", "metric=cpu.usage&from=1000&to=2000&limit=10"),
    (4, "telemetry_backwards", "from=2000&to=1000"),
    (5, "none", ""),
    (5, "escaped", "a=%41+b&c=%zz&d=%e2%82%ac"),
];

fn api_seeds(seeds: &Seeds<'_>) {
    for (name, body) in SUBMISSIONS {
        seeds.write("api_submit_body", name, body.as_bytes());
    }
    for spec in REGISTRY {
        let args: Value = serde_json::from_str(spec.example).expect("a registry example is JSON");
        let body = serde_json::json!({ "verb": spec.name, "args": args, "targets": ["gw-1", "gw-2"] });
        seeds.write(
            "api_submit_body",
            &format!("example_{}", spec.name.replace('.', "_")),
            body.to_string().as_bytes(),
        );
    }

    for (pick, name, body) in [
        (0u8, "enroll", r#"{"agent_id": "gw-2", "site": "lab"}"#),
        (0, "enroll_bad_site", r#"{"agent_id": "gw-3", "site": "a\nVIW_AGENT_ID=evil"}"#),
        (0, "enroll_bad_id", r#"{"agent_id": "../etc", "site": "lab"}"#),
        (1, "maintenance_on", r#"{"maintenance": true}"#),
        (1, "maintenance_off", r#"{"maintenance": false}"#),
        (2, "token", r#"{"name": "ci", "role": "viewer"}"#),
        (2, "token_bad_role", r#"{"name": "ci", "role": "root"}"#),
    ] {
        let mut seed = vec![pick];
        seed.extend_from_slice(body.as_bytes());
        seeds.write("api_agent_bodies", name, &seed);
    }

    for (pick, name, query) in QUERIES {
        let mut seed = vec![*pick];
        seed.extend_from_slice(query.as_bytes());
        seeds.write("api_query_strings", name, &seed);
    }
    const METHODS: &[&str] = &["GET", "POST", "PATCH", "DELETE"];
    for (n, route) in ROUTES.iter().enumerate() {
        let method = METHODS.iter().position(|m| *m == route.method).expect("a method the target can pick");
        let path = route.pattern.replace("{id}", "gw-1").replace("{agent_id}", "gw-1");
        let mut seed = vec![6, u8::try_from(method).expect("few methods")];
        seed.extend_from_slice(path.as_bytes());
        seeds.write("api_query_strings", &format!("route_{n}"), &seed);
    }
    let mut pairs = vec![7];
    for (key, value) in [("status", "queued"), ("agent", "gw 1/ü"), ("", "="), ("status", "again")] {
        push_chunk(&mut pairs, key.as_bytes());
        push_chunk(&mut pairs, value.as_bytes());
    }
    seeds.write("api_query_strings", "round_trip", &pairs);
}
