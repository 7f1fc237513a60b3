//! The SQLite store's durable writes: jobs, results and telemetry, alone and in the
//! concurrent bursts that its writer thread commits as one group (one transaction, one fsync).
//!
//! The database is a real file in a temporary directory on the machine's disk, opened with
//! the store's defaults (WAL, `synchronous=FULL`, groups of up to 512 requests); every
//! figure is for writes that are durable when their future resolves. Every write is new
//! (fresh command ids, fresh telemetry timestamps), so tables grow through the run as they
//! do in service.

use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use viworks_benches::{agent_id, at, command_id, metric_key, result};
use viworks_core::idempotency::{JobId, Recorded};
use viworks_core::session::{CommandRecord, CommandState, NewCommand};
use viworks_core::wire::{AgentId, CommandResult, Verb};
use viworks_host::store::sqlite::SqliteStore;
use viworks_host::store::{JobInsert, JobRecord, QueueBounds, Store, TelemetryRow};

/// Samples in one agent's telemetry batch: 30 s of 33 metrics sampled once a second.
const BATCH: usize = 1000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

/// Jobs as the API stores them: one target (a single command), or a broadcast to 1,000
/// agents; every job and command is new, and none is claimed.
fn jobs(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("a temporary directory");
    let store = SqliteStore::open(dir.path().join("bench.db")).expect("the store opens");
    let rt = runtime();
    let agents: Vec<AgentId> = (0..1000).map(|n| agent_id(&format!("gw-{n:04}"))).collect();
    let verb = Verb::new("get_system_health").expect("a valid verb");
    let (mut jobs, mut order) = (0u64, 0u64);
    let mut fresh = |targets: &[AgentId]| -> (JobRecord, Vec<CommandRecord>) {
        jobs += 1;
        let job = JobRecord {
            job_id: JobId::new(format!("job-{jobs:012}")).expect("a valid job id"),
            req_id: format!("req-{jobs}"),
            actor: "operator".into(),
            verb: verb.clone(),
            args: serde_json::json!({}),
            created_at: at(jobs),
            idempotency: None,
        };
        let commands = targets
            .iter()
            .enumerate()
            .map(|(n, agent)| {
                order += 1;
                CommandRecord {
                    command: NewCommand {
                        command_id: command_id(&format!("cmd-{jobs:012}-{n}")),
                        agent_id: agent.clone(),
                        verb: verb.clone(),
                        args: serde_json::json!({}),
                        timeout: Duration::from_secs(30),
                    },
                    state: CommandState::Queued { not_before: at(jobs) },
                    attempts: 0,
                    submitted_at: at(jobs),
                    order,
                }
            })
            .collect();
        (job, commands)
    };

    let mut group = c.benchmark_group("sqlite/create_job");
    group.sample_size(10);
    for targets in [1, 1000] {
        group.throughput(Throughput::Elements(targets as u64));
        group.bench_function(BenchmarkId::new("targets", targets), |b| {
            b.iter_batched(
                || fresh(&agents[..targets]),
                |(job, commands)| {
                    let stored = rt.block_on(store.create_job(&job, &commands, QueueBounds::UNBOUNDED, None));
                    assert!(matches!(stored, Ok(JobInsert::Created { .. })), "{stored:?}");
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn results(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("a temporary directory");
    let store = SqliteStore::open(dir.path().join("bench.db")).expect("the store opens");
    let rt = runtime();
    let agent = agent_id("gw-bench");
    let mut next = 0u64;
    let mut fresh = |count: usize| -> Vec<CommandResult> {
        (0..count)
            .map(|_| {
                next += 1;
                result(next)
            })
            .collect()
    };

    let mut group = c.benchmark_group("sqlite/save_result");
    group.sample_size(10);
    for concurrent in [1, 64, 512] {
        group.throughput(Throughput::Elements(concurrent as u64));
        group.bench_function(BenchmarkId::new("concurrent", concurrent), |b| {
            b.iter_batched(
                || fresh(concurrent),
                |batch| {
                    let stored = rt.block_on(join_all(batch.iter().map(|r| store.save_result(&agent, r, at(1)))));
                    for recorded in stored {
                        assert_eq!(recorded.expect("stored"), Recorded::New);
                    }
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
    let stats = store.writer_stats();
    println!(
        "sqlite/save_result: {} requests in {} transactions ({:.1} per group commit)",
        stats.requests,
        stats.transactions,
        stats.requests as f64 / stats.transactions.max(1) as f64
    );
}

fn telemetry(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("a temporary directory");
    let store = SqliteStore::open(dir.path().join("bench.db")).expect("the store opens");
    let rt = runtime();
    let agents: Vec<AgentId> = (0..16).map(|n| agent_id(&format!("gw-{n:02}"))).collect();
    let keys: Vec<_> = (0..33).map(|m| metric_key(&format!("host.metric_{m}"))).collect();
    let mut second = 0u64;
    // One batch per agent: every sample a new (agent, ts, metric) row.
    let mut fresh = |agents: &[AgentId]| -> Vec<Vec<TelemetryRow>> {
        let start = second;
        second += (BATCH / keys.len() + 1) as u64;
        agents
            .iter()
            .map(|agent| {
                (0..BATCH)
                    .map(|i| TelemetryRow {
                        agent_id: agent.clone(),
                        ts: at((start + (i / keys.len()) as u64) * 1000),
                        metric_key: keys[i % keys.len()].clone(),
                        value: i as f64 * 0.5,
                    })
                    .collect()
            })
            .collect()
    };

    let mut group = c.benchmark_group("sqlite/save_telemetry");
    group.sample_size(10);
    for concurrent in [1, 16] {
        group.throughput(Throughput::Elements((concurrent * BATCH) as u64));
        group.bench_function(BenchmarkId::new(format!("batches_of_{BATCH}"), concurrent), |b| {
            b.iter_batched(
                || fresh(&agents[..concurrent]),
                |batches| {
                    let written = rt.block_on(join_all(batches.iter().map(|rows| store.save_telemetry(rows))));
                    for count in written {
                        assert_eq!(count.expect("stored"), BATCH);
                    }
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    jobs(&mut c);
    results(&mut c);
    telemetry(&mut c);
    c.final_summary();
}
