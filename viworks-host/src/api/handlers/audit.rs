//! The audit trail and the dead letters, newest first.

use serde_json::{Value, json};

use super::Reply;
use crate::api::request::Query;
use crate::api::{ApiError, ApiState, Call, views};
use crate::store::{AuditFilter, Store};

/// The filter of `GET /api/v1/audit?action&actor&limit&cursor`: `cursor` an integer, `limit` 1
/// to 1000 (100 when absent); 400 for anything else, an unknown or a repeated parameter
/// included.
pub fn audit_filter(query: &Query) -> Result<AuditFilter, ApiError> {
    query.only(&["action", "actor", "limit", "cursor"])?;
    Ok(AuditFilter {
        action: query.get("action").map(str::to_owned),
        actor: query.get("actor").map(str::to_owned),
        before: query.parsed::<u64>("cursor")?,
        limit: query.limit(100, 1000)?,
    })
}

/// The page size of `GET /api/v1/dead-letters?limit`: 1 to 1000, 100 when absent; 400 for
/// anything else.
pub fn dead_letters_limit(query: &Query) -> Result<usize, ApiError> {
    query.only(&["limit"])?;
    query.limit(100, 1000)
}

/// `GET /api/v1/audit?action&actor&limit&cursor`: records with their chain hashes.
pub(super) async fn records<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    let filter = audit_filter(&call.query)?;
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
    let rows = state.control.store().dead_letters(dead_letters_limit(&call.query)?).await?;
    let items: Vec<Value> = rows.iter().map(views::dead_letter).collect();
    Ok(Reply::Json(200, json!({ "dead_letters": items })))
}
