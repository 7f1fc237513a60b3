//! What every request goes through, in this order:
//! 1. the client IP's budget (reads and writes apart), before anything else, so that token
//!    guessing and scanning are throttled;
//! 2. the route table (404, 405);
//! 3. for routes that need a token: authentication (401), the token's budget (429), the
//!    route's role (403);
//! 4. the body, for mutations: at most 1 MiB (413 before reading more), within 30 s (408);
//! 5. the handler; then the audit record of a mutation, whatever its outcome, and the request
//!    counted in `viworks_http_requests{kind="<METHOD> <pattern> <class>"}`.
//!
//! A panicking handler answers 500 `internal` instead of dropping the connection.

use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{HeaderMap, Request, Response};
use serde_json::json;

use super::audit::{self, Mutation};
use super::auth;
use super::rate_limit::{Budget, Client};
use super::request::{AuditNote, Call, Query};
use super::response::{self, Body, Reply};
use super::router::{self, Matched};
use super::server::Shared;
use super::{ApiError, MAX_BODY, handlers};
use crate::metrics::Metrics;
use crate::store::Store;

/// A body must arrive within this time once its head has.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers one request; never fails, never panics.
pub(super) async fn handle<S: Store + Clone>(
    shared: &Shared<S>,
    ip: IpAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    let req_id = shared.state.control.random_id();
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let matched = router::find(&method, &path);
    let label = match &matched {
        Matched::Route(spec, _) => format!("{} {}", spec.method, spec.pattern),
        _ => "unmatched".to_owned(),
    };
    let answer = respond(shared, ip, request, &method, &path, matched, &req_id);
    let response = AssertUnwindSafe(answer).catch_unwind().await.unwrap_or_else(|_| {
        tracing::error!(req_id, route = label, "an API handler panicked");
        response::finish(response::error(&ApiError::Internal, &req_id), &req_id, None)
    });
    let kind = format!("{label} {}xx", response.status().as_u16() / 100);
    Metrics::count(&shared.state.control.metrics().http_requests, &kind);
    response
}

async fn respond<S: Store + Clone>(
    shared: &Shared<S>,
    ip: IpAddr,
    request: Request<Incoming>,
    method: &str,
    path: &str,
    matched: Matched<'_>,
    req_id: &str,
) -> Response<Body> {
    let state = &*shared.state;
    let started = Instant::now();
    let budget = Budget::of_method(method);
    let fail = |error: &ApiError, quota| response::finish(response::error(error, req_id), req_id, quota);

    let per_ip = state.rate_limits.per_ip_per_minute;
    let ip_quota = match state.limiter.take(&Client::ip(ip), budget, per_ip, state.control.now()) {
        Ok(quota) => quota,
        Err(refused) => return fail(&ApiError::RateLimited(refused.retry_after), Some(refused.quota)),
    };
    let (spec, param) = match matched {
        Matched::Route(spec, param) => (spec, param),
        Matched::MethodNotAllowed(allow) => {
            return fail(&ApiError::MethodNotAllowed { method: method.to_owned(), allow }, None);
        }
        Matched::NotFound => return fail(&ApiError::NotFound(format!("no route {path}")), None),
    };
    let Some(role) = spec.role else {
        return response::finish(handlers::public(state, spec.route, req_id).await, req_id, None);
    };

    let caller = match auth::authenticate(state.control.store(), request.headers()).await {
        Ok(caller) => caller,
        Err(error) => {
            if budget == Budget::Write && matches!(error, ApiError::Unauthorized) {
                let detail = json!({ "req_id": req_id, "method": method, "path": path });
                state.control.audit_security("anonymous", spec.action, vec![ip.to_string()], "401", detail).await;
            }
            return fail(&error, None);
        }
    };
    let per_token = match budget {
        Budget::Read => state.rate_limits.reads_per_minute,
        Budget::Write => state.rate_limits.writes_per_minute,
    };
    let token = Client::Token(caller.token_hash.clone());
    let quota = match state.limiter.take(&token, budget, per_token, state.control.now()) {
        Ok(quota) => quota.tighter(ip_quota),
        Err(refused) => {
            if budget == Budget::Write {
                let detail = json!({ "req_id": req_id, "method": method, "path": path });
                let targets = param.map(|p| vec![p.to_owned()]).unwrap_or_default();
                state.control.audit_security(&caller.name, spec.action, targets, "429", detail).await;
            }
            return fail(&ApiError::RateLimited(refused.retry_after), Some(refused.quota));
        }
    };
    let audited = async |body: &[u8], outcome: Result<u16, &ApiError>, note: AuditNote| {
        if budget == Budget::Write {
            let (status, error) = match outcome {
                Ok(status) => (status, None),
                Err(error) => (error.status(), Some(error.code())),
            };
            let mutation = Mutation { spec, req_id, caller: &caller, param, path, body, status, error, started };
            audit::write(state, &mutation, note).await;
        }
    };

    if let Err(error) = auth::authorize(&caller, role) {
        audited(&[], Err(&error), AuditNote::default()).await;
        return fail(&error, Some(quota));
    }
    let (parts, body) = request.into_parts();
    let body = match budget {
        Budget::Read => Bytes::new(),
        Budget::Write => match read_body(&parts.headers, body).await {
            Ok(body) => body,
            Err(error) => {
                audited(&[], Err(&error), AuditNote::default()).await;
                return fail(&error, Some(quota));
            }
        },
    };
    // The caller is authenticated, within both budgets and allowed this route; a body is at
    // most MAX_BODY. Handlers check only what the request asks for.
    let mut call = Call {
        req_id,
        caller: &caller,
        param,
        query: Query::parse(parts.uri.query().unwrap_or("")),
        body,
        headers: &parts.headers,
        path,
        streams: &shared.streams,
        note: AuditNote::default(),
    };
    let outcome = handlers::dispatch(state, spec.route, &mut call).await;
    let note = std::mem::take(&mut call.note);
    match outcome {
        Ok(reply) => {
            audited(&call.body, Ok(status_of(&reply)), note).await;
            response::finish(response::reply(reply), req_id, Some(quota))
        }
        Err(error) => {
            audited(&call.body, Err(&error), note).await;
            fail(&error, Some(quota))
        }
    }
}

fn status_of(reply: &Reply) -> u16 {
    match reply {
        Reply::Json(status, _) => *status,
        Reply::Raw(response) => response.status().as_u16(),
    }
}

/// Reads a body of at most [`MAX_BODY`] bytes: refused from its `Content-Length` before any of
/// it is read, or as soon as a chunked body passes the limit.
async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
    let declared = headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge),
        Ok(Err(_)) => Err(ApiError::BadRequest("the request body could not be read".into())),
    }
}
