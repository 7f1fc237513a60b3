//! `exec`: run one program by absolute path with an argv. The path has exactly one spelling
//! (absolute, no `.`, `..` or empty components), so the agent can compare it with its
//! allow-list as a plain string. That allow-list check is the gateway's, not this module's:
//! parsing here only says the request is well formed, never that it may run.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Args, ArgsError, check_argv, fields};

/// The longest program path, in bytes (Linux's `PATH_MAX`).
const MAX_PATH_LEN: usize = 4096;

/// Arguments of `exec`.
///
/// The agent refuses the command unless its configured allow-list contains [`Exec::path`]
/// exactly; with no allow-list configured, it refuses every `exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Exec {
    /// The program: an absolute path of at most 4096 bytes, without control characters and
    /// without `.`, `..` or empty components (no `//`, no trailing `/`).
    pub path: String,
    /// The arguments after the program name: at most 64, each at most 4096 bytes without NUL.
    /// Passed verbatim, never through a shell; they may start with `-`, which is the
    /// program's business.
    pub args: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    path: String,
    #[serde(default)]
    args: Vec<String>,
}

pub(super) fn parse_exec(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawExec = fields(args)?;
    check_path(&raw.path).map_err(|reason| ArgsError::InvalidField { field: "path", reason })?;
    check_argv("args", &raw.args)?;
    Ok(Args::Exec(Exec { path: raw.path, args: raw.args }))
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err("must be 1 to 4096 bytes long");
    }
    if path.chars().any(char::is_control) {
        return Err("must not contain NUL or control characters");
    }
    let Some(relative) = path.strip_prefix('/') else {
        return Err("must be an absolute path");
    };
    for component in relative.split('/') {
        match component {
            ".." => return Err("must not contain .. components"),
            "." | "" => return Err("must not contain . or empty components, nor end with /"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn exec(args: Value) -> Result<Exec, ArgsError> {
        match parse_exec(&args)? {
            Args::Exec(exec) => Ok(exec),
            other => panic!("exec parsed as {other:?}"),
        }
    }

    fn refused(args: Value) -> (&'static str, &'static str) {
        match exec(args) {
            Err(ArgsError::InvalidField { field, reason }) | Err(ArgsError::InvalidItem { field, reason, .. }) => {
                (field, reason)
            }
            other => panic!("expected a rule refusal, got {other:?}"),
        }
    }

    #[test]
    fn accepts_an_absolute_program_and_verbatim_arguments() {
        let run = exec(json!({"path": "/usr/bin/systemctl", "args": ["restart", "nginx.service"]})).expect("valid");
        assert_eq!(run.path, "/usr/bin/systemctl");
        assert_eq!(run.args, ["restart", "nginx.service"]);
        let bare = exec(json!({"path": "/opt/viworks/bin/rotate-logs"})).expect("no args");
        assert!(bare.args.is_empty());
        let odd = exec(json!({"path": "/bin/echo", "args": ["-n", "; rm -rf / $(id) `id`\n", ""]}));
        assert!(odd.is_ok(), "arguments are data handed to the program, never shell");
        assert!(exec(json!({"path": "/opt/my app/..hidden/run.sh"})).is_ok(), "`..hidden` is a name, not `..`");
    }

    #[test]
    fn refuses_relative_paths_and_traversal() {
        for bad in ["bin/sh", "sh", "./sh", "~/bin/sh", " /bin/sh"] {
            assert_eq!(refused(json!({"path": bad})), ("path", "must be an absolute path"), "{bad}");
        }
        for bad in ["/usr/bin/../../bin/sh", "/..", "/opt/allowed/../../bin/sh", "/opt/x/.."] {
            assert_eq!(refused(json!({"path": bad})), ("path", "must not contain .. components"), "{bad}");
        }
        for bad in ["/", "/usr//bin/sh", "/usr/bin/./sh", "/usr/bin/", "/."] {
            assert_eq!(
                refused(json!({"path": bad})).1,
                "must not contain . or empty components, nor end with /",
                "{bad}"
            );
        }
        for bad in ["/bin/sh\0", "/bin/sh\n", "/bin/\tsh"] {
            assert_eq!(refused(json!({"path": bad})).1, "must not contain NUL or control characters", "{bad:?}");
        }
        assert_eq!(refused(json!({"path": ""})).1, "must be 1 to 4096 bytes long");
        let longest = format!("/{}", "p".repeat(4095));
        assert!(exec(json!({"path": longest})).is_ok());
        assert_eq!(refused(json!({"path": format!("{longest}p")})).1, "must be 1 to 4096 bytes long");
    }

    #[test]
    fn arguments_are_bounded() {
        assert!(exec(json!({"path": "/bin/true", "args": vec!["x"; 64]})).is_ok());
        assert_eq!(refused(json!({"path": "/bin/true", "args": vec!["x"; 65]})).0, "args");
        assert!(exec(json!({"path": "/bin/true", "args": ["a".repeat(4096)]})).is_ok());
        assert!(matches!(
            exec(json!({"path": "/bin/true", "args": ["ok", "a".repeat(4097)]})),
            Err(ArgsError::InvalidItem { field: "args", index: 1, .. })
        ));
        assert_eq!(refused(json!({"path": "/bin/true", "args": ["\u{0}"]})).1, "contains a NUL byte");
    }

    #[test]
    fn shape_is_strict() {
        for bad in [
            json!({}),
            json!({"path": 1}),
            json!({"path": ["/bin/sh"]}),
            json!({"path": "/bin/sh", "args": "-c id"}),
            json!({"path": "/bin/sh", "args": [1]}),
            json!({"path": "/bin/sh", "shell": true}),
            json!({"path": "/bin/sh", "env": {}}),
        ] {
            assert!(matches!(exec(bad.clone()), Err(ArgsError::Malformed(_))), "{bad}");
        }
    }
}
