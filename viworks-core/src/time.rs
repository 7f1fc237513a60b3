//! Wall-clock time as the protocol sees it: milliseconds since the Unix epoch, passed in by
//! the caller. The core never reads a clock.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since the Unix epoch (UTC).
///
/// Drivers should pass a clock that never goes backwards: wall-clock time taken once at start
/// plus a monotonic elapsed time is the recommended source. Arithmetic saturates instead of
/// overflowing, so no input can make it panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch itself.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `millis` milliseconds after the Unix epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + span`, saturating at the far future.
    pub fn saturating_add(self, span: Duration) -> Self {
        Timestamp(self.0.saturating_add(millis_of(span)))
    }

    /// `self - span`, saturating at the epoch.
    pub fn saturating_sub(self, span: Duration) -> Self {
        Timestamp(self.0.saturating_sub(millis_of(span)))
    }

    /// The span from `earlier` to `self`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Whole milliseconds in `span`, saturating at `u64::MAX`.
pub(crate) fn millis_of(span: Duration) -> u64 {
    u64::try_from(span.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_overflowing() {
        let far = Timestamp::from_millis(u64::MAX - 1);
        assert_eq!(far.saturating_add(Duration::from_secs(10)).as_millis(), u64::MAX);
        assert_eq!(Timestamp::ZERO.saturating_sub(Duration::from_secs(1)), Timestamp::ZERO);
        assert_eq!(Timestamp::ZERO.saturating_since(far), Duration::ZERO);
        assert_eq!(Timestamp::from_millis(1_500).saturating_since(Timestamp::from_millis(500)), Duration::from_secs(1));
    }
}
