//! Prometheus metrics of the host, rendered in the text exposition format at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A label naming a kind: a reject code, a violation, a state, a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: String,
}

/// Every metric the host exports. Cheap to clone; clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Live agent sessions.
    pub sessions: Gauge,
    /// Agent connections accepted at the TLS layer.
    pub connections: Counter,
    /// HELLOs refused, by reject code.
    pub refused: Family<KindLabel, Counter>,
    /// Messages refused inside sessions, by violation.
    pub violations: Family<KindLabel, Counter>,
    /// Replayed messages refused (HELLO replays and in-session sequence replays).
    pub replays_rejected: Counter,
    /// Commands accepted by the API.
    pub submitted: Counter,
    /// Submissions refused because queues were full.
    pub refused_full: Counter,
    /// Results that finished a command.
    pub results: Counter,
    /// Time from sending a command to storing its result, seconds.
    pub round_trip_seconds: Histogram,
    /// Time to store one batch of results durably, seconds.
    pub result_store_seconds: Histogram,
    /// Time to store one job and its commands durably, seconds.
    pub job_store_seconds: Histogram,
    /// Telemetry samples stored.
    pub telemetry_samples: Counter,
    /// Unfinished commands per lifecycle state (`queued`, `sent`, `acked`) across every
    /// instance, refreshed at each scrape.
    pub commands: Family<KindLabel, Gauge>,
    /// Commands whose end this instance stored, by terminal state.
    pub finished: Family<KindLabel, Counter>,
    /// Commands waiting to be sent, refreshed at each scrape.
    pub queue_depth: Gauge,
    /// Commands sent and not yet answered, refreshed at each scrape.
    pub in_flight: Gauge,
    /// API requests, by route and status class.
    pub http_requests: Family<KindLabel, Counter>,
    /// Security audit records not written because of the audit rate limit.
    pub audit_suppressed: Counter,
    /// Transactions of the SQLite writer, mirrored from the store at each scrape.
    pub writer_transactions: Counter,
    /// Write requests of the SQLite writer, mirrored from the store at each scrape.
    pub writer_requests: Counter,
    /// Seconds the SQLite writer spent in transactions, mirrored from the store at each scrape.
    pub writer_busy_seconds: Counter<f64, AtomicU64>,
}

impl Metrics {
    /// A registry with every metric registered under the `viworks` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("viworks");
        let latency = || Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let metrics = Metrics {
            registry: Arc::new(Registry::default()),
            sessions: Gauge::default(),
            connections: Counter::default(),
            refused: Family::default(),
            violations: Family::default(),
            replays_rejected: Counter::default(),
            submitted: Counter::default(),
            refused_full: Counter::default(),
            results: Counter::default(),
            round_trip_seconds: latency(),
            result_store_seconds: latency(),
            job_store_seconds: latency(),
            telemetry_samples: Counter::default(),
            commands: Family::default(),
            finished: Family::default(),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            http_requests: Family::default(),
            audit_suppressed: Counter::default(),
            writer_transactions: Counter::default(),
            writer_requests: Counter::default(),
            writer_busy_seconds: Counter::default(),
        };
        registry.register("agent_sessions", "Live agent sessions", metrics.sessions.clone());
        registry.register("agent_connections", "Agent TLS connections accepted", metrics.connections.clone());
        registry.register("hello_refused", "HELLOs refused, by reject code", metrics.refused.clone());
        registry.register("session_violations", "Messages refused in sessions", metrics.violations.clone());
        registry.register("replays_rejected", "Replayed messages refused", metrics.replays_rejected.clone());
        registry.register("commands_submitted", "Commands accepted", metrics.submitted.clone());
        registry.register("submissions_refused_full", "Submissions refused: queues full", metrics.refused_full.clone());
        registry.register("command_results", "Results that finished a command", metrics.results.clone());
        registry.register(
            "command_round_trip_seconds",
            "Time from sending a command to storing its result",
            metrics.round_trip_seconds.clone(),
        );
        registry.register(
            "result_store_seconds",
            "Time to store a batch of results durably",
            metrics.result_store_seconds.clone(),
        );
        registry.register(
            "job_store_seconds",
            "Time to store a job and its commands durably",
            metrics.job_store_seconds.clone(),
        );
        registry.register("telemetry_samples", "Telemetry samples stored", metrics.telemetry_samples.clone());
        registry.register("commands", "Unfinished commands per lifecycle state", metrics.commands.clone());
        registry.register(
            "commands_finished",
            "Commands whose end this instance stored, by terminal state",
            metrics.finished.clone(),
        );
        registry.register("queue_depth", "Commands waiting to be sent", metrics.queue_depth.clone());
        registry.register("commands_in_flight", "Commands sent and not yet answered", metrics.in_flight.clone());
        registry.register("http_requests", "API requests by route and status", metrics.http_requests.clone());
        registry.register(
            "audit_suppressed",
            "Security audit records not written because of the audit rate limit",
            metrics.audit_suppressed.clone(),
        );
        registry.register(
            "store_writer_transactions",
            "Transactions committed by the SQLite writer",
            metrics.writer_transactions.clone(),
        );
        registry.register(
            "store_writer_requests",
            "Write requests handled by the SQLite writer",
            metrics.writer_requests.clone(),
        );
        registry.register(
            "store_writer_busy_seconds",
            "Time the SQLite writer spent in transactions, fsync included",
            metrics.writer_busy_seconds.clone(),
        );
        Metrics { registry: Arc::new(registry), ..metrics }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Raises `counter`, which mirrors a count kept elsewhere, to `value`. Never lowers it, so
    /// two scrapes at once cannot count anything twice.
    pub fn mirror(counter: &Counter, value: u64) {
        counter.inner().fetch_max(value, Ordering::Relaxed);
    }

    /// [`Metrics::mirror`] for a counter of seconds. Non-negative doubles order as their bit
    /// patterns do, so the largest bit pattern is the largest value.
    pub fn mirror_seconds(counter: &Counter<f64, AtomicU64>, seconds: f64) {
        if seconds.is_finite() && seconds >= 0.0 {
            counter.inner().fetch_max(seconds.to_bits(), Ordering::Relaxed);
        }
    }

    /// Counts one of `family` under `kind`.
    pub fn count(family: &Family<KindLabel, Counter>, kind: &str) {
        family.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrored_counters_follow_the_largest_value_seen() {
        let metrics = Metrics::new();
        Metrics::mirror(&metrics.writer_transactions, 7);
        Metrics::mirror(&metrics.writer_transactions, 5);
        assert_eq!(metrics.writer_transactions.get(), 7, "a stale read never lowers it");
        Metrics::mirror(&metrics.writer_transactions, 9);
        assert_eq!(metrics.writer_transactions.get(), 9);
        for (seconds, expected) in [(0.25, 0.25), (1.5, 1.5), (0.75, 1.5), (f64::NAN, 1.5), (-3.0, 1.5), (2.0, 2.0)] {
            Metrics::mirror_seconds(&metrics.writer_busy_seconds, seconds);
            assert_eq!(metrics.writer_busy_seconds.get(), expected, "after {seconds}");
        }
        let text = metrics.render();
        assert!(text.contains("viworks_store_writer_transactions_total 9"), "{text}");
        assert!(text.contains("viworks_store_writer_busy_seconds_total 2.0"), "{text}");
    }
}
