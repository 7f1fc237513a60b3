//! The figures of one run, printed beside the design's targets, and as JSON: the first
//! store's host in full, every store's side by side.

use std::fmt;
use std::time::Duration;

use serde_json::{Value, json};

use super::echo::EchoFigures;
use super::phases::{BroadcastFigures, ConnectFigures, RoundTripFigures, SustainedFigures, TelemetryFigures};
use super::process::LogCounts;
use super::stats::ms;
use super::store::StoreKind;
use super::system::{FileLimit, Memory, PhaseCpu};

/// A phase's figures, or why it failed (its error as text).
pub type Outcome<T> = Result<T, String>;

/// The fleet size the connection, memory and broadcast targets are stated for.
pub const TARGET_AGENTS: usize = 10_000;

/// The host's memory around the connection phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostMemory {
    /// With no agent connected.
    pub idle: Memory,
    /// With every agent connected and idle.
    pub connected: Memory,
    /// The most resident over the whole run (VmHWM before the host stopped).
    pub peak: u64,
}

impl HostMemory {
    /// Bytes per connection: the growth of VmRSS divided by the connections.
    pub fn per_connection(&self, connections: usize) -> f64 {
        self.connected.rss.saturating_sub(self.idle.rss) as f64 / connections.max(1) as f64
    }
}

/// What one host measured, on one store: the phases from connecting the fleet to telemetry.
#[derive(Clone, Debug)]
pub struct HostRun {
    /// The host child's open-file limit.
    pub host_files: FileLimit,
    /// How the fleet connected.
    pub connect: ConnectFigures,
    /// The host's memory.
    pub host_memory: HostMemory,
    /// Broadcast to all.
    pub broadcast: Outcome<BroadcastFigures>,
    /// Round trips at a fixed rate.
    pub round_trip: Outcome<RoundTripFigures>,
    /// Sustained throughput.
    pub sustained: Outcome<SustainedFigures>,
    /// Telemetry ingestion.
    pub telemetry: Outcome<TelemetryFigures>,
    /// Warnings and errors the host logged.
    pub host_log: LogCounts,
    /// Whether the host stopped by itself on SIGTERM.
    pub host_stopped_cleanly: bool,
    /// The load generator's own resident memory with the fleet connected.
    pub loadgen_rss: u64,
    /// Messages from the host the agents refused (should be 0).
    pub violations: u64,
    /// Sessions that ended before the run told the agents to stop (should be 0).
    pub lost: u64,
    /// CPU time per phase: the host's and the load generator's.
    pub cpu: Vec<PhaseCpu>,
}

/// What became of the host on one store.
#[derive(Clone, Debug)]
pub enum HostOutcome {
    /// It ran every phase (each phase may still have failed).
    Ran(Box<HostRun>),
    /// It did not run, and why (no Postgres on this machine).
    Skipped(String),
    /// It could not be set up (started, enrolled, connected to), and why.
    Failed(String),
}

/// One store of `--stores` and its host.
#[derive(Clone, Debug)]
pub struct StoreRun {
    /// The store.
    pub store: StoreKind,
    /// What it promises and where it is (its durability settings; never its URL).
    pub settings: String,
    /// The host's figures.
    pub host: HostOutcome,
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Agents asked for.
    pub agents: usize,
    /// Cores of the machine.
    pub cores: usize,
    /// The load generator's open-file limit.
    pub loadgen_files: FileLimit,
    /// A host per store, in the order of `--stores`; the targets are judged on the first.
    pub stores: Vec<StoreRun>,
    /// The echo baseline.
    pub echo: Outcome<EchoFigures>,
    /// Load averages (1, 5, 15 min) when the run started and when it ended.
    pub load: (String, String),
}

/// The overhead of our stack over the bare transport, each a ratio of like to like measured
/// in the same run (ours divided by the echo baseline's).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overhead {
    /// Connecting the whole fleet (TLS, upgrade and HELLO/WELCOME) vs TLS and upgrade alone.
    pub connect: Option<f64>,
    /// Host memory per connection vs the echo server's.
    pub memory: Option<f64>,
    /// Median command round trip vs median echo round trip, same rate.
    pub round_trip_p50: Option<f64>,
    /// 99th percentile of both.
    pub round_trip_p99: Option<f64>,
    /// Median of COMMAND-at-agent to RESULT_ACK (one message each way plus a durable write)
    /// vs median echo round trip.
    pub result_p50: Option<f64>,
    /// Median command round trip (two durable writes in series: the command before the 202,
    /// its result before the RESULT_ACK) vs median journaled echo of two legs.
    pub durable_round_trip_p50: Option<f64>,
    /// 99th percentile of both.
    pub durable_round_trip_p99: Option<f64>,
    /// Median of COMMAND-at-agent to RESULT_ACK vs median journaled echo of one leg.
    pub durable_result_p50: Option<f64>,
    /// 99th percentile of both.
    pub durable_result_p99: Option<f64>,
}

fn ratio(ours: f64, bare: f64) -> Option<f64> {
    (bare > 0.0 && ours.is_finite()).then(|| ours / bare)
}

impl HostRun {
    /// Whether any of its phases failed.
    pub fn failed(&self) -> bool {
        self.broadcast.is_err() || self.round_trip.is_err() || self.sustained.is_err() || self.telemetry.is_err()
    }

    /// Its figures as JSON object members (durations in milliseconds, memory in bytes).
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let outcome = |o: Result<Value, &String>| match o {
            Ok(v) => v,
            Err(e) => json!({ "error": e }),
        };
        let value = json!({
            "host_nofile": { "soft": self.host_files.soft, "hard": self.host_files.hard },
            "connect": {
                "connected": self.connect.connected,
                "wall_ms": ms(self.connect.wall),
                "setup": self.connect.setup.to_json(),
                "retries": self.connect.retries,
            },
            "host_memory": {
                "idle_rss": self.host_memory.idle.rss,
                "connected_rss": self.host_memory.connected.rss,
                "per_connection": self.host_memory.per_connection(self.connect.connected),
                "peak_rss": self.host_memory.peak,
            },
            "broadcast": outcome(self.broadcast.as_ref().map(|b| json!({
                "commands": b.commands,
                "accepted_ms": ms(b.accepted),
                "last_arrival_ms": ms(b.last_arrival),
                "all_stored_ms": ms(b.all_stored),
                "verified": b.verified,
            }))),
            "round_trip": outcome(self.round_trip.as_ref().map(|r| json!({
                "rate": r.rate,
                "due": r.due,
                "completed": r.completed,
                "errors": r.errors,
                "first_error": r.first_error,
                "round_trip": r.round_trip.to_json(),
                "accepted": r.accepted.to_json(),
                "late": r.late.to_json(),
                "delivered": r.delivered.to_json(),
                "result_stored": r.result_stored.to_json(),
                "host_result_store_mean_ms": r.host_result_store.map(ms),
                "host_job_store_mean_ms": r.host_job_store.map(ms),
                "host_round_trip_mean_ms": r.host_round_trip.map(ms),
            }))),
            "sustained": outcome(self.sustained.as_ref().map(|s| json!({
                "batch": s.batch,
                "outstanding": s.outstanding,
                "window_ms": ms(s.window),
                "completed": s.completed,
                "per_second": s.per_second,
                "submitted": s.submitted,
                "errors": s.errors,
                "first_error": s.first_error,
                "post": s.post.to_json(),
            }))),
            "telemetry": outcome(self.telemetry.as_ref().map(|t| json!({
                "agents": t.agents,
                "batch": t.batch,
                "window_ms": ms(t.window),
                "samples": t.samples,
                "batches": t.batches,
                "per_second": t.per_second,
            }))),
            "host_log": {
                "bytes": self.host_log.bytes,
                "lines": self.host_log.lines,
                "warnings": self.host_log.warnings,
                "errors": self.host_log.errors,
                "first_error": self.host_log.first_error,
            },
            "host_stopped_cleanly": self.host_stopped_cleanly,
            "loadgen_rss": self.loadgen_rss,
            "violations": self.violations,
            "lost": self.lost,
            "cpu": cpu_json(&self.cpu),
        });
        match value {
            Value::Object(members) => members,
            _ => serde_json::Map::new(),
        }
    }

    /// Host CPU time in `phase`, if it was measured.
    fn cpu_in(&self, phase: &str) -> Option<Duration> {
        self.cpu.iter().find(|c| c.phase == phase).map(|c| c.server)
    }

    /// CPU time of the store's own server in `phase`, if it was measured.
    fn store_cpu_in(&self, phase: &str) -> Option<Duration> {
        self.cpu.iter().find(|c| c.phase == phase).and_then(|c| c.store)
    }
}

fn cpu_json<'a>(cpu: impl IntoIterator<Item = &'a PhaseCpu>) -> Vec<Value> {
    cpu.into_iter()
        .map(|c| {
            json!({
                "phase": c.phase,
                "wall_ms": ms(c.wall),
                "server_ms": ms(c.server),
                "store_ms": c.store.map(ms),
                "loadgen_ms": ms(c.loadgen),
            })
        })
        .collect()
}

impl Report {
    /// The first store's host, when it ran: the one the targets are judged on.
    pub fn first(&self) -> Option<&HostRun> {
        match self.stores.first().map(|s| &s.host) {
            Some(HostOutcome::Ran(host)) => Some(host),
            _ => None,
        }
    }

    /// Whether any host could not be set up, any phase failed, or the echo baseline failed. A
    /// store skipped for want of Postgres is not a failure.
    pub fn failed(&self) -> bool {
        self.stores.iter().any(|s| match &s.host {
            HostOutcome::Ran(host) => host.failed(),
            HostOutcome::Skipped(_) => false,
            HostOutcome::Failed(_) => true,
        }) || self.echo.as_ref().is_err_and(|e| e != SKIPPED)
    }

    /// The overhead ratios that both the first store's host and the echo measured.
    pub fn overhead(&self) -> Overhead {
        let (Some(host), Ok(echo)) = (self.first(), &self.echo) else { return Overhead::default() };
        let rtt = host.round_trip.as_ref().ok();
        Overhead {
            connect: ratio(host.connect.wall.as_secs_f64(), echo.connect_wall.as_secs_f64()),
            memory: ratio(host.host_memory.per_connection(host.connect.connected), echo.per_connection),
            round_trip_p50: rtt.and_then(|r| ratio(ms(r.round_trip.p50), ms(echo.round_trip.p50))),
            round_trip_p99: rtt.and_then(|r| ratio(ms(r.round_trip.p99), ms(echo.round_trip.p99))),
            result_p50: rtt.and_then(|r| ratio(ms(r.result_stored.p50), ms(echo.round_trip.p50))),
            durable_round_trip_p50: rtt.and_then(|r| ratio(ms(r.round_trip.p50), ms(echo.journaled_twice.p50))),
            durable_round_trip_p99: rtt.and_then(|r| ratio(ms(r.round_trip.p99), ms(echo.journaled_twice.p99))),
            durable_result_p50: rtt.and_then(|r| ratio(ms(r.result_stored.p50), ms(echo.journaled_once.p50))),
            durable_result_p99: rtt.and_then(|r| ratio(ms(r.result_stored.p99), ms(echo.journaled_once.p99))),
        }
    }

    /// The report as JSON (durations in milliseconds, memory in bytes): the first store's
    /// host's figures at the top level (with the echo's CPU phases after its own in `cpu`),
    /// and every store's in `stores`.
    pub fn to_json(&self) -> Value {
        let overhead = self.overhead();
        let mut report = json!({
            "agents": self.agents,
            "cores": self.cores,
            "loadgen_nofile": { "soft": self.loadgen_files.soft, "hard": self.loadgen_files.hard },
            "echo": match &self.echo {
                Ok(e) => json!({
                    "connected": e.connected,
                    "connect_wall_ms": ms(e.connect_wall),
                    "setup": e.setup.to_json(),
                    "idle_rss": e.idle_rss,
                    "connected_rss": e.connected_rss,
                    "per_connection": e.per_connection,
                    "rate": e.rate,
                    "sent": e.sent,
                    "round_trip": e.round_trip.to_json(),
                    "journaled_sent": e.journaled_sent,
                    "journaled_once": e.journaled_once.to_json(),
                    "journaled_twice": e.journaled_twice.to_json(),
                    "late": e.late.to_json(),
                }),
                Err(e) => json!({ "error": e }),
            },
            "overhead": {
                "connect": overhead.connect,
                "memory": overhead.memory,
                "round_trip_p50": overhead.round_trip_p50,
                "round_trip_p99": overhead.round_trip_p99,
                "result_p50": overhead.result_p50,
                "durable_round_trip_p50": overhead.durable_round_trip_p50,
                "durable_round_trip_p99": overhead.durable_round_trip_p99,
                "durable_result_p50": overhead.durable_result_p50,
                "durable_result_p99": overhead.durable_result_p99,
            },
            "load_average": { "start": self.load.0, "end": self.load.1 },
            "stores": self.stores.iter().map(|s| {
                let mut members = match &s.host {
                    HostOutcome::Ran(host) => host.to_json(),
                    HostOutcome::Skipped(reason) => [("skipped".to_owned(), json!(reason))].into_iter().collect(),
                    HostOutcome::Failed(reason) => [("error".to_owned(), json!(reason))].into_iter().collect(),
                };
                members.insert("store".into(), json!(s.store.as_str()));
                members.insert("settings".into(), json!(s.settings));
                Value::Object(members)
            }).collect::<Vec<_>>(),
        });
        if let (Some(host), Value::Object(top)) = (self.first(), &mut report) {
            top.extend(host.to_json());
            let echo_cpu = self.echo.as_ref().map(|e| e.cpu.as_slice()).unwrap_or_default();
            top.insert("cpu".into(), Value::Array(cpu_json(host.cpu.iter().chain(echo_cpu))));
        }
        report
    }

    fn at_scale(&self) -> bool {
        self.agents >= TARGET_AGENTS
    }

    fn verdict(&self, met: bool) -> &'static str {
        match (met, self.at_scale()) {
            (true, true) => "met",
            (false, true) => "NOT MET",
            (true, false) => "met at this scale",
            (false, false) => "NOT MET at this scale",
        }
    }
}

/// The text an echo outcome holds when `--skip-echo` was given.
pub const SKIPPED: &str = "skipped (--skip-echo)";

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn kib(bytes: f64) -> f64 {
    bytes / 1024.0
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn times(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "n/a".into())
}

impl Report {
    /// Phases 1 to 6 of `h`, with the verdicts.
    fn write_phases(&self, f: &mut fmt::Formatter<'_>, h: &HostRun) -> fmt::Result {
        let c = &h.connect;
        writeln!(
            f,
            "1. connections: {} of {} connected in {:.2} s ({:.0}/s), {} lost before the end; \
             per connection {}; retries {} [{}]",
            c.connected,
            self.agents,
            secs(c.wall),
            c.connected as f64 / secs(c.wall).max(1e-9),
            h.lost,
            c.setup,
            c.retries,
            self.verdict(c.connected == self.agents && h.lost == 0)
        )?;
        let m = &h.host_memory;
        let per = m.per_connection(c.connected);
        writeln!(
            f,
            "2. host memory: VmRSS {:.1} MiB idle, {:.1} MiB connected: {:.1} KiB per connection \
             (target ≤ 64 KiB) [{}]; peak over the run {:.1} MiB; load generator {:.1} MiB",
            mib(m.idle.rss),
            mib(m.connected.rss),
            kib(per),
            self.verdict(per <= 64.0 * 1024.0),
            mib(m.peak),
            mib(h.loadgen_rss)
        )?;
        match &h.broadcast {
            Ok(b) => writeln!(
                f,
                "3. broadcast: {} commands; 202 after {:.1} ms, last COMMAND delivered at {:.1} ms, \
                 every result stored at {:.1} ms (target < 1 s) [{}]; {} results read back from the store",
                b.commands,
                ms(b.accepted),
                ms(b.last_arrival),
                ms(b.all_stored),
                self.verdict(b.all_stored < Duration::from_secs(1) && b.commands == c.connected),
                b.verified
            )?,
            Err(e) => writeln!(f, "3. broadcast: FAILED: {e}")?,
        }
        match &h.round_trip {
            Ok(r) => {
                writeln!(
                    f,
                    "4. round trip at {}/s: {} of {} completed, {} POST errors{}",
                    r.rate,
                    r.completed,
                    r.due,
                    r.errors,
                    r.first_error.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default()
                )?;
                writeln!(
                    f,
                    "   POST due → RESULT_ACK at agent: {} (target p99 < 5 ms) [{}]",
                    r.round_trip,
                    self.verdict(r.round_trip.p99 < Duration::from_millis(5) && r.completed == r.due)
                )?;
                writeln!(f, "   POST due → 202 (command durable): {}", r.accepted)?;
                writeln!(f, "   POST due → COMMAND at agent:      {}", r.delivered)?;
                writeln!(f, "   COMMAND → RESULT_ACK at agent:    {}", r.result_stored)?;
                writeln!(f, "   POST due → sent (our own lateness): {}", r.late)?;
                let mean = |d: Option<Duration>| d.map(|d| format!("{:.2} ms", ms(d))).unwrap_or_else(|| "n/a".into());
                writeln!(
                    f,
                    "   the host's own means: storing a job {}, a batch of results {}, command sent → its result received {}",
                    mean(r.host_job_store),
                    mean(r.host_result_store),
                    mean(r.host_round_trip)
                )?;
            }
            Err(e) => writeln!(f, "4. round trip: FAILED: {e}")?,
        }
        match &h.sustained {
            Ok(s) => writeln!(
                f,
                "5. sustained: {:.0} commands/s with results durable ({} in {:.2} s; batches of {}, \
                 ≤ {} outstanding; {} submitted, {} POST errors{}; POST {}) (target ≥ 10,000/s) [{}]",
                s.per_second,
                s.completed,
                secs(s.window),
                s.batch,
                s.outstanding,
                s.submitted,
                s.errors,
                s.first_error.as_ref().map(|e| format!(", first: {e}")).unwrap_or_default(),
                s.post,
                self.verdict(s.per_second >= 10_000.0)
            )?,
            Err(e) => writeln!(f, "5. sustained: FAILED: {e}")?,
        }
        match &h.telemetry {
            Ok(t) => writeln!(
                f,
                "6. telemetry: {:.0} samples/s persisted ({} samples in {} batches over {:.2} s; {} agents, \
                 batches of {}) (target ≥ 100,000/s) [{}]",
                t.per_second,
                t.samples,
                t.batches,
                secs(t.window),
                t.agents,
                t.batch,
                self.verdict(t.per_second >= 100_000.0)
            )?,
            Err(e) => writeln!(f, "6. telemetry: FAILED: {e}")?,
        }
        Ok(())
    }

    /// One column per store: the main figures of every host, side by side.
    fn write_side_by_side(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        type Row = (&'static str, fn(&HostRun) -> String);
        fn cell<T>(outcome: &Outcome<T>, show: impl Fn(&T) -> String) -> String {
            outcome.as_ref().map(show).unwrap_or_else(|_| "FAILED".into())
        }
        let rows: [Row; 15] = [
            ("connect the fleet, s", |h| format!("{:.2}", secs(h.connect.wall))),
            ("host memory per connection, KiB", |h| {
                format!("{:.1}", kib(h.host_memory.per_connection(h.connect.connected)))
            }),
            ("broadcast: every result stored, ms", |h| cell(&h.broadcast, |b| format!("{:.0}", ms(b.all_stored)))),
            ("round trip p50 / p99, ms", |h| {
                cell(&h.round_trip, |r| format!("{:.1} / {:.1}", ms(r.round_trip.p50), ms(r.round_trip.p99)))
            }),
            ("  POST due → 202 p50, ms", |h| cell(&h.round_trip, |r| format!("{:.1}", ms(r.accepted.p50)))),
            ("  COMMAND → RESULT_ACK p50, ms", |h| {
                cell(&h.round_trip, |r| format!("{:.1}", ms(r.result_stored.p50)))
            }),
            ("  host's mean result store, ms", |h| {
                cell(&h.round_trip, |r| {
                    r.host_result_store.map(|d| format!("{:.2}", ms(d))).unwrap_or_else(|| "n/a".into())
                })
            }),
            ("sustained commands/s, durable", |h| cell(&h.sustained, |s| format!("{:.0}", s.per_second))),
            ("  POST of a batch p50, ms", |h| cell(&h.sustained, |s| format!("{:.0}", ms(s.post.p50)))),
            ("  host CPU per command, µs", |h| {
                cell(&h.sustained, |s| {
                    h.cpu_in("sustained")
                        .map(|cpu| format!("{:.0}", cpu.as_secs_f64() * 1e6 / s.submitted.max(1) as f64))
                        .unwrap_or_else(|| "n/a".into())
                })
            }),
            ("  store server CPU per command, µs", |h| {
                cell(&h.sustained, |s| {
                    h.store_cpu_in("sustained")
                        .map(|cpu| format!("{:.0}", cpu.as_secs_f64() * 1e6 / s.submitted.max(1) as f64))
                        .unwrap_or_else(|| "in the host".into())
                })
            }),
            ("telemetry samples/s, persisted", |h| cell(&h.telemetry, |t| format!("{:.0}", t.per_second))),
            ("  host / store server CPU, s", |h| {
                let store = h.store_cpu_in("telemetry").map(|d| format!("{:.2}", secs(d)));
                let host = h.cpu_in("telemetry").map(|d| format!("{:.2}", secs(d)));
                format!("{} / {}", host.unwrap_or_else(|| "n/a".into()), store.unwrap_or_else(|| "-".into()))
            }),
            ("host log warnings / errors", |h| format!("{} / {}", h.host_log.warnings, h.host_log.errors)),
            ("stopped cleanly on SIGTERM", |h| h.host_stopped_cleanly.to_string()),
        ];
        writeln!(f, "Side by side, one host per store, the same fleet and phases:")?;
        write!(f, "  {:<36}", "")?;
        for store in &self.stores {
            write!(f, " {:>18}", store.store.as_str())?;
        }
        writeln!(f)?;
        for (name, show) in rows {
            write!(f, "  {name:<36}")?;
            for store in &self.stores {
                let value = match &store.host {
                    HostOutcome::Ran(host) => show(host),
                    HostOutcome::Skipped(_) => "skipped".into(),
                    HostOutcome::Failed(_) => "FAILED".into(),
                };
                write!(f, " {value:>18}")?;
            }
            writeln!(f)?;
        }
        for store in &self.stores {
            let name = store.store;
            match &store.host {
                HostOutcome::Ran(host) => {
                    let phases = [
                        ("broadcast", host.broadcast.as_ref().err()),
                        ("round trip", host.round_trip.as_ref().err()),
                        ("sustained", host.sustained.as_ref().err()),
                        ("telemetry", host.telemetry.as_ref().err()),
                    ];
                    for (phase, error) in phases {
                        if let Some(error) = error {
                            writeln!(f, "  {name} {phase}: FAILED: {error}")?;
                        }
                    }
                    if let Some(error) = &host.host_log.first_error {
                        writeln!(f, "  {name}: first host error: {error}")?;
                    }
                }
                HostOutcome::Skipped(reason) => writeln!(f, "  {name}: skipped: {reason}")?,
                HostOutcome::Failed(reason) => writeln!(f, "  {name}: FAILED: {reason}")?,
            }
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "viworks-loadgen: {} agents, {} cores, load average {} at the start, {} at the end",
            self.agents, self.cores, self.load.0, self.load.1
        )?;
        write!(f, "open-file limits: load generator {}/{}", self.loadgen_files.soft, self.loadgen_files.hard)?;
        match self.first() {
            Some(h) => writeln!(f, ", host {}/{} (soft/hard)", h.host_files.soft, h.host_files.hard)?,
            None => writeln!(f, " (soft/hard)")?,
        }
        for store in &self.stores {
            writeln!(f, "store {}: {}", store.store, store.settings)?;
        }
        if !self.at_scale() {
            writeln!(f, "(the targets are stated for {TARGET_AGENTS} agents; verdicts below are at this scale)")?;
        }
        if self.stores.len() > 1 {
            let first = self.stores.first().map(|s| s.store.as_str()).unwrap_or_default();
            writeln!(f, "(1 to 6, the verdicts and the CPU table are the {first} host's; every store's at the end)")?;
        }
        writeln!(f)?;
        match self.stores.first().map(|s| (s.store, &s.host)) {
            Some((_, HostOutcome::Ran(h))) => self.write_phases(f, h)?,
            Some((store, HostOutcome::Skipped(reason))) => writeln!(f, "1-6. the host on {store}: skipped: {reason}")?,
            Some((store, HostOutcome::Failed(reason))) => writeln!(f, "1-6. the host on {store}: FAILED: {reason}")?,
            None => {}
        }
        match &self.echo {
            Ok(e) => {
                writeln!(
                    f,
                    "7. baseline (bare TLS WebSocket echo): {} connected in {:.2} s; per connection {}",
                    e.connected,
                    secs(e.connect_wall),
                    e.setup
                )?;
                writeln!(
                    f,
                    "   echo server VmRSS {:.1} MiB idle, {:.1} MiB connected: {:.1} KiB per connection",
                    mib(e.idle_rss),
                    mib(e.connected_rss),
                    kib(e.per_connection)
                )?;
                writeln!(f, "   echo round trip at {}/s ({} sent): {}", e.rate, e.sent, e.round_trip)?;
                writeln!(
                    f,
                    "   journaled echo at {}/s ({} sent; each message written to SQLite, WAL, synchronous=FULL, \
                     before its echo):",
                    e.rate, e.journaled_sent
                )?;
                writeln!(f, "     one write:             {}", e.journaled_once)?;
                writeln!(f, "     two writes in series:  {}", e.journaled_twice)?;
                writeln!(f, "   due → sent (the echo's own lateness): {}", e.late)?;
                let o = self.overhead();
                // One line per ratio, its label padded to `width`, and its verdict.
                let ratios = |f: &mut fmt::Formatter<'_>, width: usize, rows: &[(&str, Option<f64>)]| {
                    for &(what, r) in rows {
                        let within = r.map(|r| if r <= 1.5 { "≤ 1.5×" } else { "> 1.5×" }).unwrap_or("n/a");
                        writeln!(f, "     {what:<width$} {} ({within})", times(r))?;
                    }
                    Ok::<_, fmt::Error>(())
                };
                writeln!(f, "   overhead of ViWorkS over the bare transport (target ≤ 1.5×):")?;
                ratios(
                    f,
                    29,
                    &[
                        ("connect the fleet:", o.connect),
                        ("memory per connection:", o.memory),
                        ("round trip p50:", o.round_trip_p50),
                        ("round trip p99:", o.round_trip_p99),
                        ("COMMAND→RESULT_ACK p50 vs echo:", o.result_p50),
                    ],
                )?;
                writeln!(f, "   the same against the journaled echo (as many durable writes in series as ours):")?;
                ratios(
                    f,
                    30,
                    &[
                        ("round trip p50 vs two writes:", o.durable_round_trip_p50),
                        ("round trip p99 vs two writes:", o.durable_round_trip_p99),
                        ("COMMAND→RESULT_ACK p50 vs one:", o.durable_result_p50),
                        ("COMMAND→RESULT_ACK p99 vs one:", o.durable_result_p99),
                    ],
                )?;
            }
            Err(e) => writeln!(f, "7. baseline: {e}")?,
        }
        writeln!(f)?;
        writeln!(f, "CPU time per phase (the machine has {} cores):", self.cores)?;
        writeln!(f, "  {:<18} {:>9} {:>22} {:>16}", "phase", "wall s", "host / echo server s", "load generator s")?;
        let echo_cpu = self.echo.as_ref().map(|e| e.cpu.as_slice()).unwrap_or_default();
        let host_cpu = self.first().map(|h| h.cpu.as_slice()).unwrap_or_default();
        for c in host_cpu.iter().chain(echo_cpu) {
            writeln!(f, "  {:<18} {:>9.2} {:>22.2} {:>16.2}", c.phase, secs(c.wall), secs(c.server), secs(c.loadgen))?;
        }
        if let Some(h) = self.first() {
            if let (Some(cpu), Ok(r)) = (h.cpu_in("round trips"), &h.round_trip) {
                let per = cpu.as_secs_f64() * 1e6 / r.completed.max(1) as f64;
                writeln!(f, "  host CPU per command at {}/s (POST included): {per:.0} µs", r.rate)?;
            }
            if let (Some(cpu), Ok(s)) = (h.cpu_in("sustained"), &h.sustained) {
                let per = cpu.as_secs_f64() * 1e6 / s.submitted.max(1) as f64;
                writeln!(f, "  host CPU per command, sustained (batches of {}): {per:.0} µs", s.batch)?;
            }
            if let Some(cpu) = h.cpu_in("connect") {
                let per = cpu.as_secs_f64() * 1e6 / h.connect.connected.max(1) as f64;
                writeln!(f, "  host CPU per connection set up: {per:.0} µs")?;
            }
            writeln!(f)?;
            writeln!(
                f,
                "host log: {:.1} MiB in {} lines, {} warnings, {} errors; stopped cleanly on SIGTERM: {}; \
                 messages refused by agents: {}",
                mib(h.host_log.bytes),
                h.host_log.lines,
                h.host_log.warnings,
                h.host_log.errors,
                h.host_stopped_cleanly,
                h.violations
            )?;
            if let Some(error) = &h.host_log.first_error {
                writeln!(f, "first host error: {error}")?;
            }
        }
        if self.stores.len() > 1 {
            writeln!(f)?;
            self.write_side_by_side(f)?;
        }
        Ok(())
    }
}
