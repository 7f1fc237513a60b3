//! The agent endpoint end to end: real TLS with client certificates, real WebSocket, a real
//! SQLite file, and agents driven through `viworks-core`'s `AgentSession`.

mod support;

use std::time::Duration;

use support::{Fleet, TestAgent, eventually, now};
use viworks_core::auth::{self, MacKey};
use viworks_core::idempotency::{IdempotencyKey, RequestDigest};
use viworks_core::session::AgentEvent;
use viworks_core::wire::{CloseCode, CommandResult, Envelope, Heartbeat, Message, RejectCode, ResultStatus, Verb};
use viworks_host::control::{SubmitRequest, Targets};
use viworks_host::store::{AuditFilter, Store};
use viworks_host::tls::{self, InitOptions, Pki};

fn health_request(agent: &str, key: Option<&str>) -> SubmitRequest {
    SubmitRequest {
        verb: Verb::new("get_system_health").expect("verb"),
        args: serde_json::json!({}),
        targets: Targets::Agents(vec![agent.parse().expect("id")]),
        timeout: Duration::from_secs(30),
        actor: "test".into(),
        req_id: "req-1".into(),
        idempotency: key.map(|k| {
            (IdempotencyKey::new(k).expect("key"), RequestDigest::of_json(&serde_json::json!({"verb": "health"})))
        }),
    }
}

async fn audited(host: &viworks_host::RunningHost, action: &str) -> bool {
    eventually(Duration::from_secs(3), async || {
        let filter = AuditFilter { action: Some(action.into()), limit: 10, ..AuditFilter::default() };
        host.control().store().audit(&filter).await.map(|rows| !rows.is_empty()).unwrap_or(false)
    })
    .await
}

#[tokio::test]
async fn an_agent_registers_and_is_listed_online_within_a_second() {
    let fleet = Fleet::new().await;
    let bundle = fleet.enroll("gw-1").await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let started = std::time::Instant::now();
    let mut agent = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    assert!(agent.established().await, "events: {:?}", agent.events);
    let id = "gw-1".parse().expect("id");
    assert!(eventually(Duration::from_secs(1), async || host.control().is_online(&id)).await);
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    let stored = host.control().store().agent(&id).await.expect("store").expect("enrolled");
    assert!(stored.connected);
    assert_eq!(stored.capabilities, vec!["scripts".to_owned()]);
    host.shutdown().await;
}

#[tokio::test]
async fn an_agent_enrolled_by_another_process_while_the_host_runs_is_admitted() {
    let fleet = Fleet::new().await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    // Fleet::enroll writes through its own store handle, as the CLI does.
    let bundle = fleet.enroll("gw-late").await;
    let mut agent = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    assert!(agent.established().await, "events: {:?}", agent.events);
    host.shutdown().await;
}

#[tokio::test]
async fn a_second_connection_with_the_same_agent_id_is_refused_and_audited() {
    let fleet = Fleet::new().await;
    let bundle = fleet.enroll("gw-1").await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let mut first = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    assert!(first.established().await);
    let mut second = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    let refused = second
        .until(Duration::from_secs(5), |e| matches!(e, AgentEvent::Rejected { code: RejectCode::DuplicateAgent, .. }))
        .await;
    assert!(refused, "events: {:?}", second.events);
    assert!(audited(&host, "security.hello_refused.duplicate_agent").await);
    // The first session is untouched.
    assert!(host.control().is_online(&"gw-1".parse().expect("id")));
    host.shutdown().await;
}

#[tokio::test]
async fn an_agent_whose_certificate_names_another_id_is_refused() {
    let fleet = Fleet::new().await;
    let bundle = fleet.enroll("gw-a").await;
    fleet.enroll("gw-b").await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let mut impostor = TestAgent::connect_as(host.agent_addr, &bundle, "gw-b").await.expect("connects");
    let refused = impostor
        .until(Duration::from_secs(5), |e| matches!(e, AgentEvent::Rejected { code: RejectCode::IdentityMismatch, .. }))
        .await;
    assert!(refused, "events: {:?}", impostor.events);
    assert!(audited(&host, "security.hello_refused.identity_mismatch").await);
    host.shutdown().await;
}

#[tokio::test]
async fn a_tcp_probe_is_counted_but_not_audited_and_a_garbage_handshake_is_both() {
    let fleet = Fleet::new().await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let metrics = || host.control().metrics().render();
    // Connect and close without a byte, as a load balancer's health check does.
    drop(tokio::net::TcpStream::connect(host.agent_addr).await.expect("connects"));
    let counted = eventually(Duration::from_secs(3), async || {
        metrics().contains("viworks_hello_refused_total{kind=\"probe\"} 1")
    })
    .await;
    assert!(counted, "{}", metrics());
    let mut garbage = tokio::net::TcpStream::connect(host.agent_addr).await.expect("connects");
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n").await.expect("writes");
    assert!(audited(&host, "security.tls_refused").await);
    let filter = AuditFilter { action: Some("security.tls_refused".into()), limit: 10, ..AuditFilter::default() };
    let refusals = host.control().store().audit(&filter).await.expect("read the audit trail");
    assert_eq!(refusals.len(), 1, "the probe is not audited: {refusals:?}");
    host.shutdown().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_the_tls_layer() {
    let fleet = Fleet::new().await;
    fleet.enroll("gw-1").await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let stranger = tempfile::tempdir().expect("dir");
    let other = Pki::init(&stranger.path().join("data"), &InitOptions::default()).expect("other pki");
    let bundle = stranger.path().join("gw-1");
    tls::write_bundle(&other, &"gw-1".parse().expect("id"), "x", "wss://localhost:1/ws/agent", &bundle)
        .expect("bundle");
    // Trust our host's CA and pin, but present a certificate from the other CA.
    std::fs::copy(fleet.config.data_dir.join("ca.crt"), bundle.join("ca.crt")).expect("ca");
    std::fs::write(bundle.join("host.pin"), format!("{}\n", fleet.pki().host_pin())).expect("pin");
    let outcome = TestAgent::connect(host.agent_addr, &bundle).await;
    let refused = match outcome {
        Err(_) => true,
        Ok(mut agent) => !agent.established().await,
    };
    assert!(refused);
    assert!(audited(&host, "security.tls_refused").await);
    host.shutdown().await;
}

#[tokio::test]
async fn a_command_round_trip_is_persisted_once_even_when_its_result_is_delivered_twice() {
    let fleet = Fleet::new().await;
    let bundle = fleet.enroll("gw-1").await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let mut agent = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    assert!(agent.established().await);

    let first = host.control().submit(health_request("gw-1", Some("key-1"))).await.expect("accepted");
    let again = host.control().submit(health_request("gw-1", Some("key-1"))).await.expect("accepted");
    assert_eq!(first.job_id, again.job_id, "the same idempotency key gives the same job");
    assert!(again.replayed);
    assert_eq!(first.commands.len(), 1);
    let command_id = first.commands[0].0.clone();

    let delivered = agent.until(Duration::from_secs(5), |e| matches!(e, AgentEvent::Command(_))).await;
    assert!(delivered, "events: {:?}", agent.events);
    let result = CommandResult {
        command_id: command_id.clone(),
        status: ResultStatus::Succeeded,
        exit_code: None,
        output: serde_json::json!({"cpu": 1.5}),
        error: None,
        duration_ms: 3,
    };
    agent.session.send_ack(now(), command_id.clone()).expect("ack");
    agent.session.send_result(now(), result.clone()).expect("result");
    agent.session.send_result(now(), result).expect("result again");
    agent.flush().await;
    let acked = agent.until(Duration::from_secs(5), |e| matches!(e, AgentEvent::ResultsAcked(_))).await;
    assert!(acked, "the host acknowledges only what it stored: {:?}", agent.events);

    let store = host.control().store();
    let done = eventually(Duration::from_secs(3), async || {
        store.command(&command_id).await.ok().flatten().is_some_and(|c| {
            matches!(
                c.record.state,
                viworks_core::session::CommandState::Done(viworks_core::session::Terminal::Succeeded)
            )
        })
    })
    .await;
    assert!(done);
    let stored = store.command(&command_id).await.expect("store").expect("command");
    assert_eq!(stored.result.expect("result").result.output, serde_json::json!({"cpu": 1.5}));
    let job = store.job(&first.job_id).await.expect("store").expect("job");
    assert_eq!(job.1.len(), 1, "one command, not two");
    let store = store.clone();
    host.shutdown().await;
    // The command's life in the audit chain, oldest first.
    let trail =
        store.audit(&AuditFilter { limit: 1000, ..AuditFilter::default() }).await.expect("read the audit trail");
    let lifecycle: Vec<&str> = trail
        .iter()
        .rev()
        .filter(|entry| entry.content.targets.iter().any(|t| t == command_id.as_str()))
        .map(|entry| entry.content.action.as_str())
        .collect();
    // Every step, though the store may have written only the last of those that came close.
    assert_eq!(lifecycle, ["command.created", "command.dispatched", "command.acked", "command.finished"]);
}

#[tokio::test]
async fn forged_replayed_and_garbage_frames_are_refused_audited_and_end_the_session() {
    let fleet = Fleet::new().await;
    let bundle = fleet.enroll("gw-1").await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let mut agent = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    assert!(agent.established().await);
    // A genuine heartbeat, captured and replayed.
    agent.session.handle_timeout(now().saturating_add(Duration::from_secs(2)));
    let captured = agent.session.poll_transmit().expect("a heartbeat is due");
    agent.send_raw(captured.clone()).await;
    agent.send_raw(captured).await;
    let forged = auth::seal(
        &MacKey::from_bytes([7; 32]),
        &Envelope { seq: 2, ts: now(), message: Message::Heartbeat(Heartbeat {}) },
    )
    .expect("seals");
    agent.send_raw(forged).await;
    agent.send_raw(b"garbage".to_vec()).await;
    let closed = agent
        .until(
            Duration::from_secs(5),
            |e| matches!(e, AgentEvent::Closed(end) if end.code == CloseCode::TooManyViolations),
        )
        .await;
    assert!(closed, "events: {:?}", agent.events);
    assert!(audited(&host, "security.replay_or_gap").await);
    assert!(audited(&host, "security.bad_mac").await);
    // The host is still up: the same agent can come back.
    let mut again = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    let back =
        eventually(Duration::from_secs(5), async || !host.control().is_online(&"gw-1".parse().expect("id"))).await;
    assert!(back);
    assert!(again.established().await, "events: {:?}", again.events);
    host.shutdown().await;
}

#[tokio::test]
async fn an_oversized_message_ends_the_connection_and_the_host_stays_up() {
    let fleet = Fleet::new().await;
    let bundle = fleet.enroll("gw-1").await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let mut agent = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    assert!(agent.established().await);
    agent.send_raw(vec![b'x'; 2 * 1024 * 1024]).await;
    let gone =
        eventually(Duration::from_secs(5), async || !host.control().is_online(&"gw-1".parse().expect("id"))).await;
    assert!(gone, "the host dropped the connection that sent 2 MiB");
    assert!(audited(&host, "security.too_large").await, "the oversized message was audited");
    let mut again = TestAgent::connect(host.agent_addr, &bundle).await.expect("connects");
    assert!(again.established().await);
    host.shutdown().await;
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let fleet = Fleet::new().await;
    let past = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    let validity = tls::Validity { not_before: past - Duration::from_secs(86_400), not_after: past };
    let bundle = fleet.enroll_with("gw-old", validity).await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let refused = match TestAgent::connect(host.agent_addr, &bundle).await {
        Err(_) => true,
        Ok(mut agent) => !agent.established().await,
    };
    assert!(refused);
    assert!(audited(&host, "security.tls_refused").await);
    host.shutdown().await;
}

#[tokio::test]
async fn submissions_still_work_after_a_restart_in_which_every_earlier_command_had_finished() {
    let fleet = Fleet::new().await;
    fleet.enroll("gw-1").await;
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let first = host.control().submit(health_request("gw-1", None)).await.expect("accepted");
    host.control().cancel(&first.commands[0].0).await.expect("cancels the queued command");
    let store = host.control().store().clone();
    let finished =
        eventually(Duration::from_secs(3), async || store.unfinished_commands().await.is_ok_and(|c| c.is_empty()))
            .await;
    assert!(finished);
    host.shutdown().await;
    let host = viworks_host::start(&fleet.config).await.expect("restarts");
    let second = host.control().submit(health_request("gw-1", None)).await;
    assert!(second.is_ok(), "a new submission after the restart: {second:?}");
    host.shutdown().await;
}

#[tokio::test]
async fn every_audit_record_of_accepted_work_is_stored_by_the_time_shutdown_returns() {
    let fleet = Fleet::new().await;
    for n in 0..20 {
        fleet.enroll(&format!("gw-{n}")).await;
    }
    let host = viworks_host::start(&fleet.config).await.expect("starts");
    let store = host.control().store().clone();
    let mut accepted = 0;
    for _ in 0..100 {
        let targets = Targets::Selector { site: None, capability: None, online: None };
        let request = SubmitRequest { targets, ..health_request("gw-0", None) };
        accepted += host.control().submit(request).await.expect("accepted").commands.len();
    }
    assert_eq!(accepted, 2000);
    // No waiting: the records were only queued when submit returned.
    host.shutdown().await;
    let mut created = 0;
    let mut filter = AuditFilter { action: Some("command.created".into()), limit: 1000, ..AuditFilter::default() };
    loop {
        let page = store.audit(&filter).await.expect("read the audit trail");
        created += page.len();
        match page.last() {
            Some(last) => filter.before = Some(last.seq),
            None => break,
        }
    }
    assert_eq!(created, accepted, "one command.created record per accepted command");
    assert!(matches!(store.verify_audit().await.expect("verify"), viworks_host::store::ChainVerdict::Intact { .. }));
}
