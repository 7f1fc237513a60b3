//! The names an operator puts into a command: containers, images, user accounts and VPN
//! profiles. Each is a validated type with a strict alphabet and a length limit, so none of
//! them can become an option (`-rf`), a path (`../x`) or shell syntax wherever it ends up.

use super::ArgsError;

macro_rules! validated_name {
    ($(#[$doc:meta])* $name:ident, $field:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`. Fails with [`ArgsError::InvalidField`] naming the field
            #[doc = concat!("`", $field, "`")]
            /// and the rule broken.
            pub fn new(value: impl Into<String>) -> Result<Self, ArgsError> {
                Self::for_field($field, value.into())
            }

            /// Validates `value` found in the argument `field`.
            pub(super) fn for_field(field: &'static str, value: String) -> Result<Self, ArgsError> {
                match $check(&value) {
                    Ok(()) => Ok($name(value)),
                    Err(reason) => Err(ArgsError::InvalidField { field, reason }),
                }
            }
        }

        crate::wire::ids::string_newtype!($name);
    };
}

validated_name!(
    /// A container, by name or by id: 2 to 128 bytes of `A-Z a-z 0-9 _ . -` starting with a
    /// letter or digit. That alphabet covers ids too (12 to 64 hexadecimal digits).
    ///
    /// Docker's own rule for names is `[a-zA-Z0-9][a-zA-Z0-9_.-]+`, so no container is named
    /// with one character; refusing one-character references keeps a reference from
    /// matching only as a short id prefix.
    ContainerRef,
    "container",
    check_container
);

validated_name!(
    /// An image reference as `docker pull` takes it: `[registry[:port]/]path[:tag][@digest]`,
    /// at most 255 bytes, lowercase except in the tag, starting with a letter or digit,
    /// without `..` and with at most one `@`, whose digest is `sha256:` and 64 lowercase
    /// hexadecimal digits (or `sha512:` and 128).
    ///
    /// Examples: `busybox`, `docker.io/library/nginx:1.27`, `localhost:5000/x`,
    /// `ghcr.io/org/app@sha256:…`.
    ImageRef,
    "image",
    check_image
);

validated_name!(
    /// A local or VPN user name: `^[a-z_][a-z0-9_-]{0,31}$` (the POSIX-portable subset, as
    /// `useradd` accepts by default), never a reserved system account or privileged group
    /// ([`RESERVED_USERNAMES`], `systemd-*`).
    Username,
    "username",
    check_username
);

validated_name!(
    /// A VPN profile name: 1 to 32 bytes of `a-z 0-9 _ -`, not starting with `-`.
    VpnProfile,
    "profile",
    check_profile
);

/// User names the user scripts never create or delete: the system accounts of common Linux
/// distributions, and groups that grant privileges (a script that creates a user-private
/// group of the same name could otherwise put the new user in `sudo` or `docker`). Any
/// name starting with `systemd-` is reserved as well.
pub const RESERVED_USERNAMES: &[&str] = &[
    // System accounts (Debian, Ubuntu, RHEL base passwd files).
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    "nogroup",
    "sshd",
    "_apt",
    "messagebus",
    "syslog",
    "halt",
    "shutdown",
    "operator",
    "ftp",
    // Groups that grant privileges.
    "adm",
    "admin",
    "sudo",
    "wheel",
    "docker",
    "lxd",
    "shadow",
    "disk",
    "kmem",
    "staff",
];

const NAME_TOO_SHORT_OR_LONG: &str = "must be 2 to 128 bytes long";

fn check_container(s: &str) -> Result<(), &'static str> {
    let bytes = s.as_bytes();
    if bytes.len() < 2 || bytes.len() > 128 {
        return Err(NAME_TOO_SHORT_OR_LONG);
    }
    if !bytes[0].is_ascii_alphanumeric() {
        return Err("must start with a letter or digit");
    }
    if !bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err("may only contain A-Z a-z 0-9 _ . -");
    }
    Ok(())
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn check_image(s: &str) -> Result<(), &'static str> {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 {
        return Err("must be 1 to 255 bytes long");
    }
    if !is_lower_alnum(bytes[0]) {
        return Err("must start with a lowercase letter or digit");
    }
    if s.contains("..") {
        return Err("must not contain ..");
    }
    let (name_and_tag, digest) = match s.split_once('@') {
        Some((_, digest)) if digest.contains('@') => return Err("may contain at most one @"),
        Some((name_and_tag, digest)) => (name_and_tag, Some(digest)),
        None => (s, None),
    };
    if let Some(digest) = digest {
        check_digest(digest)?;
    }
    // A `:` after the last `/` starts the tag; one before it belongs to a registry port.
    let (name, tag) = match name_and_tag.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (name_and_tag, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    check_repository(name)
}

fn check_digest(digest: &str) -> Result<(), &'static str> {
    const RULE: &str = "must have a digest of sha256: and 64, or sha512: and 128, lowercase hexadecimal digits";
    let (algorithm, hex) = digest.split_once(':').ok_or(RULE)?;
    let len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(RULE),
    };
    if hex.len() != len || !hex.bytes().all(is_lower_hex) {
        return Err(RULE);
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), &'static str> {
    const RULE: &str = "must have a tag of 1 to 128 bytes of A-Z a-z 0-9 _ . - not starting with . or -";
    let bytes = tag.as_bytes();
    let first_ok = bytes.first().is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok || bytes.len() > 128 {
        return Err(RULE);
    }
    if !bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(RULE);
    }
    Ok(())
}

fn check_repository(name: &str) -> Result<(), &'static str> {
    let mut components = name.split('/').peekable();
    // The first component names a registry when more follow and it looks like a host
    // (a dot, a port or `localhost`), as Docker decides.
    if let Some(first) = components.next() {
        let more = components.peek().is_some();
        if more && (first.contains('.') || first.contains(':') || first == "localhost") {
            check_registry(first)?;
        } else {
            check_path_component(first)?;
        }
    }
    components.try_for_each(check_path_component)
}

fn check_registry(registry: &str) -> Result<(), &'static str> {
    const RULE: &str = "must have a registry of lowercase host name labels and an optional :port";
    let (host, port) = match registry.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    };
    for label in host.split('.') {
        let bytes = label.as_bytes();
        let edges_ok =
            bytes.first().is_some_and(|&b| is_lower_alnum(b)) && bytes.last().is_some_and(|&b| is_lower_alnum(b));
        if !edges_ok || !bytes.iter().all(|&b| is_lower_alnum(b) || b == b'-') {
            return Err(RULE);
        }
    }
    if let Some(port) = port {
        let digits_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !digits_ok || !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(RULE);
        }
    }
    Ok(())
}

fn check_path_component(component: &str) -> Result<(), &'static str> {
    const RULE: &str = "must have path components of a-z 0-9 . _ - that start and end with a letter or digit";
    let bytes = component.as_bytes();
    let edges_ok =
        bytes.first().is_some_and(|&b| is_lower_alnum(b)) && bytes.last().is_some_and(|&b| is_lower_alnum(b));
    if !edges_ok || !bytes.iter().all(|&b| is_lower_alnum(b) || matches!(b, b'.' | b'_' | b'-')) {
        return Err(RULE);
    }
    Ok(())
}

fn check_username(s: &str) -> Result<(), &'static str> {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 32 {
        return Err("must be 1 to 32 bytes long");
    }
    if !(bytes[0].is_ascii_lowercase() || bytes[0] == b'_') {
        return Err("must start with a-z or _");
    }
    if !bytes.iter().all(|&b| is_lower_alnum(b) || matches!(b, b'_' | b'-')) {
        return Err("may only contain a-z 0-9 _ -");
    }
    if s.starts_with("systemd-") || RESERVED_USERNAMES.contains(&s) {
        return Err("is a reserved system account or group name");
    }
    Ok(())
}

fn check_profile(s: &str) -> Result<(), &'static str> {
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() > 32 {
        return Err("must be 1 to 32 bytes long");
    }
    if bytes[0] == b'-' {
        return Err("must not start with -");
    }
    if !bytes.iter().all(|&b| is_lower_alnum(b) || matches!(b, b'_' | b'-')) {
        return Err("may only contain a-z 0-9 _ -");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SHELL_ATTACKS: &[&str] = &[
        "; rm -rf /",
        "web; rm -rf /",
        "$(reboot)",
        "web$(id)",
        "`id`",
        "web`id`",
        "web\nrm",
        "web\r",
        "web|cat",
        "web&&id",
        "web>out",
        "web<in",
        "web id",
        "web'",
        "web\"",
        "web\\",
        "web*",
        "web\0",
        "-rf",
        "--force",
        "../etc",
        "web/..",
        "",
    ];

    fn rule(result: Result<impl std::fmt::Debug, ArgsError>) -> &'static str {
        match result {
            Err(ArgsError::InvalidField { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn container_references_accept_names_and_ids() {
        for ok in ["web", "db", "my_app.v2-blue", "3f4e8a9b2c1d", &"a".repeat(128), &"0123456789abcdef".repeat(4)] {
            assert!(ContainerRef::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(rule(ContainerRef::new("a")), NAME_TOO_SHORT_OR_LONG);
        assert_eq!(rule(ContainerRef::new("a".repeat(129))), NAME_TOO_SHORT_OR_LONG);
        assert_eq!(rule(ContainerRef::new("_web")), "must start with a letter or digit");
        assert_eq!(rule(ContainerRef::new("/web")), "must start with a letter or digit");
        for bad in SHELL_ATTACKS {
            assert!(ContainerRef::new(*bad).is_err(), "{bad:?}");
        }
        let err = ContainerRef::for_field("name", "x".into()).expect_err("too short");
        assert!(matches!(err, ArgsError::InvalidField { field: "name", .. }));
    }

    #[test]
    fn real_image_references_are_accepted() {
        let digest = format!("sha256:{}", "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881");
        for ok in [
            "busybox".to_string(),
            "busybox:latest".into(),
            "docker.io/library/nginx:1.27".into(),
            "nginx:1.27-alpine".into(),
            format!("ghcr.io/org/app@{digest}"),
            format!("nginx:1.27@{digest}"),
            format!("quay.io/prometheus/node-exporter@sha512:{}", "ab".repeat(64)),
            "localhost:5000/x".into(),
            "localhost:5000/team/x:v1.0.0-RC1".into(),
            "localhost/x".into(),
            "registry-1.docker.io/bitnami/redis:7.2".into(),
            "my_org/my__app".into(),
            "localhost:5000".into(), // the image `localhost`, tag `5000`
            "127.0.0.1:5000/x".into(),
            format!("{}:{}", "a".repeat(126), "t".repeat(128)),
        ] {
            assert!(ImageRef::new(ok.as_str()).is_ok(), "{ok}");
        }
    }

    #[test]
    fn malformed_image_references_are_refused_by_rule() {
        let digest = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
        assert_eq!(rule(ImageRef::new("")), "must be 1 to 255 bytes long");
        assert_eq!(rule(ImageRef::new("a".repeat(256))), "must be 1 to 255 bytes long");
        assert!(ImageRef::new("a".repeat(255)).is_ok());
        assert_eq!(rule(ImageRef::new("-rf")), "must start with a lowercase letter or digit");
        assert_eq!(rule(ImageRef::new("Nginx")), "must start with a lowercase letter or digit");
        assert_eq!(rule(ImageRef::new("a/../b")), "must not contain ..");
        assert_eq!(rule(ImageRef::new(format!("a@sha256:{digest}@sha256:{digest}"))), "may contain at most one @");
        for bad_digest in [
            "a@".to_string(),
            "a@sha256".into(),
            "a@sha256:abc".into(),
            format!("a@sha256:{}", digest.to_uppercase()),
            format!("a@md5:{digest}"),
            format!("a@sha256:{digest}0"),
        ] {
            assert!(rule(ImageRef::new(bad_digest.as_str())).contains("digest"), "{bad_digest}");
        }
        for bad_tag in ["a:", "a:-x", "a:.x", "a:x$y", &format!("a:{}", "t".repeat(129))] {
            assert!(rule(ImageRef::new(bad_tag)).contains("tag"), "{bad_tag}");
        }
        for bad_path in ["a//b", "a/", "a/-b", "a/b-", "nginx;id", "ng inx", "a/B", "a.b/c!"] {
            assert!(rule(ImageRef::new(bad_path)).contains("path components"), "{bad_path}");
        }
        for bad_registry in ["localhost:0/x", "localhost:65536/x", "localhost:x/y", "a-.io/x", "a..io/x", "a:1:2/x"] {
            assert!(ImageRef::new(bad_registry).is_err(), "{bad_registry}");
        }
        for bad in SHELL_ATTACKS {
            assert!(ImageRef::new(*bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usernames_follow_the_portable_pattern_and_skip_reserved_names() {
        for ok in ["alice", "_svc", "a", "bob-2", "web_admin", &format!("a{}", "b".repeat(31))] {
            assert!(Username::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(rule(Username::new("")), "must be 1 to 32 bytes long");
        assert_eq!(rule(Username::new("a".repeat(33))), "must be 1 to 32 bytes long");
        assert_eq!(rule(Username::new("-alice")), "must start with a-z or _");
        assert_eq!(rule(Username::new("1alice")), "must start with a-z or _");
        assert_eq!(rule(Username::new("Alice")), "must start with a-z or _");
        assert_eq!(rule(Username::new("alIce")), "may only contain a-z 0-9 _ -");
        assert_eq!(rule(Username::new("alice$")), "may only contain a-z 0-9 _ -");
        for reserved in ["root", "nobody", "www-data", "sshd", "systemd-network", "systemd-", "sudo", "docker"] {
            assert_eq!(rule(Username::new(reserved)), "is a reserved system account or group name", "{reserved}");
        }
        for bad in SHELL_ATTACKS {
            assert!(Username::new(*bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_reserved_name_would_otherwise_be_a_valid_username() {
        // An entry the pattern refuses anyway would be dead weight, or a typo.
        for name in RESERVED_USERNAMES {
            assert!(matches_username_pattern(name), "{name}");
        }
    }

    #[test]
    fn vpn_profiles_are_short_lowercase_names() {
        for ok in ["staff", "0", "full-tunnel", "_default", &"p".repeat(32)] {
            assert!(VpnProfile::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(rule(VpnProfile::new("")), "must be 1 to 32 bytes long");
        assert_eq!(rule(VpnProfile::new("p".repeat(33))), "must be 1 to 32 bytes long");
        assert_eq!(rule(VpnProfile::new("-rf")), "must not start with -");
        assert_eq!(rule(VpnProfile::new("Staff")), "may only contain a-z 0-9 _ -");
        for bad in SHELL_ATTACKS {
            assert!(VpnProfile::new(*bad).is_err(), "{bad:?}");
        }
    }

    /// `s` matches `^[a-z_][a-z0-9_-]{0,31}$`, checked without the validator's code.
    fn matches_username_pattern(s: &str) -> bool {
        let mut chars = s.chars();
        let first = chars.next();
        matches!(first, Some('a'..='z' | '_'))
            && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
            && s.len() <= 32
    }

    proptest! {
        #[test]
        fn usernames_never_start_with_a_dash_or_contain_shell_metacharacters(
            s in prop_oneof!["\\PC{0,40}", "[a-z_;$`()|&<> \n'\"\\\\-]{0,40}", any::<String>()],
        ) {
            if let Ok(name) = Username::new(s.as_str()) {
                prop_assert!(matches_username_pattern(name.as_str()), "{:?}", name);
                prop_assert!(!name.as_str().starts_with('-'));
                prop_assert!(!RESERVED_USERNAMES.contains(&name.as_str()));
                prop_assert!(!name.as_str().starts_with("systemd-"));
            } else {
                let reserved = s.starts_with("systemd-") || RESERVED_USERNAMES.contains(&s.as_str());
                prop_assert!(!matches_username_pattern(&s) || reserved, "{:?} was refused", s);
            }
        }

        #[test]
        fn accepted_container_and_image_references_are_never_options_or_shell_syntax(
            s in prop_oneof!["\\PC{0,80}", "[a-zA-Z0-9._/:@ ;$`|&-]{1,40}"],
        ) {
            let container = ContainerRef::new(s.as_str()).map(|c| c.0);
            let image = ImageRef::new(s.as_str()).map(|i| i.0);
            for accepted in [container, image].into_iter().flatten() {
                prop_assert!(accepted.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric));
                let shell = b" ;$`()|&<>'\"\\\n\r\t*?!{}[]~#";
                prop_assert!(!accepted.bytes().any(|b| shell.contains(&b)), "{:?}", accepted);
            }
            if let Ok(image) = ImageRef::new(s.as_str()) {
                prop_assert!(!image.as_str().contains(".."));
            }
        }
    }
}
