//! The REST API over real HTTP/1.1: a real SQLite file, the real control plane and
//! `api::serve` on a loopback port, spoken to with hand-written requests. The last test runs
//! the whole host and enrolls, connects and drives a real agent through the API.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Fleet, TestAgent, eventually, http, now};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use viworks_core::session::AgentEvent;
use viworks_core::wire::{CommandResult, ResultStatus};
use viworks_host::api::{self, ApiState, Limiter};
use viworks_host::config::Config;
use viworks_host::control::Control;
use viworks_host::metrics::Metrics;
use viworks_host::store::AnyStore;
use viworks_host::store::{AuditFilter, Role, Store, TelemetryRow, TokenRecord};

/// `api::serve` over a fresh data directory with agent `gw-1` enrolled (and not connected).
struct Api {
    addr: std::net::SocketAddr,
    admin: String,
    control: Control<AnyStore>,
    store: AnyStore,
    stop: watch::Sender<bool>,
    served: tokio::task::JoinHandle<()>,
    _fleet: Fleet,
}

impl Api {
    async fn start() -> Api {
        Api::with(|_| {}).await
    }

    async fn with(tune: impl FnOnce(&mut Config)) -> Api {
        let mut fleet = Fleet::new().await;
        fleet.enroll("gw-1").await;
        tune(&mut fleet.config);
        let store =
            viworks_host::open_store(&fleet.config.store, fleet.config.postgres).await.expect("opens the SQLite store");
        let pki = fleet.pki();
        let name = fleet.config.instance_name.clone();
        let control =
            Control::start(store.clone(), pki.master_key().clone(), fleet.config.control, Metrics::new(), name)
                .await
                .expect("control starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("address");
        let (stop, signal) = watch::channel(false);
        let state = Arc::new(ApiState {
            control: control.clone(),
            rate_limits: fleet.config.rate_limits,
            pki: Arc::new(pki),
            public_url: fleet.config.public_url.clone(),
            limiter: Limiter::default(),
            shutdown: signal.clone(),
        });
        let served = tokio::spawn(api::serve(listener, None, state, signal));
        Api { addr, admin: fleet.admin_token.clone(), control, store, stop, served, _fleet: fleet }
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> support::Response {
        http(self.addr, method, path, token, &[], body).await
    }

    async fn submit(&self, token: &str, key: Option<&str>, body: &Value) -> support::Response {
        let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
        http(self.addr, "POST", "/api/v1/commands", Some(token), &headers, Some(body)).await
    }

    async fn token(&self, role: Role) -> String {
        viworks_host::create_token(&self.store, role, &format!("{}-token", role.as_str())).await.expect("token")
    }

    /// Waits for an audit record of `action` with status `rc`.
    async fn audited(&self, action: &str, rc: &str) -> Option<viworks_host::store::AuditEntry> {
        let mut found = None;
        eventually(Duration::from_secs(3), async || {
            let filter = AuditFilter { action: Some(action.into()), limit: 50, ..AuditFilter::default() };
            found = self.store.audit(&filter).await.ok().and_then(|rows| rows.into_iter().find(|r| r.content.rc == rc));
            found.is_some()
        })
        .await;
        found
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(15), self.served).await.expect("serve returns").expect("no panic");
        self.control.shutdown().await;
        self.store.close().await;
    }
}

fn health(targets: &[&str]) -> Value {
    json!({ "verb": "get_system_health", "args": {}, "targets": targets })
}

/// Reads from `stream` until `needle` was seen, the peer closed, or `within` passed.
async fn read_until(stream: &mut TcpStream, seen: &mut String, needle: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 8192];
    while !seen.contains(needle) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => return seen.contains(needle),
        }
    }
    true
}

/// Opens a job's event stream.
async fn events(addr: std::net::SocketAddr, token: &str, job: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let request = format!("GET /api/v1/jobs/{job}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("writes");
    stream
}

#[tokio::test]
async fn requests_without_a_valid_token_are_401_with_the_error_shape_and_a_request_id() {
    let api = Api::start().await;
    let revoked = format!("vwk_{}", "ab".repeat(32));
    let record = TokenRecord {
        token_hash: api::hash_token(&revoked),
        name: "old".into(),
        role: Role::Admin,
        created_at: now(),
        revoked: true,
    };
    api.store.create_token(&record).await.expect("stored");
    let unknown = format!("vwk_{}", "0".repeat(64));
    for token in [None, Some("not-a-token"), Some(unknown.as_str()), Some(revoked.as_str())] {
        let response = api.call("GET", "/api/v1/agents", token, None).await;
        assert_eq!(response.status, 401, "{token:?}: {}", response.body);
        let error = &response.json()["error"];
        assert_eq!(error["code"], "unauthorized");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        let req_id = response.header("X-Request-Id").expect("every response has a request id");
        assert_eq!(error["req_id"], req_id);
        assert!(response.header("WWW-Authenticate").is_some());
    }
    let a = api.call("GET", "/api/v1/agents", None, None).await;
    let b = api.call("GET", "/api/v1/agents", None, None).await;
    assert_ne!(a.header("X-Request-Id"), b.header("X-Request-Id"), "request ids are random");
    api.stop().await;
}

#[tokio::test]
async fn a_viewer_reads_but_may_not_submit_and_the_refusal_is_audited() {
    let api = Api::start().await;
    let viewer = api.token(Role::Viewer).await;
    let listed = api.call("GET", "/api/v1/agents", Some(&viewer), None).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json()["agents"][0]["agent_id"], "gw-1");
    assert_eq!(listed.json()["agents"][0]["status"], "offline");
    for header in ["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-Request-Id"] {
        assert!(listed.header(header).is_some(), "{header} missing");
    }
    let reset: u64 = listed.header("X-RateLimit-Reset").and_then(|v| v.parse().ok()).expect("epoch seconds");
    assert!(reset >= now().as_millis() / 1000, "the reset is an epoch time, not a delay");

    let posted = api.submit(&viewer, None, &health(&["gw-1"])).await;
    assert_eq!(posted.status, 403, "{}", posted.body);
    assert_eq!(posted.json()["error"]["code"], "forbidden");
    assert_eq!(api.call("DELETE", "/api/v1/agents/gw-1", Some(&viewer), None).await.status, 403);
    let operator = api.token(Role::Operator).await;
    let enroll = json!({ "agent_id": "gw-2", "site": "lab" });
    assert_eq!(api.call("POST", "/api/v1/agents", Some(&operator), Some(&enroll)).await.status, 403);

    let record = api.audited("api.commands.submit", "403").await.expect("the refused submission is audited");
    assert_eq!(record.content.actor, "viewer-token");
    assert_eq!(record.content.req_id, posted.header("X-Request-Id").expect("id"));
    assert!(api.audited("api.agents.revoke", "403").await.is_some());
    let listed = api.call("GET", "/api/v1/commands", Some(&viewer), None).await;
    assert_eq!(listed.json()["commands"], json!([]), "nothing was queued");
    api.stop().await;
}

#[tokio::test]
async fn an_exhausted_write_budget_is_429_with_retry_after_while_reads_keep_their_own() {
    let api = Api::with(|config| config.rate_limits.writes_per_minute = 2).await;
    for _ in 0..2 {
        assert_eq!(api.submit(&api.admin, None, &health(&["gw-1"])).await.status, 202);
    }
    let limited = api.submit(&api.admin, None, &health(&["gw-1"])).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.json()["error"]["code"], "rate_limited");
    let retry: u64 = limited.header("Retry-After").and_then(|v| v.parse().ok()).expect("Retry-After in seconds");
    assert!((1..=30).contains(&retry), "one write per 30 s at 2 a minute: {retry}");
    assert_eq!(limited.header("X-RateLimit-Limit"), Some("2"));
    assert_eq!(limited.header("X-RateLimit-Remaining"), Some("0"));
    let read = api.call("GET", "/api/v1/commands", Some(&api.admin), None).await;
    assert_eq!(read.status, 200, "reads have their own budget");
    assert_eq!(read.json()["commands"].as_array().map(Vec::len), Some(2), "the refused write queued nothing");
    api.stop().await;
}

#[tokio::test]
async fn the_client_address_budget_throttles_requests_before_any_token_is_checked() {
    let api = Api::with(|config| config.rate_limits.per_ip_per_minute = 3).await;
    for _ in 0..3 {
        assert_eq!(api.call("GET", "/health", None, None).await.status, 200);
    }
    let guessing = api.call("GET", "/api/v1/agents", Some(&format!("vwk_{}", "1".repeat(64))), None).await;
    assert_eq!(guessing.status, 429, "token guessing is throttled per address: {}", guessing.body);
    assert!(guessing.header("Retry-After").is_some());
    // Writes from the address have their own budget.
    assert_eq!(api.call("POST", "/api/v1/commands", None, Some(&health(&["gw-1"]))).await.status, 401);
    api.stop().await;
}

#[tokio::test]
async fn unknown_verbs_and_bad_arguments_are_422_naming_the_field_and_nothing_is_queued() {
    let api = Api::start().await;
    let unknown = api.submit(&api.admin, None, &json!({ "verb": "rm_rf", "args": {}, "targets": ["gw-1"] })).await;
    assert_eq!(unknown.status, 422, "{}", unknown.body);
    assert_eq!(unknown.json()["error"]["code"], "unprocessable");
    assert_eq!(unknown.json()["error"]["field"], "verb");
    let bad = json!({ "verb": "add_user", "args": { "username": "x; rm -rf /" }, "targets": ["gw-1"] });
    let refused = api.submit(&api.admin, None, &bad).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(refused.json()["error"]["field"], "args.username");
    let extra = json!({ "verb": "get_system_health", "args": { "rm": true }, "targets": ["gw-1"] });
    assert_eq!(api.submit(&api.admin, None, &extra).await.status, 422);
    let long = json!({ "verb": "get_system_health", "args": {}, "targets": ["gw-1"], "timeout_secs": 999_999 });
    assert_eq!(api.submit(&api.admin, None, &long).await.json()["error"]["field"], "timeout_secs");
    let both = json!({ "verb": "get_system_health", "targets": ["gw-1"], "selector": {} });
    assert_eq!(api.submit(&api.admin, None, &both).await.status, 422);
    assert_eq!(api.submit(&api.admin, None, &health(&["gw-9"])).await.status, 404, "not enrolled");
    assert_eq!(api.submit(&api.admin, None, &json!({ "verb": 1 })).await.status, 400);
    assert_eq!(api.submit(&api.admin, None, &json!({ "verb": "get_system_health", "tragets": [] })).await.status, 400);
    let listed = api.call("GET", "/api/v1/commands", Some(&api.admin), None).await;
    assert_eq!(listed.json()["commands"], json!([]), "nothing was queued");
    let record = api.audited("api.commands.submit", "422").await.expect("refusals are audited");
    assert_eq!(record.content.actor, "admin");
    api.stop().await;
}

#[tokio::test]
async fn a_valid_submission_is_202_with_its_job_and_stays_queued_without_an_agent() {
    let api = Api::start().await;
    let operator = api.token(Role::Operator).await;
    let body =
        json!({ "verb": "get_system_health", "args": {}, "targets": ["gw-1"], "priority": 5, "timeout_secs": 30 });
    let accepted = api.submit(&operator, None, &body).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let reply = accepted.json();
    assert_eq!(reply["req_id"], accepted.header("X-Request-Id").expect("id"));
    assert_eq!(reply["commands"][0]["agent_id"], "gw-1");
    let (job, command) =
        (reply["job_id"].as_str().expect("job"), reply["commands"][0]["command_id"].as_str().expect("id"));

    let read = api.call("GET", &format!("/api/v1/commands/{command}"), Some(&operator), None).await.json();
    assert_eq!(
        (read["state"].as_str(), read["job_id"].as_str(), read["timeout_secs"].as_u64()),
        (Some("queued"), Some(job), Some(30))
    );
    let job_view = api.call("GET", &format!("/api/v1/jobs/{job}"), Some(&operator), None).await.json();
    assert_eq!(job_view["complete"], false);
    assert_eq!(job_view["commands"].as_array().map(Vec::len), Some(1));
    let queued = api
        .call("GET", "/api/v1/commands?status=queued&agent=gw-1&verb=get_system_health", Some(&operator), None)
        .await;
    assert_eq!(queued.json()["commands"][0]["command_id"], command);
    assert_eq!(api.call("GET", "/api/v1/commands?status=done", Some(&operator), None).await.status, 400);
    assert_eq!(api.call("GET", "/api/v1/commands?stauts=queued", Some(&operator), None).await.status, 400);

    let record = api.audited("api.commands.submit", "202").await.expect("audited");
    assert_eq!(record.content.targets, vec!["gw-1".to_owned()]);
    assert_eq!(record.content.detail["priority"], 5);
    assert_eq!(record.content.detail["job_id"], job);
    assert_eq!(record.content.args_hash, viworks_host::audit::chain::args_hash(&json!({})));
    api.stop().await;
}

#[tokio::test]
async fn one_idempotency_key_gives_one_job_and_no_other_request_or_token_can_reuse_it() {
    let api = Api::start().await;
    let first = api.submit(&api.admin, Some("deploy-42"), &health(&["gw-1"])).await;
    assert_eq!(first.status, 202, "{}", first.body);
    // Key order and spacing do not change the request.
    let same = json!({ "targets": ["gw-1"], "args": {}, "verb": "get_system_health" });
    let again = api.submit(&api.admin, Some("deploy-42"), &same).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(first.json()["job_id"], again.json()["job_id"]);
    assert_eq!(first.json()["commands"], again.json()["commands"]);
    let other = json!({ "verb": "docker.ps", "args": {}, "targets": ["gw-1"] });
    let conflict = api.submit(&api.admin, Some("deploy-42"), &other).await;
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    assert_eq!(conflict.json()["error"]["code"], "conflict");
    let second_admin = viworks_host::create_token(&api.store, Role::Admin, "admin").await.expect("token");
    let borrowed = api.submit(&second_admin, Some("deploy-42"), &health(&["gw-1"])).await;
    assert_eq!(borrowed.status, 409, "another token, even of the same name, never replays this job");
    let listed = api.call("GET", "/api/v1/commands", Some(&api.admin), None).await;
    assert_eq!(listed.json()["commands"].as_array().map(Vec::len), Some(1), "one command in all");
    assert_eq!(api.submit(&api.admin, Some(""), &health(&["gw-1"])).await.status, 400);
    api.stop().await;
}

#[tokio::test]
async fn cancelling_a_queued_command_makes_it_cancelled_and_cancelling_again_is_409() {
    let api = Api::start().await;
    let accepted = api.submit(&api.admin, None, &health(&["gw-1"])).await.json();
    let command = accepted["commands"][0]["command_id"].as_str().expect("id").to_owned();
    let path = format!("/api/v1/commands/{command}/cancel");
    let cancelled = api.call("POST", &path, Some(&api.admin), None).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.json(), json!({ "command_id": command, "state": "cancelled" }));
    let stored = eventually(Duration::from_secs(3), async || {
        api.call("GET", &format!("/api/v1/commands/{command}"), Some(&api.admin), None).await.json()["state"]
            == "cancelled"
    })
    .await;
    assert!(stored, "the terminal state is durable");
    let metrics = api.call("GET", "/metrics", None, None).await.body;
    for line in ["viworks_commands_finished_total{kind=\"cancelled\"} 1", "viworks_commands{kind=\"queued\"} 0"] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    let again = api.call("POST", &path, Some(&api.admin), None).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(api.call("POST", "/api/v1/commands/cmd-nope/cancel", Some(&api.admin), None).await.status, 404);
    assert!(api.audited("api.commands.cancel", "200").await.is_some());
    api.stop().await;
}

#[tokio::test]
async fn full_queues_answer_429_queue_full_with_retry_after() {
    let api = Api::with(|config| {
        config.control.dispatch.max_commands = 1;
        config.control.dispatch.per_agent_queue = 1;
    })
    .await;
    assert_eq!(api.submit(&api.admin, None, &health(&["gw-1"])).await.status, 202);
    let full = api.submit(&api.admin, None, &health(&["gw-1"])).await;
    assert_eq!(full.status, 429, "{}", full.body);
    assert_eq!(full.json()["error"]["code"], "queue_full");
    assert!(full.header("Retry-After").is_some());
    let healthz = api.call("GET", "/internal/_healthz", None, None).await;
    assert_eq!(healthz.status, 503, "no free slot is degraded: {}", healthz.body);
    assert_eq!(healthz.json()["degraded"], json!(["queue"]));
    api.stop().await;
}

#[tokio::test]
async fn health_reports_every_component_and_metrics_count_submissions_and_requests() {
    let api = Api::start().await;
    assert_eq!(api.call("GET", "/health", None, None).await.json(), json!({ "status": "ok" }));
    let healthz = api.call("GET", "/internal/_healthz", None, None).await;
    assert_eq!(healthz.status, 200, "{}", healthz.body);
    let components = &healthz.json()["components"];
    assert_eq!(components["database"]["ok"], true);
    assert!(components["database"]["latency_ms"].is_number());
    assert_eq!(components["agents"]["online"], 0);
    assert!(components["queue"]["free_slots"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(components["queue"]["queued"], 0);
    assert!(components["telemetry"].get("lag_ms").is_some());
    assert_eq!(components["dead_letters"]["count"], 0);

    assert_eq!(api.submit(&api.admin, None, &health(&["gw-1"])).await.status, 202);
    let metrics = api.call("GET", "/metrics", None, None).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.header("Content-Type").is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    for line in [
        "viworks_commands_submitted_total 1",
        "viworks_queue_depth 1",
        "viworks_commands{kind=\"queued\"} 1",
        "viworks_commands{kind=\"sent\"} 0",
        "viworks_http_requests_total{kind=\"POST /api/v1/commands 2xx\"} 1",
        "viworks_http_requests_total{kind=\"GET /internal/_healthz 2xx\"} 1",
    ] {
        assert!(metrics.body.contains(line), "{line} missing from\n{}", metrics.body);
    }
    // The SQLite writer's counters: the enrolment and the submission were written.
    let value = |name: &str| -> f64 {
        let line = metrics.body.lines().find(|l| l.starts_with(&format!("{name} "))).expect(name);
        line[name.len() + 1..].parse().expect("a number")
    };
    let transactions = value("viworks_store_writer_transactions_total");
    assert!(transactions >= 1.0, "{transactions}");
    assert!(value("viworks_store_writer_requests_total") >= transactions);
    assert!(value("viworks_store_writer_busy_seconds_total") > 0.0);
    assert_eq!(api.call("GET", "/api/v1/nope", Some(&api.admin), None).await.status, 404);
    let not_allowed = api.call("PUT", "/api/v1/agents/gw-1", Some(&api.admin), None).await;
    assert_eq!(not_allowed.status, 405);
    assert_eq!(not_allowed.header("Allow"), Some("GET, DELETE, PATCH"));
    let metrics = api.call("GET", "/metrics", None, None).await;
    assert!(metrics.body.contains("viworks_http_requests_total{kind=\"unmatched 4xx\"} 2"), "{}", metrics.body);
    let dashboard = api.call("GET", "/", None, None).await;
    assert!(dashboard.body.contains("ViWorkS control plane"));
    assert!(dashboard.header("Content-Security-Policy").is_some_and(|p| p.contains("'nonce-")));
    api.stop().await;
}

#[tokio::test]
async fn a_job_event_stream_sends_the_current_state_then_each_change_then_end() {
    let api = Api::start().await;
    let accepted = api.submit(&api.admin, None, &health(&["gw-1"])).await.json();
    let (job, command) =
        (accepted["job_id"].as_str().expect("job"), accepted["commands"][0]["command_id"].as_str().expect("id"));
    let mut stream = events(api.addr, &api.admin, job).await;
    let mut seen = String::new();
    assert!(read_until(&mut stream, &mut seen, "\"state\":\"queued\"", Duration::from_secs(3)).await, "{seen}");
    assert!(seen.starts_with("HTTP/1.1 200") && seen.contains("text/event-stream"), "{seen}");
    assert!(seen.contains("event: state\ndata: {"), "{seen}");
    let cancelled = api.call("POST", &format!("/api/v1/commands/{command}/cancel"), Some(&api.admin), None).await;
    assert_eq!(cancelled.status, 200);
    assert!(read_until(&mut stream, &mut seen, "event: end", Duration::from_secs(3)).await, "{seen}");
    assert!(seen.contains("\"state\":\"cancelled\""), "{seen}");
    // The stream closes after `end`: the chunked body's terminator arrives.
    assert!(read_until(&mut stream, &mut seen, "\r\n0\r\n\r\n", Duration::from_secs(3)).await, "{seen}");
    let missing = api.call("GET", "/api/v1/jobs/job-nope/events", Some(&api.admin), None).await;
    assert_eq!(missing.status, 404);
    api.stop().await;
}

#[tokio::test]
async fn a_body_over_1_mib_is_refused_with_413_before_it_is_read() {
    let api = Api::start().await;
    let mut stream = TcpStream::connect(api.addr).await.expect("connects");
    let head = format!(
        "POST /api/v1/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{",
        api.admin,
        2 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.expect("writes");
    let mut seen = String::new();
    assert!(read_until(&mut stream, &mut seen, "payload_too_large", Duration::from_secs(3)).await, "{seen}");
    assert!(seen.starts_with("HTTP/1.1 413"), "{seen}");
    assert!(api.audited("api.commands.submit", "413").await.is_some());
    api.stop().await;
}

#[tokio::test]
async fn agents_are_enrolled_listed_put_in_maintenance_and_revoked() {
    let api = Api::start().await;
    let enrolled =
        api.call("POST", "/api/v1/agents", Some(&api.admin), Some(&json!({ "agent_id": "gw-2", "site": "lab" }))).await;
    assert_eq!(enrolled.status, 201, "{}", enrolled.body);
    assert_eq!(enrolled.header("Cache-Control"), Some("no-store"), "the bundle holds a private key");
    let bundle = &enrolled.json()["bundle"];
    assert!(bundle["client_cert"].as_str().is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----")));
    assert!(bundle["client_key"].as_str().is_some_and(|p| p.contains("PRIVATE KEY")));
    assert!(bundle["ca_cert"].as_str().is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----")));
    assert_eq!(bundle["host_pin"], api._fleet.pki().host_pin().to_base64());
    assert!(bundle["agent_env"].as_str().is_some_and(|env| env.contains("VIW_AGENT_ID=gw-2\n")));
    assert_eq!(
        api.call("POST", "/api/v1/agents", Some(&api.admin), Some(&json!({ "agent_id": "gw-2", "site": "lab" })))
            .await
            .status,
        409
    );
    let bad_site = json!({ "agent_id": "gw-3", "site": "a\nVIW_AGENT_ID=evil" });
    let refused = api.call("POST", "/api/v1/agents", Some(&api.admin), Some(&bad_site)).await;
    assert_eq!((refused.status, refused.json()["error"]["field"].as_str()), (422, Some("site")));
    let record = api.audited("api.agents.enroll", "201").await.expect("audited");
    assert!(!record.content.detail.to_string().contains("PRIVATE"), "no key material in the audit trail");

    let listed = api.call("GET", "/api/v1/agents?status=offline&site=lab", Some(&api.admin), None).await.json();
    assert_eq!(
        listed["agents"].as_array().map(|a| a.iter().map(|x| x["agent_id"].clone()).collect::<Vec<_>>()),
        Some(vec![json!("gw-2")])
    );
    assert_eq!(
        api.call("GET", "/api/v1/agents?status=online", Some(&api.admin), None).await.json()["agents"],
        json!([])
    );
    let paged = api.call("GET", "/api/v1/agents?limit=1", Some(&api.admin), None).await.json();
    assert_eq!(paged["next_cursor"], "gw-1");
    let rest = api.call("GET", "/api/v1/agents?limit=1&cursor=gw-1", Some(&api.admin), None).await.json();
    assert_eq!(rest["agents"][0]["agent_id"], "gw-2");

    let on = api.call("PATCH", "/api/v1/agents/gw-2", Some(&api.admin), Some(&json!({ "maintenance": true }))).await;
    assert_eq!((on.status, on.json()["maintenance"].as_bool()), (200, Some(true)));
    assert_eq!(api.submit(&api.admin, None, &health(&["gw-2"])).await.status, 409, "no new commands in maintenance");
    api.call("PATCH", "/api/v1/agents/gw-2", Some(&api.admin), Some(&json!({ "maintenance": false }))).await;
    assert_eq!(api.submit(&api.admin, None, &health(&["gw-2"])).await.status, 202);

    let revoked = api.call("DELETE", "/api/v1/agents/gw-2", Some(&api.admin), None).await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert_eq!(api.call("GET", "/api/v1/agents/gw-2", Some(&api.admin), None).await.json()["status"], "revoked");
    let listed = api.call("GET", "/api/v1/agents", Some(&api.admin), None).await.json();
    assert_eq!(listed["agents"].as_array().map(Vec::len), Some(1), "revoked agents are listed only on request");
    let revoked_list = api.call("GET", "/api/v1/agents?status=revoked", Some(&api.admin), None).await.json();
    assert_eq!(revoked_list["agents"][0]["agent_id"], "gw-2");
    assert_eq!(api.submit(&api.admin, None, &health(&["gw-2"])).await.status, 404, "revoked agents get no commands");
    assert_eq!(api.call("DELETE", "/api/v1/agents/gw-9", Some(&api.admin), None).await.status, 404);
    api.stop().await;
}

#[tokio::test]
async fn telemetry_audit_dead_letters_and_tokens_are_served() {
    let api = Api::start().await;
    let rows: Vec<TelemetryRow> = (0..3)
        .map(|n| TelemetryRow {
            agent_id: "gw-1".parse().expect("id"),
            ts: viworks_core::Timestamp::from_millis(1_000 + n),
            metric_key: "cpu.usage".parse().expect("metric"),
            value: n as f64,
        })
        .collect();
    api.store.save_telemetry(&rows).await.expect("saved");
    let samples =
        api.call("GET", "/api/v1/telemetry/gw-1?metric=cpu.usage&from=1001&to=1003", Some(&api.admin), None).await;
    assert_eq!(samples.status, 200, "{}", samples.body);
    assert_eq!(
        samples.json()["samples"],
        json!([{ "ts": 1002, "metric": "cpu.usage", "value": 2.0 }, { "ts": 1001, "metric": "cpu.usage", "value": 1.0 }])
    );
    let latest = api.call("GET", "/api/v1/telemetry/gw-1/latest", Some(&api.admin), None).await.json();
    assert_eq!(latest["samples"][0]["ts"], 1002);
    assert_eq!(api.call("GET", "/api/v1/telemetry/gw-9", Some(&api.admin), None).await.status, 404);
    assert_eq!(api.call("GET", "/api/v1/telemetry/gw-1?from=5&to=1", Some(&api.admin), None).await.status, 400);

    let created =
        api.call("POST", "/api/v1/tokens", Some(&api.admin), Some(&json!({ "name": "ci", "role": "viewer" }))).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let token = created.json()["token"].as_str().expect("token").to_owned();
    assert_eq!(api.call("GET", "/api/v1/audit", Some(&token), None).await.status, 200, "the new token works");
    assert_eq!(api.submit(&token, None, &health(&["gw-1"])).await.status, 403, "with its role");
    let record = api.audited("api.tokens.create", "201").await.expect("audited");
    assert!(!record.content.detail.to_string().contains(&token), "the token is never audited");
    let audit = api.call("GET", "/api/v1/audit?action=api.tokens.create&limit=1", Some(&token), None).await.json();
    assert_eq!(audit["records"][0]["actor"], "admin");
    assert!(audit["records"][0]["hash"].as_str().is_some_and(|h| h.len() == 64));
    let dead = api.call("GET", "/api/v1/dead-letters?limit=5", Some(&token), None).await;
    assert_eq!((dead.status, dead.json()["dead_letters"].clone()), (200, json!([])));
    api.stop().await;
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish_and_stops_accepting() {
    let api = Api::start().await;
    let body = health(&["gw-1"]).to_string();
    let (first, rest) = body.split_at(10);
    let mut stream = TcpStream::connect(api.addr).await.expect("connects");
    let head = format!(
        "POST /api/v1/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{first}",
        api.admin,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("writes");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = api.stop.send(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(TcpStream::connect(api.addr).await.is_err(), "no new connections once shutdown began");
    stream.write_all(rest.as_bytes()).await.expect("writes the rest");
    let mut seen = String::new();
    assert!(read_until(&mut stream, &mut seen, "\"job_id\"", Duration::from_secs(5)).await, "{seen}");
    assert!(seen.starts_with("HTTP/1.1 202"), "the request in flight completes: {seen}");
    api.stop().await;
}

#[tokio::test]
async fn an_agent_enrolled_through_the_api_connects_and_a_job_streams_to_its_end() {
    let fleet = Fleet::new().await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let (addr, admin) = (host.api_addr, fleet.admin_token.as_str());
    let enrolled =
        http(addr, "POST", "/api/v1/agents", Some(admin), &[], Some(&json!({ "agent_id": "gw-new", "site": "lab" })))
            .await;
    assert_eq!(enrolled.status, 201, "{}", enrolled.body);
    let bundle = enrolled.json()["bundle"].clone();
    let dir = fleet.dir.path().join("api-bundles").join("gw-new");
    std::fs::create_dir_all(&dir).expect("dir");
    for (file, field) in
        [("client.crt", "client_cert"), ("client.key", "client_key"), ("ca.crt", "ca_cert"), ("agent.key", "agent_key")]
    {
        std::fs::write(dir.join(file), bundle[field].as_str().expect(field)).expect("writes");
    }
    std::fs::write(dir.join("host.pin"), format!("{}\n", bundle["host_pin"].as_str().expect("pin"))).expect("writes");

    let mut agent = TestAgent::connect(host.agent_addr, &dir).await.expect("the bundle's certificate is accepted");
    assert!(agent.established().await, "the bundle's agent key is right: {:?}", agent.events);
    let online = eventually(Duration::from_secs(2), async || {
        http(addr, "GET", "/api/v1/agents/gw-new", Some(admin), &[], None).await.json()["status"] == "online"
    })
    .await;
    assert!(online);

    let accepted = http(addr, "POST", "/api/v1/commands", Some(admin), &[], Some(&health(&["gw-new"]))).await.json();
    let job = accepted["job_id"].as_str().expect("job").to_owned();
    let mut stream = events(addr, admin, &job).await;
    let mut seen = String::new();
    assert!(read_until(&mut stream, &mut seen, "event: state", Duration::from_secs(3)).await, "{seen}");
    let command = match agent.until(Duration::from_secs(5), |e| matches!(e, AgentEvent::Command(_))).await {
        true => agent
            .events
            .iter()
            .find_map(|e| match e {
                AgentEvent::Command(c) => Some(c.command_id.clone()),
                _ => None,
            })
            .expect("command"),
        false => panic!("no command arrived: {:?}", agent.events),
    };
    agent.session.send_ack(now(), command.clone()).expect("ack");
    let result = CommandResult {
        command_id: command,
        status: ResultStatus::Succeeded,
        exit_code: None,
        output: json!({ "cpu": 0.5 }),
        error: None,
        duration_ms: 2,
    };
    agent.session.send_result(now(), result).expect("result");
    agent.flush().await;
    assert!(agent.until(Duration::from_secs(5), |e| matches!(e, AgentEvent::ResultsAcked(_))).await);
    assert!(read_until(&mut stream, &mut seen, "event: end", Duration::from_secs(5)).await, "{seen}");
    assert!(seen.contains("\"state\":\"succeeded\""), "{seen}");
    let job_view = http(addr, "GET", &format!("/api/v1/jobs/{job}"), Some(admin), &[], None).await.json();
    assert_eq!(job_view["complete"], true);
    assert_eq!(job_view["commands"][0]["result"]["output"], json!({ "cpu": 0.5 }));
    host.shutdown().await;
}
