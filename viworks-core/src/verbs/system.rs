//! `get_system_health`: the one verb without arguments. It still refuses unknown fields, so a
//! client that believes it can pass options learns that it cannot.

use serde::Deserialize;
use serde_json::Value;

use super::{Args, ArgsError, fields};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNoArgs {}

pub(super) fn parse_get_system_health(args: &Value) -> Result<Args, ArgsError> {
    let RawNoArgs {} = fields(args)?;
    Ok(Args::GetSystemHealth)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn takes_no_arguments() {
        assert_eq!(parse_get_system_health(&json!({})).ok(), Some(Args::GetSystemHealth));
        assert!(matches!(parse_get_system_health(&json!({"verbose": true})), Err(ArgsError::Malformed(_))));
        assert!(matches!(parse_get_system_health(&json!({"": null})), Err(ArgsError::Malformed(_))));
    }
}
