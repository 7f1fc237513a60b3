//! The audit record of an API mutation, written for every POST, PATCH and DELETE an
//! authenticated caller makes, refused ones included: req_id, actor, action, args_hash,
//! targets, rc (the HTTP status), duration_ms, ts and a detail without secrets.
//!
//! Requests a peer can repeat without a valid token or budget (401, 429) go through
//! [`crate::control::Control::audit_security`] instead, which is itself rate-limited, so a
//! flood cannot grow the audit chain one row per request.

use std::time::Instant;

use serde_json::{Value, json};

use super::ApiState;
use super::auth::Caller;
use super::request::AuditNote;
use super::router::RouteSpec;
use crate::audit;
use crate::store::{NewAudit, Store};

/// What the pipeline knows of a finished mutation.
pub struct Mutation<'a> {
    /// The route.
    pub spec: &'static RouteSpec,
    /// The request id.
    pub req_id: &'a str,
    /// The caller.
    pub caller: &'a Caller,
    /// The path parameter.
    pub param: Option<&'a str>,
    /// The request path.
    pub path: &'a str,
    /// The body as received (may be empty or not JSON).
    pub body: &'a [u8],
    /// The response status.
    pub status: u16,
    /// The error code, when it failed.
    pub error: Option<&'static str>,
    /// When the request arrived.
    pub started: Instant,
}

/// The `args_hash` of a mutation whose handler noted none: of the body's canonical JSON, or,
/// when it is not JSON (refused with 400) or empty, of the bytes as a JSON string, so that
/// equal bodies still hash equal. Any bytes hash; the cost is one JSON parse.
pub fn body_hash(body: &[u8]) -> String {
    let value = serde_json::from_slice::<Value>(body)
        .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(body).into_owned()));
    audit::chain::args_hash(&value)
}

/// The audit record of `mutation`, with what its handler noted.
pub fn record(mutation: &Mutation<'_>, note: AuditNote, ts: viworks_core::Timestamp) -> NewAudit {
    let args_hash = note.args_hash.unwrap_or_else(|| body_hash(mutation.body));
    let targets = if note.targets.is_empty() {
        mutation.param.map(|p| vec![p.to_owned()]).unwrap_or_default()
    } else {
        note.targets
    };
    let mut detail = note.detail;
    detail.insert("method".into(), json!(mutation.spec.method));
    detail.insert("path".into(), json!(mutation.path));
    detail.insert("role".into(), json!(mutation.caller.role.as_str()));
    if let Some(code) = mutation.error {
        detail.insert("error".into(), json!(code));
    }
    NewAudit {
        ts,
        req_id: mutation.req_id.to_owned(),
        actor: mutation.caller.name.clone(),
        action: mutation.spec.action.to_owned(),
        args_hash,
        targets,
        rc: mutation.status.to_string(),
        duration_ms: mutation.started.elapsed().as_millis() as u64,
        detail: Value::Object(detail),
    }
}

/// Queues the record of `mutation` for the audit chain (it is emitted on the `audit` target
/// once stored).
pub async fn write<S: Store + Clone>(state: &ApiState<S>, mutation: &Mutation<'_>, note: AuditNote) {
    state.control.audit(record(mutation, note, state.control.now())).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::router::{Matched, find};
    use crate::store::Role;

    #[test]
    fn a_mutation_record_has_the_design_shape_and_no_body_content() {
        let Matched::Route(spec, param) = find("DELETE", "/api/v1/agents/gw-1") else { panic!("routed") };
        let caller = Caller { name: "ops".into(), role: Role::Viewer, token_hash: "h".into() };
        let body = br#"{"secret":"hunter2"}"#;
        let mutation = Mutation {
            spec,
            req_id: "r1",
            caller: &caller,
            param,
            path: "/api/v1/agents/gw-1",
            body,
            status: 403,
            error: Some("forbidden"),
            started: Instant::now(),
        };
        let entry = record(&mutation, AuditNote::default(), viworks_core::Timestamp::from_millis(7));
        assert_eq!(entry.action, "api.agents.revoke");
        assert_eq!((entry.req_id.as_str(), entry.actor.as_str(), entry.rc.as_str()), ("r1", "ops", "403"));
        assert_eq!(entry.targets, vec!["gw-1".to_owned()]);
        assert_eq!(entry.args_hash, audit::chain::args_hash(&json!({ "secret": "hunter2" })));
        assert_eq!(entry.detail["error"], "forbidden");
        assert!(!entry.detail.to_string().contains("hunter2"), "only a hash of the arguments is kept");
    }
}
