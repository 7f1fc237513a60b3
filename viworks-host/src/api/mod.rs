//! The REST API under `/api/v1`, plus `/health`, `/internal/_healthz`, `/metrics` and the
//! dashboard at `/`. JSON in and out, times as integer milliseconds since the Unix epoch;
//! bearer tokens with roles; per-token and per-IP rate limits with separate read and write
//! budgets; every mutation audited.
//!
//! A request goes through `server.rs` (connections, size limits, shutdown), then
//! `pipeline.rs` (budgets, route, token, role, body, audit), then a handler in `handlers/`.
//! The routes are listed once, in [`router::ROUTES`], and described in `docs/openapi.yaml`.

mod audit;
pub mod auth;
mod dashboard;
pub mod errors;
mod handlers;
mod pipeline;
pub mod rate_limit;
mod request;
mod response;
pub mod router;
mod server;
mod sse;
mod views;

use std::sync::Arc;

use tokio::sync::watch;

pub use auth::{Caller, hash_token, new_token};
pub use errors::ApiError;
pub use rate_limit::{Limiter, Quota};
pub use server::{MAX_CONNECTIONS, MAX_STREAMS, serve};

use crate::config::RateLimits;
use crate::control::Control;
use crate::tls::Pki;
use request::Call;

/// The parsers the handlers run on a request's body and query before they touch the store,
/// public so that the fuzz targets feed them exactly what the router does. Each returns the
/// checked request or the [`ApiError`] the client gets (400 for a malformed body or query, 422
/// for a well-formed one with an invalid value), and never panics.
pub mod input {
    pub use super::audit::body_hash;
    pub use super::handlers::{
        AgentListing, AgentStatus, CheckedCommand, CreateTokenBody, EnrollBody, Enrollment, MAX_TARGETS,
        MAX_TOKEN_NAME, SubmitBody, TelemetryRange, UpdateBody, agent_listing, audit_filter, command_filter,
        dead_letters_limit, idempotency_scope, telemetry_range,
    };
    pub use super::request::{Query, json_body};
    pub use super::views::STATES;
}

/// Request bodies larger than this are refused with 413, before more is read.
pub const MAX_BODY: usize = 1024 * 1024;

/// Everything the handlers need. Built once per listener and shared by every connection.
pub struct ApiState<S> {
    /// The control plane.
    pub control: Control<S>,
    /// The per-minute budgets.
    pub rate_limits: RateLimits,
    /// The PKI, which issues the client certificates of enrollment bundles.
    pub pki: Arc<Pki>,
    /// The URL agents dial (`wss://…/ws/agent`), written into enrollment bundles.
    pub public_url: String,
    /// The rate-limit buckets; [`Limiter::default`] bounds them at 100,000.
    pub limiter: Limiter,
    /// Turns true when the host shuts down; event streams end then.
    pub shutdown: watch::Receiver<bool>,
}
