//! One function per route, grouped by resource. Handlers see a routed, authenticated request
//! within budget ([`Call`]) and return a [`Reply`] or an [`ApiError`]; the pipeline adds the
//! common headers and writes the audit record.

mod agents;
mod audit;
mod commands;
mod health;
mod telemetry;
mod tokens;

use hyper::Response;

pub use agents::{AgentListing, AgentStatus, EnrollBody, Enrollment, UpdateBody, agent_listing};
pub use audit::{audit_filter, dead_letters_limit};
pub use commands::{CheckedCommand, MAX_TARGETS, SubmitBody, command_filter, idempotency_scope};
pub use telemetry::{TelemetryRange, telemetry_range};
pub use tokens::{CreateTokenBody, MAX_TOKEN_NAME};

pub(super) use super::response::Reply;
use super::response::{self, Body};
use super::router::Route;
use super::{ApiError, ApiState, Call, dashboard};
use crate::store::Store;

/// Answers a route that needs no token.
pub(super) async fn public<S: Store + Clone>(state: &ApiState<S>, route: Route, req_id: &str) -> Response<Body> {
    match route {
        Route::Health => response::json(200, &serde_json::json!({ "status": "ok" })),
        Route::Healthz => health::healthz(state).await,
        Route::Metrics => health::metrics(state).await,
        Route::Dashboard => dashboard::page(state),
        other => {
            tracing::error!(req_id, ?other, "a route needing a token was routed as public");
            response::error(&ApiError::Internal, req_id)
        }
    }
}

/// Answers a route that needs a token.
pub(super) async fn dispatch<S: Store + Clone>(
    state: &ApiState<S>,
    route: Route,
    call: &mut Call<'_>,
) -> Result<Reply, ApiError> {
    match route {
        Route::SubmitCommands => commands::submit(state, call).await,
        Route::ListCommands => commands::list(state, call).await,
        Route::GetCommand => commands::get(state, call).await,
        Route::CancelCommand => commands::cancel(state, call).await,
        Route::GetJob => commands::job(state, call).await,
        Route::JobEvents => commands::job_events(state, call).await,
        Route::ListAgents => agents::list(state, call).await,
        Route::EnrollAgent => agents::enroll(state, call).await,
        Route::GetAgent => agents::get(state, call).await,
        Route::RevokeAgent => agents::revoke(state, call).await,
        Route::PatchAgent => agents::update(state, call).await,
        Route::Telemetry => telemetry::samples(state, call).await,
        Route::LatestTelemetry => telemetry::latest(state, call).await,
        Route::Audit => audit::records(state, call).await,
        Route::DeadLetters => audit::dead_letters(state, call).await,
        Route::CreateToken => tokens::create(state, call).await,
        Route::Health | Route::Healthz | Route::Metrics | Route::Dashboard => {
            Ok(Reply::Raw(public(state, route, call.req_id).await))
        }
    }
}
