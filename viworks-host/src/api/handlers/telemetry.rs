//! Telemetry: an agent's samples over a time range, and the latest value of each metric.

use serde_json::{Value, json};
use viworks_core::Timestamp;
use viworks_core::wire::{AgentId, MetricKey};

use super::Reply;
use crate::api::request::Query;
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

/// What `GET /api/v1/telemetry/{agent_id}?metric&from&to&limit` asks for, besides the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryRange {
    /// Only this metric.
    pub metric: Option<MetricKey>,
    /// Samples at or after this instant.
    pub from: Option<Timestamp>,
    /// Samples before this instant; never before `from`.
    pub to: Option<Timestamp>,
    /// At most this many, 1 to 10,000.
    pub limit: usize,
}

/// Reads the query of `GET /api/v1/telemetry/{agent_id}`: `from` and `to` epoch milliseconds
/// with `from` not after `to`, `metric` a valid metric key, `limit` 1 to 10,000 (1000 when
/// absent); 400 for anything else, an unknown or a repeated parameter included.
pub fn telemetry_range(query: &Query) -> Result<TelemetryRange, ApiError> {
    query.only(&["metric", "from", "to", "limit"])?;
    let from = query.parsed::<u64>("from")?.map(Timestamp::from_millis);
    let to = query.parsed::<u64>("to")?.map(Timestamp::from_millis);
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        return Err(ApiError::BadRequest("from must not be after to".into()));
    }
    Ok(TelemetryRange { metric: query.parsed::<MetricKey>("metric")?, from, to, limit: query.limit(1000, 10_000)? })
}

/// `GET /api/v1/telemetry/{agent_id}?metric&from&to&limit`: newest first; `from` inclusive and
/// `to` exclusive, in epoch milliseconds.
pub(super) async fn samples<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    let TelemetryRange { metric, from, to, limit } = telemetry_range(&call.query)?;
    let query = TelemetryQuery { agent_id: known_agent(state, call).await?, metric, from, to, limit };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_telemetry_range_is_bounded_and_never_runs_backwards() {
        let range = telemetry_range(&Query::parse("metric=cpu.usage_pct&from=1000&to=2000&limit=10")).expect("valid");
        assert_eq!((range.from, range.to), (Some(Timestamp::from_millis(1000)), Some(Timestamp::from_millis(2000))));
        assert_eq!((range.metric.map(|m| m.to_string()), range.limit), (Some("cpu.usage_pct".to_owned()), 10));
        assert_eq!(telemetry_range(&Query::parse("")).map(|r| r.limit).ok(), Some(1000));
        for bad in ["from=2000&to=1000", "from=-1", "limit=10001", "metric=%2Fx", "agent=gw-1"] {
            assert_eq!(telemetry_range(&Query::parse(bad)).map_err(|e| e.status()).err(), Some(400), "{bad}");
        }
    }
}
