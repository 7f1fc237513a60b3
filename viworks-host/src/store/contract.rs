//! Store contract tests: what every [`Store`] implementation must do, written once.
//!
//! Each case is a `pub(crate) async fn case<S: Store>(store: &S)` taking a fresh, empty store.
//! [`store_contract_tests!`] expands to one `#[tokio::test]` per case for a store factory, an
//! async function returning `Some((store, guard))`, where the guard keeps the database alive, or
//! `None` (after printing why) when this machine cannot run that store:
//!
//! ```ignore
//! mod contract_sqlite {
//!     crate::store::contract::store_contract_tests!(super::fresh);
//! }
//! ```
//! A new case is added to the list inside the macro, so every store runs it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;
use viworks_core::Timestamp;
use viworks_core::idempotency::{DEFAULT_TTL, IdempotencyKey, JobId, Recorded, RequestDigest, ResultDigest};
use viworks_core::session::{CommandRecord, CommandState, DeadLetter, NewCommand, Terminal};
use viworks_core::wire::{
    AgentId, Capability, CommandId, CommandResult, Hello, MetricKey, Nonce, ResultError, ResultStatus, Text, Verb,
};

use super::{
    AgentFilter, AgentRecord, AuditFilter, CancelOutcome, ChainVerdict, ClaimScope, CommandFilter, InstanceRecord,
    JobInsert, JobRecord, NewAudit, PresenceClaim, QueueBounds, Role, Store, StoreError, StoredCommand, TelemetryQuery,
    TelemetryRow, TokenRecord,
};
use crate::audit::chain::{self, Prepared};

/// Expands to one `#[tokio::test]` per contract case, each on a store from `$fresh().await`,
/// which returns `Some((store, guard))`, or `None` to skip on a machine without that store.
macro_rules! store_contract_tests {
    ($fresh:path) => {
        $crate::store::contract::store_contract_tests!(@cases $fresh;
            ping_answers,
            enrolling_an_id_twice_fails_with_exists,
            agents_filter_by_site_capability_and_connection_and_hide_revoked,
            agents_paginate_in_id_order_with_capped_limits,
            a_session_start_records_the_hello_and_its_end_the_disconnect,
            revoke_and_maintenance_toggle_and_report_unknown_agents,
            agents_named_are_read_together_and_unknown_ids_left_out,
            a_job_and_its_commands_are_stored_together,
            the_same_key_and_request_returns_the_existing_job_and_stores_nothing,
            the_same_key_with_another_request_conflicts_and_stores_nothing,
            jobs_without_a_key_are_always_new,
            an_expired_key_starts_a_new_job,
            a_failing_job_stores_none_of_its_commands,
            every_command_state_round_trips,
            unfinished_commands_exclude_terminal_ones_in_submission_order,
            a_terminal_state_is_final,
            saving_an_unknown_command_fails_and_stores_nothing,
            dead_letters_are_written_from_saved_commands,
            commands_filter_and_paginate_newest_first,
            a_result_is_stored_once_and_a_different_one_conflicts,
            telemetry_upserts_by_agent_time_and_metric,
            telemetry_queries_filter_by_metric_and_time_newest_first,
            the_audit_chain_links_every_append_and_verifies,
            audit_filters_and_paginates_newest_first,
            tokens_are_found_by_hash_and_unique,
            stats_count_unfinished_commands_by_state_dead_letters_and_latest_telemetry,
            many_concurrent_writes_are_all_durable,
            the_highest_order_covers_finished_commands_too,
            jobs_beyond_the_queue_bounds_are_refused_whole_and_orders_follow_the_store,
            wide_and_narrow_jobs_are_held_to_each_target_queue,
            commands_are_claimed_only_for_agents_present_here_and_released_with_their_state,
            a_claimant_holds_the_new_commands_of_agents_present_there_from_the_start,
            presence_is_taken_over_by_a_newer_session_of_the_same_instance_only,
            timers_of_unowned_commands_run_from_their_rows,
            cancelling_an_unowned_command_and_what_cannot_be_cancelled,
            a_deregistered_instance_lets_go_of_everything,
        );
    };
    (@cases $fresh:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                // `None`: this machine cannot run the store (the constructor said why).
                let Some((store, _guard)) = $fresh().await else { return };
                $crate::store::contract::$case(&store).await;
            }
        )*
    };
}
pub(crate) use store_contract_tests;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A time well after the epoch, so that offsets either side stay positive.
pub(crate) const T0: u64 = 1_700_000_000_000;

fn at(offset: u64) -> Timestamp {
    Timestamp::from_millis(T0 + offset)
}

pub(crate) fn agent_id(id: &str) -> AgentId {
    AgentId::new(id).expect("valid agent id")
}

pub(crate) fn command_id(id: &str) -> CommandId {
    CommandId::new(id).expect("valid command id")
}

fn job_id(id: &str) -> JobId {
    JobId::new(id).expect("valid job id")
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::new(k).expect("valid key")
}

fn digest(n: u64) -> RequestDigest {
    RequestDigest::of_json(&json!({ "body": n }))
}

fn metric(m: &str) -> MetricKey {
    MetricKey::new(m).expect("valid metric key")
}

/// An enrolled, never connected agent advertising `docker`.
pub(crate) fn agent_record(id: &str, site: &str) -> AgentRecord {
    AgentRecord {
        agent_id: agent_id(id),
        site: site.into(),
        hostname: String::new(),
        version: String::new(),
        capabilities: vec!["docker".into()],
        max_concurrency: 0,
        revoked: false,
        maintenance: false,
        enrolled_at: at(0),
        last_seen: None,
        connected: false,
    }
}

fn hello(id: &str, capabilities: &[&str]) -> Hello {
    Hello {
        agent_id: agent_id(id),
        site: Text::new("claimed-site").expect("text"),
        hostname: Text::new(format!("{id}.example")).expect("text"),
        version: Text::new("1.2.3").expect("text"),
        capabilities: capabilities.iter().map(|c| Capability::new(*c).expect("capability")).collect(),
        max_concurrency: 8,
        nonce: Nonce([7; 32]),
    }
}

/// A queued command as the dispatcher submits it.
pub(crate) fn queued(id: &str, agent: &str, order: u64) -> CommandRecord {
    CommandRecord {
        command: NewCommand {
            command_id: command_id(id),
            agent_id: agent_id(agent),
            verb: Verb::new("docker.ps").expect("verb"),
            args: json!({ "all": true, "filters": { "label": ["a", "b"] }, "ratio": 0.25, "n": -3 }),
            timeout: Duration::from_millis(30_500),
        },
        state: CommandState::Queued { not_before: at(0) },
        attempts: 0,
        submitted_at: at(0),
        order,
    }
}

/// A job of `docker.ps` commands `(command id, agent id)`, ordered from `first_order`.
pub(crate) fn job_of(
    id: &str,
    idempotency: Option<(IdempotencyKey, RequestDigest)>,
    commands: &[(&str, &str)],
    first_order: u64,
) -> (JobRecord, Vec<CommandRecord>) {
    let job = JobRecord {
        job_id: job_id(id),
        req_id: format!("req-{id}"),
        actor: "operator-1".into(),
        verb: Verb::new("docker.ps").expect("verb"),
        args: json!({ "all": true }),
        created_at: at(0),
        idempotency,
    };
    let records = commands.iter().zip(first_order..).map(|((c, a), order)| queued(c, a, order)).collect();
    (job, records)
}

fn with_state(record: &CommandRecord, state: CommandState, attempts: u32) -> CommandRecord {
    CommandRecord { state, attempts, ..record.clone() }
}

fn done(record: &CommandRecord, terminal: Terminal) -> CommandRecord {
    with_state(record, CommandState::Done(terminal), 1)
}

/// A successful result for `cmd-{n}`.
pub(crate) fn result_for(n: u32) -> CommandResult {
    CommandResult {
        command_id: command_id(&format!("cmd-{n}")),
        status: ResultStatus::Succeeded,
        exit_code: Some(0),
        output: json!({ "containers": [{ "id": n, "name": format!("c{n}") }], "load": 0.5 }),
        error: None,
        duration_ms: 12,
    }
}

fn sample(agent: &str, ts: u64, m: &str, value: f64) -> TelemetryRow {
    TelemetryRow { agent_id: agent_id(agent), ts: at(ts), metric_key: metric(m), value }
}

fn audit_entry(n: u64, actor: &str, action: &str) -> NewAudit {
    NewAudit {
        ts: at(n),
        req_id: format!("req-{n}"),
        actor: actor.into(),
        action: action.into(),
        args_hash: chain::args_hash(&json!({ "n": n })),
        targets: vec![format!("gw-{n}"), format!("cmd-{n}")],
        rc: "202".into(),
        duration_ms: n,
        detail: json!({ "n": n, "nested": { "b": [1, 2.5, null], "a": "é\n" } }),
    }
}

fn ids(commands: &[StoredCommand]) -> Vec<&str> {
    commands.iter().map(|c| c.record.command.command_id.as_str()).collect()
}

fn agent_ids(agents: &[AgentRecord]) -> Vec<&str> {
    agents.iter().map(|a| a.agent_id.as_str()).collect()
}

async fn enroll<S: Store>(store: &S, agents: &[AgentRecord]) {
    for agent in agents {
        store.enroll_agent(agent).await.expect("enroll");
    }
}

/// What creating a job without a claimant returns.
fn created() -> JobInsert {
    JobInsert::Created { claimed: Vec::new() }
}

async fn create<S: Store>(store: &S, job: &JobRecord, commands: &[CommandRecord]) {
    assert_eq!(store.create_job(job, commands, QueueBounds::UNBOUNDED, None).await.expect("create job"), created());
}

// ---------------------------------------------------------------------------------------------
// Agents

pub(crate) async fn ping_answers<S: Store>(store: &S) {
    store.ping().await.expect("a fresh store answers");
}

pub(crate) async fn enrolling_an_id_twice_fails_with_exists<S: Store>(store: &S) {
    let agent = agent_record("gw-1", "fra");
    store.enroll_agent(&agent).await.expect("enroll");
    assert!(matches!(store.enroll_agent(&agent_record("gw-1", "nyc")).await, Err(StoreError::Exists(_))));
    assert_eq!(store.agent(&agent.agent_id).await.expect("read"), Some(agent.clone()), "the first is kept");

    assert!(store.set_revoked(&agent.agent_id, true).await.expect("revoke"));
    assert!(matches!(store.enroll_agent(&agent).await, Err(StoreError::Exists(_))), "a revoked id is still taken");
    assert_eq!(store.agent(&agent_id("gw-2")).await.expect("read"), None);
}

pub(crate) async fn agents_filter_by_site_capability_and_connection_and_hide_revoked<S: Store>(store: &S) {
    let mut a = agent_record("a", "fra");
    a.capabilities = vec!["docker".into(), "scripts".into()];
    let b = agent_record("b", "fra");
    let mut c = agent_record("c", "nyc");
    c.capabilities = vec!["scripts".into()];
    let d = agent_record("d", "fra");
    enroll(store, &[c.clone(), a.clone(), d.clone(), b.clone()]).await;
    assert!(store.set_revoked(&d.agent_id, true).await.expect("revoke"));
    assert!(store.agent_connected(&hello("a", &["docker", "scripts"]), at(10)).await.expect("connect"));

    let list = |filter: AgentFilter| async move { store.agents(&filter).await.expect("list") };
    assert_eq!(agent_ids(&list(AgentFilter::default()).await), ["a", "b", "c"], "revoked are hidden");
    assert_eq!(
        agent_ids(&list(AgentFilter { include_revoked: true, ..Default::default() }).await),
        ["a", "b", "c", "d"]
    );
    assert_eq!(agent_ids(&list(AgentFilter { site: Some("fra".into()), ..Default::default() }).await), ["a", "b"]);
    assert_eq!(
        agent_ids(&list(AgentFilter { capability: Some("scripts".into()), ..Default::default() }).await),
        ["a", "c"]
    );
    assert_eq!(agent_ids(&list(AgentFilter { connected: Some(true), ..Default::default() }).await), ["a"]);
    assert_eq!(agent_ids(&list(AgentFilter { connected: Some(false), ..Default::default() }).await), ["b", "c"]);
    let narrow = AgentFilter {
        site: Some("fra".into()),
        capability: Some("docker".into()),
        connected: Some(false),
        include_revoked: true,
        ..Default::default()
    };
    assert_eq!(agent_ids(&list(narrow).await), ["b", "d"]);
    let none = AgentFilter { capability: Some("dock".into()), ..Default::default() };
    assert!(list(none).await.is_empty(), "capabilities match whole names only");
}

pub(crate) async fn agents_paginate_in_id_order_with_capped_limits<S: Store>(store: &S) {
    let agents: Vec<AgentRecord> = (0..1005).map(|n| agent_record(&format!("gw-{n:04}"), "fra")).collect();
    for outcome in join_all(agents.iter().map(|a| store.enroll_agent(a))).await {
        outcome.expect("enroll");
    }
    let page = |after: Option<&str>, limit: usize| {
        let filter = AgentFilter { after: after.map(agent_id), limit, ..Default::default() };
        async move { store.agents(&filter).await.expect("list") }
    };
    assert_eq!(page(None, 0).await.len(), 100, "limit 0 means 100");
    assert_eq!(page(None, 5000).await.len(), 1000, "limits are capped at 1000");

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let got = page(after.as_deref(), 400).await;
        if got.is_empty() {
            break;
        }
        after = got.last().map(|a| a.agent_id.as_str().to_owned());
        seen.extend(got.into_iter().map(|a| a.agent_id));
    }
    assert_eq!(seen, agents.iter().map(|a| a.agent_id.clone()).collect::<Vec<_>>(), "every agent once, in id order");
}

pub(crate) async fn a_session_start_records_the_hello_and_its_end_the_disconnect<S: Store>(store: &S) {
    enroll(store, &[agent_record("gw-1", "fra")]).await;
    assert!(store.agent_connected(&hello("gw-1", &["docker", "get_system_health"]), at(5)).await.expect("connect"));
    let agent = store.agent(&agent_id("gw-1")).await.expect("read").expect("enrolled");
    assert_eq!(agent.hostname, "gw-1.example");
    assert_eq!(agent.version, "1.2.3");
    assert_eq!(agent.capabilities, ["docker", "get_system_health"]);
    assert_eq!(agent.max_concurrency, 8);
    assert!(agent.connected);
    assert_eq!(agent.last_seen, Some(at(5)));
    assert_eq!(agent.site, "fra", "the site is the enrolled one, not what the agent claims");
    assert_eq!(agent.enrolled_at, at(0));

    store.agent_disconnected(&agent_id("gw-1"), at(9)).await.expect("disconnect");
    let agent = store.agent(&agent_id("gw-1")).await.expect("read").expect("enrolled");
    assert!(!agent.connected);
    assert_eq!(agent.last_seen, Some(at(9)));
    assert_eq!(agent.hostname, "gw-1.example", "the HELLO's details stay");

    assert!(!store.agent_connected(&hello("stranger", &[]), at(5)).await.expect("connect"), "not enrolled");
    assert_eq!(store.agent(&agent_id("stranger")).await.expect("read"), None, "and not created");
    store.agent_disconnected(&agent_id("stranger"), at(9)).await.expect("a stranger's end is a no-op");
}

pub(crate) async fn revoke_and_maintenance_toggle_and_report_unknown_agents<S: Store>(store: &S) {
    enroll(store, &[agent_record("gw-1", "fra")]).await;
    let id = agent_id("gw-1");
    assert!(store.set_maintenance(&id, true).await.expect("maintenance"));
    assert!(store.set_revoked(&id, true).await.expect("revoke"));
    let agent = store.agent(&id).await.expect("read").expect("enrolled");
    assert!(agent.maintenance && agent.revoked);
    assert!(store.set_maintenance(&id, false).await.expect("maintenance"));
    assert!(store.set_revoked(&id, false).await.expect("reinstate"));
    let agent = store.agent(&id).await.expect("read").expect("enrolled");
    assert!(!agent.maintenance && !agent.revoked);

    let unknown = agent_id("gw-9");
    assert!(!store.set_revoked(&unknown, true).await.expect("revoke"));
    assert!(!store.set_maintenance(&unknown, true).await.expect("maintenance"));
}

pub(crate) async fn agents_named_are_read_together_and_unknown_ids_left_out<S: Store>(store: &S) {
    enroll(store, &[agent_record("gw-1", "fra"), agent_record("gw-2", "ams"), agent_record("gw-3", "fra")]).await;
    assert!(store.set_revoked(&agent_id("gw-3"), true).await.expect("revoke"));
    let ids = [agent_id("gw-3"), agent_id("gw-9"), agent_id("gw-1")];
    let mut found = store.agents_named(&ids).await.expect("read");
    found.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    assert_eq!(agent_ids(&found), vec!["gw-1", "gw-3"], "the unknown gw-9 is left out, the revoked gw-3 is not");
    assert!(found[1].revoked);
    assert_eq!(found[0], store.agent(&agent_id("gw-1")).await.expect("read").expect("enrolled"));
    assert!(store.agents_named(&[]).await.expect("read").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Jobs and idempotency

pub(crate) async fn a_job_and_its_commands_are_stored_together<S: Store>(store: &S) {
    let (job, commands) = job_of("job-1", Some((key("k-1"), digest(1))), &[("cmd-1", "gw-1"), ("cmd-2", "gw-2")], 0);
    create(store, &job, &commands).await;
    let (stored_job, stored) = store.job(&job.job_id).await.expect("read").expect("stored");
    assert_eq!(stored_job, job);
    assert_eq!(stored.iter().map(|c| c.record.clone()).collect::<Vec<_>>(), commands, "in submission order");
    for command in &stored {
        assert_eq!(command.job_id, job.job_id);
        assert_eq!(command.result, None);
    }
    let one = store.command(&command_id("cmd-2")).await.expect("read").expect("stored");
    assert_eq!(one.record, commands[1]);
    assert_eq!(one.job_id, job.job_id);
    assert_eq!(store.job(&job_id("job-9")).await.expect("read"), None);
    assert_eq!(store.command(&command_id("cmd-9")).await.expect("read"), None);
}

pub(crate) async fn the_same_key_and_request_returns_the_existing_job_and_stores_nothing<S: Store>(store: &S) {
    let (first, commands) = job_of("job-1", Some((key("k-1"), digest(1))), &[("cmd-1", "gw-1")], 0);
    create(store, &first, &commands).await;
    // The client's retry: the API made a new job id and command ids for it.
    let (mut retry, retry_commands) = job_of("job-2", Some((key("k-1"), digest(1))), &[("cmd-2", "gw-1")], 1);
    retry.created_at = at(60_000);
    assert_eq!(
        store.create_job(&retry, &retry_commands, QueueBounds::UNBOUNDED, None).await.expect("resolve"),
        JobInsert::Existing(first.job_id)
    );
    assert_eq!(store.job(&retry.job_id).await.expect("read"), None);
    assert_eq!(store.command(&command_id("cmd-2")).await.expect("read"), None);
    assert_eq!(store.unfinished_commands().await.expect("read"), commands, "nothing stored twice");
}

pub(crate) async fn the_same_key_with_another_request_conflicts_and_stores_nothing<S: Store>(store: &S) {
    let (first, commands) = job_of("job-1", Some((key("k-1"), digest(1))), &[("cmd-1", "gw-1")], 0);
    create(store, &first, &commands).await;
    let (other, other_commands) = job_of("job-2", Some((key("k-1"), digest(2))), &[("cmd-2", "gw-1")], 1);
    match store.create_job(&other, &other_commands, QueueBounds::UNBOUNDED, None).await {
        Err(StoreError::IdempotencyConflict(k)) => assert_eq!(k, key("k-1")),
        got => panic!("expected a conflict, got {got:?}"),
    }
    assert_eq!(store.job(&other.job_id).await.expect("read"), None);
    assert_eq!(store.unfinished_commands().await.expect("read"), commands);
}

pub(crate) async fn jobs_without_a_key_are_always_new<S: Store>(store: &S) {
    let (a, a_commands) = job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
    let (b, b_commands) = job_of("job-2", None, &[("cmd-2", "gw-1")], 1);
    create(store, &a, &a_commands).await;
    create(store, &b, &b_commands).await;
    assert!(store.job(&b.job_id).await.expect("read").is_some());
    assert_eq!(store.unfinished_commands().await.expect("read").len(), 2);
    let (again, again_commands) = job_of("job-1", None, &[("cmd-3", "gw-1")], 2);
    assert!(
        matches!(
            store.create_job(&again, &again_commands, QueueBounds::UNBOUNDED, None).await,
            Err(StoreError::Exists(_))
        ),
        "a job id is unique"
    );
}

pub(crate) async fn an_expired_key_starts_a_new_job<S: Store>(store: &S) {
    let (first, commands) = job_of("job-1", Some((key("k-1"), digest(1))), &[("cmd-1", "gw-1")], 0);
    create(store, &first, &commands).await;
    let (mut later, later_commands) = job_of("job-2", Some((key("k-1"), digest(2))), &[("cmd-2", "gw-1")], 1);
    later.created_at = first.created_at.saturating_add(DEFAULT_TTL);
    create(store, &later, &later_commands).await;
    let mut retry = later.clone();
    retry.job_id = job_id("job-3");
    retry.created_at = later.created_at.saturating_add(Duration::from_secs(1));
    assert_eq!(
        store.create_job(&retry, &[], QueueBounds::UNBOUNDED, None).await.expect("resolve"),
        JobInsert::Existing(later.job_id.clone())
    );
    assert!(store.job(&first.job_id).await.expect("read").is_some(), "the old job stays");
}

pub(crate) async fn a_failing_job_stores_none_of_its_commands<S: Store>(store: &S) {
    let (first, commands) = job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
    create(store, &first, &commands).await;
    let (second, second_commands) =
        job_of("job-2", Some((key("k-2"), digest(2))), &[("cmd-2", "gw-1"), ("cmd-1", "gw-2")], 1);
    assert!(matches!(
        store.create_job(&second, &second_commands, QueueBounds::UNBOUNDED, None).await,
        Err(StoreError::Exists(_))
    ));
    assert_eq!(store.job(&second.job_id).await.expect("read"), None);
    assert_eq!(store.command(&command_id("cmd-2")).await.expect("read"), None);
    assert_eq!(store.unfinished_commands().await.expect("read"), commands);
    let (retry, retry_commands) = job_of("job-2", Some((key("k-2"), digest(2))), &[("cmd-2", "gw-1")], 1);
    create(store, &retry, &retry_commands).await;
}

// ---------------------------------------------------------------------------------------------
// Command lifecycle

pub(crate) async fn every_command_state_round_trips<S: Store>(store: &S) {
    let states = [
        CommandState::Queued { not_before: at(5) },
        CommandState::Sent { session: 7 },
        CommandState::Sent { session: u64::MAX },
        CommandState::Acked { deadline: at(90_000) },
        CommandState::Acked { deadline: Timestamp::from_millis(u64::MAX) },
        CommandState::Done(Terminal::Succeeded),
        CommandState::Done(Terminal::Failed),
        CommandState::Done(Terminal::TimedOut),
        CommandState::Done(Terminal::Interrupted),
        CommandState::Done(Terminal::Rejected),
        CommandState::Done(Terminal::Cancelled),
        CommandState::Done(Terminal::DeadLettered(DeadLetter::AttemptsExhausted(5))),
        CommandState::Done(Terminal::DeadLettered(DeadLetter::QueueExpired)),
        CommandState::Done(Terminal::DeadLettered(DeadLetter::NoResult)),
    ];
    let names: Vec<String> = (0..states.len()).map(|n| format!("cmd-{n}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "gw-1")).collect();
    // The store numbers commands from 0 in a fresh store; the records say the same.
    let (job, commands) = job_of("job-1", None, &pairs, 0);
    create(store, &job, &commands).await;
    let saved: Vec<CommandRecord> = commands
        .iter()
        .zip(states)
        .enumerate()
        .map(|(n, (record, state))| with_state(record, state, u32::try_from(n).expect("small")))
        .collect();
    store.save_commands(&saved).await.expect("save");
    for record in &saved {
        let stored = store.command(&record.command.command_id).await.expect("read").expect("stored");
        assert_eq!(&stored.record, record, "{:?}", record.state);
    }

    // One command through its whole life, one save at a time.
    let (job, commands) = job_of("job-2", None, &[("life", "gw-2")], 14);
    create(store, &job, &commands).await;
    let life = [
        with_state(&commands[0], CommandState::Sent { session: 1 }, 1),
        with_state(&commands[0], CommandState::Queued { not_before: at(2_000) }, 1),
        with_state(&commands[0], CommandState::Sent { session: 2 }, 2),
        with_state(&commands[0], CommandState::Acked { deadline: at(40_000) }, 2),
        with_state(&commands[0], CommandState::Done(Terminal::Succeeded), 2),
    ];
    for record in &life {
        store.save_commands(std::slice::from_ref(record)).await.expect("save");
        assert_eq!(&store.command(&command_id("life")).await.expect("read").expect("stored").record, record);
    }
}

pub(crate) async fn unfinished_commands_exclude_terminal_ones_in_submission_order<S: Store>(store: &S) {
    let (job, commands) =
        job_of("job-1", None, &[("c0", "gw-1"), ("c1", "gw-2"), ("c2", "gw-1"), ("c3", "gw-1"), ("c4", "gw-2")], 0);
    // The store numbers them in the order given; the listing follows that order.
    create(store, &job, &commands).await;
    store
        .save_commands(&[
            with_state(&commands[1], CommandState::Sent { session: 3 }, 1),
            done(&commands[2], Terminal::Cancelled),
            with_state(&commands[3], CommandState::Acked { deadline: at(1) }, 1),
            done(&commands[4], Terminal::DeadLettered(DeadLetter::QueueExpired)),
        ])
        .await
        .expect("save");
    let unfinished = store.unfinished_commands().await.expect("read");
    assert_eq!(
        unfinished,
        [
            commands[0].clone(),
            with_state(&commands[1], CommandState::Sent { session: 3 }, 1),
            with_state(&commands[3], CommandState::Acked { deadline: at(1) }, 1),
        ]
    );
}

pub(crate) async fn a_terminal_state_is_final<S: Store>(store: &S) {
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
    create(store, &job, &commands).await;
    let finished = done(&commands[0], Terminal::Succeeded);
    store.save_commands(std::slice::from_ref(&finished)).await.expect("save");
    store
        .save_commands(&[
            with_state(&commands[0], CommandState::Queued { not_before: at(9) }, 2),
            done(&commands[0], Terminal::DeadLettered(DeadLetter::NoResult)),
            finished.clone(),
        ])
        .await
        .expect("a stale record is not an error");
    assert_eq!(store.command(&command_id("cmd-1")).await.expect("read").expect("stored").record, finished);
    assert!(store.dead_letters(0).await.expect("read").is_empty(), "no dead letter for a finished command");
    assert!(store.unfinished_commands().await.expect("read").is_empty());
}

pub(crate) async fn saving_an_unknown_command_fails_and_stores_nothing<S: Store>(store: &S) {
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
    create(store, &job, &commands).await;
    let sent = with_state(&commands[0], CommandState::Sent { session: 1 }, 1);
    let stranger = queued("cmd-9", "gw-1", 9);
    assert!(store.save_commands(&[sent, stranger]).await.is_err());
    assert_eq!(store.command(&command_id("cmd-9")).await.expect("read"), None);
    assert_eq!(store.unfinished_commands().await.expect("read"), commands, "the call stored nothing");
}

pub(crate) async fn dead_letters_are_written_from_saved_commands<S: Store>(store: &S) {
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1"), ("cmd-2", "gw-2"), ("cmd-3", "gw-1")], 0);
    create(store, &job, &commands).await;
    let exhausted =
        with_state(&commands[0], CommandState::Done(Terminal::DeadLettered(DeadLetter::AttemptsExhausted(4))), 4);
    store.save_commands(&[exhausted.clone(), done(&commands[2], Terminal::Failed)]).await.expect("save");
    let no_result = with_state(&commands[1], CommandState::Done(Terminal::DeadLettered(DeadLetter::NoResult)), 1);
    store.save_commands(&[no_result]).await.expect("save");

    let letters = store.dead_letters(0).await.expect("read");
    let summary: Vec<(&str, &str, &str, u32)> =
        letters.iter().map(|d| (d.command_id.as_str(), d.agent_id.as_str(), d.reason.as_str(), d.attempts)).collect();
    assert_eq!(
        summary,
        [("cmd-2", "gw-2", "no_result", 1), ("cmd-1", "gw-1", "attempts_exhausted", 4)],
        "newest first"
    );
    assert!(letters[0].at >= letters[1].at);
    assert_eq!(store.dead_letters(1).await.expect("read").len(), 1);
    store.save_commands(&[exhausted]).await.expect("saving it again");
    assert_eq!(store.dead_letters(0).await.expect("read").len(), 2, "one row per command");
}

pub(crate) async fn commands_filter_and_paginate_newest_first<S: Store>(store: &S) {
    let (job1, commands1) = job_of("job-1", None, &[("c1", "gw-1"), ("c2", "gw-2")], 0);
    let (mut job2, mut commands2) = job_of("job-2", None, &[("c3", "gw-1")], 2);
    let health = Verb::new("get_system_health").expect("verb");
    job2.verb = health.clone();
    commands2[0].command.verb = health.clone();
    create(store, &job1, &commands1).await;
    create(store, &job2, &commands2).await;
    store.save_commands(&[done(&commands1[0], Terminal::Succeeded)]).await.expect("save");
    let result = CommandResult { command_id: command_id("c1"), ..result_for(1) };
    store.save_result(&agent_id("gw-1"), &result, at(50)).await.expect("save result");

    let list = |filter: CommandFilter| async move { store.commands(&filter).await.expect("list") };
    assert_eq!(ids(&list(CommandFilter::default()).await), ["c3", "c2", "c1"]);
    assert_eq!(ids(&list(CommandFilter { agent: Some(agent_id("gw-1")), ..Default::default() }).await), ["c3", "c1"]);
    assert_eq!(ids(&list(CommandFilter { verb: Some(health), ..Default::default() }).await), ["c3"]);
    assert_eq!(ids(&list(CommandFilter { status: Some("queued".into()), ..Default::default() }).await), ["c3", "c2"]);
    let succeeded = list(CommandFilter { status: Some("succeeded".into()), ..Default::default() }).await;
    assert_eq!(ids(&succeeded), ["c1"]);
    assert_eq!(succeeded[0].result.as_ref().map(|r| &r.result), Some(&result), "with its result");
    assert_eq!(succeeded[0].job_id, job1.job_id);
    assert_eq!(ids(&list(CommandFilter { before: Some(2), ..Default::default() }).await), ["c2", "c1"]);
    let first_page = list(CommandFilter { limit: 2, ..Default::default() }).await;
    assert_eq!(ids(&first_page), ["c3", "c2"]);
    let next = CommandFilter { limit: 2, before: first_page.last().map(|c| c.record.order), ..Default::default() };
    assert_eq!(ids(&list(next).await), ["c1"]);
    assert!(list(CommandFilter { status: Some("no_such_state".into()), ..Default::default() }).await.is_empty());

    let (_, in_job) = store.job(&job1.job_id).await.expect("read").expect("stored");
    assert_eq!(ids(&in_job), ["c1", "c2"]);
    assert_eq!(in_job[0].result.as_ref().map(|r| r.received_at), Some(at(50)));
}

pub(crate) async fn a_result_is_stored_once_and_a_different_one_conflicts<S: Store>(store: &S) {
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
    create(store, &job, &commands).await;
    let agent = agent_id("gw-1");
    let first = CommandResult {
        status: ResultStatus::Failed,
        exit_code: Some(-9),
        error: Some(ResultError {
            code: Text::new("killed").expect("text"),
            message: Text::new("signal 9").expect("text"),
        }),
        ..result_for(1)
    };
    assert_eq!(store.save_result(&agent, &first, at(10)).await.expect("save"), Recorded::New);
    assert_eq!(store.save_result(&agent, &first, at(20)).await.expect("save"), Recorded::Duplicate);
    let other = CommandResult { status: ResultStatus::Succeeded, exit_code: Some(0), error: None, ..first.clone() };
    assert_eq!(
        store.save_result(&agent, &other, at(30)).await.expect("save"),
        Recorded::Conflicting { stored: ResultDigest::of(&first), received: ResultDigest::of(&other) }
    );
    let stored = store.command(&command_id("cmd-1")).await.expect("read").expect("stored");
    let stored = stored.result.expect("a result");
    assert_eq!(stored.result, first, "the first is kept");
    assert_eq!(stored.received_at, at(10), "when it first arrived");
}

// ---------------------------------------------------------------------------------------------
// Telemetry

pub(crate) async fn telemetry_upserts_by_agent_time_and_metric<S: Store>(store: &S) {
    let batch = [sample("gw-1", 1, "cpu", 1.0), sample("gw-1", 1, "mem", 2.0), sample("gw-2", 1, "cpu", 3.0)];
    assert_eq!(store.save_telemetry(&batch).await.expect("save"), 3);
    assert_eq!(store.save_telemetry(&[]).await.expect("save"), 0);
    // A replay, a changed value, and a duplicate inside one batch: the last value wins.
    store.save_telemetry(&batch).await.expect("replay");
    store.save_telemetry(&[sample("gw-1", 1, "cpu", 5.0), sample("gw-1", 1, "cpu", 6.5)]).await.expect("save");
    let query = TelemetryQuery { agent_id: agent_id("gw-1"), metric: None, from: None, to: None, limit: 0 };
    let rows = store.telemetry(&query).await.expect("read");
    assert_eq!(rows, [sample("gw-1", 1, "cpu", 6.5), sample("gw-1", 1, "mem", 2.0)]);
    let other = TelemetryQuery { agent_id: agent_id("gw-2"), ..query };
    assert_eq!(store.telemetry(&other).await.expect("read"), [sample("gw-2", 1, "cpu", 3.0)]);
}

pub(crate) async fn telemetry_queries_filter_by_metric_and_time_newest_first<S: Store>(store: &S) {
    let rows = [
        sample("gw-1", 1000, "cpu", 1.0),
        sample("gw-1", 2000, "cpu", 2.0),
        sample("gw-1", 3000, "cpu", 3.0),
        sample("gw-1", 1000, "mem", 10.0),
        sample("gw-1", 2000, "mem", 20.0),
        sample("gw-2", 4000, "cpu", 99.0),
    ];
    store.save_telemetry(&rows).await.expect("save");
    let base = TelemetryQuery { agent_id: agent_id("gw-1"), metric: None, from: None, to: None, limit: 0 };
    let read = |query: TelemetryQuery| async move {
        store
            .telemetry(&query)
            .await
            .expect("read")
            .iter()
            .map(|r| (r.ts, r.metric_key.to_string()))
            .collect::<Vec<_>>()
    };
    let key = |ts: u64, m: &str| (at(ts), m.to_owned());
    assert_eq!(
        read(base.clone()).await,
        [key(3000, "cpu"), key(2000, "cpu"), key(2000, "mem"), key(1000, "cpu"), key(1000, "mem")]
    );
    assert_eq!(
        read(TelemetryQuery { metric: Some(metric("cpu")), ..base.clone() }).await,
        [key(3000, "cpu"), key(2000, "cpu"), key(1000, "cpu")]
    );
    assert_eq!(
        read(TelemetryQuery { from: Some(at(2000)), ..base.clone() }).await,
        [key(3000, "cpu"), key(2000, "cpu"), key(2000, "mem")]
    );
    assert_eq!(read(TelemetryQuery { to: Some(at(2000)), ..base.clone() }).await, [key(1000, "cpu"), key(1000, "mem")]);
    assert_eq!(read(TelemetryQuery { limit: 2, ..base.clone() }).await, [key(3000, "cpu"), key(2000, "cpu")]);
    let window = TelemetryQuery { metric: Some(metric("mem")), from: Some(at(1000)), to: Some(at(2000)), ..base };
    assert_eq!(read(window).await, [key(1000, "mem")]);

    let latest = store.latest_telemetry(&agent_id("gw-1")).await.expect("read");
    assert_eq!(latest, [sample("gw-1", 3000, "cpu", 3.0), sample("gw-1", 2000, "mem", 20.0)]);
    assert!(store.latest_telemetry(&agent_id("gw-9")).await.expect("read").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Audit

pub(crate) async fn the_audit_chain_links_every_append_and_verifies<S: Store>(store: &S) {
    assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 0 });
    let mut prev = chain::GENESIS;
    let mut appended = Vec::new();
    for n in 1..=3 {
        let content = audit_entry(n, "admin", "command.created");
        let entry = store.append_audit(&content).await.expect("append");
        assert_eq!(entry.seq, n);
        assert_eq!(entry.content, content);
        assert_eq!(entry.prev_hash, chain::to_hex(&prev));
        prev = chain::link_hash(&prev, &content);
        assert_eq!(entry.hash, chain::to_hex(&prev));
        appended.push(entry);
    }
    // A batch continues the chain in its order, in one write; more rows than one insert holds.
    assert!(store.append_audits(Arc::from([])).await.expect("an empty batch").is_empty());
    let batch: Vec<NewAudit> = (4..=303).map(|n| audit_entry(n, "host", "command.finished")).collect();
    let records: Arc<[Prepared]> = batch.iter().cloned().map(Prepared::new).collect();
    let links = store.append_audits(Arc::clone(&records)).await.expect("append a batch");
    assert_eq!(links.iter().map(|l| l.seq).collect::<Vec<_>>(), (4..=303).collect::<Vec<_>>());
    for ((link, record), content) in links.iter().zip(records.iter()).zip(&batch) {
        assert_eq!(&record.content(), content);
        assert_eq!(link.prev, prev);
        prev = chain::link_hash(&prev, content);
        assert_eq!(link.hash, prev);
        appended.push(record.clone().into_entry(*link));
    }
    appended.reverse();
    let read = store.audit(&AuditFilter { limit: 1000, ..Default::default() }).await.expect("read");
    assert_eq!(read, appended, "stored as appended");
    assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 303 });
}

pub(crate) async fn audit_filters_and_paginates_newest_first<S: Store>(store: &S) {
    let plan = [
        ("admin", "agent.enrolled"),
        ("op", "command.created"),
        ("admin", "command.created"),
        ("host", "security.replay"),
        ("op", "command.created"),
    ];
    for (n, (actor, action)) in (1..).zip(plan) {
        store.append_audit(&audit_entry(n, actor, action)).await.expect("append");
    }
    let seqs = |filter: AuditFilter| async move {
        store.audit(&filter).await.expect("read").iter().map(|e| e.seq).collect::<Vec<_>>()
    };
    assert_eq!(seqs(AuditFilter::default()).await, [5, 4, 3, 2, 1]);
    assert_eq!(seqs(AuditFilter { action: Some("command.created".into()), ..Default::default() }).await, [5, 3, 2]);
    assert_eq!(seqs(AuditFilter { actor: Some("op".into()), ..Default::default() }).await, [5, 2]);
    let both =
        AuditFilter { action: Some("command.created".into()), actor: Some("admin".into()), ..Default::default() };
    assert_eq!(seqs(both).await, [3]);
    assert_eq!(seqs(AuditFilter { before: Some(4), limit: 2, ..Default::default() }).await, [3, 2]);
    assert_eq!(seqs(AuditFilter { limit: 1, ..Default::default() }).await, [5]);
}

// ---------------------------------------------------------------------------------------------
// Tokens, stats, concurrency

pub(crate) async fn tokens_are_found_by_hash_and_unique<S: Store>(store: &S) {
    let token = TokenRecord {
        token_hash: chain::to_hex(blake3::hash(b"secret").as_bytes()),
        name: "ci".into(),
        role: Role::Operator,
        created_at: at(0),
        revoked: false,
    };
    store.create_token(&token).await.expect("create");
    assert_eq!(store.token(&token.token_hash).await.expect("read"), Some(token.clone()));
    let clash = TokenRecord { name: "other".into(), role: Role::Admin, ..token.clone() };
    assert!(matches!(store.create_token(&clash).await, Err(StoreError::Exists(_))));
    assert_eq!(store.token(&token.token_hash).await.expect("read"), Some(token), "the first is kept");
    assert_eq!(store.token(&"0".repeat(64)).await.expect("read"), None);
    let revoked = TokenRecord {
        token_hash: "ab".repeat(32),
        name: "old".into(),
        role: Role::Viewer,
        created_at: at(1),
        revoked: true,
    };
    store.create_token(&revoked).await.expect("create");
    assert_eq!(store.token(&revoked.token_hash).await.expect("read"), Some(revoked));
}

pub(crate) async fn stats_count_unfinished_commands_by_state_dead_letters_and_latest_telemetry<S: Store>(store: &S) {
    let empty = store.stats().await.expect("stats");
    assert!(empty.unfinished_by_state.is_empty());
    assert_eq!((empty.dead_letters, empty.latest_telemetry), (0, None));

    let (job, commands) =
        job_of("job-1", None, &[("c1", "gw-1"), ("c2", "gw-1"), ("c3", "gw-1"), ("c4", "gw-1"), ("c5", "gw-1")], 0);
    create(store, &job, &commands).await;
    store
        .save_commands(&[
            done(&commands[0], Terminal::Succeeded),
            done(&commands[1], Terminal::DeadLettered(DeadLetter::QueueExpired)),
            with_state(&commands[2], CommandState::Sent { session: 1 }, 1),
            done(&commands[3], Terminal::Succeeded),
        ])
        .await
        .expect("save");
    store.save_telemetry(&[sample("gw-1", 500, "cpu", 1.0), sample("gw-2", 900, "cpu", 1.0)]).await.expect("save");
    store.save_telemetry(&[sample("gw-1", 100, "cpu", 1.0)]).await.expect("an older batch");
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.unfinished_by_state, [("queued".to_owned(), 1), ("sent".to_owned(), 1)], "finished ones are not");
    assert_eq!(stats.dead_letters, 1);
    assert_eq!(stats.latest_telemetry, Some(at(900)));
}

pub(crate) async fn many_concurrent_writes_are_all_durable<S: Store>(store: &S) {
    let names: Vec<String> = (0..500).map(|n| format!("cmd-{n}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "gw-1")).collect();
    let (job, commands) = job_of("job-1", None, &pairs, 0);
    create(store, &job, &commands).await;

    // Every result delivered twice at once, audit appends and telemetry batches interleaved.
    let agent = agent_id("gw-1");
    let results: Vec<CommandResult> = (0..500).map(result_for).collect();
    let deliveries = results.iter().chain(results.iter()).map(|r| store.save_result(&agent, r, at(1)));
    let audits: Vec<NewAudit> = (1..=100).map(|n| audit_entry(n, "host", "command.result")).collect();
    let appends = audits.iter().map(|a| store.append_audit(a));
    let batches: Vec<Vec<TelemetryRow>> =
        (0..50).map(|n| (0..20).map(|m| sample("gw-1", n, &format!("m{m}"), 1.0)).collect()).collect();
    let samples = batches.iter().map(|b| store.save_telemetry(b));
    let (recorded, appended, written) = tokio::join!(join_all(deliveries), join_all(appends), join_all(samples));

    let recorded: Vec<Recorded> = recorded.into_iter().map(|r| r.expect("stored")).collect();
    assert_eq!(recorded.iter().filter(|r| **r == Recorded::New).count(), 500, "each result once");
    assert_eq!(recorded.iter().filter(|r| **r == Recorded::Duplicate).count(), 500, "and once a duplicate");
    let mut seqs: Vec<u64> = appended.into_iter().map(|e| e.expect("appended").seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>(), "each append its own position");
    assert_eq!(written.into_iter().map(|w| w.expect("saved")).sum::<usize>(), 1000);

    let stored = store.commands(&CommandFilter { limit: 1000, ..Default::default() }).await.expect("read");
    assert_eq!(stored.len(), 500);
    for command in &stored {
        let result = command.result.as_ref().expect("every result is stored");
        assert_eq!(result.result.command_id, command.record.command.command_id);
    }
    assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 100 });
    let query = TelemetryQuery { agent_id: agent, metric: None, from: None, to: None, limit: 10_000 };
    assert_eq!(store.telemetry(&query).await.expect("read").len(), 1000);
}

pub(crate) async fn the_highest_order_covers_finished_commands_too<S: Store>(store: &S) {
    assert_eq!(store.max_order().await.expect("reads"), None, "an empty store has no order");
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1"), ("cmd-2", "gw-1")], 5);
    store.create_job(&job, &commands, QueueBounds::UNBOUNDED, None).await.expect("creates");
    store
        .save_commands(&[done(&commands[0], Terminal::Succeeded), done(&commands[1], Terminal::Failed)])
        .await
        .expect("saves");
    assert!(store.unfinished_commands().await.expect("reads").is_empty());
    assert_eq!(store.max_order().await.expect("reads"), Some(1), "finished commands still hold their orders");
}

// ---------------------------------------------------------------------------------------------
// Instances, presence and ownership

fn instance(id: &str, lease_until: u64) -> InstanceRecord {
    InstanceRecord {
        instance_id: id.into(),
        name: format!("{id} on test"),
        started_at: at(0),
        lease_until: at(lease_until),
    }
}

fn owner_of_nothing(records: &[CommandRecord]) -> Vec<String> {
    records.iter().map(|r| r.command.command_id.to_string()).collect()
}

pub(crate) async fn jobs_beyond_the_queue_bounds_are_refused_whole_and_orders_follow_the_store<S: Store>(store: &S) {
    let bounds = QueueBounds { max_commands: 3, per_agent: 2 };
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1"), ("cmd-2", "gw-1")], 40);
    assert_eq!(store.create_job(&job, &commands, bounds, None).await.expect("fits"), created());
    let (job, commands) = job_of("job-2", None, &[("cmd-3", "gw-1")], 0);
    match store.create_job(&job, &commands, bounds, None).await {
        Err(StoreError::QueueFull { global: false, agents }) => assert_eq!(agents, vec![agent_id("gw-1")]),
        other => panic!("expected the agent's queue to be full, got {other:?}"),
    }
    let (job, commands) = job_of("job-3", None, &[("cmd-4", "gw-2"), ("cmd-5", "gw-3")], 0);
    assert!(matches!(
        store.create_job(&job, &commands, bounds, None).await,
        Err(StoreError::QueueFull { global: true, .. })
    ));
    assert!(store.job(&job_id("job-3")).await.expect("reads").is_none(), "a refused job stores nothing");
    let (job, commands) = job_of("job-4", None, &[("cmd-6", "gw-2")], 0);
    store.create_job(&job, &commands, bounds, None).await.expect("fits");
    let orders: Vec<u64> = store.unfinished_commands().await.expect("reads").iter().map(|r| r.order).collect();
    assert_eq!(orders, vec![0, 1, 2], "the store numbers commands consecutively, whatever the records said");
    // Finished commands leave the bound.
    let first = store.command(&command_id("cmd-1")).await.expect("reads").expect("stored").record;
    store.save_commands(&[done(&first, Terminal::Succeeded)]).await.expect("saves");
    let (job, commands) = job_of("job-5", None, &[("cmd-7", "gw-1")], 0);
    store.create_job(&job, &commands, bounds, None).await.expect("room again");
}

/// Jobs of many targets and of few, against a queue holding more or fewer commands than the
/// job has targets: a store may count differently in each case, never with another answer.
pub(crate) async fn wide_and_narrow_jobs_are_held_to_each_target_queue<S: Store>(store: &S) {
    let bounds = QueueBounds { max_commands: 1_000, per_agent: 1 };
    let names = |job: &str, agents: std::ops::Range<u32>| -> Vec<(String, String)> {
        agents.map(|n| (format!("{job}-{n}"), format!("gw-{n}"))).collect()
    };
    let job = |id: &str, pairs: &[(String, String)]| {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(c, a)| (c.as_str(), a.as_str())).collect();
        job_of(id, None, &pairs, 0)
    };
    let refused = |outcome: Result<JobInsert, StoreError>| match outcome {
        Err(StoreError::QueueFull { global: false, agents }) => agents,
        other => panic!("expected a per-agent refusal, got {other:?}"),
    };
    let (lone, lone_commands) = job("lone", &names("lone", 5..6));
    assert_eq!(store.create_job(&lone, &lone_commands, bounds, None).await.expect("fits"), created());
    // 70 targets, one command queued: gw-5 is full.
    let (wide, wide_commands) = job("wide", &names("wide", 0..70));
    assert_eq!(refused(store.create_job(&wide, &wide_commands, bounds, None).await), vec![agent_id("gw-5")]);
    let (other, other_commands) = job("other", &names("other", 100..170));
    assert_eq!(store.create_job(&other, &other_commands, bounds, None).await.expect("fits"), created());
    // 3 targets, 71 commands queued: gw-101 and gw-169 are full, gw-200 is not.
    let mut narrow_pairs = names("narrow", 101..102);
    narrow_pairs.extend(names("narrow", 169..170));
    narrow_pairs.extend(names("narrow", 200..201));
    let (narrow, narrow_commands) = job("narrow", &narrow_pairs);
    assert_eq!(
        refused(store.create_job(&narrow, &narrow_commands, bounds, None).await),
        vec![agent_id("gw-101"), agent_id("gw-169")]
    );
    // Once gw-5's command finishes, the wide job fits.
    let first = store.command(&command_id("lone-5")).await.expect("reads").expect("stored").record;
    store.save_commands(&[done(&first, Terminal::Succeeded)]).await.expect("saves");
    assert_eq!(store.create_job(&wide, &wide_commands, bounds, None).await.expect("fits"), created());
}

pub(crate) async fn commands_are_claimed_only_for_agents_present_here_and_released_with_their_state<S: Store>(
    store: &S,
) {
    store.register_instance(&instance("inst-a", 60_000)).await.expect("registers");
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1"), ("cmd-2", "gw-1"), ("cmd-3", "gw-2")], 0);
    create(store, &job, &commands).await;
    let nothing = store.claim_commands("inst-a", &ClaimScope::All).await.expect("claims");
    assert!(nothing.is_empty(), "no agent is present here: {:?}", owner_of_nothing(&nothing));
    assert_eq!(
        store.claim_presence(&agent_id("gw-1"), "inst-a", 7, at(1)).await.expect("claims"),
        PresenceClaim::Claimed
    );
    let claimed = store.claim_commands("inst-a", &ClaimScope::Job(job_id("job-1"))).await.expect("claims");
    assert_eq!(owner_of_nothing(&claimed), vec!["cmd-1", "cmd-2"], "only the present agent's, in order");
    assert!(store.claim_commands("inst-a", &ClaimScope::All).await.expect("claims").is_empty(), "held already");
    // Handed back in the state the dispatcher left them, then claimable again.
    let sent = with_state(&claimed[0], CommandState::Sent { session: 7 }, 1);
    let acked = with_state(&claimed[1], CommandState::Acked { deadline: at(9_000) }, 1);
    store.release_commands("inst-a", &[sent.clone(), acked.clone()]).await.expect("releases");
    store.release_presence(&agent_id("gw-1"), "inst-a", 7).await.expect("releases");
    assert!(store.claim_commands("inst-a", &ClaimScope::All).await.expect("claims").is_empty(), "absent again");
    assert_eq!(
        store.claim_presence(&agent_id("gw-1"), "inst-a", 8, at(2)).await.expect("claims"),
        PresenceClaim::Claimed
    );
    let again = store.claim_commands("inst-a", &ClaimScope::Agent(agent_id("gw-1"))).await.expect("claims");
    assert_eq!(again, vec![sent, acked], "released state is what the next holder adopts");
    // A release from an instance that does not hold a command changes nothing.
    let stale = with_state(&commands[2], CommandState::Sent { session: 1 }, 1);
    store.release_commands("inst-a", &[stale]).await.expect("no-op");
    let third = store.command(&command_id("cmd-3")).await.expect("reads").expect("stored");
    assert!(matches!(third.record.state, CommandState::Queued { .. }));
}

pub(crate) async fn a_claimant_holds_the_new_commands_of_agents_present_there_from_the_start<S: Store>(store: &S) {
    store.register_instance(&instance("inst-a", 60_000)).await.expect("registers");
    store.claim_presence(&agent_id("gw-1"), "inst-a", 1, at(1)).await.expect("claims");
    let (earlier, earlier_commands) = job_of("job-0", None, &[("cmd-0", "gw-3")], 0);
    create(store, &earlier, &earlier_commands).await;
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1"), ("cmd-2", "gw-2"), ("cmd-3", "gw-1")], 0);
    let claimed = match store.create_job(&job, &commands, QueueBounds::UNBOUNDED, Some("inst-a")).await {
        Ok(JobInsert::Created { claimed }) => claimed,
        other => panic!("expected the job to be created, got {other:?}"),
    };
    assert_eq!(owner_of_nothing(&claimed), vec!["cmd-1", "cmd-3"], "only the agent present here, in order");
    let orders: Vec<u64> = claimed.iter().map(|r| r.order).collect();
    assert_eq!(orders, vec![1, 3], "the claimed records carry the orders the store gave them");
    assert_eq!(
        store.claim_commands("inst-a", &ClaimScope::All).await.expect("claims"),
        Vec::<CommandRecord>::new(),
        "held from the start: there is nothing left to claim"
    );
    assert_eq!(
        store.cancel_unowned(&command_id("cmd-1"), at(2)).await.expect("answers"),
        CancelOutcome::Owned("inst-a".into())
    );
    store.claim_presence(&agent_id("gw-2"), "inst-a", 1, at(1)).await.expect("claims");
    let later = store.claim_commands("inst-a", &ClaimScope::Job(job_id("job-1"))).await.expect("claims");
    assert_eq!(owner_of_nothing(&later), vec!["cmd-2"], "the rest is claimed once its agent is present");
    // A claimant serving none of the targets holds nothing.
    let (job, commands) = job_of("job-2", None, &[("cmd-4", "gw-3")], 0);
    assert_eq!(
        store.create_job(&job, &commands, QueueBounds::UNBOUNDED, Some("inst-a")).await.expect("creates"),
        created()
    );
    assert_eq!(store.cancel_unowned(&command_id("cmd-4"), at(2)).await.expect("cancels"), CancelOutcome::Cancelled);
}

pub(crate) async fn presence_is_taken_over_by_a_newer_session_of_the_same_instance_only<S: Store>(store: &S) {
    let gw = agent_id("gw-1");
    assert!(
        matches!(store.claim_presence(&gw, "inst-a", 1, at(1)).await, Err(StoreError::NotRegistered(_))),
        "an unregistered instance cannot hold agents"
    );
    store.register_instance(&instance("inst-a", 60_000)).await.expect("registers");
    assert_eq!(store.claim_presence(&gw, "inst-a", 1, at(1)).await.expect("claims"), PresenceClaim::Claimed);
    assert_eq!(store.claim_presence(&gw, "inst-a", 2, at(2)).await.expect("claims"), PresenceClaim::Claimed);
    // The older session's release leaves the newer one's presence.
    store.release_presence(&gw, "inst-a", 1).await.expect("releases");
    assert_eq!(store.claim_presence(&gw, "inst-a", 3, at(3)).await.expect("claims"), PresenceClaim::Claimed);
    assert!(store.renew_instance("inst-a", at(120_000)).await.expect("renews"));
    assert!(!store.renew_instance("inst-unknown", at(120_000)).await.expect("renews"), "unknown instances are told");
    let instances = store.instances().await.expect("lists");
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].lease_until, at(120_000));
    assert_eq!(store.claim_presence(&gw, "inst-a", 4, at(200_000)).await.ok(), None, "a lapsed lease holds nothing");
}

pub(crate) async fn timers_of_unowned_commands_run_from_their_rows<S: Store>(store: &S) {
    let ttl = Duration::from_secs(60);
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1"), ("cmd-2", "gw-1"), ("cmd-3", "gw-2")], 0);
    create(store, &job, &commands).await;
    store
        .save_commands(&[with_state(&commands[1], CommandState::Acked { deadline: at(30_000) }, 1)])
        .await
        .expect("saves");
    assert!(store.expire_unowned(at(29_999), ttl).await.expect("sweeps").is_empty(), "nothing is due yet");
    let due = store.expire_unowned(at(30_000), ttl).await.expect("sweeps");
    assert_eq!(owner_of_nothing(&due), vec!["cmd-2"]);
    assert_eq!(due[0].state, CommandState::Done(Terminal::DeadLettered(DeadLetter::NoResult)));
    let due = store.expire_unowned(at(60_000), ttl).await.expect("sweeps");
    assert_eq!(owner_of_nothing(&due), vec!["cmd-1", "cmd-3"], "queued past the queue's time to live");
    assert!(store.expire_unowned(at(90_000), ttl).await.expect("sweeps").is_empty(), "each expires once");
    assert_eq!(store.dead_letters(10).await.expect("reads").len(), 3);
    // A held command's timers are its holder's.
    let (job, commands) = job_of("job-2", None, &[("cmd-4", "gw-1")], 0);
    create(store, &job, &commands).await;
    store.register_instance(&instance("inst-a", 900_000)).await.expect("registers");
    store.claim_presence(&agent_id("gw-1"), "inst-a", 1, at(1)).await.expect("claims");
    assert_eq!(store.claim_commands("inst-a", &ClaimScope::All).await.expect("claims").len(), 1);
    assert!(store.expire_unowned(at(800_000), ttl).await.expect("sweeps").is_empty());
}

pub(crate) async fn cancelling_an_unowned_command_and_what_cannot_be_cancelled<S: Store>(store: &S) {
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1"), ("cmd-2", "gw-1"), ("cmd-3", "gw-2")], 0);
    create(store, &job, &commands).await;
    assert_eq!(store.cancel_unowned(&command_id("cmd-1"), at(5)).await.expect("cancels"), CancelOutcome::Cancelled);
    let cancelled = store.command(&command_id("cmd-1")).await.expect("reads").expect("stored");
    assert_eq!(cancelled.record.state, CommandState::Done(Terminal::Cancelled));
    assert_eq!(
        store.cancel_unowned(&command_id("cmd-1"), at(6)).await.expect("answers"),
        CancelOutcome::NotCancellable("cancelled".into())
    );
    store.save_commands(&[with_state(&commands[1], CommandState::Sent { session: 1 }, 1)]).await.expect("saves");
    assert_eq!(
        store.cancel_unowned(&command_id("cmd-2"), at(6)).await.expect("answers"),
        CancelOutcome::NotCancellable("sent".into())
    );
    store.register_instance(&instance("inst-a", 60_000)).await.expect("registers");
    store.claim_presence(&agent_id("gw-2"), "inst-a", 1, at(1)).await.expect("claims");
    store.claim_commands("inst-a", &ClaimScope::All).await.expect("claims");
    assert_eq!(
        store.cancel_unowned(&command_id("cmd-3"), at(6)).await.expect("answers"),
        CancelOutcome::Owned("inst-a".into())
    );
    assert_eq!(store.cancel_unowned(&command_id("cmd-9"), at(6)).await.expect("answers"), CancelOutcome::NotFound);
}

pub(crate) async fn a_deregistered_instance_lets_go_of_everything<S: Store>(store: &S) {
    store.register_instance(&instance("inst-a", 60_000)).await.expect("registers");
    let (job, commands) = job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
    create(store, &job, &commands).await;
    store.claim_presence(&agent_id("gw-1"), "inst-a", 1, at(1)).await.expect("claims");
    assert_eq!(store.claim_commands("inst-a", &ClaimScope::All).await.expect("claims").len(), 1);
    store.deregister_instance("inst-a").await.expect("deregisters");
    assert!(store.instances().await.expect("lists").is_empty());
    assert!(!store.renew_instance("inst-a", at(2)).await.expect("renews"), "it is told it is gone");
    // Its command is nobody's again: the queue's timers apply, and a new instance claims it.
    store.register_instance(&instance("inst-b", 60_000)).await.expect("registers");
    assert_eq!(
        store.claim_presence(&agent_id("gw-1"), "inst-b", 1, at(3)).await.expect("claims"),
        PresenceClaim::Claimed
    );
    assert_eq!(store.claim_commands("inst-b", &ClaimScope::All).await.expect("claims").len(), 1);
    assert!(store.reap_instances(at(59_999)).await.expect("reaps").is_empty());
    assert_eq!(store.reap_instances(at(60_001)).await.expect("reaps"), vec!["inst-b".to_owned()]);
    assert!(store.claim_commands("inst-b", &ClaimScope::All).await.is_ok());
}
