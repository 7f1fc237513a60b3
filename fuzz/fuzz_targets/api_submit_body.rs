//! Any body of `POST /api/v1/commands` parses to a checked submission or to the error the
//! client gets — 400 for a body that is not JSON of the request's shape, 422 naming the field
//! to blame for a well-formed one — never a panic. What is accepted is canonical: the same
//! request written back with the canonical arguments and the granted timeout is accepted again,
//! to the same command and targets. Any body also hashes for the audit record and digests for
//! an idempotency key.
//!
//! The whole input is the request body, passed through the parsers the handler runs in order.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use viworks_core::idempotency::RequestDigest;
use viworks_core::wire::AgentId;
use viworks_host::api::ApiError;
use viworks_host::api::input::{MAX_TARGETS, SubmitBody, body_hash, idempotency_scope};
use viworks_host::control::Targets;

/// Whether `error` is a 422 blaming one of `fields` (exactly, or as a prefix ending in `.` or `[`).
fn blames(error: &ApiError, fields: &[&str]) -> bool {
    let ApiError::Unprocessable { field: Some(field), message } = error else { return false };
    !message.is_empty()
        && fields.iter().any(|f| {
            field == f || field.strip_prefix(f).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
}

fuzz_target!(|data: &[u8]| {
    // Every mutation's audit record hashes its body, and an Idempotency-Key digests it, before
    // anything is checked.
    assert_eq!(body_hash(data).len(), 64);
    let scope = idempotency_scope("token-hash", "/api/v1/commands", data);
    assert_eq!(RequestDigest::of_json(&scope), RequestDigest::of_json(&scope.clone()));

    let request = match SubmitBody::parse(data) {
        Ok(request) => request,
        Err(error) => {
            assert_eq!(error.status(), 400, "a malformed body is a bad request: {error:?}");
            return;
        }
    };
    let command = match request.command() {
        Ok(command) => command,
        Err(error) => {
            assert!(blames(&error, &["verb", "args", "timeout_secs"]), "{error:?}");
            let _ = error.body("req");
            return;
        }
    };
    let targets = match request.into_targets() {
        Ok(targets) => targets,
        Err(error) => {
            assert!(blames(&error, &["targets", "selector"]), "{error:?}");
            return;
        }
    };

    // Accepted: the arguments fit the verb's schema and the deadline is within its bounds.
    let spec = command.args.spec();
    assert_eq!(command.args.verb(), command.verb.as_str());
    assert!(!command.timeout.is_zero() && command.timeout <= spec.max_timeout, "{:?}", command.timeout);
    let canonical = command.args.to_value();
    let reparsed = viworks_core::verbs::parse(&command.verb, &canonical).expect("canonical arguments parse");
    assert_eq!(reparsed, command.args);
    let mut again = json!({ "verb": command.verb.as_str(), "args": canonical });
    match &targets {
        Targets::Agents(ids) => {
            assert!((1..=MAX_TARGETS).contains(&ids.len()));
            for id in ids {
                assert_eq!(AgentId::new(id.to_string()).as_ref(), Ok(id));
            }
            again["targets"] = json!(ids);
        }
        Targets::Selector { site, capability, online } => {
            let status = online.map(|online| if online { "online" } else { "offline" });
            again["selector"] = json!({ "site": site, "capability": capability, "status": status });
        }
    }
    let whole_seconds = command.timeout.subsec_nanos() == 0;
    if whole_seconds {
        again["timeout_secs"] = Value::from(command.timeout.as_secs());
    }
    let bytes = serde_json::to_vec(&again).expect("a JSON value serializes");
    let request = SubmitBody::parse(&bytes).expect("the canonical request parses");
    let resubmitted = request.command().expect("the canonical request's command is accepted");
    assert_eq!((&resubmitted.verb, &resubmitted.args), (&command.verb, &command.args));
    if whole_seconds {
        assert_eq!(resubmitted.timeout, command.timeout, "the granted deadline is accepted when asked for");
    }
    assert_eq!(request.into_targets().expect("the canonical targets are accepted"), targets);
});
