//! The figures of one run, printed beside the design's targets, and as JSON.

use std::fmt;
use std::time::Duration;

use serde_json::{Value, json};

use super::echo::EchoFigures;
use super::phases::{BroadcastFigures, ConnectFigures, RoundTripFigures, SustainedFigures, TelemetryFigures};
use super::process::LogCounts;
use super::stats::ms;
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

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Agents asked for.
    pub agents: usize,
    /// Cores of the machine.
    pub cores: usize,
    /// The load generator's open-file limit.
    pub loadgen_files: FileLimit,
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
    /// The echo baseline.
    pub echo: Outcome<EchoFigures>,
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
    /// Load averages (1, 5, 15 min) when the run started and when it ended.
    pub load: (String, String),
    /// CPU time per phase: the host's (the echo server's in the baseline) and the load
    /// generator's.
    pub cpu: Vec<PhaseCpu>,
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
}

fn ratio(ours: f64, bare: f64) -> Option<f64> {
    (bare > 0.0 && ours.is_finite()).then(|| ours / bare)
}

impl Report {
    /// Whether any phase failed.
    pub fn failed(&self) -> bool {
        self.broadcast.is_err()
            || self.round_trip.is_err()
            || self.sustained.is_err()
            || self.telemetry.is_err()
            || self.echo.as_ref().is_err_and(|e| e != SKIPPED)
    }

    /// The overhead ratios that both sides measured.
    pub fn overhead(&self) -> Overhead {
        let Ok(echo) = &self.echo else { return Overhead::default() };
        let rtt = self.round_trip.as_ref().ok();
        Overhead {
            connect: ratio(self.connect.wall.as_secs_f64(), echo.connect_wall.as_secs_f64()),
            memory: ratio(self.host_memory.per_connection(self.connect.connected), echo.per_connection),
            round_trip_p50: rtt.and_then(|r| ratio(ms(r.round_trip.p50), ms(echo.round_trip.p50))),
            round_trip_p99: rtt.and_then(|r| ratio(ms(r.round_trip.p99), ms(echo.round_trip.p99))),
            result_p50: rtt.and_then(|r| ratio(ms(r.result_stored.p50), ms(echo.round_trip.p50))),
        }
    }

    /// The report as JSON (durations in milliseconds, memory in bytes).
    pub fn to_json(&self) -> Value {
        let outcome = |o: Result<Value, &String>| match o {
            Ok(v) => v,
            Err(e) => json!({ "error": e }),
        };
        let overhead = self.overhead();
        json!({
            "agents": self.agents,
            "cores": self.cores,
            "loadgen_nofile": { "soft": self.loadgen_files.soft, "hard": self.loadgen_files.hard },
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
                "delivered": r.delivered.to_json(),
                "result_stored": r.result_stored.to_json(),
                "host_result_store_mean_ms": r.host_result_store.map(ms),
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
            "echo": outcome(self.echo.as_ref().map(|e| json!({
                "connected": e.connected,
                "connect_wall_ms": ms(e.connect_wall),
                "setup": e.setup.to_json(),
                "idle_rss": e.idle_rss,
                "connected_rss": e.connected_rss,
                "per_connection": e.per_connection,
                "rate": e.rate,
                "sent": e.sent,
                "round_trip": e.round_trip.to_json(),
            }))),
            "overhead": {
                "connect": overhead.connect,
                "memory": overhead.memory,
                "round_trip_p50": overhead.round_trip_p50,
                "round_trip_p99": overhead.round_trip_p99,
                "result_p50": overhead.result_p50,
            },
            "host_log": {
                "bytes": self.host_log.bytes,
                "lines": self.host_log.lines,
                "warnings": self.host_log.warnings,
                "errors": self.host_log.errors,
                "first_error": self.host_log.first_error,
            },
            "load_average": { "start": self.load.0, "end": self.load.1 },
            "host_stopped_cleanly": self.host_stopped_cleanly,
            "loadgen_rss": self.loadgen_rss,
            "violations": self.violations,
            "lost": self.lost,
            "cpu": self.cpu.iter().map(|c| json!({
                "phase": c.phase,
                "wall_ms": ms(c.wall),
                "server_ms": ms(c.server),
                "loadgen_ms": ms(c.loadgen),
            })).collect::<Vec<_>>(),
        })
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

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "viworks-loadgen: {} agents, {} cores, load average {} at the start, {} at the end",
            self.agents, self.cores, self.load.0, self.load.1
        )?;
        writeln!(
            f,
            "open-file limits: load generator {}/{}, host {}/{} (soft/hard)",
            self.loadgen_files.soft, self.loadgen_files.hard, self.host_files.soft, self.host_files.hard
        )?;
        if !self.at_scale() {
            writeln!(f, "(the targets are stated for {TARGET_AGENTS} agents; verdicts below are at this scale)")?;
        }
        writeln!(f)?;
        let c = &self.connect;
        writeln!(
            f,
            "1. connections: {} of {} connected in {:.2} s ({:.0}/s), {} lost before the end; \
             per connection {}; retries {} [{}]",
            c.connected,
            self.agents,
            secs(c.wall),
            c.connected as f64 / secs(c.wall).max(1e-9),
            self.lost,
            c.setup,
            c.retries,
            self.verdict(c.connected == self.agents && self.lost == 0)
        )?;
        let m = &self.host_memory;
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
            mib(self.loadgen_rss)
        )?;
        match &self.broadcast {
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
        match &self.round_trip {
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
                let mean = |d: Option<Duration>| d.map(|d| format!("{:.2} ms", ms(d))).unwrap_or_else(|| "n/a".into());
                writeln!(
                    f,
                    "   the host's own means: storing a batch of results {}, command sent → its result received {}",
                    mean(r.host_result_store),
                    mean(r.host_round_trip)
                )?;
            }
            Err(e) => writeln!(f, "4. round trip: FAILED: {e}")?,
        }
        match &self.sustained {
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
        match &self.telemetry {
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
                let o = self.overhead();
                let within = |r: Option<f64>| r.map(|r| if r <= 1.5 { "≤ 1.5×" } else { "> 1.5×" }).unwrap_or("n/a");
                writeln!(f, "   overhead of ViWorkS over the bare transport (target ≤ 1.5×):")?;
                writeln!(f, "     connect the fleet:            {} ({})", times(o.connect), within(o.connect))?;
                writeln!(f, "     memory per connection:        {} ({})", times(o.memory), within(o.memory))?;
                writeln!(
                    f,
                    "     round trip p50:               {} ({})",
                    times(o.round_trip_p50),
                    within(o.round_trip_p50)
                )?;
                writeln!(
                    f,
                    "     round trip p99:               {} ({})",
                    times(o.round_trip_p99),
                    within(o.round_trip_p99)
                )?;
                writeln!(f, "     COMMAND→RESULT_ACK p50 vs echo: {} ({})", times(o.result_p50), within(o.result_p50))?;
            }
            Err(e) => writeln!(f, "7. baseline: {e}")?,
        }
        writeln!(f)?;
        writeln!(f, "CPU time per phase (the machine has {} cores):", self.cores)?;
        writeln!(f, "  {:<18} {:>9} {:>22} {:>16}", "phase", "wall s", "host / echo server s", "load generator s")?;
        for c in &self.cpu {
            writeln!(f, "  {:<18} {:>9.2} {:>22.2} {:>16.2}", c.phase, secs(c.wall), secs(c.server), secs(c.loadgen))?;
        }
        let host_cpu = |phase: &str| self.cpu.iter().find(|c| c.phase == phase).map(|c| c.server);
        if let (Some(cpu), Ok(r)) = (host_cpu("round trips"), &self.round_trip) {
            let per = cpu.as_secs_f64() * 1e6 / r.completed.max(1) as f64;
            writeln!(f, "  host CPU per command at {}/s (POST included): {per:.0} µs", r.rate)?;
        }
        if let (Some(cpu), Ok(s)) = (host_cpu("sustained"), &self.sustained) {
            let per = cpu.as_secs_f64() * 1e6 / s.submitted.max(1) as f64;
            writeln!(f, "  host CPU per command, sustained (batches of {}): {per:.0} µs", s.batch)?;
        }
        if let Some(cpu) = host_cpu("connect") {
            let per = cpu.as_secs_f64() * 1e6 / self.connect.connected.max(1) as f64;
            writeln!(f, "  host CPU per connection set up: {per:.0} µs")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "host log: {:.1} MiB in {} lines, {} warnings, {} errors; stopped cleanly on SIGTERM: {}; \
             messages refused by agents: {}",
            mib(self.host_log.bytes),
            self.host_log.lines,
            self.host_log.warnings,
            self.host_log.errors,
            self.host_stopped_cleanly,
            self.violations
        )?;
        if let Some(error) = &self.host_log.first_error {
            writeln!(f, "first host error: {error}")?;
        }
        Ok(())
    }
}
