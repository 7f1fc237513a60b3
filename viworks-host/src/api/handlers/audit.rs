//! The audit trail and the dead letters, newest first.

use serde_json::{Value, json};

use super::Reply;
use crate::api::{ApiError, ApiState, Call, views};
use crate::store::{AuditFilter, Store};

/// `GET /api/v1/audit?action&actor&limit&cursor`: records with their chain hashes.
pub(super) async fn records<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&["action", "actor", "limit", "cursor"])?;
    let filter = AuditFilter {
        action: call.query.get("action").map(str::to_owned),
        actor: call.query.get("actor").map(str::to_owned),
        before: call.query.parsed::<u64>("cursor")?,
        limit: call.query.limit(100, 1000)?,
    };
    let entries = state.control.store().audit(&filter).await?;
    let next = match entries.last() {
        Some(last) if entries.len() == filter.limit => Some(last.seq.to_string()),
        _ => None,
    };
    let items: Vec<Value> = entries.iter().map(views::audit).collect();
    Ok(Reply::Json(200, json!({ "records": items, "next_cursor": next })))
}

/// `GET /api/v1/dead-letters?limit`: commands the host gave up on, with the reason.
pub(super) async fn dead_letters<S: Store + Clone>(
    state: &ApiState<S>,
    call: &mut Call<'_>,
) -> Result<Reply, ApiError> {
    call.query.only(&["limit"])?;
    let rows = state.control.store().dead_letters(call.query.limit(100, 1000)?).await?;
    let items: Vec<Value> = rows.iter().map(views::dead_letter).collect();
    Ok(Reply::Json(200, json!({ "dead_letters": items })))
}
