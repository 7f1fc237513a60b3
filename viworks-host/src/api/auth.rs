//! Bearer API tokens: their form (`vwk_` and 64 lowercase hex digits), the hash the store keeps
//! instead of the token, and the lookup that turns an `Authorization` header into a caller.

use hyper::HeaderMap;

use super::ApiError;
use crate::store::{Role, Store, TokenRecord};

/// The prefix of every API token.
pub const TOKEN_PREFIX: &str = "vwk_";

/// Who is calling, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name, the actor in audit records.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The token's hash: its identity for rate limits and idempotency scopes.
    pub token_hash: String,
}

/// A new random API token and the hash the store keeps of it: `(token, hash)`. The token is
/// shown to its owner once; only the hash is stored.
///
/// Fails only if the operating system's random number generator does; a predictable token is
/// never returned.
pub fn new_token() -> Result<(String, String), getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)?;
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 64);
    token.push_str(TOKEN_PREFIX);
    for byte in secret {
        token.push_str(&format!("{byte:02x}"));
    }
    let hash = hash_token(&token);
    Ok((token, hash))
}

/// The stored form of an API token: BLAKE3 of its text, 64 lowercase hex digits. The token has
/// 256 random bits, so a fast unsalted hash is enough: the hash cannot be inverted, and a
/// stolen database grants nothing.
pub fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// Whether `token` has the form [`new_token`] gives: checked before the store is asked, so
/// garbage costs no database read.
pub fn is_well_formed(token: &str) -> bool {
    token.len() == TOKEN_PREFIX.len() + 64
        && token.starts_with(TOKEN_PREFIX)
        && token.bytes().skip(TOKEN_PREFIX.len()).all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The caller presenting `headers`. Fails with [`ApiError::Unauthorized`] without a token, or
/// with a malformed, unknown or revoked one; with a store error when the store fails. Costs one
/// BLAKE3 of 68 bytes and one indexed read.
pub async fn authenticate<S: Store>(store: &S, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let token = bearer(headers).filter(|t| is_well_formed(t)).ok_or(ApiError::Unauthorized)?;
    let token_hash = hash_token(token);
    match store.token(&token_hash).await? {
        Some(TokenRecord { revoked: false, name, role, .. }) => Ok(Caller { name, role, token_hash }),
        _ => Err(ApiError::Unauthorized),
    }
}

/// Whether `caller` may use a route needing `needs`; the 403 otherwise.
pub fn authorize(caller: &Caller, needs: Role) -> Result<(), ApiError> {
    if caller.role >= needs {
        Ok(())
    } else {
        Err(ApiError::Forbidden { role: caller.role.as_str(), needs: needs.as_str() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(hyper::header::AUTHORIZATION, value.parse().expect("valid header"));
        headers
    }

    #[test]
    fn new_tokens_have_the_documented_form_are_distinct_and_hash_as_stored() {
        let (token, hash) = new_token().expect("randomness");
        let (other, _) = new_token().expect("randomness");
        assert!(is_well_formed(&token), "{token}");
        assert_ne!(token, other);
        assert_eq!(hash, hash_token(&token));
        assert_eq!(hash.len(), 64);
        assert_eq!(hash, crate::token_hash(&token), "the CLI's tokens authenticate here");
    }

    #[test]
    fn only_well_formed_tokens_reach_the_store() {
        let good = format!("vwk_{}", "0a".repeat(32));
        assert!(is_well_formed(&good));
        assert!(!is_well_formed(&good.to_uppercase()));
        assert!(!is_well_formed(&format!("vwk_{}", "0A".repeat(32))));
        assert!(!is_well_formed(&format!("vwk_{}", "0g".repeat(32))));
        assert!(!is_well_formed(&good[..67]));
        assert!(!is_well_formed(&format!("{good}0")));
        assert!(!is_well_formed(&format!("xyz_{}", "0a".repeat(32))));
        assert!(!is_well_formed(&format!("vwk_{}é", "0a".repeat(31))));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_other_schemes_are_ignored() {
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn roles_are_ordered_viewer_operator_admin() {
        let caller = |role| Caller { name: "n".into(), role, token_hash: String::new() };
        assert!(authorize(&caller(Role::Viewer), Role::Viewer).is_ok());
        let refused = authorize(&caller(Role::Viewer), Role::Operator).expect_err("viewers only read");
        assert_eq!((refused.status(), refused.code()), (403, "forbidden"));
        assert!(authorize(&caller(Role::Operator), Role::Operator).is_ok());
        assert!(authorize(&caller(Role::Operator), Role::Admin).is_err());
        assert!(authorize(&caller(Role::Admin), Role::Admin).is_ok());
    }
}
