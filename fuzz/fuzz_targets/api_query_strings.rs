//! Any query string of the list routes (`GET /api/v1/commands`, `/agents`, `/audit`,
//! `/dead-letters`, `/telemetry/{agent_id}`) reads to a filter within its documented bounds or
//! to a 400, never a panic; any method and path routes to one route whose path parameter is a
//! non-empty segment, or to a 404 or 405 that lists only other methods; and a query written
//! with every byte percent-encoded decodes back to what was written.
//!
//! The first byte picks the operation (modulo 8): 0 to 4 the query of one list route, 5 the
//! query of a route that takes none, 6 routing (a second byte picks the method, the rest is
//! the path), 7 the encoding round trip (the rest is a list of two-byte-length chunks, key
//! then value). For 0 to 5 the rest of the input is the query text after `?`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viworks_core::idempotency::JobId;
use viworks_core::wire::{AgentId, CommandId};
use viworks_fuzz::Script;
use viworks_host::api::ApiError;
use viworks_host::api::input::{
    AgentStatus, Query, STATES, agent_listing, audit_filter, command_filter, dead_letters_limit, telemetry_range,
};
use viworks_host::api::router::{self, Matched, ROUTES, Route};

const METHODS: &[&str] = &["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS", "get"];

/// A query parser's refusal is always a 400 naming what is wrong.
fn bad_request(error: ApiError) {
    assert_eq!(error.status(), 400, "{error:?}");
    assert!(!error.to_string().is_empty());
}

/// `limit` as the parser must have read it.
fn check_limit(query: &Query, limit: usize, default: usize, max: usize) {
    assert!((1..=max).contains(&limit), "limit {limit}");
    match query.get("limit") {
        None => assert_eq!(limit, default),
        Some(text) => assert_eq!(text.parse::<usize>().ok(), Some(limit)),
    }
}

fn cursor(query: &Query, name: &str) -> Option<u64> {
    query.get(name).map(|text| text.parse().expect("an accepted cursor is an integer"))
}

fn list_query(pick: u8, text: &str) {
    let query = Query::parse(text);
    match pick {
        0 => match command_filter(&query) {
            Ok(filter) => {
                assert!(filter.status.as_deref().is_none_or(|s| STATES.contains(&s)));
                assert_eq!(filter.agent.as_ref().map(ToString::to_string).as_deref(), query.get("agent"));
                assert_eq!(filter.verb.as_ref().map(ToString::to_string).as_deref(), query.get("verb"));
                assert_eq!(filter.before, cursor(&query, "cursor"));
                check_limit(&query, filter.limit, 100, 1000);
            }
            Err(error) => bad_request(error),
        },
        1 => match agent_listing(&query) {
            Ok(listing) => {
                let status = listing.status.map(|s| match s {
                    AgentStatus::Online => "online",
                    AgentStatus::Offline => "offline",
                    AgentStatus::Revoked => "revoked",
                });
                assert_eq!(status, query.get("status"));
                assert_eq!(listing.site.as_deref(), query.get("site"));
                assert_eq!(listing.after.as_ref().map(ToString::to_string).as_deref(), query.get("cursor"));
                check_limit(&query, listing.limit, 100, 1000);
            }
            Err(error) => bad_request(error),
        },
        2 => match audit_filter(&query) {
            Ok(filter) => {
                assert_eq!(
                    (filter.action.as_deref(), filter.actor.as_deref()),
                    (query.get("action"), query.get("actor"))
                );
                assert_eq!(filter.before, cursor(&query, "cursor"));
                check_limit(&query, filter.limit, 100, 1000);
            }
            Err(error) => bad_request(error),
        },
        3 => match dead_letters_limit(&query) {
            Ok(limit) => check_limit(&query, limit, 100, 1000),
            Err(error) => bad_request(error),
        },
        4 => match telemetry_range(&query) {
            Ok(range) => {
                if let (Some(from), Some(to)) = (range.from, range.to) {
                    assert!(from <= to);
                }
                assert_eq!(range.from.map(|t| t.as_millis()), cursor(&query, "from"));
                assert_eq!(range.metric.as_ref().map(ToString::to_string).as_deref(), query.get("metric"));
                check_limit(&query, range.limit, 1000, 10_000);
            }
            Err(error) => bad_request(error),
        },
        _ => match query.only(&[]) {
            Ok(()) => assert!(text.split('&').all(str::is_empty), "{text:?} has a parameter"),
            Err(error) => bad_request(error),
        },
    }
}

fn route(method: &str, path: &str) {
    match router::find(method, path) {
        Matched::Route(spec, param) => {
            assert_eq!(spec.method, method);
            assert_eq!(param.is_some(), spec.pattern.contains('{'), "{path:?} as {}", spec.pattern);
            let Some(param) = param else {
                assert_eq!(spec.pattern, path);
                return;
            };
            assert!(!param.is_empty() && !param.contains('/'), "{param:?}");
            // What the handler's `call.param` parses it as; a failure is a 404.
            let round_trip = match spec.route {
                Route::GetCommand | Route::CancelCommand => param.parse::<CommandId>().map(|id| id.to_string()).ok(),
                Route::GetJob | Route::JobEvents => param.parse::<JobId>().map(|id| id.to_string()).ok(),
                _ => param.parse::<AgentId>().map(|id| id.to_string()).ok(),
            };
            assert!(round_trip.is_none_or(|text| text == param));
        }
        Matched::MethodNotAllowed(allow) => {
            let allowed: Vec<&str> = allow.split(", ").collect();
            assert!(!allowed.is_empty() && !allowed.contains(&method), "{allow}");
            for other in allowed {
                assert!(matches!(router::find(other, path), Matched::Route(..)), "{other} {path}");
            }
        }
        Matched::NotFound => {
            assert!(ROUTES.iter().all(|r| !matches!(router::find(r.method, path), Matched::Route(..))), "{path}");
        }
    }
}

/// Writes `text` with every byte but the unreserved ones as `%XX`.
fn encode(text: &str, out: &mut String) {
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

fn round_trip(mut script: Script<'_>) {
    let mut pairs: Vec<(String, String)> = Vec::new();
    while script.clone().byte().is_some() && pairs.len() < 64 {
        let key = String::from_utf8_lossy(script.chunk()).into_owned();
        let value = String::from_utf8_lossy(script.chunk()).into_owned();
        pairs.push((key, value));
    }
    let mut text = String::new();
    for (n, (key, value)) in pairs.iter().enumerate() {
        if n > 0 {
            text.push('&');
        }
        encode(key, &mut text);
        text.push('=');
        encode(value, &mut text);
    }
    let query = Query::parse(&text);
    for (n, (key, value)) in pairs.iter().enumerate() {
        if pairs[..n].iter().all(|(k, _)| k != key) {
            assert_eq!(query.get(key), Some(value.as_str()), "{text:?}");
        }
    }
    let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    let repeated = keys.iter().enumerate().any(|(n, k)| keys[..n].contains(k));
    assert_eq!(query.only(&keys).is_ok(), !repeated, "{text:?}");
}

fuzz_target!(|data: &[u8]| {
    let mut script = Script::new(data);
    let Some(pick) = script.byte() else { return };
    match pick % 8 {
        pick @ 0..=5 => list_query(pick, &String::from_utf8_lossy(script.rest())),
        6 => {
            let method = METHODS[usize::from(script.byte().unwrap_or(0)) % METHODS.len()];
            route(method, &String::from_utf8_lossy(script.rest()));
        }
        _ => round_trip(script),
    }
});
