//! API tokens: an admin creates one; the token is in the response once and only its hash is
//! stored.

use serde::Deserialize;
use serde_json::json;

use super::Reply;
use crate::api::{ApiError, ApiState, Call, auth};
use crate::store::{Role, Store, TokenRecord};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    role: String,
}

/// `POST /api/v1/tokens` `{name, role}`: 201 `{token, name, role}`.
pub(super) async fn create<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let request: CreateBody = call.json()?;
    call.note.detail.insert("name".into(), json!(request.name));
    call.note.detail.insert("role".into(), json!(request.role));
    if request.name.is_empty() || request.name.len() > 64 || request.name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name", "name must be 1 to 64 printable characters"));
    }
    let role = Role::parse(&request.role)
        .ok_or_else(|| ApiError::invalid("role", format!("{:?} is not viewer, operator or admin", request.role)))?;
    let (token, token_hash) = auth::new_token().map_err(|error| {
        tracing::error!(%error, "no OS randomness for a token");
        ApiError::Internal
    })?;
    let record =
        TokenRecord { token_hash, name: request.name.clone(), role, created_at: state.control.now(), revoked: false };
    state.control.store().create_token(&record).await?;
    Ok(Reply::Json(201, json!({ "token": token, "name": request.name, "role": role.as_str() })))
}
