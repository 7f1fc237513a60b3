//! Health and metrics, served without a token: `/internal/_healthz` reports each component
//! and answers 503 when one is degraded; `/metrics` refreshes the gauges and renders every
//! metric in the Prometheus text format.

use std::time::Duration;

use hyper::Response;
use serde_json::json;

use crate::api::ApiState;
use crate::api::response::{self, Body};
use crate::metrics::{KindLabel, Metrics};
use crate::store::{Store, StoreStats, UNFINISHED_STATES};

/// A database slower than this to answer a ping is degraded.
const SLOW_DATABASE: Duration = Duration::from_secs(1);

/// `GET /internal/_healthz`: database (ok, latency, connection pool), this instance, agents
/// (online here), queue (queued, in flight, free slots, across all instances), telemetry
/// (ingest lag), dead letters (count). 503 when the database fails, is slower than 1 s or has
/// its pool saturated with calls waiting, or the queues have no free slot.
pub(super) async fn healthz<S: Store + Clone>(state: &ApiState<S>) -> Response<Body> {
    let store = state.control.store();
    let ping = store.ping().await;
    let stats = store.stats().await;
    let pool = store.pool_status();
    let queue = state.control.queue_stats(stats.as_ref().unwrap_or(&StoreStats::default()));
    let latency_ms = ping.as_ref().ok().map(|latency| latency.as_secs_f64() * 1000.0);
    let database_ok = matches!(&ping, Ok(latency) if *latency <= SLOW_DATABASE) && stats.is_ok();
    if let Err(error) = &ping {
        tracing::warn!(%error, "health check: the database ping failed");
    }
    if let Err(error) = &stats {
        tracing::warn!(%error, "health check: reading store statistics failed");
    }
    let stats = stats.ok();
    let lag_ms = stats
        .as_ref()
        .and_then(|s| s.latest_telemetry)
        .map(|latest| state.control.now().saturating_since(latest).as_millis() as u64);
    let queue_ok = queue.free_slots > 0;
    // Every connection busy and calls queueing for one: requests are about to slow down.
    let pool_saturated = pool.in_use >= pool.max && pool.waiting > 0;
    let mut degraded = Vec::new();
    if !database_ok || pool_saturated {
        degraded.push("database");
    }
    if !queue_ok {
        degraded.push("queue");
    }
    let healthy = degraded.is_empty();
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "degraded": degraded,
        "components": {
            "database": {
                "ok": database_ok,
                "latency_ms": latency_ms,
                "pool": { "max": pool.max, "in_use": pool.in_use, "waiting": pool.waiting, "saturated": pool_saturated },
            },
            "instance": { "ok": true, "id": state.control.instance().instance_id, "name": state.control.instance().name },
            "agents": { "ok": true, "online": queue.online },
            "queue": { "ok": queue_ok, "queued": queue.queued, "in_flight": queue.in_flight, "free_slots": queue.free_slots },
            "telemetry": { "ok": true, "lag_ms": lag_ms },
            "dead_letters": { "ok": true, "count": stats.as_ref().map(|s| s.dead_letters) },
        },
    });
    response::json(if healthy { 200 } else { 503 }, &body)
}

/// `GET /metrics`: refreshes the command-state and queue gauges and the store writer's
/// counters, then renders every metric.
pub(super) async fn metrics<S: Store + Clone>(state: &ApiState<S>) -> Response<Body> {
    let metrics = state.control.metrics();
    match state.control.store().stats().await {
        Ok(stats) => {
            let queue = state.control.queue_stats(&stats);
            metrics.queue_depth.set(queue.queued as i64);
            metrics.in_flight.set(queue.in_flight as i64);
            // Every unfinished state, at zero when the store counted none, so that a series
            // does not vanish when its state empties.
            for name in UNFINISHED_STATES {
                let count = i64::try_from(stats.unfinished(name)).unwrap_or(i64::MAX);
                metrics.commands.get_or_create(&KindLabel { kind: name.to_owned() }).set(count);
            }
        }
        Err(error) => tracing::warn!(%error, "metrics: reading store statistics failed; command gauges are stale"),
    }
    if let Some(writer) = state.control.store().writer_stats() {
        Metrics::mirror(&metrics.writer_transactions, writer.transactions);
        Metrics::mirror(&metrics.writer_requests, writer.requests);
        Metrics::mirror_seconds(&metrics.writer_busy_seconds, writer.busy.as_secs_f64());
    }
    response::with_body(200, "text/plain; version=0.0.4; charset=utf-8", response::full(metrics.render()))
}
