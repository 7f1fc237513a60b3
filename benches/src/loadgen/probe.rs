//! What the synthetic agents and the submitters observe, shared between them: counters, and
//! one timeline per command that joins what the API said with what its agent saw.
//!
//! Every instant is this process's monotonic clock (`std::time::Instant`), so the differences
//! are exact whatever the host's clock does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use viworks_core::wire::CommandId;

/// The life of one command as the load generator saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeline {
    /// When the POST that created it was due to be sent (its scheduled time, so that a
    /// submitter running late does not hide the delay).
    pub submitted: Option<Instant>,
    /// When the API's `202 Accepted` arrived: the command was durable in the store.
    pub accepted: Option<Instant>,
    /// When its COMMAND reached the agent.
    pub arrived: Option<Instant>,
    /// When the agent received the RESULT_ACK for its result: the host sends it only after
    /// the result is durable in the store.
    pub stored: Option<Instant>,
}

/// Counters and timelines, shared by every agent task and submitter.
#[derive(Debug, Default)]
pub struct Probe {
    /// Sessions established (WELCOME received), ever.
    pub established: AtomicU64,
    /// Sessions that ended, ever.
    pub closed: AtomicU64,
    /// COMMAND messages received.
    pub commands: AtomicU64,
    /// Results acknowledged by the host (RESULT_ACK entries).
    pub results_stored: AtomicU64,
    /// Telemetry batches acknowledged by the host.
    pub telemetry_batches: AtomicU64,
    /// Telemetry samples in acknowledged batches.
    pub telemetry_samples: AtomicU64,
    /// Messages from the host the agents' sessions refused.
    pub violations: AtomicU64,
    timelines: Mutex<HashMap<CommandId, Timeline>>,
}

impl Probe {
    fn update(&self, id: &CommandId, f: impl FnOnce(&mut Timeline)) {
        let mut timelines = self.timelines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(timelines.entry(id.clone()).or_default());
    }

    /// A submitter's view of command `id`: when its POST was due and when it was accepted.
    pub fn submitted(&self, id: &CommandId, due: Instant, accepted: Instant) {
        self.update(id, |t| {
            t.submitted = Some(due);
            t.accepted = Some(accepted);
        });
    }

    /// Command `id` reached its agent at `at`.
    pub fn arrived(&self, id: &CommandId, at: Instant) {
        self.commands.fetch_add(1, Ordering::Relaxed);
        self.update(id, |t| {
            t.arrived.get_or_insert(at);
        });
    }

    /// The host acknowledged the results of `ids` at `at`.
    pub fn stored(&self, ids: &[CommandId], at: Instant) {
        self.results_stored.fetch_add(ids.len() as u64, Ordering::Relaxed);
        let mut timelines = self.timelines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for id in ids {
            timelines.entry(id.clone()).or_default().stored.get_or_insert(at);
        }
    }

    /// The host acknowledged a telemetry batch of `samples` samples.
    pub fn telemetry_acked(&self, samples: usize) {
        self.telemetry_batches.fetch_add(1, Ordering::Relaxed);
        self.telemetry_samples.fetch_add(samples as u64, Ordering::Relaxed);
    }

    /// Takes the timelines of `ids` out of the probe (those never seen come back empty).
    pub fn take(&self, ids: &[CommandId]) -> Vec<Timeline> {
        let mut timelines = self.timelines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.iter().map(|id| timelines.remove(id).unwrap_or_default()).collect()
    }

    /// How many of `ids` the host has acknowledged the results of.
    pub fn count_stored(&self, ids: &[CommandId]) -> usize {
        let timelines = self.timelines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.iter().filter(|id| timelines.get(*id).is_some_and(|t| t.stored.is_some())).count()
    }

    /// Forgets every timeline (between phases).
    pub fn clear(&self) {
        self.timelines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    /// A counter's value.
    pub fn read(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
