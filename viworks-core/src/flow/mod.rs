//! Flow control: how long to wait before trying again, when to give up, how fast to admit
//! work, and when to stop calling a peer that keeps failing.
//!
//! - [`BackoffPolicy`] draws exponential, capped delays with full jitter; [`ReconnectBackoff`]
//!   is the agent's reconnect schedule on top of it, reset only by a session that stayed up.
//! - [`RetryPolicy`] turns a failed attempt into [`RetryDecision::RetryAt`] or
//!   [`RetryDecision::DeadLetter`].
//! - [`TokenBucket`] is the rate limiter behind the API's per-token and per-IP limits.
//! - [`CircuitBreaker`] is closed, open or half-open according to recent failures.
//! - [`CreditWindow`] keeps the commands in flight to an agent within the concurrency it
//!   advertised.
//!
//! All of them are plain values: they read no clock and draw no randomness of their own.
//! Callers pass `now` as a [`Timestamp`](crate::Timestamp) and randomness as
//! [`Entropy`](crate::Entropy); every bound is fixed at construction and no input panics.

mod backoff;
mod circuit;
mod credit;
mod rate_limit;
mod retry;

pub use backoff::{BackoffPolicy, ReconnectBackoff};
pub use circuit::{CircuitBreaker, CircuitOpen, CircuitPolicy, CircuitState};
pub use credit::{CreditWindow, Delivery, NoCredit};
pub use rate_limit::{RateLimited, TokenBucket};
pub use retry::{RetryDecision, RetryPolicy};
