//! The API's one error type and its JSON shape: `{"error":{"code","message","req_id"}}`, plus
//! `field` when a request field is to blame. Each variant has one status and one stable code.

use std::time::Duration;

use thiserror::Error;
use viworks_core::verbs::ArgsError;

use crate::control::ControlError;
use crate::store::StoreError;

/// Why a request failed. Each variant maps to one HTTP status and one stable `code`; the
/// message is for people and may change.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed: not JSON, a wrong type, an unknown field or parameter (400,
    /// `bad_request`).
    #[error("{0}")]
    BadRequest(String),
    /// No token, or an unknown or revoked one (401, `unauthorized`).
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// The token's role may not do this (403, `forbidden`).
    #[error("the {role} role may not do this; it needs {needs}")]
    Forbidden {
        /// The caller's role.
        role: &'static str,
        /// The least role the route needs.
        needs: &'static str,
    },
    /// No such resource or route (404, `not_found`).
    #[error("{0}")]
    NotFound(String),
    /// The path exists, but not with this method (405, `method_not_allowed`).
    #[error("{method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed {
        /// The method asked for.
        method: String,
        /// The methods the path serves, comma-separated, for the `Allow` header.
        allow: String,
    },
    /// The body was not received in time (408, `request_timeout`).
    #[error("the request body was not received in time")]
    RequestTimeout,
    /// The request conflicts with the current state: an idempotency key reused with another
    /// request, a command already sent, an agent enrolled already or in maintenance (409,
    /// `conflict`).
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than [`super::MAX_BODY`] (413, `payload_too_large`).
    #[error("the request body exceeds 1 MiB")]
    PayloadTooLarge,
    /// The body is well-formed but a value is invalid: an unknown verb, arguments that break
    /// the verb's schema, a bad target (422, `unprocessable`).
    #[error("{message}")]
    Unprocessable {
        /// The field to blame, such as `args.username` or `timeout_secs`, when one is.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A rate-limit budget is spent (429, `rate_limited`, with `Retry-After`).
    #[error("rate limit exceeded; retry in {} s", seconds(*.0))]
    RateLimited(Duration),
    /// Command queues are full (429, `queue_full`, with `Retry-After`).
    #[error("command queues are full; retry in {} s", seconds(*.0))]
    QueueFull(Duration),
    /// The store or another dependency is failing, or a bound on open streams is reached (503,
    /// `unavailable`, with `Retry-After`). The message names no internals; they are logged.
    #[error("{0}")]
    Unavailable(&'static str),
    /// A bug: a handler panicked or stored data cannot be read (500, `internal`). Logged.
    #[error("internal error; the request id is in the log")]
    Internal,
}

fn seconds(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

impl ApiError {
    /// A 422 blaming `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Unprocessable { field: Some(field.into()), message: message.into() }
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::Forbidden { .. } => 403,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::RequestTimeout => 408,
            ApiError::Conflict(_) => 409,
            ApiError::PayloadTooLarge => 413,
            ApiError::Unprocessable { .. } => 422,
            ApiError::RateLimited(_) | ApiError::QueueFull(_) => 429,
            ApiError::Internal => 500,
            ApiError::Unavailable(_) => 503,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unprocessable { .. } => "unprocessable",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::QueueFull(_) => "queue_full",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal => "internal",
        }
    }

    /// Seconds for `Retry-After`, when the client should retry later.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited(wait) | ApiError::QueueFull(wait) => Some(seconds(*wait)),
            ApiError::Unavailable(_) => Some(5),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self, req_id: &str) -> serde_json::Value {
        let mut error = serde_json::json!({ "code": self.code(), "message": self.to_string(), "req_id": req_id });
        if let ApiError::Unprocessable { field: Some(field), .. } = self {
            error["field"] = serde_json::Value::from(field.as_str());
        }
        serde_json::json!({ "error": error })
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Exists(what) => ApiError::Conflict(format!("{what} exists already")),
            StoreError::IdempotencyConflict(key) => {
                ApiError::Conflict(format!("idempotency key {key} was used with a different request"))
            }
            StoreError::Corrupt { .. } | StoreError::SchemaTooNew { .. } => {
                tracing::error!(%error, "the store returned unreadable data");
                ApiError::Internal
            }
            error => {
                tracing::warn!(%error, "the store failed a request");
                ApiError::Unavailable("the database is unavailable; retry later")
            }
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::QueueFull { retry_after } => ApiError::QueueFull(retry_after),
            ControlError::UnknownAgents(_) | ControlError::NotFound(_) => ApiError::NotFound(error.to_string()),
            ControlError::IdempotencyConflict(_) | ControlError::InMaintenance(_) | ControlError::NotCancellable(_) => {
                ApiError::Conflict(error.to_string())
            }
            ControlError::NoTargets => ApiError::Unprocessable { field: None, message: error.to_string() },
            ControlError::Store(store) => store.into(),
        }
    }
}

impl From<ArgsError> for ApiError {
    /// Names the field to blame: `verb`, `args`, `args.<field>`, `args.<field>[i]` or
    /// `timeout_secs`.
    fn from(error: ArgsError) -> Self {
        let field = match &error {
            ArgsError::UnknownVerb(_) => "verb".to_owned(),
            ArgsError::InvalidField { field, .. } => format!("args.{field}"),
            ArgsError::InvalidItem { field, index, .. } => format!("args.{field}[{index}]"),
            ArgsError::TimeoutZero | ArgsError::TimeoutTooLong { .. } | ArgsError::TimeoutTooShort { .. } => {
                "timeout_secs".to_owned()
            }
            _ => "args".to_owned(),
        };
        ApiError::invalid(field, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use viworks_core::wire::Verb;

    #[test]
    fn every_error_has_its_status_code_and_the_documented_shape() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400, "bad_request"),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::Forbidden { role: "viewer", needs: "operator" }, 403, "forbidden"),
            (ApiError::NotFound("x".into()), 404, "not_found"),
            (ApiError::MethodNotAllowed { method: "PUT".into(), allow: "GET".into() }, 405, "method_not_allowed"),
            (ApiError::RequestTimeout, 408, "request_timeout"),
            (ApiError::Conflict("x".into()), 409, "conflict"),
            (ApiError::PayloadTooLarge, 413, "payload_too_large"),
            (ApiError::invalid("verb", "x"), 422, "unprocessable"),
            (ApiError::RateLimited(Duration::from_millis(1500)), 429, "rate_limited"),
            (ApiError::QueueFull(Duration::from_secs(3)), 429, "queue_full"),
            (ApiError::Internal, 500, "internal"),
            (ApiError::Unavailable("x"), 503, "unavailable"),
        ];
        for (error, status, code) in cases {
            assert_eq!((error.status(), error.code()), (status, code), "{error:?}");
            let body = error.body("r1");
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["error"]["req_id"], "r1");
            assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(body.as_object().map(|o| o.len()), Some(1), "only `error` at the top");
        }
    }

    #[test]
    fn retry_after_is_given_in_whole_seconds_rounded_up_for_429_and_503_only() {
        assert_eq!(ApiError::RateLimited(Duration::from_millis(1500)).retry_after(), Some(2));
        assert_eq!(ApiError::RateLimited(Duration::from_millis(1)).retry_after(), Some(1));
        assert_eq!(ApiError::QueueFull(Duration::from_secs(3)).retry_after(), Some(3));
        assert_eq!(ApiError::Unavailable("x").retry_after(), Some(5));
        assert_eq!(ApiError::Unauthorized.retry_after(), None);
    }

    #[test]
    fn argument_errors_name_the_field_to_blame() {
        let verb = Verb::new("add_user").expect("valid name");
        let error: ApiError = viworks_core::verbs::validate(&verb, &serde_json::json!({ "username": "x; rm -rf /" }))
            .expect_err("invalid")
            .into();
        assert_eq!(error.status(), 422);
        assert_eq!(error.body("r")["error"]["field"], "args.username");
        let unknown: ApiError = viworks_core::verbs::validate(&Verb::new("rm_rf").expect("valid name"), &Value::Null)
            .expect_err("unknown")
            .into();
        assert_eq!(unknown.body("r")["error"]["field"], "verb");
    }

    #[test]
    fn store_failures_name_no_internals() {
        let error: ApiError = StoreError::Database("disk I/O error at /var/lib/viworks/host.db".into()).into();
        assert_eq!(error.status(), 503);
        assert!(!error.to_string().contains("/var/lib"), "{error}");
    }
}
