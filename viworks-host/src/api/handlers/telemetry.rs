//! Telemetry: an agent's samples over a time range, and the latest value of each metric.

use serde_json::{Value, json};
use viworks_core::Timestamp;
use viworks_core::wire::{AgentId, MetricKey};

use super::Reply;
use crate::api::{ApiError, ApiState, Call, views};
use crate::store::{Store, TelemetryQuery};

/// 404 unless `id` is enrolled, so that a typo is not an empty series.
async fn known_agent<S: Store + Clone>(state: &ApiState<S>, call: &Call<'_>) -> Result<AgentId, ApiError> {
    let id: AgentId = call.param("agent")?;
    match state.control.store().agent(&id).await? {
        Some(_) => Ok(id),
        None => Err(ApiError::NotFound(format!("no agent {id}"))),
    }
}

/// `GET /api/v1/telemetry/{agent_id}?metric&from&to&limit`: newest first; `from` inclusive and
/// `to` exclusive, in epoch milliseconds.
pub(super) async fn samples<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&["metric", "from", "to", "limit"])?;
    let from = call.query.parsed::<u64>("from")?.map(Timestamp::from_millis);
    let to = call.query.parsed::<u64>("to")?.map(Timestamp::from_millis);
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        return Err(ApiError::BadRequest("from must not be after to".into()));
    }
    let query = TelemetryQuery {
        agent_id: known_agent(state, call).await?,
        metric: call.query.parsed::<MetricKey>("metric")?,
        from,
        to,
        limit: call.query.limit(1000, 10_000)?,
    };
    let rows = state.control.store().telemetry(&query).await?;
    let samples: Vec<Value> = rows.iter().map(views::sample).collect();
    Ok(Reply::Json(200, json!({ "agent_id": query.agent_id, "samples": samples })))
}

/// `GET /api/v1/telemetry/{agent_id}/latest`: the newest sample of each metric.
pub(super) async fn latest<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let agent = known_agent(state, call).await?;
    let rows = state.control.store().latest_telemetry(&agent).await?;
    let samples: Vec<Value> = rows.iter().map(views::sample).collect();
    Ok(Reply::Json(200, json!({ "agent_id": agent, "samples": samples })))
}
