//! API tokens: an admin creates one; the token is in the response once and only its hash is
//! stored.

use serde::Deserialize;
use serde_json::json;

use super::Reply;
use crate::api::request::json_body;
use crate::api::{ApiError, ApiState, Call, auth};
use crate::store::{Role, Store, TokenRecord};

/// The body of `POST /api/v1/tokens` as received: `{name, role}`, no other fields, not yet
/// checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    name: String,
    role: String,
}

/// The longest token name, in bytes.
pub const MAX_TOKEN_NAME: usize = 64;

impl CreateTokenBody {
    /// Parses a request body; 400 when it is empty, not JSON, or not of this shape.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        json_body(body)
    }

    /// Checks the name (1 to [`MAX_TOKEN_NAME`] bytes, no control characters) and the role
    /// (`viewer`, `operator` or `admin`); 422 naming `name` or `role`.
    pub fn check(&self) -> Result<(&str, Role), ApiError> {
        let name = self.name.as_str();
        if name.is_empty() || name.len() > MAX_TOKEN_NAME || name.chars().any(char::is_control) {
            return Err(ApiError::invalid("name", "name must be 1 to 64 printable characters"));
        }
        let role = Role::parse(&self.role)
            .ok_or_else(|| ApiError::invalid("role", format!("{:?} is not viewer, operator or admin", self.role)))?;
        Ok((name, role))
    }
}

/// `POST /api/v1/tokens` `{name, role}`: 201 `{token, name, role}`.
pub(super) async fn create<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let request = CreateTokenBody::parse(&call.body)?;
    call.note.detail.insert("name".into(), json!(request.name));
    call.note.detail.insert("role".into(), json!(request.role));
    let (name, role) = request.check()?;
    let (token, token_hash) = auth::new_token().map_err(|error| {
        tracing::error!(%error, "no OS randomness for a token");
        ApiError::Internal
    })?;
    let record =
        TokenRecord { token_hash, name: name.to_owned(), role, created_at: state.control.now(), revoked: false };
    state.control.store().create_token(&record).await?;
    Ok(Reply::Json(201, json!({ "token": token, "name": name, "role": role.as_str() })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_needs_a_short_printable_name_and_a_known_role() {
        let body = CreateTokenBody::parse(br#"{"name": "ci", "role": "operator"}"#).expect("well-formed");
        assert_eq!(body.check().ok(), Some(("ci", Role::Operator)));
        let long = format!(r#"{{"name": "{}", "role": "viewer"}}"#, "x".repeat(MAX_TOKEN_NAME + 1));
        for (body, blamed) in [
            (long.as_bytes(), "name"),
            (br#"{"name": "a\u0007b", "role": "viewer"}"#, "name"),
            (br#"{"name": "ci", "role": "root"}"#, "role"),
        ] {
            match CreateTokenBody::parse(body).expect("well-formed").check() {
                Err(ApiError::Unprocessable { field: Some(field), .. }) => assert_eq!(field, blamed),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(CreateTokenBody::parse(br#"{"name": "ci"}"#).map_err(|e| e.status()).err(), Some(400));
    }
}
