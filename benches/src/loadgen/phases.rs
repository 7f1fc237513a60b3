//! The measured phases against the running host, in the order a run takes them: connect the
//! fleet, broadcast one command to all, round trips at a fixed rate, sustained throughput,
//! telemetry. Each phase waits for what it started to finish (bounded), so the next one
//! starts from a quiet host.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use viworks_core::Entropy;
use viworks_core::wire::{AgentId, CommandId};

use super::agent::{self, Context, Orders, SyntheticAgent, TelemetryOrder};
use super::api::{Api, SumCount};
use super::fleet::{Identity, SITE};
use super::pace;
use super::probe::Probe;
use super::stats::Summary;
use super::system;
use super::{Deadline, LoadgenError};

/// Connection attempts per agent before it counts as failed.
const CONNECT_ATTEMPTS: u32 = 3;

/// How long a phase waits for its last results after it stopped sending.
const DRAIN: Duration = Duration::from_secs(30);

/// How the fleet connected.
#[derive(Clone, Debug, Default)]
pub struct ConnectFigures {
    /// Agents with an established session.
    pub connected: usize,
    /// From the first dial to the last WELCOME.
    pub wall: Duration,
    /// Per agent: TCP connect to WELCOME, of the successful attempt.
    pub setup: Summary,
    /// Attempts that failed and were retried.
    pub retries: u64,
}

/// The connected fleet: its agents' tasks, ended by [`Orders::stop`].
#[derive(Debug)]
pub struct Fleet {
    /// One task per connected agent.
    pub tasks: JoinSet<()>,
    /// The ids of the connected agents, in index order.
    pub agents: Vec<AgentId>,
}

/// Connects one synthetic agent per identity, `concurrency` at a time, each from its
/// loopback source address, retrying transient failures. Fails unless every agent connects.
pub async fn connect(
    identities: &Arc<Vec<Identity>>,
    context: &Context,
    concurrency: usize,
    per_source: usize,
    deadline: Deadline,
) -> Result<(Fleet, ConnectFigures), LoadgenError> {
    let count = identities.len();
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| LoadgenError::Internal { what: "the system's random number generator", reason: e.to_string() })?;
    let mut entropy = Entropy::from_seed(seed);
    let semaphore = Arc::new(Semaphore::new(concurrency));
    let retries = Arc::new(AtomicU64::new(0));
    let (report, mut reports) = mpsc::unbounded_channel::<(usize, Result<Duration, String>)>();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for index in 0..count {
        let permit = tokio::time::timeout_at(deadline.instant(), Arc::clone(&semaphore).acquire_owned()).await;
        let Ok(Ok(permit)) = permit else {
            return Err(deadline.expired("connecting", format!("{index} of {count} agents dialled")));
        };
        let (identities, context, report, retries) =
            (Arc::clone(identities), context.clone(), report.clone(), Arc::clone(&retries));
        let mut entropy = entropy.fork();
        let source = system::source_addr(index, per_source);
        tasks.spawn(async move {
            let identity = &identities[index];
            let mut attempt = 1;
            let connected = loop {
                let t0 = Instant::now();
                match SyntheticAgent::connect(index, identity, source, &context, &mut entropy).await {
                    Ok(agent) => break Ok((agent, t0.elapsed())),
                    Err(error) if error.is_transient() && attempt < CONNECT_ATTEMPTS => {
                        tracing::debug!(agent = index, %error, attempt, "connection failed; retrying");
                        retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                        attempt += 1;
                    }
                    Err(error) => break Err(error.to_string()),
                }
            };
            drop(permit);
            match connected {
                Ok((agent, setup)) => {
                    let _ = report.send((index, Ok(setup)));
                    agent.run().await;
                }
                Err(error) => {
                    let _ = report.send((index, Err(error)));
                }
            }
        });
    }
    drop(report);
    let mut setups = Vec::with_capacity(count);
    let mut connected = vec![false; count];
    let mut failures = 0;
    let mut first_failure = None;
    let mut last = started;
    while setups.len() + failures < count {
        match tokio::time::timeout_at(deadline.instant(), reports.recv()).await {
            Ok(Some((index, Ok(setup)))) => {
                setups.push(setup);
                connected[index] = true;
                last = Instant::now();
            }
            Ok(Some((index, Err(error)))) => {
                failures += 1;
                if first_failure.is_none() {
                    first_failure = Some(format!("agent {index}: {error}"));
                }
            }
            Ok(None) => break,
            Err(_) => {
                let detail = format!("{} of {count} connected", setups.len());
                return Err(deadline.expired("connecting", detail));
            }
        }
    }
    if setups.len() < count {
        return Err(LoadgenError::Connect {
            connected: setups.len(),
            wanted: count,
            first_failure: first_failure.unwrap_or_else(|| "unknown".into()),
        });
    }
    let figures = ConnectFigures {
        connected: setups.len(),
        wall: last - started,
        setup: Summary::of(setups),
        retries: retries.load(Ordering::Relaxed),
    };
    let agents = identities.iter().map(|identity| identity.agent_id.clone()).collect();
    Ok((Fleet { tasks, agents }, figures))
}

/// Waits until the host has acknowledged the results of all of `ids`, or `until`.
async fn wait_stored(probe: &Probe, ids: &[CommandId], until: tokio::time::Instant) -> Result<(), usize> {
    loop {
        let stored = probe.count_stored(ids);
        if stored >= ids.len() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            return Err(stored);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The POSTs of a phase that failed: how many, and what the first one said.
#[derive(Debug, Default)]
struct Failures {
    count: AtomicU64,
    first: std::sync::Mutex<Option<String>>,
}

impl Failures {
    fn record(&self, error: &LoadgenError) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert_with(|| error.to_string());
    }

    /// The count and the first message.
    fn read(&self) -> (u64, Option<String>) {
        let first = self.first.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        (self.count.load(Ordering::Relaxed), first)
    }
}

/// What the broadcast phase measured.
#[derive(Clone, Debug, Default)]
pub struct BroadcastFigures {
    /// Commands the selector produced.
    pub commands: usize,
    /// From sending the POST to its 202 (every command durable).
    pub accepted: Duration,
    /// From sending the POST to the last COMMAND reaching its agent.
    pub last_arrival: Duration,
    /// From sending the POST to the last RESULT_ACK: every result durable.
    pub all_stored: Duration,
    /// Commands of the job with a stored result, read back through the API afterwards.
    pub verified: usize,
}

/// One `POST /api/v1/commands` with a selector matching every agent, timed until every
/// result is stored (the last RESULT_ACK reaches its agent), then checked through
/// `GET /api/v1/jobs/{id}`.
pub async fn broadcast(api: &Api, probe: &Probe, deadline: Deadline) -> Result<BroadcastFigures, LoadgenError> {
    probe.clear();
    let body = json!({ "verb": agent::VERB, "args": {}, "selector": { "site": SITE } });
    let t0 = Instant::now();
    let submission = tokio::time::timeout_at(deadline.instant(), api.submit(&body))
        .await
        .map_err(|_| deadline.expired("broadcast", "no answer to the POST".into()))??;
    let accepted = Instant::now();
    for id in &submission.commands {
        probe.submitted(id, t0, accepted);
    }
    let ids = submission.commands;
    if let Err(stored) = wait_stored(probe, &ids, deadline.within(DRAIN * 2)).await {
        return Err(LoadgenError::Deadline {
            phase: "broadcast",
            limit: DRAIN * 2,
            detail: format!("{stored} of {} results stored", ids.len()),
        });
    }
    let timelines = probe.take(&ids);
    let latest = |pick: fn(&super::probe::Timeline) -> Option<Instant>| {
        timelines.iter().filter_map(pick).max().map(|at| at - t0).unwrap_or_default()
    };
    let last_arrival = latest(|t| t.arrived);
    let all_stored = latest(|t| t.stored);
    let path = format!("/api/v1/jobs/{}", submission.job_id);
    let (status, job) = tokio::time::timeout_at(deadline.within(DRAIN), api.call(hyper::Method::GET, &path, None))
        .await
        .map_err(|_| deadline.expired("broadcast", "no answer to the job read".into()))??;
    if status != 200 {
        return Err(LoadgenError::Api { what: format!("GET {path}"), status, body: super::api::shorten(&job) });
    }
    let verified = job
        .get("commands")
        .and_then(Value::as_array)
        .map(|commands| commands.iter().filter(|c| c.get("result").is_some_and(|r| !r.is_null())).count())
        .unwrap_or(0);
    Ok(BroadcastFigures { commands: ids.len(), accepted: accepted - t0, last_arrival, all_stored, verified })
}

/// What the round-trip phase measured.
#[derive(Clone, Debug, Default)]
pub struct RoundTripFigures {
    /// Commands per second asked for.
    pub rate: u32,
    /// POSTs due in the phase.
    pub due: usize,
    /// Commands whose result was stored.
    pub completed: usize,
    /// POSTs that failed.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Due time of the POST to RESULT_ACK at the agent: the command round trip.
    pub round_trip: Summary,
    /// Due time of the POST to its 202 (the command is durable).
    pub accepted: Summary,
    /// Due time of the POST to when the load generator began sending it: its own lateness,
    /// part of every figure measured from the due time.
    pub late: Summary,
    /// Due time of the POST to the COMMAND at the agent.
    pub delivered: Summary,
    /// COMMAND at the agent to RESULT_ACK at the agent: ACK and RESULT out, result stored,
    /// RESULT_ACK back.
    pub result_stored: Summary,
    /// The host's own mean time to store a batch of results durably over the phase
    /// (`viworks_result_store_seconds`), when its metrics could be read.
    pub host_result_store: Option<Duration>,
    /// The host's own mean time to store a submission (its job and command) durably over the
    /// phase (`viworks_job_store_seconds`), when its metrics could be read.
    pub host_job_store: Option<Duration>,
    /// The host's own mean time from sending a command to receiving its result, before it
    /// is stored (`viworks_command_round_trip_seconds`, millisecond resolution).
    pub host_round_trip: Option<Duration>,
}

/// The host's result-store histogram.
const RESULT_STORE: &str = "viworks_result_store_seconds";

/// The host's job-store histogram.
const JOB_STORE: &str = "viworks_job_store_seconds";

/// The host's command round-trip histogram.
const HOST_ROUND_TRIP: &str = "viworks_command_round_trip_seconds";

/// Round trips at `rate` commands per second for `duration`, open loop: one POST per
/// command naming one agent (round robin), each due at a fixed time; at most `in_flight`
/// POSTs outstanding. A command's round trip runs from when its POST was due (not when it
/// was sent, so that a late submitter shows as latency) to when its agent receives the
/// RESULT_ACK for its result.
pub async fn round_trip(
    api: &Arc<Api>,
    probe: &Arc<Probe>,
    agents: &[AgentId],
    rate: u32,
    duration: Duration,
    in_flight: usize,
    deadline: Deadline,
) -> Result<RoundTripFigures, LoadgenError> {
    probe.clear();
    let store_before = api.histogram(RESULT_STORE).await.ok();
    let job_before = api.histogram(JOB_STORE).await.ok();
    let trip_before = api.histogram(HOST_ROUND_TRIP).await.ok();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let due_count = (f64::from(rate) * duration.as_secs_f64()).round() as usize;
    let semaphore = Arc::new(Semaphore::new(in_flight));
    let ids = Arc::new(AsyncMutex::new(Vec::<CommandId>::with_capacity(due_count)));
    let failures = Arc::new(Failures::default());
    let lateness = Arc::new(std::sync::Mutex::new(Vec::<Duration>::with_capacity(due_count)));
    let mut posts = JoinSet::new();
    let mut ticks = pace::ticks(Instant::now() + Duration::from_millis(10), interval, due_count);
    while let Some((k, due)) = ticks.recv().await {
        if tokio::time::Instant::from_std(due) > deadline.instant() {
            return Err(deadline.expired("round trips", format!("{k} of {due_count} sent")));
        }
        let Ok(permit) = Arc::clone(&semaphore).acquire_owned().await else { break };
        let body = json!({ "verb": agent::VERB, "args": {}, "targets": [agents[k % agents.len()].as_str()] });
        let (api, probe, ids, failures, lateness) =
            (Arc::clone(api), Arc::clone(probe), Arc::clone(&ids), Arc::clone(&failures), Arc::clone(&lateness));
        posts.spawn(async move {
            let late = due.elapsed();
            lateness.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(late);
            match api.submit(&body).await {
                Ok(submission) => {
                    let accepted = Instant::now();
                    for id in &submission.commands {
                        probe.submitted(id, due, accepted);
                    }
                    ids.lock().await.extend(submission.commands);
                }
                Err(error) => failures.record(&error),
            }
            drop(permit);
        });
        while posts.try_join_next().is_some() {}
    }
    let until = deadline.within(DRAIN);
    while let Ok(Some(_)) = tokio::time::timeout_at(until, posts.join_next()).await {}
    let ids = std::mem::take(&mut *ids.lock().await);
    let _ = wait_stored(probe, &ids, deadline.within(DRAIN)).await;
    let timelines = probe.take(&ids);
    let since = |from: fn(&super::probe::Timeline) -> Option<Instant>,
                 to: fn(&super::probe::Timeline) -> Option<Instant>| {
        Summary::of(timelines.iter().filter_map(|t| Some(to(t)?.saturating_duration_since(from(t)?))).collect())
    };
    let round_trip = since(|t| t.submitted, |t| t.stored);
    let (errors, first_error) = failures.read();
    let host_mean = |before: Option<SumCount>, after: Result<SumCount, LoadgenError>| {
        before.zip(after.ok()).and_then(|(before, after)| after.mean_since(&before))
    };
    let host_result_store = host_mean(store_before, api.histogram(RESULT_STORE).await);
    let host_job_store = host_mean(job_before, api.histogram(JOB_STORE).await);
    let host_round_trip = host_mean(trip_before, api.histogram(HOST_ROUND_TRIP).await);
    Ok(RoundTripFigures {
        rate,
        due: due_count,
        completed: round_trip.count,
        errors,
        first_error,
        round_trip,
        accepted: since(|t| t.submitted, |t| t.accepted),
        late: Summary::of(std::mem::take(&mut *lateness.lock().unwrap_or_else(std::sync::PoisonError::into_inner))),
        delivered: since(|t| t.submitted, |t| t.arrived),
        result_stored: since(|t| t.arrived, |t| t.stored),
        host_result_store,
        host_job_store,
        host_round_trip,
    })
}

/// What the sustained-throughput phase measured.
#[derive(Clone, Debug, Default)]
pub struct SustainedFigures {
    /// Agents named per POST.
    pub batch: usize,
    /// Commands outstanding at most.
    pub outstanding: usize,
    /// The measured window (the phase minus its first fifth, a warm-up).
    pub window: Duration,
    /// Results stored within the window.
    pub completed: u64,
    /// `completed` per second.
    pub per_second: f64,
    /// Commands submitted in the whole phase.
    pub submitted: u64,
    /// POSTs that failed (including 429 when the host's queues are full).
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// POST latency (to 202) across the phase.
    pub post: Summary,
}

/// Closed loop: `submitters` tasks POST batches of `batch` agents (round robin) whenever
/// fewer than `outstanding` commands are submitted and not yet stored, for `duration`.
/// Throughput is the results stored (RESULT_ACKs received) per second over the phase after
/// its first fifth.
#[allow(clippy::too_many_arguments)]
pub async fn sustained(
    api: &Arc<Api>,
    probe: &Arc<Probe>,
    agents: &Arc<Vec<AgentId>>,
    duration: Duration,
    batch: usize,
    outstanding: usize,
    submitters: usize,
    deadline: Deadline,
) -> Result<SustainedFigures, LoadgenError> {
    probe.clear();
    let batch = batch.min(agents.len()).max(1);
    let stored_at_start = Probe::read(&probe.results_stored);
    let submitted = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Failures::default());
    let cursor = Arc::new(AtomicUsize::new(0));
    let posts = Arc::new(AsyncMutex::new(Vec::<Duration>::new()));
    let start = tokio::time::Instant::now();
    let end = start + duration;
    if end > deadline.instant() {
        return Err(deadline.expired("sustained throughput", "not enough time left to start".into()));
    }
    let mut tasks = JoinSet::new();
    for _ in 0..submitters {
        let (api, probe, agents, submitted, failures, cursor, posts) = (
            Arc::clone(api),
            Arc::clone(probe),
            Arc::clone(agents),
            Arc::clone(&submitted),
            Arc::clone(&failures),
            Arc::clone(&cursor),
            Arc::clone(&posts),
        );
        tasks.spawn(async move {
            while tokio::time::Instant::now() < end {
                let done = Probe::read(&probe.results_stored) - stored_at_start;
                let waiting = submitted.load(Ordering::Relaxed).saturating_sub(done);
                if waiting as usize + batch > outstanding {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                submitted.fetch_add(batch as u64, Ordering::Relaxed);
                let first = cursor.fetch_add(batch, Ordering::Relaxed);
                let targets: Vec<&str> = (first..first + batch).map(|n| agents[n % agents.len()].as_str()).collect();
                let body = json!({ "verb": agent::VERB, "args": {}, "targets": targets });
                let t0 = Instant::now();
                match api.submit(&body).await {
                    Ok(_) => posts.lock().await.push(t0.elapsed()),
                    Err(error) => {
                        submitted.fetch_sub(batch as u64, Ordering::Relaxed);
                        failures.record(&error);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    let warm_up = duration / 5;
    tokio::time::sleep_until(start + warm_up).await;
    let (t1, c1) = (Instant::now(), Probe::read(&probe.results_stored));
    tokio::time::sleep_until(end).await;
    let (t2, c2) = (Instant::now(), Probe::read(&probe.results_stored));
    let until = deadline.within(DRAIN);
    while let Ok(Some(_)) = tokio::time::timeout_at(until, tasks.join_next()).await {}
    let total = submitted.load(Ordering::Relaxed);
    while Probe::read(&probe.results_stored) - stored_at_start < total && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    probe.clear();
    let window = t2 - t1;
    let completed = c2 - c1;
    let (errors, first_error) = failures.read();
    let post = Summary::of(std::mem::take(&mut *posts.lock().await));
    Ok(SustainedFigures {
        batch,
        outstanding,
        window,
        completed,
        per_second: completed as f64 / window.as_secs_f64().max(1e-9),
        submitted: total,
        errors,
        first_error,
        post,
    })
}

/// What the telemetry phase measured.
#[derive(Clone, Debug, Default)]
pub struct TelemetryFigures {
    /// Agents sending.
    pub agents: usize,
    /// Samples per batch.
    pub batch: usize,
    /// The measured window (the phase minus its first fifth).
    pub window: Duration,
    /// Samples in batches acknowledged (durable) within the window.
    pub samples: u64,
    /// `samples` per second.
    pub per_second: f64,
    /// Batches acknowledged within the window.
    pub batches: u64,
}

/// Tells the first `agents` agents to send telemetry batches of `batch` samples, each with
/// one batch in flight, for `duration`; counts the samples in batches the host acknowledged
/// (it does so after storing them) over the phase after its first fifth.
pub async fn telemetry(
    orders: &watch::Sender<Orders>,
    probe: &Probe,
    agents: usize,
    batch: usize,
    duration: Duration,
    deadline: Deadline,
) -> Result<TelemetryFigures, LoadgenError> {
    let start = tokio::time::Instant::now();
    if start + duration > deadline.instant() {
        return Err(deadline.expired("telemetry", "not enough time left to start".into()));
    }
    orders.send_modify(|o| o.telemetry = Some(TelemetryOrder { agents, samples: batch }));
    tokio::time::sleep_until(start + duration / 5).await;
    let (t1, s1, b1) = (Instant::now(), Probe::read(&probe.telemetry_samples), Probe::read(&probe.telemetry_batches));
    tokio::time::sleep_until(start + duration).await;
    let (t2, s2, b2) = (Instant::now(), Probe::read(&probe.telemetry_samples), Probe::read(&probe.telemetry_batches));
    orders.send_modify(|o| o.telemetry = None);
    // Let the batches in flight be acknowledged, so the next phase starts from a quiet host.
    let until = deadline.within(DRAIN);
    let mut previous = Probe::read(&probe.telemetry_batches);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Probe::read(&probe.telemetry_batches);
        if now == previous || tokio::time::Instant::now() >= until {
            break;
        }
        previous = now;
    }
    let window = t2 - t1;
    Ok(TelemetryFigures {
        agents,
        batch,
        window,
        samples: s2 - s1,
        per_second: (s2 - s1) as f64 / window.as_secs_f64().max(1e-9),
        batches: b2 - b1,
    })
}
