//! The session state machines, driven against each other in memory.

use std::time::Duration;

use proptest::prelude::*;
use viworks_core::auth::{self, AgentKey, ChannelBinding, MacKey, MasterKey, SkewWindow};
use viworks_core::flow::RetryPolicy;
use viworks_core::session::*;
use viworks_core::wire::{
    AgentId, CloseCode, Command, CommandId, CommandResult, Envelope, Heartbeat, Limits, Message, RejectCode,
    ResultStatus, Sample, Telemetry, Verb,
};
use viworks_core::{Entropy, Timestamp};

const MASTER: [u8; 32] = [9; 32];

fn id(s: &str) -> AgentId {
    AgentId::new(s).expect("valid id")
}

fn cid(s: &str) -> CommandId {
    CommandId::new(s).expect("valid id")
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_000_000 + ms)
}

fn host_config() -> HostConfig {
    HostConfig {
        timers: Timers { heartbeat_interval: Duration::from_secs(1), liveness_timeout: Duration::from_secs(3) },
        skew_window: SkewWindow::new(Duration::from_secs(10)),
        max_sessions: 4,
        ..HostConfig::default()
    }
}

fn host() -> Host {
    Host::new(host_config(), Box::new(MasterKey::from_bytes(MASTER)), Entropy::from_u64(1), at(0)).expect("valid")
}

fn agent_config(agent: &str, concurrency: u32) -> AgentConfig {
    let agent_id = id(agent);
    let key = AgentKey::derive(&MasterKey::from_bytes(MASTER), &agent_id);
    AgentConfig { max_concurrency: concurrency, ..AgentConfig::new(agent_id, key) }
}

/// One agent connected to the host through memory.
#[derive(Debug)]
struct Link {
    host: HostSession,
    agent: AgentSession,
    host_events: Vec<HostEvent>,
    agent_events: Vec<AgentEvent>,
}

impl Link {
    fn connect(host: &mut Host, config: &AgentConfig, now: Timestamp, seed: u64) -> Result<Link, Refusal> {
        let mut agent =
            AgentSession::new(config, now, &mut Entropy::from_u64(seed), &ChannelBinding::NONE).expect("hello");
        let hello = agent.poll_transmit().expect("hello queued");
        let host = host.accept(now, &hello, Some(&config.agent_id), &ChannelBinding::NONE)?;
        let mut link = Link { host, agent, host_events: vec![], agent_events: vec![] };
        link.pump(now);
        Ok(link)
    }

    /// Moves every queued message both ways until both are quiet.
    fn pump(&mut self, now: Timestamp) {
        loop {
            let mut moved = false;
            while let Some(bytes) = self.host.poll_transmit() {
                self.agent.handle_message(now, &bytes);
                moved = true;
            }
            while let Some(bytes) = self.agent.poll_transmit() {
                self.host.handle_message(now, &bytes);
                moved = true;
            }
            while let Some(event) = self.host.poll_event() {
                self.host_events.push(event);
            }
            while let Some(event) = self.agent.poll_event() {
                self.agent_events.push(event);
            }
            if !moved {
                return;
            }
        }
    }

    fn tick(&mut self, now: Timestamp) {
        self.host.handle_timeout(now);
        self.agent.handle_timeout(now);
        self.pump(now);
    }
}

fn command(n: u32) -> Command {
    Command {
        command_id: cid(&format!("cmd-{n}")),
        verb: Verb::new("get_system_health").expect("verb"),
        args: serde_json::json!({}),
        timeout_ms: 5_000,
        attempt: 1,
    }
}

fn result(id: &CommandId, status: ResultStatus) -> CommandResult {
    CommandResult {
        command_id: id.clone(),
        status,
        exit_code: Some(0),
        output: serde_json::json!({"ok": true}),
        error: None,
        duration_ms: 5,
    }
}

#[test]
fn a_hello_is_welcomed_and_both_sides_are_established() {
    let mut host = host();
    let link = Link::connect(&mut host, &agent_config("gw-1", 2), at(0), 1).expect("admitted");
    assert!(link.agent.is_established());
    assert!(matches!(link.agent_events[0], AgentEvent::Established { .. }));
    assert_eq!(link.host.agent_id(), &id("gw-1"));
    assert_eq!(host.live_sessions(), 1);
    assert!(host.is_live(&id("gw-1"), at(0)));
}

#[test]
fn a_second_hello_for_a_live_agent_is_refused_until_the_first_session_misses_its_deadline() {
    let mut host = host();
    let config = agent_config("gw-1", 2);
    let first = Link::connect(&mut host, &config, at(0), 1).expect("admitted");
    let refusal = Link::connect(&mut host, &config, at(100), 2).expect_err("duplicate refused");
    assert_eq!(refusal.code, RejectCode::DuplicateAgent);
    assert!(refusal.authenticated);
    // The first session hears nothing for longer than the liveness timeout: no longer live.
    let second = Link::connect(&mut host, &config, at(3_100), 3).expect("admitted once the first is silent");
    assert!(second.agent.is_established());
    drop(first);
    assert_eq!(host.live_sessions(), 1);
}

#[test]
fn the_refused_agent_learns_why_and_an_authenticated_reject_answers_its_own_hello() {
    let mut host = host();
    let config = agent_config("gw-1", 2);
    let _first = Link::connect(&mut host, &config, at(0), 1).expect("admitted");
    let mut agent =
        AgentSession::new(&config, at(10), &mut Entropy::from_u64(5), &ChannelBinding::NONE).expect("hello");
    let refusal =
        host.accept(at(10), &agent.poll_transmit().expect("hello"), None, &ChannelBinding::NONE).expect_err("refused");
    agent.handle_message(at(11), &refusal.reply);
    match agent.poll_event() {
        Some(AgentEvent::Rejected { code, authenticated, retry_after, .. }) => {
            assert_eq!(code, RejectCode::DuplicateAgent);
            assert!(authenticated);
            assert_eq!(retry_after, Some(Duration::from_secs(3)));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(agent.is_closed());
    // The same REJECT replayed into a later handshake does not answer that HELLO.
    let mut later =
        AgentSession::new(&config, at(20), &mut Entropy::from_u64(6), &ChannelBinding::NONE).expect("hello");
    let _ = later.poll_transmit();
    later.handle_message(at(21), &refusal.reply);
    assert!(matches!(later.poll_event(), Some(AgentEvent::Rejected { authenticated: false, .. })));
}

#[test]
fn hellos_are_refused_for_each_reason_with_the_right_code() {
    struct Nobody;
    impl AgentKeys for Nobody {
        fn agent_key(&self, _: &AgentId) -> Option<AgentKey> {
            None
        }
    }
    let config = agent_config("gw-1", 2);
    let hello_at = |now: Timestamp, seed: u64, config: &AgentConfig| {
        AgentSession::new(config, now, &mut Entropy::from_u64(seed), &ChannelBinding::NONE)
            .expect("hello")
            .poll_transmit()
            .expect("hello")
    };

    let mut strangers = Host::new(host_config(), Box::new(Nobody), Entropy::from_u64(1), at(0)).expect("valid");
    let refused =
        strangers.accept(at(0), &hello_at(at(0), 1, &config), None, &ChannelBinding::NONE).expect_err("refused");
    assert_eq!((refused.code, refused.authenticated), (RejectCode::UnknownAgent, false));

    let mut host = host();
    let refused = host
        .accept(at(0), &hello_at(at(0), 1, &config), Some(&id("gw-2")), &ChannelBinding::NONE)
        .expect_err("refused");
    assert_eq!(refused.code, RejectCode::IdentityMismatch);

    let impostor = AgentConfig { agent_key: AgentKey::from_bytes([1; 32]), ..config.clone() };
    let refused = host.accept(at(0), &hello_at(at(0), 1, &impostor), None, &ChannelBinding::NONE).expect_err("refused");
    assert_eq!((refused.code, refused.authenticated), (RejectCode::BadMac, false));

    let hello = hello_at(at(0), 3, &config);
    let session = host.accept(at(0), &hello, None, &ChannelBinding::NONE).expect("admitted");
    drop(session);
    let refused = host.accept(at(5), &hello, None, &ChannelBinding::NONE).expect_err("refused");
    assert_eq!(refused.code, RejectCode::Replay, "a captured HELLO replayed inside the window");

    let greedy = agent_config("gw-9", 100_000);
    let refused = host.accept(at(0), &hello_at(at(0), 4, &greedy), None, &ChannelBinding::NONE).expect_err("refused");
    assert_eq!(refused.code, RejectCode::Malformed, "concurrency beyond the host's maximum");

    let mut garbage = hello_at(at(0), 5, &config);
    garbage[0] = 9;
    assert_eq!(
        host.accept(at(0), &garbage, None, &ChannelBinding::NONE).expect_err("refused").code,
        RejectCode::UnsupportedVersion
    );
    assert_eq!(
        host.accept(at(0), b"\x01{}", None, &ChannelBinding::NONE).expect_err("refused").code,
        RejectCode::Malformed
    );

    // Last: the cache's clock only moves forward.
    let stale = hello_at(at(0), 2, &config);
    let refused = host.accept(at(10_001), &stale, None, &ChannelBinding::NONE).expect_err("refused");
    assert_eq!(refused.code, RejectCode::Stale);
}

#[test]
fn a_hello_relayed_onto_another_connection_fails_authentication() {
    let mut host = host();
    let config = agent_config("gw-1", 2);
    let binding = ChannelBinding([7; 32]);
    let mut agent = AgentSession::new(&config, at(0), &mut Entropy::from_u64(1), &binding).expect("hello");
    let hello = agent.poll_transmit().expect("hello");
    let relayed = host.accept(at(0), &hello, None, &ChannelBinding([8; 32])).expect_err("refused");
    assert_eq!((relayed.code, relayed.authenticated), (RejectCode::BadMac, false));
    let mut session = host.accept(at(1), &hello, None, &binding).expect("admitted on its own connection");
    let welcome = session.poll_transmit().expect("welcome");
    let mut elsewhere =
        AgentSession::new(&config, at(2), &mut Entropy::from_u64(2), &ChannelBinding([8; 32])).expect("hello");
    let _ = elsewhere.poll_transmit();
    elsewhere.handle_message(at(2), &welcome);
    assert!(matches!(elsewhere.poll_event(), Some(AgentEvent::Violation(Violation::BadMac))));
    agent.handle_message(at(2), &welcome);
    assert!(agent.is_established());
}

#[test]
fn admission_stops_at_the_session_limit() {
    let mut host = host();
    let links: Vec<Link> = (0..4)
        .map(|n| Link::connect(&mut host, &agent_config(&format!("gw-{n}"), 1), at(0), n).expect("admitted"))
        .collect();
    let refused = Link::connect(&mut host, &agent_config("gw-4", 1), at(0), 9).expect_err("refused");
    assert_eq!(refused.code, RejectCode::Overloaded);
    drop(links);
    assert!(Link::connect(&mut host, &agent_config("gw-4", 1), at(0), 10).is_ok());
}

#[test]
fn a_command_round_trip_returns_its_credit_and_acks_only_what_the_driver_stored() {
    let mut host = host();
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 2), at(0), 1).expect("admitted");
    assert_eq!(link.host.credits(), 2);
    link.host.send_command(at(1), command(1)).expect("credit");
    link.host.send_command(at(1), command(2)).expect("credit");
    assert!(matches!(link.host.send_command(at(1), command(3)), Err(SessionError::NoCredit { in_flight: 2 })));
    link.pump(at(2));
    let received: Vec<Command> = link
        .agent_events
        .iter()
        .filter_map(|e| if let AgentEvent::Command(c) = e { Some(c.clone()) } else { None })
        .collect();
    assert_eq!(received.len(), 2);
    link.agent.send_ack(at(3), received[0].command_id.clone()).expect("ack");
    link.agent.send_result(at(4), result(&received[0].command_id, ResultStatus::Succeeded)).expect("result");
    link.pump(at(4));
    assert!(link.host_events.contains(&HostEvent::Acked(cid("cmd-1"))));
    assert!(link.host_events.iter().any(|e| matches!(e, HostEvent::Result(r) if r.command_id == cid("cmd-1"))));
    assert_eq!(link.host.credits(), 1, "the result returned its credit");
    assert!(!link.agent_events.iter().any(|e| matches!(e, AgentEvent::ResultsAcked(_))), "nothing acked before stored");
    link.host.ack_results(at(5), &[cid("cmd-1")]).expect("ack");
    link.pump(at(5));
    assert!(link.agent_events.contains(&AgentEvent::ResultsAcked(vec![cid("cmd-1")])));
}

#[test]
fn telemetry_is_acknowledged_by_batch() {
    let mut host = host();
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 1), at(0), 1).expect("admitted");
    let batch = Telemetry {
        batch_id: 7,
        samples: vec![Sample { ts: at(0), key: "cpu.usage_pct".parse().expect("key"), value: 3.5 }],
        dropped: 2,
    };
    link.agent.send_telemetry(at(1), batch.clone()).expect("sent");
    link.pump(at(1));
    assert!(link.host_events.contains(&HostEvent::Telemetry(batch)));
    link.host.ack_telemetry(at(2), 7).expect("ack");
    link.pump(at(2));
    assert!(link.agent_events.contains(&AgentEvent::TelemetryAcked(7)));
}

#[test]
fn heartbeats_keep_an_idle_session_alive_and_silence_ends_it() {
    let mut host = host();
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 1), at(0), 1).expect("admitted");
    for second in 1..=20 {
        link.tick(at(second * 1_000));
    }
    assert!(!link.host.is_closed() && !link.agent.is_closed(), "heartbeats kept it up for 20 s");
    // The agent goes silent: nothing it sends reaches the host any more.
    link.host.handle_timeout(at(23_001));
    link.host.handle_timeout(at(24_001));
    assert_eq!(link.host.end(), Some(SessionEnd { code: CloseCode::LivenessTimeout, by_peer: false }));
    assert!(!host.is_live(&id("gw-1"), at(24_001)));
}

#[test]
fn forged_and_replayed_messages_are_refused_and_too_many_close_the_session() {
    let mut host = host();
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 1), at(0), 1).expect("admitted");
    link.agent.send_ack(at(1), cid("never-sent")).expect("ack");
    let captured = link.agent.poll_transmit().expect("sealed ack");
    link.host.handle_message(at(1), &captured);
    link.host.handle_message(at(2), &captured);
    assert_eq!(link.host.poll_event(), Some(HostEvent::Violation(Violation::OutOfSequence { expected: 2, got: 1 })));
    let forged = auth::seal(
        &MacKey::from_bytes([0; 32]),
        &Envelope { seq: 2, ts: at(3), message: Message::Heartbeat(Heartbeat {}) },
    )
    .expect("seals");
    link.host.handle_message(at(3), &forged);
    assert_eq!(link.host.poll_event(), Some(HostEvent::Violation(Violation::BadMac)));
    assert!(!link.host.is_closed());
    link.host.handle_message(at(4), b"garbage");
    assert!(matches!(link.host.poll_event(), Some(HostEvent::Violation(Violation::Undecodable("too_short")))));
    assert!(matches!(
        link.host.poll_event(),
        Some(HostEvent::Closed { end: SessionEnd { code: CloseCode::TooManyViolations, by_peer: false }, .. })
    ));
}

#[test]
fn a_session_that_closes_reports_what_was_in_flight() {
    let mut host = host();
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 2), at(0), 1).expect("admitted");
    link.host.send_command(at(1), command(1)).expect("credit");
    link.host.send_command(at(1), command(2)).expect("credit");
    link.pump(at(1));
    link.agent.send_ack(at(2), cid("cmd-1")).expect("ack");
    link.pump(at(2));
    link.agent.close(at(3), CloseCode::GoingAway, "restarting");
    link.pump(at(3));
    let closed = link.host_events.iter().find_map(|e| match e {
        HostEvent::Closed { end, in_flight } => Some((*end, in_flight.clone())),
        _ => None,
    });
    let (end, in_flight) = closed.expect("closed");
    assert_eq!(end, SessionEnd { code: CloseCode::GoingAway, by_peer: true });
    let acked: Vec<bool> = in_flight.iter().map(|(_, d)| d.acked).collect();
    assert_eq!(in_flight.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), vec![cid("cmd-1"), cid("cmd-2")]);
    assert_eq!(acked, vec![true, false]);
}

#[test]
fn the_guard_runs_a_command_once_and_answers_redeliveries_from_the_ledger() {
    let mut host = host();
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 2), at(0), 1).expect("admitted");
    let mut guard = ExecutionGuard::recover(MemoryLedger::new(64), at(0), 2).expect("recovers");
    assert_eq!(guard.on_command(at(1), &mut link.agent, command(1)).expect("ledger"), Some(command(1)));
    assert_eq!(guard.on_command(at(2), &mut link.agent, command(1)).expect("ledger"), None, "running: ack only");
    guard.on_finished(at(3), Some(&mut link.agent), result(&cid("cmd-1"), ResultStatus::Succeeded)).expect("ok");
    assert_eq!(guard.on_command(at(4), &mut link.agent, command(1)).expect("ledger"), None, "finished: from ledger");
    link.pump(at(4));
    let results = link.host_events.iter().filter(|e| matches!(e, HostEvent::Result(_))).count();
    assert_eq!(results, 2, "the redelivery got the stored result again");
}

#[test]
fn a_command_interrupted_by_a_crash_is_reported_interrupted_and_never_rerun() {
    let mut host = host();
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 2), at(0), 1).expect("admitted");
    let mut guard = ExecutionGuard::recover(MemoryLedger::new(64), at(0), 2).expect("recovers");
    assert!(guard.on_command(at(1), &mut link.agent, command(1)).expect("ledger").is_some());
    // The agent crashes; only the ledger survives.
    let ledger = guard.ledger().clone();
    let mut guard = ExecutionGuard::recover(ledger, at(10), 2).expect("recovers");
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 2), at(5_000), 2).expect("admitted");
    assert_eq!(guard.on_established(at(5_000), &mut link.agent).expect("outbox"), 1);
    assert_eq!(guard.on_command(at(5_001), &mut link.agent, command(1)).expect("ledger"), None, "never run twice");
    link.pump(at(5_001));
    let statuses: Vec<ResultStatus> = link
        .host_events
        .iter()
        .filter_map(|e| if let HostEvent::Result(r) = e { Some(r.status) } else { None })
        .collect();
    assert_eq!(statuses, vec![ResultStatus::Interrupted, ResultStatus::Interrupted]);
}

#[test]
fn the_guard_refuses_beyond_its_concurrency_with_a_lasting_answer() {
    let mut host = host();
    let mut link = Link::connect(&mut host, &agent_config("gw-1", 1), at(0), 1).expect("admitted");
    let mut guard = ExecutionGuard::recover(MemoryLedger::new(64), at(0), 1).expect("recovers");
    assert!(guard.on_command(at(1), &mut link.agent, command(1)).expect("ledger").is_some());
    assert!(guard.on_command(at(1), &mut link.agent, command(2)).expect("ledger").is_none());
    assert!(matches!(
        guard.ledger().clone().outbox(8).expect("outbox").as_slice(),
        [r] if r.status == ResultStatus::Rejected
    ));
}

fn new_command(n: u32, agent: &str) -> NewCommand {
    NewCommand {
        command_id: cid(&format!("cmd-{n}")),
        agent_id: id(agent),
        verb: Verb::new("get_system_health").expect("verb"),
        args: serde_json::json!({}),
        timeout: Duration::from_secs(5),
    }
}

fn dispatch_config() -> DispatchConfig {
    DispatchConfig {
        retry: RetryPolicy { base: Duration::from_millis(100), cap: Duration::from_secs(1), max_attempts: 3 },
        max_commands: 8,
        per_agent_queue: 4,
        queue_ttl: Duration::from_secs(60),
        result_grace: Duration::from_secs(10),
    }
}

fn terminal_of(events: &mut Dispatcher, id: &CommandId) -> Option<Terminal> {
    let mut found = None;
    while let Some(event) = events.poll_event() {
        if let DispatchEvent::Changed(record) = event
            && &record.command.command_id == id
            && let CommandState::Done(terminal) = record.state
        {
            found = Some(terminal);
        }
    }
    found
}

#[test]
fn the_dispatcher_bounds_its_queues() {
    let mut dispatcher = Dispatcher::new(dispatch_config(), Entropy::from_u64(1));
    for n in 0..4 {
        dispatcher.submit(at(0), new_command(n, "a")).expect("room");
    }
    assert!(matches!(dispatcher.submit(at(0), new_command(4, "a")), Err(DispatchError::AgentQueueFull(_))));
    assert!(matches!(dispatcher.submit(at(0), new_command(0, "b")), Err(DispatchError::Duplicate(_))));
    for n in 10..14 {
        dispatcher.submit(at(0), new_command(n, "b")).expect("room");
    }
    assert!(matches!(dispatcher.submit(at(0), new_command(20, "c")), Err(DispatchError::Full(8))));
}

#[test]
fn unacknowledged_commands_are_retried_then_dead_lettered_and_acked_ones_are_not_resent() {
    let mut dispatcher = Dispatcher::new(dispatch_config(), Entropy::from_u64(1));
    dispatcher.submit(at(0), new_command(1, "a")).expect("room");
    dispatcher.submit(at(0), new_command(2, "a")).expect("room");
    let mut now = at(0);
    for attempt in 1..=3u32 {
        let sent = dispatcher.next_for(now, &id("a"), u64::from(attempt), 8);
        let ids: Vec<&CommandId> = sent.iter().map(|c| &c.command_id).collect();
        if attempt == 1 {
            assert_eq!(ids, vec![&cid("cmd-1"), &cid("cmd-2")]);
            dispatcher.on_acked(now, &cid("cmd-2"));
        } else {
            assert_eq!(ids, vec![&cid("cmd-1")], "only the never-acknowledged command is sent again");
        }
        assert_eq!(sent[0].attempt, attempt);
        let in_flight: Vec<_> = sent
            .iter()
            .map(|c| (c.command_id.clone(), viworks_core::flow::Delivery { sent_at: now, acked: false }))
            .collect();
        dispatcher.on_session_closed(now, u64::from(attempt), &in_flight);
        now = now.saturating_add(Duration::from_secs(2));
        dispatcher.handle_timeout(now);
    }
    assert_eq!(
        terminal_of(&mut dispatcher, &cid("cmd-1")),
        Some(Terminal::DeadLettered(viworks_core::session::DeadLetter::AttemptsExhausted(3)))
    );
    assert_eq!(dispatcher.awaiting_results(&id("a")), vec![cid("cmd-2")]);
    assert!(dispatcher.on_result(now, &result(&cid("cmd-2"), ResultStatus::Succeeded)));
    assert!(
        !dispatcher.on_result(now, &result(&cid("cmd-2"), ResultStatus::Succeeded)),
        "a second result changes nothing"
    );
    assert!(dispatcher.is_empty());
}

#[test]
fn queued_commands_expire_acked_ones_wait_for_their_deadline_and_only_queued_ones_cancel() {
    let mut dispatcher = Dispatcher::new(dispatch_config(), Entropy::from_u64(1));
    dispatcher.submit(at(0), new_command(1, "offline")).expect("room");
    dispatcher.submit(at(0), new_command(2, "a")).expect("room");
    dispatcher.submit(at(0), new_command(3, "a")).expect("room");
    let sent = dispatcher.next_for(at(0), &id("a"), 1, 1);
    assert_eq!(sent[0].command_id, cid("cmd-2"));
    assert!(matches!(dispatcher.cancel(at(1), &cid("cmd-2")), Err(DispatchError::NotCancellable(_))));
    dispatcher.cancel(at(1), &cid("cmd-3")).expect("queued: cancellable");
    assert_eq!(terminal_of(&mut dispatcher, &cid("cmd-3")), Some(Terminal::Cancelled));
    dispatcher.on_acked(at(1), &cid("cmd-2"));
    dispatcher.handle_timeout(at(15_001));
    assert_eq!(
        terminal_of(&mut dispatcher, &cid("cmd-2")),
        Some(Terminal::DeadLettered(viworks_core::session::DeadLetter::NoResult))
    );
    dispatcher.handle_timeout(at(60_000));
    assert_eq!(
        terminal_of(&mut dispatcher, &cid("cmd-1")),
        Some(Terminal::DeadLettered(viworks_core::session::DeadLetter::QueueExpired))
    );
}

#[test]
fn a_recovered_dispatcher_retries_what_was_sent_and_keeps_waiting_for_what_was_acked() {
    let mut dispatcher = Dispatcher::new(dispatch_config(), Entropy::from_u64(1));
    let mut store = std::collections::BTreeMap::new();
    for n in 1..=3 {
        dispatcher.submit(at(0), new_command(n, "a")).expect("room");
    }
    let _ = dispatcher.next_for(at(0), &id("a"), 1, 2);
    dispatcher.on_acked(at(0), &cid("cmd-1"));
    while let Some(event) = dispatcher.poll_event() {
        if let DispatchEvent::Changed(record) = event {
            store.insert(record.command.command_id.clone(), record);
        }
    }
    let mut recovered = Dispatcher::recover(dispatch_config(), Entropy::from_u64(2), at(10), store.into_values());
    assert_eq!(recovered.len(), 3);
    assert_eq!(recovered.awaiting_results(&id("a")), vec![cid("cmd-1")]);
    recovered.handle_timeout(at(2_000));
    let resent: Vec<CommandId> =
        recovered.next_for(at(2_000), &id("a"), 7, 8).into_iter().map(|c| c.command_id).collect();
    assert_eq!(resent, vec![cid("cmd-2"), cid("cmd-3")]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_sequence_of_messages_and_timeouts_panics_either_session(
        inputs in proptest::collection::vec((0u8..6, any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64), 0u32..40), 0..80),
    ) {
        let mut host = host();
        let config = agent_config("gw-1", 2);
        let mut link = Link::connect(&mut host, &config, at(0), 1).expect("admitted");
        let mut now = at(0);
        let keys = [MacKey::from_bytes([0; 32]), MacKey::anonymous_reject()];
        for (op, number, bytes, kind) in inputs {
            now = now.saturating_add(Duration::from_millis(number % 2_000));
            match op {
                0 => link.host.handle_message(now, &bytes),
                1 => link.agent.handle_message(now, &bytes),
                2 => link.tick(now),
                3 => { let _ = link.host.send_command(now, command(kind)); link.pump(now); }
                4 => {
                    // A well-formed message under a wrong key, with a plausible sequence number.
                    let message = if kind % 2 == 0 { Message::Heartbeat(Heartbeat {}) } else {
                        Message::Result(result(&command(kind).command_id, ResultStatus::Failed))
                    };
                    let sealed = auth::seal(&keys[(number % 2) as usize], &Envelope { seq: number % 4, ts: now, message }).expect("seals");
                    link.host.handle_message(now, &sealed);
                    link.agent.handle_message(now, &sealed);
                }
                _ => { let _ = link.agent.send_result(now, result(&command(kind).command_id, ResultStatus::Succeeded)); link.pump(now); }
            }
            while link.host.poll_event().is_some() {}
            while link.agent.poll_event().is_some() {}
            prop_assert!(link.host.in_flight() <= 2 || link.host.is_closed(), "credits hold");
            let _ = (link.host.poll_timeout(), link.agent.poll_timeout(), Limits::default());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_dispatcher_stays_in_bounds_and_finishes_each_command_at_most_once(
        ops in proptest::collection::vec((0u8..7, 0u32..12, 0u64..3_000), 0..300),
    ) {
        let config = dispatch_config();
        let mut dispatcher = Dispatcher::new(config, Entropy::from_u64(3));
        let mut now = at(0);
        let mut session = 0u64;
        let mut in_flight: Vec<(CommandId, viworks_core::flow::Delivery)> = Vec::new();
        let mut finished = std::collections::BTreeMap::<CommandId, u32>::new();
        for (op, n, advance) in ops {
            now = now.saturating_add(Duration::from_millis(advance));
            let agent = if n % 2 == 0 { "a" } else { "b" };
            match op {
                0 => {
                    if !finished.contains_key(&cid(&format!("cmd-{n}"))) {
                        let _ = dispatcher.submit(now, new_command(n, agent));
                    }
                }
                1 => {
                    for c in dispatcher.next_for(now, &id(agent), session, (n % 3) as usize) {
                        in_flight.push((c.command_id, viworks_core::flow::Delivery { sent_at: now, acked: false }));
                    }
                }
                2 => dispatcher.on_acked(now, &cid(&format!("cmd-{n}"))),
                3 => { dispatcher.on_result(now, &result(&cid(&format!("cmd-{n}")), ResultStatus::Succeeded)); }
                4 => {
                    dispatcher.on_session_closed(now, session, &in_flight);
                    in_flight.clear();
                    session += 1;
                }
                5 => { let _ = dispatcher.cancel(now, &cid(&format!("cmd-{n}"))); }
                _ => dispatcher.handle_timeout(now),
            }
            while let Some(event) = dispatcher.poll_event() {
                if let DispatchEvent::Changed(record) = event
                    && matches!(record.state, CommandState::Done(_))
                {
                    *finished.entry(record.command.command_id).or_default() += 1;
                }
            }
            prop_assert!(dispatcher.len() <= config.max_commands);
            for agent in [id("a"), id("b")] {
                prop_assert!(dispatcher.queued(&agent) <= dispatcher.unfinished_for(&agent));
                prop_assert!(dispatcher.unfinished_for(&agent) <= config.per_agent_queue);
            }
            for (command, times) in &finished {
                prop_assert_eq!(*times, 1, "{} reached {} terminal states", command, times);
                prop_assert!(dispatcher.record(command).is_none(), "{} finished but is still held", command);
            }
            if let Some(next) = dispatcher.poll_timeout() {
                prop_assert!(next >= at(0));
            }
        }
    }
}

#[test]
fn an_admission_turned_into_a_refusal_sends_an_authenticated_reject_and_frees_the_agent_id() {
    let mut host = host();
    let config = agent_config("gw-1", 2);
    let mut agent = AgentSession::new(&config, at(0), &mut Entropy::from_u64(5), &ChannelBinding::NONE).expect("hello");
    let hello = agent.poll_transmit().expect("hello");
    let session = host.accept(at(1), &hello, None, &ChannelBinding::NONE).expect("admitted");
    assert_eq!(host.live_sessions(), 1);
    let refusal = session.refuse(at(2), RejectCode::DuplicateAgent, Some(Duration::from_secs(7)));
    assert_eq!(host.live_sessions(), 0, "the refused session no longer holds the agent id");
    agent.handle_message(at(3), &refusal.reply);
    match agent.poll_event() {
        Some(AgentEvent::Rejected { code, authenticated, retry_after, .. }) => {
            assert_eq!(code, RejectCode::DuplicateAgent);
            assert!(authenticated);
            assert_eq!(retry_after, Some(Duration::from_secs(7)));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(Link::connect(&mut host, &config, at(4), 9).is_ok(), "the agent is admitted again at once");
}

#[test]
fn released_commands_are_adopted_elsewhere_retrying_the_sent_and_awaiting_the_acked() {
    let mut first = Dispatcher::new(dispatch_config(), Entropy::from_u64(1));
    for n in 1..=3 {
        first.submit(at(0), new_command(n, "a")).expect("room");
    }
    first.submit(at(0), new_command(9, "b")).expect("room");
    let _ = first.next_for(at(0), &id("a"), 1, 2);
    first.on_acked(at(0), &cid("cmd-1"));
    let released = first.release_agent(&id("a"));
    let states: Vec<&str> = released
        .iter()
        .map(|r| match r.state {
            CommandState::Queued { .. } => "queued",
            CommandState::Sent { .. } => "sent",
            CommandState::Acked { .. } => "acked",
            CommandState::Done(_) => "done",
        })
        .collect();
    assert_eq!(states, ["acked", "sent", "queued"], "in submission order, as the session left them");
    assert_eq!((first.len(), first.unfinished_for(&id("a")), first.queued(&id("a"))), (1, 0, 0));
    assert!(first.next_for(at(5), &id("a"), 1, 8).is_empty(), "nothing of the released agent remains");
    first.handle_timeout(at(100_000));

    let mut second = Dispatcher::new(dispatch_config(), Entropy::from_u64(2));
    second.adopt(at(10), released.clone());
    second.adopt(at(10), released);
    assert_eq!(second.len(), 3, "adopting twice holds each command once");
    assert_eq!(second.awaiting_results(&id("a")), vec![cid("cmd-1")]);
    second.handle_timeout(at(2_000));
    let sent: Vec<CommandId> = second.next_for(at(2_000), &id("a"), 4, 8).into_iter().map(|c| c.command_id).collect();
    assert_eq!(sent, vec![cid("cmd-2"), cid("cmd-3")], "the sent one is retried, the queued one sent");
}
