//! The route table: every route the API serves, in one list that the router dispatches from,
//! that says who may call each route and how its mutations are audited, and that a test
//! checks against `docs/openapi.yaml` in both directions.

use crate::store::Role;

/// What a route does; the handlers match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /health`
    Health,
    /// `GET /internal/_healthz`
    Healthz,
    /// `GET /metrics`
    Metrics,
    /// `GET /`
    Dashboard,
    /// `POST /api/v1/commands`
    SubmitCommands,
    /// `GET /api/v1/commands`
    ListCommands,
    /// `GET /api/v1/commands/{id}`
    GetCommand,
    /// `POST /api/v1/commands/{id}/cancel`
    CancelCommand,
    /// `GET /api/v1/jobs/{id}`
    GetJob,
    /// `GET /api/v1/jobs/{id}/events`
    JobEvents,
    /// `GET /api/v1/agents`
    ListAgents,
    /// `POST /api/v1/agents`
    EnrollAgent,
    /// `GET /api/v1/agents/{id}`
    GetAgent,
    /// `DELETE /api/v1/agents/{id}`
    RevokeAgent,
    /// `PATCH /api/v1/agents/{id}`
    PatchAgent,
    /// `GET /api/v1/telemetry/{agent_id}`
    Telemetry,
    /// `GET /api/v1/telemetry/{agent_id}/latest`
    LatestTelemetry,
    /// `GET /api/v1/audit`
    Audit,
    /// `GET /api/v1/dead-letters`
    DeadLetters,
    /// `POST /api/v1/tokens`
    CreateToken,
}

/// One row of the route table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// The HTTP method, upper case.
    pub method: &'static str,
    /// The path; `{name}` matches exactly one non-empty segment.
    pub pattern: &'static str,
    /// What it does.
    pub route: Route,
    /// The least role that may call it; `None` for routes served without a token.
    pub role: Option<Role>,
    /// The audit action of a mutation, `api.<noun>.<verb>`; empty for reads.
    pub action: &'static str,
}

const fn public(method: &'static str, pattern: &'static str, route: Route) -> RouteSpec {
    RouteSpec { method, pattern, route, role: None, action: "" }
}

const fn read(pattern: &'static str, route: Route) -> RouteSpec {
    RouteSpec { method: "GET", pattern, route, role: Some(Role::Viewer), action: "" }
}

const fn write(
    method: &'static str,
    pattern: &'static str,
    route: Route,
    role: Role,
    action: &'static str,
) -> RouteSpec {
    RouteSpec { method, pattern, route, role: Some(role), action }
}

/// Every route the API serves. Viewers read; operators also submit and cancel commands;
/// admins also enroll, revoke and patch agents and create tokens.
pub const ROUTES: &[RouteSpec] = &[
    public("GET", "/health", Route::Health),
    public("GET", "/internal/_healthz", Route::Healthz),
    public("GET", "/metrics", Route::Metrics),
    public("GET", "/", Route::Dashboard),
    write("POST", "/api/v1/commands", Route::SubmitCommands, Role::Operator, "api.commands.submit"),
    read("/api/v1/commands", Route::ListCommands),
    read("/api/v1/commands/{id}", Route::GetCommand),
    write("POST", "/api/v1/commands/{id}/cancel", Route::CancelCommand, Role::Operator, "api.commands.cancel"),
    read("/api/v1/jobs/{id}", Route::GetJob),
    read("/api/v1/jobs/{id}/events", Route::JobEvents),
    read("/api/v1/agents", Route::ListAgents),
    write("POST", "/api/v1/agents", Route::EnrollAgent, Role::Admin, "api.agents.enroll"),
    read("/api/v1/agents/{id}", Route::GetAgent),
    write("DELETE", "/api/v1/agents/{id}", Route::RevokeAgent, Role::Admin, "api.agents.revoke"),
    write("PATCH", "/api/v1/agents/{id}", Route::PatchAgent, Role::Admin, "api.agents.update"),
    read("/api/v1/telemetry/{agent_id}", Route::Telemetry),
    read("/api/v1/telemetry/{agent_id}/latest", Route::LatestTelemetry),
    read("/api/v1/audit", Route::Audit),
    read("/api/v1/dead-letters", Route::DeadLetters),
    write("POST", "/api/v1/tokens", Route::CreateToken, Role::Admin, "api.tokens.create"),
];

/// How a request matched the table.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched<'a> {
    /// A route, with the path parameter if its pattern has one.
    Route(&'static RouteSpec, Option<&'a str>),
    /// The path exists with other methods, listed comma-separated for `Allow`.
    MethodNotAllowed(String),
    /// No route has this path.
    NotFound,
}

/// Finds the route for `method` and `path` (without the query). Costs a walk of the table.
pub fn find<'a>(method: &str, path: &'a str) -> Matched<'a> {
    let mut allowed: Vec<&str> = Vec::new();
    for spec in ROUTES {
        if let Some(param) = matches(spec.pattern, path) {
            if spec.method == method {
                return Matched::Route(spec, param);
            }
            allowed.push(spec.method);
        }
    }
    if allowed.is_empty() { Matched::NotFound } else { Matched::MethodNotAllowed(allowed.join(", ")) }
}

/// The parameter of `path` if it matches `pattern` (which has at most one `{name}`).
fn matches<'a>(pattern: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut param = None;
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return Some(param),
            (Some(w), Some(g)) if w.starts_with('{') && !g.is_empty() => param = Some(g),
            (Some(w), Some(g)) if w == g => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str) -> Option<(Route, Option<String>)> {
        match find(method, path) {
            Matched::Route(spec, param) => Some((spec.route, param.map(str::to_owned))),
            _ => None,
        }
    }

    #[test]
    fn paths_match_their_routes_and_parameters() {
        assert_eq!(route("GET", "/api/v1/commands/c-1"), Some((Route::GetCommand, Some("c-1".into()))));
        assert_eq!(route("POST", "/api/v1/commands/c-1/cancel"), Some((Route::CancelCommand, Some("c-1".into()))));
        assert_eq!(route("GET", "/api/v1/telemetry/gw-1/latest"), Some((Route::LatestTelemetry, Some("gw-1".into()))));
        assert_eq!(route("GET", "/api/v1/telemetry/gw-1"), Some((Route::Telemetry, Some("gw-1".into()))));
        assert_eq!(route("POST", "/api/v1/commands"), Some((Route::SubmitCommands, None)));
        assert_eq!(route("GET", "/"), Some((Route::Dashboard, None)));
        assert_eq!(route("GET", "/api/v1/commands/"), None, "an empty segment is no parameter");
        assert_eq!(find("GET", "/api/v1/commands//cancel"), Matched::NotFound);
        assert_eq!(find("GET", "/api/v1/commands/a/b"), Matched::NotFound);
        assert_eq!(find("GET", "/nope"), Matched::NotFound);
        assert_eq!(find("GET", ""), Matched::NotFound);
    }

    #[test]
    fn a_known_path_with_another_method_lists_the_allowed_ones() {
        assert_eq!(find("PUT", "/api/v1/agents/gw-1"), Matched::MethodNotAllowed("GET, DELETE, PATCH".into()));
        assert_eq!(find("DELETE", "/api/v1/commands"), Matched::MethodNotAllowed("POST, GET".into()));
    }

    #[test]
    fn reads_need_a_viewer_mutations_an_operator_or_admin_and_every_mutation_is_audited() {
        for spec in ROUTES {
            match (spec.method, spec.role) {
                (_, None) => assert!(spec.method == "GET" && !spec.pattern.starts_with("/api/"), "{spec:?}"),
                ("GET", Some(role)) => assert_eq!((role, spec.action), (Role::Viewer, ""), "{spec:?}"),
                (_, Some(role)) => {
                    assert!(role >= Role::Operator, "{spec:?}");
                    assert!(spec.action.starts_with("api.") && spec.action.matches('.').count() == 2, "{spec:?}");
                }
            }
        }
        let admin_only = ["api.agents.enroll", "api.agents.revoke", "api.agents.update", "api.tokens.create"];
        for spec in ROUTES.iter().filter(|s| admin_only.contains(&s.action)) {
            assert_eq!(spec.role, Some(Role::Admin), "{spec:?}");
        }
    }

    #[test]
    fn no_two_routes_share_a_method_and_pattern() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(!(a.method == b.method && a.pattern == b.pattern), "{a:?} twice");
            }
        }
    }

    /// `(METHOD, path)` for every operation under `paths:` in an OpenAPI document: a path is a
    /// two-space-indented key starting with `/`, an operation a four-space-indented HTTP
    /// method key below it. No YAML library needed for a document written in this layout.
    fn described(spec: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut in_paths = false;
        let mut path = None;
        for line in spec.lines() {
            let trimmed = line.trim_end();
            if !trimmed.starts_with(' ') && !trimmed.is_empty() {
                in_paths = trimmed == "paths:";
                path = None;
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = trimmed.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
                path = Some(format!("/{p}"));
            } else if let (Some(p), Some(method)) =
                (&path, trimmed.strip_prefix("    ").and_then(|m| m.strip_suffix(':')))
                && ["get", "post", "put", "patch", "delete", "head", "options"].contains(&method)
            {
                out.push((method.to_uppercase(), p.clone()));
            }
        }
        out
    }

    #[test]
    fn every_route_in_the_table_is_described_in_the_openapi_document_and_back() {
        let spec = include_str!("../../../docs/openapi.yaml");
        let described = described(spec);
        assert!(described.len() >= ROUTES.len(), "the scan found too little: {described:?}");
        for route in ROUTES {
            assert!(
                described.contains(&(route.method.to_owned(), route.pattern.to_owned())),
                "{} {} is served but not described in docs/openapi.yaml",
                route.method,
                route.pattern
            );
        }
        for (method, pattern) in &described {
            assert!(
                ROUTES.iter().any(|r| r.method == method && r.pattern == pattern),
                "docs/openapi.yaml describes {method} {pattern}, which is not served"
            );
        }
    }

    #[test]
    fn the_openapi_scan_reads_paths_and_methods_only_under_paths() {
        let doc = "openapi: 3.0.3\ncomponents:\n  /fake:\n    get:\npaths:\n  /:\n    get:\n      summary: x\n  /a/{id}:\n    delete:\n    parameters:\n";
        assert_eq!(described(doc), vec![("GET".into(), "/".into()), ("DELETE".into(), "/a/{id}".into())]);
    }
}
