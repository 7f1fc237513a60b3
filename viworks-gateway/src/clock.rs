//! A monotonic wall clock: wall-clock time read once at start plus monotonic elapsed time, so that
//! the timestamps handed to `viworks-core` never go backwards.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use viworks_core::Timestamp;

/// A monotonic wall clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall_at_start: u64,
    start: Instant,
}

impl Clock {
    /// A clock anchored at the current wall-clock time.
    pub fn start() -> Self {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Clock { wall_at_start: wall, start: Instant::now() }
    }

    /// Now, in milliseconds since the Unix epoch, never earlier than a previous reading.
    pub fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.wall_at_start + self.start.elapsed().as_millis() as u64)
    }

    /// The monotonic instant corresponding to `at`, for sleeping until a core timeout.
    pub fn instant_of(&self, at: Timestamp) -> tokio::time::Instant {
        let offset = at.as_millis().saturating_sub(self.wall_at_start);
        tokio::time::Instant::from_std(self.start) + std::time::Duration::from_millis(offset)
    }
}
