//! The user-management verbs, run by the agent as scripts under its `SCRIPTS_ROOT`: their
//! arguments and the argv each script receives. Every value is checked here so a script can
//! take its argv at face value; the argv is passed verbatim, never through a shell.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::names::{Username, VpnProfile};
use super::{Args, ArgsError, fields};

/// The longest full name, in bytes.
const MAX_FULL_NAME_LEN: usize = 128;
/// The longest SSH public key line, in bytes.
const MAX_SSH_KEY_LEN: usize = 8 * 1024;
/// The SSH public key types accepted.
const SSH_KEY_TYPES: &[&str] =
    &["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"];

/// Arguments of `add_user`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AddUser {
    /// The account to create.
    pub username: Username,
    /// The account's full name (the GECOS field): 1 to 128 bytes, no control or invisible
    /// formatting characters, no `:`, not starting with `-`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_name: Option<String>,
    /// One OpenSSH public key line to authorize: at most 8 KiB, `type base64 [comment]` with
    /// type `ssh-ed25519`, `ssh-rsa` or `ecdsa-sha2-nistp256/384/521`, and key data whose
    /// embedded type matches. Starting with the type leaves no room for `authorized_keys`
    /// options such as `command=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_public_key: Option<String>,
}

impl AddUser {
    pub(super) fn argv(&self) -> (&'static str, Vec<String>) {
        let mut argv = vec!["--username".to_string(), self.username.to_string()];
        if let Some(full_name) = &self.full_name {
            argv.extend(["--full-name".to_string(), full_name.clone()]);
        }
        if let Some(key) = &self.ssh_public_key {
            argv.extend(["--ssh-public-key".to_string(), key.clone()]);
        }
        ("add_user", argv)
    }
}

/// Arguments of `delete_user`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeleteUser {
    /// The account to delete.
    pub username: Username,
    /// Delete the account's home directory too. Default `false`.
    pub remove_home: bool,
}

impl DeleteUser {
    pub(super) fn argv(&self) -> (&'static str, Vec<String>) {
        let mut argv = vec!["--username".to_string(), self.username.to_string()];
        if self.remove_home {
            argv.push("--remove-home".to_string());
        }
        ("delete_user", argv)
    }
}

/// Arguments of `add_vpn_user`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AddVpnUser {
    /// The VPN user to create.
    pub username: Username,
    /// The VPN profile to give it (the script's default when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<VpnProfile>,
}

impl AddVpnUser {
    pub(super) fn argv(&self) -> (&'static str, Vec<String>) {
        let mut argv = vec!["--username".to_string(), self.username.to_string()];
        if let Some(profile) = &self.profile {
            argv.extend(["--profile".to_string(), profile.to_string()]);
        }
        ("add_vpn_user", argv)
    }
}

/// Arguments of `delete_vpn_user`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeleteVpnUser {
    /// The VPN user to delete.
    pub username: Username,
}

impl DeleteVpnUser {
    pub(super) fn argv(&self) -> (&'static str, Vec<String>) {
        ("delete_vpn_user", vec!["--username".to_string(), self.username.to_string()])
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAddUser {
    username: String,
    #[serde(default)]
    full_name: Option<String>,
    #[serde(default)]
    ssh_public_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeleteUser {
    username: String,
    #[serde(default)]
    remove_home: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAddVpnUser {
    username: String,
    #[serde(default)]
    profile: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeleteVpnUser {
    username: String,
}

fn username(raw: String) -> Result<Username, ArgsError> {
    Username::for_field("username", raw)
}

pub(super) fn parse_add_user(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawAddUser = fields(args)?;
    let username = username(raw.username)?;
    if let Some(full_name) = &raw.full_name {
        check_full_name(full_name).map_err(|reason| ArgsError::InvalidField { field: "full_name", reason })?;
    }
    if let Some(key) = &raw.ssh_public_key {
        check_ssh_public_key(key).map_err(|reason| ArgsError::InvalidField { field: "ssh_public_key", reason })?;
    }
    Ok(Args::AddUser(AddUser { username, full_name: raw.full_name, ssh_public_key: raw.ssh_public_key }))
}

pub(super) fn parse_delete_user(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawDeleteUser = fields(args)?;
    Ok(Args::DeleteUser(DeleteUser { username: username(raw.username)?, remove_home: raw.remove_home }))
}

pub(super) fn parse_add_vpn_user(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawAddVpnUser = fields(args)?;
    let username = username(raw.username)?;
    let profile = raw.profile.map(|p| VpnProfile::for_field("profile", p)).transpose()?;
    Ok(Args::AddVpnUser(AddVpnUser { username, profile }))
}

pub(super) fn parse_delete_vpn_user(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawDeleteVpnUser = fields(args)?;
    Ok(Args::DeleteVpnUser(DeleteVpnUser { username: username(raw.username)? }))
}

/// Characters that are not control characters but still change how text reads without being
/// seen: zero-width characters, bidirectional overrides, line and paragraph separators, the
/// byte-order mark. A full name travels into `/etc/passwd`, logs and the dashboard.
fn is_invisible_format(c: char) -> bool {
    let zero_width = ('\u{200B}'..='\u{200F}').contains(&c) || c == '\u{FEFF}';
    let separators_and_overrides = ('\u{2028}'..='\u{202E}').contains(&c) || ('\u{2060}'..='\u{206F}').contains(&c);
    let annotations = ('\u{FFF9}'..='\u{FFFB}').contains(&c);
    zero_width || separators_and_overrides || annotations
}

fn check_full_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_FULL_NAME_LEN {
        return Err("must be 1 to 128 bytes long");
    }
    if name.chars().any(|c| c.is_control() || is_invisible_format(c)) {
        return Err("must not contain control or invisible formatting characters");
    }
    if name.contains(':') {
        return Err("must not contain : (the passwd field separator)");
    }
    if name.starts_with('-') {
        return Err("must not start with -");
    }
    Ok(())
}

fn check_ssh_public_key(key: &str) -> Result<(), &'static str> {
    if key.len() > MAX_SSH_KEY_LEN {
        return Err("must be at most 8192 bytes long");
    }
    if key.chars().any(|c| c.is_control() || is_invisible_format(c)) {
        return Err("must be a single line without control characters");
    }
    let mut parts = key.splitn(3, ' ');
    let key_type = parts.next().unwrap_or_default();
    if !SSH_KEY_TYPES.contains(&key_type) {
        return Err("must start with ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256/384/521 and a space");
    }
    let blob =
        STANDARD.decode(parts.next().unwrap_or_default()).map_err(|_| "must have base64 key data after its type")?;
    // The key data opens with its own type as an SSH string: a 4-byte big-endian length, then
    // the name. A key pasted under the wrong type is refused here rather than by sshd later.
    let embedded = blob
        .get(..4)
        .and_then(|len| <[u8; 4]>::try_from(len).ok())
        .map(|len| u32::from_be_bytes(len) as usize)
        .and_then(|len| blob.get(4..4usize.saturating_add(len)));
    if embedded != Some(key_type.as_bytes()) {
        return Err("must have key data of the type it names");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK8JcrDKeAkx6KdzqThsGnO0QovPlA//Vj6M0JzqTXDd alice@laptop";
    const RSA: &str = concat!(
        "ssh-rsa ",
        "AAAAB3NzaC1yc2EAAAADAQABAAABAQDQDGi6ocfsgt3LMCfAakHNRH4FKNPW5oh4IgeWHRH/QPGBFw7uhmurvB1WqVzHtXzw",
        "16tjX/6EflJIaJwQXOgpHa8aAWKqsoEi9czk1ztYwc0/wSyCLt4qc2B4Tv4ISO9WAp+db2R2G/tsR602AR92/2bHyG6Ilx55",
        "rhI0XgEQe1QgQOKJ6RN1rgi3qjLJVSXa0Ba97oUltDUN9JjZ7MZ4FSEu7hpIQtac378/QqtrUnSVzFW0g5D2psl7QUM9wLYl",
        "UQ4lR/rAObsCyTvMYRcfunqVq1ezPAlhKTOMgv4YWiV+a+bMGMSOqGB/PWa7JgwIisFOldiz9bVUjNpShofX",
        " bob",
    );
    const ECDSA: &str = concat!(
        "ecdsa-sha2-nistp256 ",
        "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMWdq55nMCOkXx0IJw322DmoYLYDNnWAuSlruk",
        "hy4lyiYtzwvX4YBee4ZgZiC8x6qbEgn0zZWxJeUnfM251WTZY=",
        " carol",
    );

    fn refusal(result: Result<Args, ArgsError>) -> (&'static str, &'static str) {
        match result {
            Err(ArgsError::InvalidField { field, reason }) => (field, reason),
            other => panic!("expected a rule refusal, got {other:?}"),
        }
    }

    fn malformed(result: Result<Args, ArgsError>) -> bool {
        matches!(result, Err(ArgsError::Malformed(_)))
    }

    fn argv(args: &Args) -> Vec<String> {
        args.script_argv().map(|(_, argv)| argv).unwrap_or_default()
    }

    #[test]
    fn add_user_accepts_real_keys_and_builds_a_fixed_argv() {
        for key in
            [ED25519, RSA, ECDSA, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK8JcrDKeAkx6KdzqThsGnO0QovPlA//Vj6M0JzqTXDd"]
        {
            assert!(parse_add_user(&json!({"username": "alice", "ssh_public_key": key})).is_ok(), "{key}");
        }
        let args =
            parse_add_user(&json!({"ssh_public_key": ED25519, "full_name": "Alice Liddell", "username": "alice"}))
                .expect("valid");
        assert_eq!(
            argv(&args),
            ["--username", "alice", "--full-name", "Alice Liddell", "--ssh-public-key", ED25519].map(String::from)
        );
        let bare = parse_add_user(&json!({"username": "bob"})).expect("username only");
        assert_eq!(bare.script_argv(), Some(("add_user", vec!["--username".to_string(), "bob".to_string()])));
    }

    #[test]
    fn add_user_refuses_what_would_corrupt_passwd_or_authorized_keys() {
        let with = |key: &str, value: &str| {
            let mut args = json!({"username": "alice"});
            args[key] = json!(value);
            parse_add_user(&args)
        };
        assert!(with("full_name", "Zoë O'Brien-Ng, Room 4").is_ok());
        assert!(with("full_name", &"n".repeat(128)).is_ok());
        assert_eq!(refusal(with("full_name", &"n".repeat(129))).0, "full_name");
        assert_eq!(refusal(with("full_name", "")).0, "full_name");
        for bad in
            ["Eve\nroot::0:0::/root:/bin/sh", "Eve:0:0", "Eve\0", "Eve\u{202E}nimda", "Eve\u{2028}", "-Eve", "\t"]
        {
            assert_eq!(refusal(with("full_name", bad)).0, "full_name", "{bad:?}");
        }
        assert!(malformed(parse_add_user(&json!({"username": "alice", "full_name": 1}))));

        let long_comment = format!("{ED25519} {}", "c".repeat(8192 - ED25519.len() - 1));
        assert_eq!(long_comment.len(), 8192);
        assert!(with("ssh_public_key", &long_comment).is_ok());
        assert_eq!(refusal(with("ssh_public_key", &format!("{long_comment}c"))).0, "ssh_public_key");
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 ",
            "ssh-dss AAAAB3NzaC1kc3M= old",
            "command=\"/bin/sh\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK8JcrDKeAkx6KdzqThsGnO0QovPlA//Vj6M0JzqTXDd",
            "ssh-ed25519  AAAAC3NzaC1lZDI1NTE5AAAAIK8JcrDKeAkx6KdzqThsGnO0QovPlA//Vj6M0JzqTXDd",
            "ssh-ed25519 not-base64!",
            "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQDQ",
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIK8JcrDKeAkx6KdzqThsGnO0QovPlA//Vj6M0JzqTXDd",
            "ssh-ed25519 AAAA",
            "ssh-ed25519 /////w==",
            "ecdsa-sha2-nistp AAAA",
        ] {
            assert_eq!(refusal(with("ssh_public_key", bad)).0, "ssh_public_key", "{bad:?}");
        }
        let two_keys = format!("{ED25519}\n{RSA}");
        assert_eq!(refusal(with("ssh_public_key", &two_keys)).1, "must be a single line without control characters");
        assert!(malformed(parse_add_user(&json!({"username": "alice", "shell": "/bin/bash"}))));
        assert!(malformed(parse_add_user(&json!({"username": "alice", "ssh_public_key": [ED25519]}))));
    }

    #[test]
    fn usernames_refuse_shell_metacharacters_in_every_script_verb() {
        for parser in [parse_add_user, parse_delete_user, parse_add_vpn_user, parse_delete_vpn_user] {
            assert!(parser(&json!({"username": "alice"})).is_ok());
            for attack in
                ["; rm -rf /", "alice; rm -rf /", "$(id)", "a$(id)", "`id`", "a`id`", "alice\n", "-alice", "root"]
            {
                assert_eq!(refusal(parser(&json!({"username": attack}))).0, "username", "{attack:?}");
            }
            assert_eq!(refusal(parser(&json!({"username": "a".repeat(33)}))).0, "username");
            assert!(parser(&json!({"username": "a".repeat(32)})).is_ok());
            assert!(malformed(parser(&json!({}))));
            assert!(malformed(parser(&json!({"username": 42}))));
            assert!(malformed(parser(&json!({"username": null}))));
            assert!(malformed(parser(&json!({"username": "alice", "uid": 0}))));
        }
    }

    #[test]
    fn delete_user_argv_has_the_flag_only_when_asked() {
        let keep = parse_delete_user(&json!({"username": "alice"})).expect("valid");
        assert_eq!(argv(&keep), ["--username", "alice"]);
        let remove = parse_delete_user(&json!({"username": "alice", "remove_home": true})).expect("valid");
        assert_eq!(remove.script_argv().map(|(script, _)| script), Some("delete_user"));
        assert_eq!(argv(&remove), ["--username", "alice", "--remove-home"]);
        assert!(malformed(parse_delete_user(&json!({"username": "alice", "remove_home": "yes"}))));
    }

    #[test]
    fn vpn_users_take_an_optional_profile() {
        let plain = parse_add_vpn_user(&json!({"username": "alice"})).expect("valid");
        assert_eq!(argv(&plain), ["--username", "alice"]);
        let staff = parse_add_vpn_user(&json!({"username": "alice", "profile": "staff"})).expect("valid");
        assert_eq!(argv(&staff), ["--username", "alice", "--profile", "staff"]);
        assert!(parse_add_vpn_user(&json!({"username": "alice", "profile": "p".repeat(32)})).is_ok());
        for bad in ["", "-x", "Staff", "staff;id", &"p".repeat(33)] {
            assert_eq!(
                refusal(parse_add_vpn_user(&json!({"username": "alice", "profile": bad}))).0,
                "profile",
                "{bad}"
            );
        }
        let delete = parse_delete_vpn_user(&json!({"username": "alice"})).expect("valid");
        assert_eq!(delete.script_argv(), Some(("delete_vpn_user", vec!["--username".into(), "alice".into()])));
        assert!(malformed(parse_delete_vpn_user(&json!({"username": "alice", "profile": "staff"}))));
    }

    #[test]
    fn no_value_in_a_script_argv_can_be_taken_for_a_flag() {
        let args = [
            parse_add_user(&json!({"username": "_x", "full_name": "x -- y", "ssh_public_key": ECDSA})),
            parse_delete_user(&json!({"username": "_-", "remove_home": true})),
            parse_add_vpn_user(&json!({"username": "a-", "profile": "_-"})),
            parse_delete_vpn_user(&json!({"username": "z"})),
        ];
        for args in args {
            let args = args.expect("valid");
            let argv = argv(&args);
            let mut i = 0;
            while i < argv.len() {
                assert!(argv[i].starts_with("--"), "{argv:?}");
                if argv[i] != "--remove-home" {
                    i += 1;
                    assert!(!argv[i].starts_with('-'), "{argv:?}");
                }
                i += 1;
            }
        }
    }
}
