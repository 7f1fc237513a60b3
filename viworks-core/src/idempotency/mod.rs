//! Idempotency: the rules that make retries and redeliveries harmless.
//!
//! Three keys, one per way a thing can arrive twice:
//! - an API request retried by its client carries an [`IdempotencyKey`]; [`resolve`] decides
//!   whether it starts a job or names the job an earlier request started, and
//!   [`IdempotencyTable`] applies that rule in memory, bounded;
//! - a command result redelivered by an agent carries its command id, which is the correlation
//!   id; [`classify_result`] decides whether it is new, a duplicate or a conflicting second
//!   answer, and [`ResultLedger`] applies that rule in memory, bounded;
//! - a telemetry sample is stored under its [`TelemetryKey`] `(agent_id, ts, metric_key)`, so
//!   a replayed batch overwrites itself; [`dedupe_batch`] collapses one batch onto those keys.
//!
//! The pure functions ([`resolve`], [`classify_result`]) are what the host's durable store
//! applies too, so the in-memory structures and the database follow one rule. Request and
//! result contents are compared by a BLAKE3 digest of their canonical JSON
//! ([`canonical_json`]): object keys sorted, no insignificant whitespace.

mod request;
mod result_ledger;
mod telemetry_key;

use std::time::Duration;

use thiserror::Error;

pub use request::{
    Begun, DEFAULT_TTL, IdempotencyKey, IdempotencyRecord, IdempotencyTable, JobId, RequestDigest, Resolution,
    canonical_json, push_canonical_json, push_json_string, resolve,
};
pub use result_ledger::{Recorded, ResultDigest, ResultLedger, classify_result};
pub use telemetry_key::{TelemetryKey, dedupe_batch};

/// Why a request or a result was refused by the idempotency layer.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The idempotency key was already used, within its time to live, for a request with
    /// different content. Nothing was started. An API answers 422 (or 409): the client reused
    /// a key for another request.
    #[error("idempotency key {key} was already used for a different request")]
    Conflict {
        /// The key that was reused.
        key: IdempotencyKey,
    },
    /// The structure holds its full capacity of entries that may not be evicted yet (unexpired
    /// request records, or results not yet acknowledged). Nothing was stored. An API answers
    /// 503; an agent connection stops acknowledging until room returns.
    #[error("idempotency store is full ({capacity} entries)")]
    Full {
        /// The capacity in force.
        capacity: usize,
        /// When room is certain to return without any other action, if that is known: the
        /// time until the oldest entry expires. Suitable for a `Retry-After` header.
        retry_after: Option<Duration>,
    },
    /// A table or ledger was configured with a zero capacity or a zero time to live.
    #[error("invalid idempotency configuration: {0}")]
    InvalidConfig(&'static str),
}
