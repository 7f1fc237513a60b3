//! Message authentication and replay protection.
//!
//! Every message ends in a BLAKE3 keyed MAC over the exact bytes before it ([`seal`],
//! [`open`]). Keys are derived, never configured per agent: an agent's key from the host's
//! master key and the agent id, and per-connection session keys from the agent key and both
//! sides' HELLO nonces ([`keys`]). A HELLO, the one message that could be replayed into a
//! new connection, must carry a timestamp inside the [`SkewWindow`] and a nonce the
//! [`NonceCache`] has not seen. Servers are identified by the SPKI pin of their certificate
//! ([`SpkiPin`], [`PinSet`]).

mod agent_counts;
pub mod keys;
mod nonce_cache;
mod nonce_table;
mod pin;
mod seal;

use std::time::Duration;

use thiserror::Error;

use crate::Timestamp;
use crate::time::millis_of;
use crate::wire::WireError;

pub use keys::{AgentKey, ChannelBinding, DirectionKeys, MacKey, MasterKey};
pub use nonce_cache::{NonceCache, NonceCacheConfig, NonceOutcome};
pub use pin::{PinMatch, PinSet, SpkiPin};
pub use seal::{open, read_hello_unverified, seal, verify};

/// Why a message, key, certificate or pin was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The bytes are not a well-formed message (size, version, JSON).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The tag does not match the content under the expected key: forged, corrupted, or sealed
    /// with another key. Nothing of the content was acted on.
    #[error("message authentication failed")]
    BadMac,
    /// The message verified but is not of the kind expected at this point.
    #[error("expected a {expected} message, got {got}")]
    UnexpectedKind {
        /// The kind expected.
        expected: &'static str,
        /// The kind received.
        got: &'static str,
    },
    /// The certificate is not parseable DER or PEM X.509.
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(&'static str),
    /// A pin is not the base64 of a 32-byte SHA-256 digest.
    #[error("SPKI pin is not base64 of 32 bytes (optionally prefixed with \"sha256/\")")]
    BadPin,
    /// The certificate's public key matches neither the primary nor the backup pin.
    #[error("certificate public key {got} matches no configured pin")]
    PinMismatch {
        /// The pin of the certificate presented.
        got: SpkiPin,
    },
    /// A nonce cache was configured with bounds that are zero or inconsistent.
    #[error("invalid nonce cache configuration: {0}")]
    InvalidCacheConfig(&'static str),
    /// A key is not 64 lowercase hexadecimal digits.
    #[error("key must be 64 lowercase hexadecimal digits")]
    BadKey,
}

impl AuthError {
    /// A stable `snake_case` name for this error, used in logs, test vectors and the C API.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Wire(wire) => wire.code(),
            AuthError::BadMac => "bad_mac",
            AuthError::UnexpectedKind { .. } => "unexpected_kind",
            AuthError::BadCertificate(_) => "bad_certificate",
            AuthError::BadPin => "bad_pin",
            AuthError::PinMismatch { .. } => "pin_mismatch",
            AuthError::InvalidCacheConfig(_) => "invalid_cache_config",
            AuthError::BadKey => "bad_key",
        }
    }
}

/// How far a HELLO's timestamp may differ from the receiver's clock, either way.
///
/// It is also how long a HELLO nonce must be remembered: a HELLO timestamped `ts` is refused
/// as stale once `now > ts + width`, so its nonce can be forgotten then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkewWindow(Duration);

impl SkewWindow {
    /// The default width: 60 seconds, generous for NTP-synchronised machines.
    pub const DEFAULT: SkewWindow = SkewWindow(Duration::from_secs(60));

    /// A window of `width` either side of `now`.
    pub const fn new(width: Duration) -> Self {
        SkewWindow(width)
    }

    /// The width either side.
    pub const fn width(self) -> Duration {
        self.0
    }

    /// Whether a message stamped `ts` is acceptable at `now`: `now - width <= ts <= now + width`.
    pub fn contains(self, ts: Timestamp, now: Timestamp) -> bool {
        let width = millis_of(self.0);
        ts.as_millis().saturating_add(width) >= now.as_millis()
            && ts.as_millis() <= now.as_millis().saturating_add(width)
    }

    /// The last instant at which a message stamped `ts` is still acceptable.
    pub fn expiry(self, ts: Timestamp) -> Timestamp {
        ts.saturating_add(self.0)
    }
}

impl Default for SkewWindow {
    fn default() -> Self {
        SkewWindow::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_inclusive_on_both_sides() {
        let window = SkewWindow::new(Duration::from_secs(10));
        let now = Timestamp::from_millis(100_000);
        assert!(window.contains(Timestamp::from_millis(90_000), now));
        assert!(window.contains(Timestamp::from_millis(110_000), now));
        assert!(!window.contains(Timestamp::from_millis(89_999), now));
        assert!(!window.contains(Timestamp::from_millis(110_001), now));
        assert!(window.contains(Timestamp::ZERO, Timestamp::from_millis(10_000)));
        assert!(window.contains(Timestamp::from_millis(u64::MAX), Timestamp::from_millis(u64::MAX)));
    }
}
