//! Verbs: the single definition of what an agent can be asked to run.
//!
//! The host checks a command against this module at the REST API, before anything is queued;
//! the gateway agent parses the same arguments into the same types before it executes. Each
//! verb has a [`VerbSpec`] in the [`REGISTRY`] (its risk, its timeouts, a documented example)
//! and a typed argument struct in [`Args`]. [`parse`] turns a command's JSON arguments into
//! [`Args`] in two steps: serde with `deny_unknown_fields` for shape, then semantic rules
//! (alphabets, lengths, ranges) that report the field and the rule they break.
//!
//! Every string and list is bounded, every name has a strict alphabet, and nothing here can
//! panic, whatever JSON it is given. Script arguments come out as an argv
//! ([`Args::script_argv`]) whose elements are passed verbatim to the program, never through a
//! shell.

mod docker;
mod exec;
mod names;
mod scripts;
mod spec;
mod system;

use std::time::Duration;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::wire::Verb;

pub use docker::{
    DockerLogs, DockerPs, DockerPull, DockerRm, DockerRun, DockerStop, DockerTarget, PortMapping, Protocol,
    RestartPolicy,
};
pub use exec::Exec;
pub use names::{ContainerRef, ImageRef, RESERVED_USERNAMES, Username, VpnProfile};
pub use scripts::{AddUser, AddVpnUser, DeleteUser, DeleteVpnUser};
pub use spec::{REGISTRY, Risk, VerbSpec, effective_timeout, spec};

/// Why a command's verb, arguments or timeout were refused.
///
/// The host answers all of these with 400 (422 where it distinguishes shape from meaning);
/// the agent answers them with a `rejected` result. Nothing was run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ArgsError {
    /// No verb of this name is registered.
    #[error("unknown verb {0}")]
    UnknownVerb(Verb),
    /// The arguments are neither a JSON object nor `null`.
    #[error("arguments must be a JSON object or null")]
    NotAnObject,
    /// The arguments do not have the verb's shape: an unknown or missing field, or a value of
    /// the wrong JSON type or out of its type's range (a negative count, a port above 65535).
    #[error("malformed arguments: {0}")]
    Malformed(#[source] serde_json::Error),
    /// A field has the right type but breaks a rule of the verb.
    #[error("argument {field} is invalid: it {reason}")]
    InvalidField {
        /// The field, as named in the JSON arguments.
        field: &'static str,
        /// The rule it breaks, as a phrase that follows "it".
        reason: &'static str,
    },
    /// One element of a list breaks a rule of the verb.
    #[error("argument {field}[{index}] is invalid: it {reason}")]
    InvalidItem {
        /// The list field, as named in the JSON arguments.
        field: &'static str,
        /// The element's position in the list, from 0.
        index: usize,
        /// The rule it breaks, as a phrase that follows "it".
        reason: &'static str,
    },
    /// A timeout of zero was requested.
    #[error("the timeout must be greater than zero")]
    TimeoutZero,
    /// The requested timeout is longer than the verb allows.
    #[error("a timeout of {requested:?} exceeds the maximum of {max:?} for this verb")]
    TimeoutTooLong {
        /// What was asked for.
        requested: Duration,
        /// The verb's maximum.
        max: Duration,
    },
    /// The requested timeout is too short for the arguments: it would end the command while
    /// the operation it asked for is still allowed to run (a `docker.stop` grace period).
    #[error("a timeout of {requested:?} is shorter than the {min:?} these arguments need")]
    TimeoutTooShort {
        /// What was asked for.
        requested: Duration,
        /// The least these arguments need.
        min: Duration,
    },
}

impl ArgsError {
    /// A stable `snake_case` name for this error, for API error bodies, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ArgsError::UnknownVerb(_) => "unknown_verb",
            ArgsError::NotAnObject => "not_an_object",
            ArgsError::Malformed(_) => "malformed",
            ArgsError::InvalidField { .. } => "invalid_field",
            ArgsError::InvalidItem { .. } => "invalid_item",
            ArgsError::TimeoutZero => "timeout_zero",
            ArgsError::TimeoutTooLong { .. } => "timeout_too_long",
            ArgsError::TimeoutTooShort { .. } => "timeout_too_short",
        }
    }
}

/// A command's arguments, parsed and checked: one variant per verb.
///
/// The only way to obtain one is [`parse`] (or [`VerbSpec::parse`]); the argument structs
/// cannot be built outside this crate, so holding an `Args` means every rule was checked.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Args {
    /// `get_system_health`: CPU, memory, disk and uptime of the agent's machine.
    GetSystemHealth,
    /// `docker.ps`: list containers.
    DockerPs(DockerPs),
    /// `docker.inspect`: one container's configuration and state.
    DockerInspect(DockerTarget),
    /// `docker.logs`: the last lines of one container's output.
    DockerLogs(DockerLogs),
    /// `docker.stats`: one sample of one container's resource usage.
    DockerStats(DockerTarget),
    /// `docker.start`: start a stopped container.
    DockerStart(DockerTarget),
    /// `docker.stop`: stop a running container.
    DockerStop(DockerStop),
    /// `docker.restart`: stop and start a container.
    DockerRestart(DockerStop),
    /// `docker.rm`: remove a container.
    DockerRm(DockerRm),
    /// `docker.pull`: pull an image.
    DockerPull(DockerPull),
    /// `docker.run`: create and start a container.
    DockerRun(DockerRun),
    /// `add_user`: create a local user account.
    AddUser(AddUser),
    /// `delete_user`: delete a local user account.
    DeleteUser(DeleteUser),
    /// `add_vpn_user`: create a VPN user.
    AddVpnUser(AddVpnUser),
    /// `delete_vpn_user`: delete a VPN user.
    DeleteVpnUser(DeleteVpnUser),
    /// `exec`: run an allow-listed program.
    Exec(Exec),
}

impl Args {
    /// The verb's entry in the [`REGISTRY`].
    pub fn spec(&self) -> &'static VerbSpec {
        match self {
            Args::GetSystemHealth => &spec::GET_SYSTEM_HEALTH,
            Args::DockerPs(_) => &spec::DOCKER_PS,
            Args::DockerInspect(_) => &spec::DOCKER_INSPECT,
            Args::DockerLogs(_) => &spec::DOCKER_LOGS,
            Args::DockerStats(_) => &spec::DOCKER_STATS,
            Args::DockerStart(_) => &spec::DOCKER_START,
            Args::DockerStop(_) => &spec::DOCKER_STOP,
            Args::DockerRestart(_) => &spec::DOCKER_RESTART,
            Args::DockerRm(_) => &spec::DOCKER_RM,
            Args::DockerPull(_) => &spec::DOCKER_PULL,
            Args::DockerRun(_) => &spec::DOCKER_RUN,
            Args::AddUser(_) => &spec::ADD_USER,
            Args::DeleteUser(_) => &spec::DELETE_USER,
            Args::AddVpnUser(_) => &spec::ADD_VPN_USER,
            Args::DeleteVpnUser(_) => &spec::DELETE_VPN_USER,
            Args::Exec(_) => &spec::EXEC,
        }
    }

    /// The verb's name, such as `docker.ps`.
    pub fn verb(&self) -> &'static str {
        self.spec().name
    }

    /// How much the verb can change on the agent's machine.
    pub fn risk(&self) -> Risk {
        self.spec().risk
    }

    /// The arguments in canonical form: every default filled in, absent options left out.
    /// [`parse`] of this value gives these arguments back, so the host can store and hash
    /// exactly what the agent will run.
    pub fn to_value(&self) -> Value {
        let value = match self {
            Args::GetSystemHealth => return Value::Object(Map::new()),
            Args::DockerPs(a) => serde_json::to_value(a),
            Args::DockerInspect(a) | Args::DockerStats(a) | Args::DockerStart(a) => serde_json::to_value(a),
            Args::DockerLogs(a) => serde_json::to_value(a),
            Args::DockerStop(a) | Args::DockerRestart(a) => serde_json::to_value(a),
            Args::DockerRm(a) => serde_json::to_value(a),
            Args::DockerPull(a) => serde_json::to_value(a),
            Args::DockerRun(a) => serde_json::to_value(a),
            Args::AddUser(a) => serde_json::to_value(a),
            Args::DeleteUser(a) => serde_json::to_value(a),
            Args::AddVpnUser(a) => serde_json::to_value(a),
            Args::DeleteVpnUser(a) => serde_json::to_value(a),
            Args::Exec(a) => serde_json::to_value(a),
        };
        // These structs hold strings, string-keyed maps, integers and finite floats only, so
        // serializing them to a `Value` cannot fail; `Null` is never produced in practice.
        value.unwrap_or(Value::Null)
    }

    /// The timeout to send with this command: [`effective_timeout`] for the verb, raised (when
    /// none was requested) or checked (when one was) so that it outlasts what the arguments
    /// themselves allow to take time, such as a `docker.stop` grace period.
    ///
    /// Fails with [`ArgsError::TimeoutTooShort`] when a requested timeout would end the
    /// command before its own grace period does.
    pub fn timeout(&self, requested: Option<Duration>) -> Result<Duration, ArgsError> {
        let spec = self.spec();
        let timeout = effective_timeout(spec, requested)?;
        let min = self.min_timeout();
        if timeout >= min {
            return Ok(timeout);
        }
        match requested {
            Some(requested) => Err(ArgsError::TimeoutTooShort { requested, min }),
            // The verb's maximum covers the largest grace period (checked by a test), so
            // raising the default to the minimum stays within it.
            None => Ok(min.min(spec.max_timeout)),
        }
    }

    /// The shortest timeout these arguments can finish in without being cut off by it.
    fn min_timeout(&self) -> Duration {
        match self {
            Args::DockerStop(stop) | Args::DockerRestart(stop) => stop.min_timeout(),
            _ => Duration::ZERO,
        }
    }

    /// For the four script verbs, the script to run and its argv; `None` for every other verb.
    ///
    /// The script is a file name under the agent's `SCRIPTS_ROOT` (`add_user`, `delete_user`,
    /// `add_vpn_user`, `delete_vpn_user`). The argv holds flags in a fixed order, each value
    /// its own element after its flag, for example
    /// `["--username", "alice", "--full-name", "Alice Liddell"]`. The elements are passed
    /// verbatim to the program, never through a shell; no value element begins with `-`, so
    /// no value can be taken for a flag.
    pub fn script_argv(&self) -> Option<(&'static str, Vec<String>)> {
        match self {
            Args::AddUser(a) => Some(a.argv()),
            Args::DeleteUser(a) => Some(a.argv()),
            Args::AddVpnUser(a) => Some(a.argv()),
            Args::DeleteVpnUser(a) => Some(a.argv()),
            _ => None,
        }
    }
}

/// Parses and checks the JSON arguments of a command for `verb`.
///
/// `args` must be a JSON object, or `null` (read as `{}`). Fails with
/// [`ArgsError::UnknownVerb`] for a verb not in the [`REGISTRY`], [`ArgsError::Malformed`]
/// when the shape is wrong (unknown field, missing field, wrong type), and
/// [`ArgsError::InvalidField`] or [`ArgsError::InvalidItem`] when a value breaks a rule. Cost:
/// one pass over the arguments plus copies of their strings.
pub fn parse(verb: &Verb, args: &Value) -> Result<Args, ArgsError> {
    let spec = spec(verb.as_str()).ok_or_else(|| ArgsError::UnknownVerb(verb.clone()))?;
    spec.parse(args)
}

/// Checks the JSON arguments of a command for `verb` without keeping the result: [`parse`],
/// then discard. This is what the host's API runs before it queues a command.
pub fn validate(verb: &Verb, args: &Value) -> Result<(), ArgsError> {
    parse(verb, args).map(drop)
}

/// Reads `args`, already known to be an object, as the verb's raw argument struct.
fn fields<T: serde::de::DeserializeOwned>(args: &Value) -> Result<T, ArgsError> {
    T::deserialize(args).map_err(ArgsError::Malformed)
}

/// The shared rule for lists of strings handed to a program (a container's command, an exec
/// argv): at most [`MAX_ARGS`] elements, each at most [`MAX_ARG_LEN`] bytes and free of NUL.
fn check_argv(field: &'static str, items: &[String]) -> Result<(), ArgsError> {
    if items.len() > MAX_ARGS {
        return Err(ArgsError::InvalidField { field, reason: "has more than 64 elements" });
    }
    for (index, item) in items.iter().enumerate() {
        if item.len() > MAX_ARG_LEN {
            return Err(ArgsError::InvalidItem { field, index, reason: "is longer than 4096 bytes" });
        }
        if item.contains('\0') {
            return Err(ArgsError::InvalidItem { field, index, reason: "contains a NUL byte" });
        }
    }
    Ok(())
}

/// The most elements in an argv-like list (a container's command, an exec argv).
const MAX_ARGS: usize = 64;

/// The longest single argv element, in bytes.
const MAX_ARG_LEN: usize = 4096;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn verb(name: &str) -> Verb {
        Verb::new(name).expect("valid verb name")
    }

    fn example(spec: &VerbSpec) -> Value {
        serde_json::from_str(spec.example).expect("the documented example is JSON")
    }

    #[test]
    fn every_registered_verb_parses_its_documented_example() {
        for spec in REGISTRY {
            let args = parse(&verb(spec.name), &example(spec))
                .unwrap_or_else(|e| panic!("{}: example refused: {e}", spec.name));
            assert_eq!(args.verb(), spec.name, "the example parses to its own verb");
            assert_eq!(args.risk(), spec.risk);
            let canonical = args.to_value();
            assert_eq!(parse(&verb(spec.name), &canonical).ok(), Some(args), "{}: canonical form", spec.name);
        }
    }

    #[test]
    fn the_registry_is_consistent() {
        let mut names = BTreeSet::new();
        for spec in REGISTRY {
            assert!(names.insert(spec.name), "{} is registered twice", spec.name);
            assert!(Verb::new(spec.name).is_ok(), "{} is a valid wire verb", spec.name);
            assert!(spec.default_timeout > Duration::ZERO, "{}", spec.name);
            assert!(spec.default_timeout <= spec.max_timeout, "{}", spec.name);
            assert!(!spec.summary.is_empty(), "{}", spec.name);
            assert_eq!(self::spec(spec.name).map(|found| found.name), Some(spec.name));
            assert_eq!(spec.parse(&example(spec)).map(|args| args.spec().name).ok(), Some(spec.name));
        }
        assert_eq!(names.len(), 16);
        assert!(self::spec("docker.exec").is_none());
    }

    #[test]
    fn unknown_verbs_are_refused_by_name() {
        let err = parse(&verb("docker.exec"), &Value::Null).expect_err("not registered");
        assert!(matches!(&err, ArgsError::UnknownVerb(v) if v.as_str() == "docker.exec"));
        assert_eq!(err.code(), "unknown_verb");
        assert!(validate(&verb("docker.exec"), &Value::Null).is_err());
    }

    #[test]
    fn every_verb_refuses_unknown_fields_and_non_objects() {
        for spec in REGISTRY {
            let mut args = example(spec);
            if let Value::Object(map) = &mut args {
                map.insert("bogus".into(), Value::Bool(true));
            }
            let err = parse(&verb(spec.name), &args).expect_err(spec.name);
            assert!(matches!(&err, ArgsError::Malformed(e) if e.to_string().contains("bogus")), "{}: {err}", spec.name);
            for not_an_object in
                [serde_json::json!([]), serde_json::json!("x"), serde_json::json!(1), Value::Bool(false)]
            {
                let err = parse(&verb(spec.name), &not_an_object).expect_err(spec.name);
                assert!(matches!(err, ArgsError::NotAnObject), "{}: {err}", spec.name);
            }
        }
    }

    #[test]
    fn null_and_empty_object_are_the_same_for_verbs_without_required_fields() {
        for name in ["get_system_health", "docker.ps"] {
            let from_null = parse(&verb(name), &Value::Null).expect("null is no arguments");
            let from_empty = parse(&verb(name), &serde_json::json!({})).expect("{} is no arguments");
            assert_eq!(from_null, from_empty);
        }
        let err = parse(&verb("docker.logs"), &Value::Null).expect_err("container is required");
        assert!(matches!(&err, ArgsError::Malformed(e) if e.to_string().contains("container")), "{err}");
    }

    #[test]
    fn errors_name_the_field_and_the_rule() {
        let err = parse(&verb("docker.logs"), &serde_json::json!({"container": "web", "tail": 0})).expect_err("tail 0");
        assert_eq!(err.to_string(), "argument tail is invalid: it must be between 1 and 10000");
        assert_eq!(err.code(), "invalid_field");
        let err =
            parse(&verb("exec"), &serde_json::json!({"path": "/bin/true", "args": ["a", "b\u{0}"]})).expect_err("NUL");
        assert_eq!(err.to_string(), "argument args[1] is invalid: it contains a NUL byte");
    }

    #[test]
    fn timeouts_default_and_are_capped() {
        let logs = spec("docker.logs").expect("registered");
        assert_eq!(effective_timeout(logs, None).ok(), Some(logs.default_timeout));
        assert_eq!(effective_timeout(logs, Some(logs.max_timeout)).ok(), Some(logs.max_timeout));
        assert_eq!(effective_timeout(logs, Some(Duration::from_secs(1))).ok(), Some(Duration::from_secs(1)));
        let above = logs.max_timeout + Duration::from_millis(1);
        assert!(matches!(
            effective_timeout(logs, Some(above)),
            Err(ArgsError::TimeoutTooLong { requested, max }) if requested == above && max == logs.max_timeout
        ));
        assert!(matches!(effective_timeout(logs, Some(Duration::ZERO)), Err(ArgsError::TimeoutZero)));
    }

    #[test]
    fn a_stop_timeout_outlasts_its_grace_period() {
        let stop = |grace: u32| {
            parse(&verb("docker.stop"), &serde_json::json!({"container": "web", "timeout_secs": grace}))
                .expect("valid stop")
        };
        let spec = spec("docker.stop").expect("registered");
        // The default already covers the default grace period.
        assert_eq!(stop(10).timeout(None).ok(), Some(spec.default_timeout));
        // A long grace period raises the default instead of timing out a stop that works.
        let long = stop(300).timeout(None).expect("raised default");
        assert!(long > Duration::from_secs(300) && long <= spec.max_timeout, "{long:?}");
        // An explicit timeout shorter than the grace period is refused.
        assert!(matches!(
            stop(300).timeout(Some(Duration::from_secs(120))),
            Err(ArgsError::TimeoutTooShort { min, .. }) if min > Duration::from_secs(300)
        ));
        assert!(stop(300).timeout(Some(spec.max_timeout)).is_ok());
        // Other verbs are unaffected.
        let ps = parse(&verb("docker.ps"), &Value::Null).expect("ps");
        assert_eq!(ps.timeout(Some(Duration::from_secs(1))).ok(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn only_the_script_verbs_have_an_argv() {
        for spec in REGISTRY {
            let args = parse(&verb(spec.name), &example(spec)).expect("example");
            let is_script = matches!(spec.name, "add_user" | "delete_user" | "add_vpn_user" | "delete_vpn_user");
            match args.script_argv() {
                Some((script, argv)) => {
                    assert!(is_script, "{}", spec.name);
                    assert_eq!(script, spec.name, "the script is named after its verb");
                    assert_eq!(argv.first().map(String::as_str), Some("--username"));
                }
                None => assert!(!is_script, "{}", spec.name),
            }
        }
    }

    /// Any JSON value, floats included, nested a few levels, with keys that are often the
    /// verbs' own field names so that deserialization gets past the first field.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (0u64..70_000).prop_map(Value::from),
            any::<f64>()
                .prop_filter_map("JSON numbers are finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
            any::<String>().prop_map(Value::String),
            "[a-z0-9_.:/@-]{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((field_name(), inner), 0..8)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn field_name() -> impl Strategy<Value = String> {
        const FIELDS: &[&str] = &[
            "all",
            "container",
            "tail",
            "timestamps",
            "timeout_secs",
            "force",
            "image",
            "name",
            "env",
            "ports",
            "host",
            "protocol",
            "host_ip",
            "memory_mb",
            "cpus",
            "restart",
            "command",
            "username",
            "full_name",
            "ssh_public_key",
            "remove_home",
            "profile",
            "path",
            "args",
        ];
        prop_oneof![proptest::sample::select(FIELDS).prop_map(String::from), any::<String>()]
    }

    fn any_spec() -> impl Strategy<Value = &'static VerbSpec> {
        proptest::sample::select(REGISTRY.iter().collect::<Vec<_>>())
    }

    /// Whatever `parse` returns for `args` under `spec`: if arguments came out, their
    /// canonical form parses back to them.
    fn check_round_trip(spec: &'static VerbSpec, args: &Value) -> Result<(), TestCaseError> {
        if let Ok(parsed) = spec.parse(args) {
            prop_assert_eq!(parsed.verb(), spec.name);
            let again = spec.parse(&parsed.to_value());
            prop_assert_eq!(again.ok(), Some(parsed));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn any_json_gives_args_or_a_typed_error(spec in any_spec(), args in json_value()) {
            check_round_trip(spec, &args)?;
        }

        #[test]
        fn a_mutated_example_gives_args_or_a_typed_error(
            spec in any_spec(),
            field in field_name(),
            value in json_value(),
            remove in any::<bool>(),
        ) {
            let mut args = example(spec);
            if let Value::Object(map) = &mut args {
                if remove {
                    map.remove(&field);
                } else {
                    map.insert(field, value);
                }
            }
            check_round_trip(spec, &args)?;
        }
    }
}
