//! Building responses: JSON bodies, error bodies with their headers, and the headers every
//! response carries (`X-Request-Id`, the rate-limit headers, no caching, no sniffing).

use std::convert::Infallible;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use hyper::body::Bytes;
use hyper::header::{self, HeaderName, HeaderValue};

use super::ApiError;
use super::rate_limit::Quota;

/// A response body: a whole buffer or a stream of server-sent events.
pub type Body = BoxBody<Bytes, Infallible>;

/// What a handler produced.
pub enum Reply {
    /// A JSON body with a status.
    Json(u16, serde_json::Value),
    /// A finished response: another content type, or a stream.
    Raw(Response<Body>),
}

/// A whole-buffer body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A response with `status`, `content_type` and `body`.
pub fn with_body(status: u16, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON response.
pub fn json(status: u16, body: &serde_json::Value) -> Response<Body> {
    // A `Value` always serialises.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    with_body(status, "application/json", full(bytes))
}

/// The response to a reply.
pub fn reply(reply: Reply) -> Response<Body> {
    match reply {
        Reply::Json(status, body) => json(status, &body),
        Reply::Raw(response) => response,
    }
}

/// The response to an error: its JSON body and the headers it calls for (`Retry-After`,
/// `Allow`, `WWW-Authenticate`; `Connection: close` when the body was not read).
pub fn error(error: &ApiError, req_id: &str) -> Response<Body> {
    let mut response = json(error.status(), &error.body(req_id));
    let headers = response.headers_mut();
    if let Some(seconds) = error.retry_after() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    match error {
        ApiError::Unauthorized => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"viworks\""));
        }
        ApiError::MethodNotAllowed { allow, .. } => {
            if let Ok(value) = HeaderValue::from_str(allow) {
                headers.insert(header::ALLOW, value);
            }
        }
        ApiError::PayloadTooLarge | ApiError::RequestTimeout => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    response
}

/// Adds the headers every response carries: `X-Request-Id`; the rate-limit headers when a
/// quota applies; `Cache-Control: no-store` unless the handler chose otherwise (responses
/// hold fleet data and, for enrollment, private keys); `X-Content-Type-Options: nosniff`.
pub fn finish(mut response: Response<Body>, req_id: &str, quota: Option<Quota>) -> Response<Body> {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(req_id) {
        headers.insert(HeaderName::from_static("x-request-id"), value);
    }
    if let Some(quota) = quota {
        headers.insert(HeaderName::from_static("x-ratelimit-limit"), HeaderValue::from(quota.limit));
        headers.insert(HeaderName::from_static("x-ratelimit-remaining"), HeaderValue::from(quota.remaining));
        headers.insert(HeaderName::from_static("x-ratelimit-reset"), HeaderValue::from(quota.reset_epoch_secs()));
    }
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use viworks_core::Timestamp;

    #[test]
    fn every_response_carries_its_request_id_and_the_rate_limit_headers_when_given() {
        let quota = Quota { limit: 120, remaining: 7, reset: Timestamp::from_millis(1_700_000_000_001) };
        let response = finish(json(200, &serde_json::json!({})), "r1", Some(quota));
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(header("X-Request-Id").as_deref(), Some("r1"));
        assert_eq!(header("X-RateLimit-Limit").as_deref(), Some("120"));
        assert_eq!(header("X-RateLimit-Remaining").as_deref(), Some("7"));
        assert_eq!(header("X-RateLimit-Reset").as_deref(), Some("1700000001"), "seconds, rounded up");
        assert_eq!(header("Cache-Control").as_deref(), Some("no-store"));
        assert_eq!(header("Content-Type").as_deref(), Some("application/json"));
        let bare = finish(json(200, &serde_json::json!({})), "r2", None);
        assert!(bare.headers().get("X-RateLimit-Limit").is_none());
    }

    #[test]
    fn errors_carry_the_headers_they_call_for() {
        let limited = error(&ApiError::RateLimited(Duration::from_millis(2500)), "r");
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers().get("Retry-After").and_then(|v| v.to_str().ok()), Some("3"));
        let unauthorized = error(&ApiError::Unauthorized, "r");
        assert!(unauthorized.headers().get("WWW-Authenticate").is_some());
        let not_allowed = error(&ApiError::MethodNotAllowed { method: "PUT".into(), allow: "GET, POST".into() }, "r");
        assert_eq!(not_allowed.headers().get("Allow").and_then(|v| v.to_str().ok()), Some("GET, POST"));
        let too_large = error(&ApiError::PayloadTooLarge, "r");
        assert_eq!(too_large.headers().get("Connection").and_then(|v| v.to_str().ok()), Some("close"));
    }
}
