//! Any body of the admin mutations — `POST /api/v1/agents` `{agent_id, site}`,
//! `PATCH /api/v1/agents/{id}` `{maintenance}` and `POST /api/v1/tokens` `{name, role}` —
//! parses to a checked request or to the error the client gets (400 malformed, 422 naming the
//! field), never a panic. What is accepted keeps its rules: a site that is safe to write into
//! an `agent.env` line, a token name of 1 to 64 printable bytes, a known role; and the request
//! written back is accepted again to the same value.
//!
//! The first byte picks the body (0 enrollment, 1 maintenance, 2 token, modulo 3); the rest
//! of the input is the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use viworks_core::wire::AgentId;
use viworks_host::api::ApiError;
use viworks_host::api::input::{CreateTokenBody, EnrollBody, MAX_TOKEN_NAME, UpdateBody, body_hash};
use viworks_host::store::Role;

/// The 400 or 422 of a refused body; anything else is a bug.
fn refused(error: &ApiError, fields: &[&str]) {
    match error {
        ApiError::BadRequest(message) => assert!(!message.is_empty()),
        ApiError::Unprocessable { field: Some(field), message } => {
            assert!(fields.contains(&field.as_str()) && !message.is_empty(), "{error:?}");
        }
        other => panic!("a body is refused with 400 or 422, not {other:?}"),
    }
}

fn enroll(body: &[u8]) {
    let request = match EnrollBody::parse(body) {
        Ok(request) => request,
        Err(error) => return refused(&error, &[]),
    };
    let enrollment = match request.check() {
        Ok(enrollment) => enrollment,
        Err(error) => return refused(&error, &["agent_id", "site"]),
    };
    let site = &enrollment.site;
    assert!((1..=255).contains(&site.len()) && site.trim() == site);
    assert!(!site.chars().any(|c| c.is_control() || matches!(c, '"' | '\'' | '\\' | '$' | '`')), "{site:?}");
    assert_eq!(AgentId::new(enrollment.agent_id.to_string()).as_ref(), Ok(&enrollment.agent_id));
    let again = json!({ "agent_id": enrollment.agent_id, "site": site }).to_string();
    let request = EnrollBody::parse(again.as_bytes()).expect("an accepted enrollment written back parses");
    assert_eq!(request.check().expect("and is accepted"), enrollment);
}

fn maintenance(body: &[u8]) {
    let request = match UpdateBody::parse(body) {
        Ok(request) => request,
        Err(error) => return refused(&error, &[]),
    };
    let again = json!({ "maintenance": request.maintenance }).to_string();
    assert_eq!(UpdateBody::parse(again.as_bytes()).expect("written back parses"), request);
}

fn token(body: &[u8]) {
    let request = match CreateTokenBody::parse(body) {
        Ok(request) => request,
        Err(error) => return refused(&error, &[]),
    };
    let (name, role) = match request.check() {
        Ok(checked) => checked,
        Err(error) => return refused(&error, &["name", "role"]),
    };
    assert!((1..=MAX_TOKEN_NAME).contains(&name.len()) && !name.chars().any(char::is_control), "{name:?}");
    assert_eq!(Role::parse(role.as_str()), Some(role));
    let again = json!({ "name": name, "role": role.as_str() }).to_string();
    let request = CreateTokenBody::parse(again.as_bytes()).expect("written back parses");
    assert_eq!(request.check().expect("and is accepted"), (name, role));
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    // Every mutation's audit record hashes its body, whatever the body is.
    assert_eq!(body_hash(body).len(), 64);
    match pick % 3 {
        0 => enroll(body),
        1 => maintenance(body),
        _ => token(body),
    }
});
