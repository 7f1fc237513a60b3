//! Validated identifiers and bounded strings: every string the peer sends has a length limit
//! and, where it names something, a strict character set.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Why a string is not a valid identifier.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IdError {
    /// The string is empty.
    #[error("{what} is empty")]
    Empty {
        /// The kind of identifier.
        what: &'static str,
    },
    /// The string is longer than allowed.
    #[error("{what} is {len} bytes long, the limit is {max}")]
    TooLong {
        /// The kind of identifier.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The string holds a character outside the identifier's alphabet.
    #[error("{what} has a character not allowed at byte {at}")]
    BadChar {
        /// The kind of identifier.
        what: &'static str,
        /// Byte offset of the first offending character.
        at: usize,
    },
    /// The string is not the expected number of hexadecimal digits.
    #[error("{what} must be {len} lowercase hexadecimal digits")]
    BadHex {
        /// The kind of value.
        what: &'static str,
        /// The number of digits expected.
        len: usize,
    },
}

pub(crate) fn check(
    what: &'static str,
    s: &str,
    max: usize,
    first: fn(u8) -> bool,
    allowed: fn(u8) -> bool,
) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > max {
        return Err(IdError::TooLong { what, len: s.len(), max });
    }
    // For names, a leading letter or digit keeps them from being `.`, `..` or an option like
    // `-rf` when they become file names or arguments.
    if !first(s.as_bytes()[0]) {
        return Err(IdError::BadChar { what, at: 0 });
    }
    match s.bytes().position(|b| !allowed(b)) {
        Some(at) => Err(IdError::BadChar { what, at }),
        None => Ok(()),
    }
}

fn name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fn verb_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_')
}

fn metric_char(b: u8) -> bool {
    name_char(b) || matches!(b, b':' | b'/')
}

/// The read side every validated string newtype shares: `as_str`, `AsRef<str>`, `Display`,
/// `Debug` (as the string) and `Serialize` (as a string).
macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(&self.0, f)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
    };
}
pub(crate) use string_newtype;

/// A string newtype validated by length, first byte and alphabet, with `new`, `FromStr` and a
/// validating `Deserialize`.
macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $first:expr, $allowed:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The longest value accepted, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, $crate::wire::IdError> {
                let value = value.into();
                $crate::wire::ids::check($what, &value, Self::MAX_LEN, $first, $allowed)?;
                Ok($name(value))
            }
        }

        $crate::wire::ids::string_newtype!($name);

        impl std::str::FromStr for $name {
            type Err = $crate::wire::IdError;
            fn from_str(s: &str) -> Result<Self, $crate::wire::IdError> {
                $name::new(s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                $name::new(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use identifier;

fn alphanumeric(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

identifier!(
    /// An agent's identity: 1 to 128 bytes of `A-Z a-z 0-9 . _ -`, starting with a letter or
    /// digit. It is also the common name of the agent's client certificate.
    AgentId, "agent id", 128, alphanumeric, name_char
);
identifier!(
    /// A command's identity, unique across the fleet; it is also the correlation id under
    /// which the command's result is stored. 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, starting
    /// with a letter or digit.
    CommandId, "command id", 64, alphanumeric, name_char
);
identifier!(
    /// The name of an operation an agent can run, such as `get_system_health` or
    /// `docker.ps`: 1 to 64 bytes of `a-z 0-9 . _`, starting with a letter or digit.
    Verb, "verb", 64, alphanumeric, verb_char
);
identifier!(
    /// Something an agent can do, advertised in its HELLO (`docker`, `scripts`, a verb name):
    /// 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
    Capability, "capability", 64, alphanumeric, name_char
);
identifier!(
    /// The name of a telemetry series, such as `cpu.usage_pct` or `disk:/var.used_bytes`:
    /// 1 to 128 bytes of `A-Z a-z 0-9 . _ - : /`, starting with a letter or digit.
    MetricKey, "metric key", 128, alphanumeric, metric_char
);

/// Free text from the peer (site names, host names, versions, human-readable reasons),
/// limited to `MAX` bytes of UTF-8 without control characters.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Text<const MAX: usize>(String);

impl<const MAX: usize> Text<MAX> {
    /// Validates `value`; an empty string is allowed.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        if value.len() > MAX {
            return Err(IdError::TooLong { what: "text", len: value.len(), max: MAX });
        }
        if let Some((at, _)) = value.char_indices().find(|(_, c)| c.is_control()) {
            return Err(IdError::BadChar { what: "text", at });
        }
        Ok(Text(value))
    }

    /// `value` cut at a character boundary to at most `MAX` bytes, with control characters
    /// replaced by spaces. For text built locally (error messages) that must never fail.
    pub fn lossy(value: &str) -> Self {
        let mut end = value.len().min(MAX);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        let cleaned = value[..end].chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        Text(cleaned)
    }

    /// The text as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> fmt::Display for Text<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const MAX: usize> fmt::Debug for Text<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<const MAX: usize> Serialize for Text<MAX> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for Text<MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Text::new(raw).map_err(serde::de::Error::custom)
    }
}

/// 32 random bytes contributed by one side to a session's keys. On the wire: 64 lowercase
/// hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 32]);

impl Nonce {
    /// The nonce as lowercase hexadecimal.
    pub fn to_hex(&self) -> String {
        crate::hex::encode32(&self.0)
    }

    /// Parses exactly 64 lowercase hexadecimal digits.
    pub fn from_hex(s: &str) -> Result<Self, IdError> {
        crate::hex::decode32(s).map(Nonce).ok_or(IdError::BadHex { what: "nonce", len: 64 })
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", self.to_hex())
    }
}

impl Serialize for Nonce {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Nonce::from_hex(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_enforce_length_and_alphabet() {
        assert!(AgentId::new("gw-fra-01.example_2").is_ok());
        assert_eq!(AgentId::new(""), Err(IdError::Empty { what: "agent id" }));
        assert_eq!(AgentId::new("a b"), Err(IdError::BadChar { what: "agent id", at: 1 }));
        assert!(matches!(AgentId::new("x".repeat(129)), Err(IdError::TooLong { len: 129, .. })));
        assert_eq!(AgentId::new(".."), Err(IdError::BadChar { what: "agent id", at: 0 }));
        assert!(AgentId::new("-rf").is_err());
        assert!(Verb::new("docker.ps").is_ok());
        assert!(Verb::new("Docker.ps").is_err(), "verbs are lowercase");
        assert!(MetricKey::new("disk:/var.used_bytes").is_ok());
    }

    #[test]
    fn text_refuses_control_characters_and_lossy_never_fails() {
        assert!(Text::<8>::new("héllo").is_ok());
        assert!(Text::<8>::new("a\nb").is_err());
        assert!(Text::<4>::new("hello").is_err());
        assert_eq!(Text::<4>::lossy("héllo").as_str(), "hél");
        assert_eq!(Text::<16>::lossy("a\tb").as_str(), "a b");
    }

    #[test]
    fn nonce_hex_round_trips_and_is_strict() {
        let nonce = Nonce([0xab; 32]);
        assert_eq!(Nonce::from_hex(&nonce.to_hex()), Ok(nonce));
        assert!(Nonce::from_hex(&"AB".repeat(32)).is_err(), "uppercase is refused");
        assert!(Nonce::from_hex("abcd").is_err());
        assert!(Nonce::from_hex(&"zz".repeat(32)).is_err());
    }
}
