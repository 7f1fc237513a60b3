//! `GET /`: the dashboard, one static page with inline script and style and no external
//! assets. An operator pastes a token and sees agents and recent commands, runs
//! `get_system_health`, and follows a job's events. The token never leaves the page's memory.
//!
//! The page is served with a strict Content-Security-Policy: its inline script and style run
//! only with a nonce fresh for each response, so injected markup could run nothing.

use hyper::Response;
use hyper::header::HeaderValue;

use super::ApiState;
use super::response::{self, Body};
use crate::store::Store;

const PAGE: &str = include_str!("dashboard.html");

/// The placeholder the page carries where each response's nonce goes.
const NONCE: &str = "__NONCE__";

/// The dashboard page with a fresh nonce.
pub(super) fn page<S: Store + Clone>(state: &ApiState<S>) -> Response<Body> {
    let nonce = state.control.random_id();
    let mut response =
        response::with_body(200, "text/html; charset=utf-8", response::full(PAGE.replace(NONCE, &nonce)));
    let policy = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&policy) {
        headers.insert(hyper::header::CONTENT_SECURITY_POLICY, value);
    }
    headers.insert(hyper::header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(hyper::header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_small_self_contained_and_nonced() {
        assert!(PAGE.len() < 16 * 1024, "keep the dashboard small: {} bytes", PAGE.len());
        assert_eq!(PAGE.matches(NONCE).count(), 2, "one nonce on the script, one on the style");
        for external in ["src=\"http", "href=\"http", "@import", "src=\"//"] {
            assert!(!PAGE.contains(external), "the page loads nothing from elsewhere: {external}");
        }
        assert!(!PAGE.contains("innerHTML"), "text is set with textContent only");
        for route in ["/api/v1/agents", "/api/v1/commands", "/events", "get_system_health"] {
            assert!(PAGE.contains(route), "{route}");
        }
    }
}
