//! A request as handlers see it, once routed, authenticated and within budget: the caller,
//! the path parameter, the query, the body, and the audit note a mutation fills in.

use std::str::FromStr;
use std::sync::Arc;

use hyper::HeaderMap;
use hyper::body::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use super::ApiError;
use super::auth::Caller;

/// What a mutation adds to its audit record; the pipeline writes the record whatever the
/// outcome.
#[derive(Clone, Debug, Default)]
pub struct AuditNote {
    /// What the mutation concerned (agent ids, command ids); the path parameter when empty.
    pub targets: Vec<String>,
    /// BLAKE3 of the canonical JSON of the mutation's arguments; of the body when `None`.
    pub args_hash: Option<String>,
    /// Anything else worth keeping. Never secrets: no tokens, keys or argument values.
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// A routed, authenticated request.
pub struct Call<'a> {
    /// The request id (also in `X-Request-Id`).
    pub req_id: &'a str,
    /// The caller.
    pub caller: &'a Caller,
    /// The path parameter, if the route has one.
    pub param: Option<&'a str>,
    /// The decoded query.
    pub query: Query,
    /// The body, at most [`super::MAX_BODY`] bytes; empty for reads.
    pub body: Bytes,
    /// The request's headers.
    pub headers: &'a HeaderMap,
    /// The request path.
    pub path: &'a str,
    /// Room for event streams, shared by the whole listener.
    pub streams: &'a Arc<Semaphore>,
    /// Filled in by mutations for their audit record.
    pub note: AuditNote,
}

impl Call<'_> {
    /// The path parameter parsed as `T`; 404 naming `what` when it cannot be one, since no
    /// such resource can exist.
    pub fn param<T: FromStr>(&self, what: &str) -> Result<T, ApiError> {
        let text = self.param.unwrap_or_default();
        text.parse().map_err(|_| ApiError::NotFound(format!("no {what} {text:?}")))
    }
}

/// A request body as JSON of type `T`: 400 when it is empty, not JSON, or not of `T`'s shape
/// (a wrong type, a missing or unknown field). Every body parser of the API goes through this.
pub fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest("a JSON body is required".into()));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Decoded query parameters, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `a=1&b=x+y&c=%2F`: `+` is a space, `%XX` a byte; malformed escapes stay as
    /// they are.
    pub fn parse(query: &str) -> Self {
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
                .collect(),
        )
    }

    /// Refuses parameters other than `allowed` and repeated ones (400), so that a misspelt
    /// filter is an error rather than a silently unfiltered list.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        for (n, (key, _)) in self.0.iter().enumerate() {
            if !allowed.contains(&key.as_str()) {
                let known = if allowed.is_empty() { "none".to_owned() } else { allowed.join(", ") };
                return Err(ApiError::BadRequest(format!("unknown query parameter {key:?}; known: {known}")));
            }
            if self.0[..n].iter().any(|(k, _)| k == key) {
                return Err(ApiError::BadRequest(format!("query parameter {key:?} is given twice")));
            }
        }
        Ok(())
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The value of `name` parsed as `T`; 400 when it does not parse.
    pub fn parsed<T: FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        self.get(name)
            .map(|v| v.parse::<T>().map_err(|_| ApiError::BadRequest(format!("invalid {name}: {v:?}"))))
            .transpose()
    }

    /// `limit`, between 1 and `max`, `default` when absent.
    pub fn limit(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.get("limit") {
            None => Ok(default),
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| ApiError::BadRequest(format!("limit must be between 1 and {max}"))),
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_split_and_decoded() {
        let query = Query::parse("status=queued&agent=gw%2D1&x=a+b&flag&bad=%zz&end=%4");
        assert_eq!(query.get("status"), Some("queued"));
        assert_eq!(query.get("agent"), Some("gw-1"));
        assert_eq!(query.get("x"), Some("a b"));
        assert_eq!(query.get("flag"), Some(""));
        assert_eq!(query.get("bad"), Some("%zz"));
        assert_eq!(query.get("end"), Some("%4"));
        assert_eq!(Query::parse("a=%41").get("a"), Some("A"));
        assert_eq!(Query::parse("a=%e2%82%ac").get("a"), Some("€"));
        assert_eq!(Query::parse("a=%"), Query(vec![("a".into(), "%".into())]));
        assert_eq!(Query::parse(""), Query::default());
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        assert!(Query::parse("status=queued&limit=5").only(&["status", "limit"]).is_ok());
        let typo = Query::parse("stauts=queued").only(&["status"]).expect_err("a typo");
        assert_eq!(typo.status(), 400);
        assert!(typo.to_string().contains("stauts"), "{typo}");
        assert!(Query::parse("limit=1&limit=2").only(&["limit"]).is_err());
        assert!(Query::parse("x=1").only(&[]).is_err());
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(Query::parse("").limit(100, 1000).ok(), Some(100));
        assert_eq!(Query::parse("limit=1000").limit(100, 1000).ok(), Some(1000));
        for bad in ["limit=0", "limit=1001", "limit=-1", "limit=x"] {
            assert_eq!(Query::parse(bad).limit(100, 1000).map_err(|e| e.status()), Err(400), "{bad}");
        }
        assert_eq!(Query::parse("n=7").parsed::<u64>("n").ok(), Some(Some(7)));
        assert!(Query::parse("n=x").parsed::<u64>("n").is_err());
    }
}
