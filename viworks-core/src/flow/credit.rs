//! The credit window: the host never has more commands in flight to an agent than the
//! concurrency the agent advertised. A command takes a credit when sent and returns it with
//! its result.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::Timestamp;
use crate::wire::CommandId;

/// One command in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// When it was sent (or, for a command resumed from an earlier session, first seen here).
    pub sent_at: Timestamp,
    /// Whether the agent acknowledged it: recorded durably and never to be sent again.
    pub acked: bool,
}

/// No credit is free: the agent runs as many commands as it advertised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("no credit: {in_flight} commands already in flight")]
pub struct NoCredit {
    /// Commands in flight now.
    pub in_flight: usize,
}

/// The commands in flight to one agent, at most `limit` of them sent through this window.
///
/// Memory is bounded by the limit plus the commands resumed from earlier sessions, which are
/// themselves bounded by the dispatcher's queues.
#[derive(Clone, Debug)]
pub struct CreditWindow {
    limit: usize,
    in_flight: BTreeMap<CommandId, Delivery>,
}

impl CreditWindow {
    /// A window of `limit` credits (at least one).
    pub fn new(limit: usize) -> Self {
        CreditWindow { limit: limit.max(1), in_flight: BTreeMap::new() }
    }

    /// Credits free now.
    pub fn credits(&self) -> usize {
        self.limit.saturating_sub(self.in_flight.len())
    }

    /// The window's size.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Commands in flight now.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Whether `id` is in flight.
    pub fn contains(&self, id: &CommandId) -> bool {
        self.in_flight.contains_key(id)
    }

    /// Takes a credit for sending `id`. Sending a command already in flight takes none.
    pub fn take(&mut self, id: &CommandId, now: Timestamp) -> Result<(), NoCredit> {
        if self.in_flight.contains_key(id) {
            return Ok(());
        }
        if self.credits() == 0 {
            return Err(NoCredit { in_flight: self.in_flight.len() });
        }
        self.in_flight.insert(id.clone(), Delivery { sent_at: now, acked: false });
        Ok(())
    }

    /// Counts `id` as in flight and acknowledged: the agent took it in an earlier session and
    /// its result is still to come. It occupies a credit even beyond the limit, because the
    /// agent may still be running it.
    pub fn resume(&mut self, id: &CommandId, now: Timestamp) {
        self.in_flight.entry(id.clone()).or_insert(Delivery { sent_at: now, acked: true }).acked = true;
    }

    /// Marks `id` acknowledged. Returns false when it is not in flight here.
    pub fn ack(&mut self, id: &CommandId) -> bool {
        match self.in_flight.get_mut(id) {
            Some(delivery) => {
                delivery.acked = true;
                true
            }
            None => false,
        }
    }

    /// Returns the credit of `id`, whose result arrived.
    pub fn release(&mut self, id: &CommandId) -> Option<Delivery> {
        self.in_flight.remove(id)
    }

    /// Empties the window, returning every command that was in flight, in id order.
    pub fn drain(&mut self) -> Vec<(CommandId, Delivery)> {
        std::mem::take(&mut self.in_flight).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> CommandId {
        CommandId::new(format!("c{n}")).expect("valid id")
    }

    #[test]
    fn credits_are_taken_by_sends_and_returned_by_results() {
        let mut window = CreditWindow::new(2);
        let now = Timestamp::ZERO;
        window.take(&id(1), now).expect("credit");
        window.take(&id(1), now).expect("the same command takes no second credit");
        window.take(&id(2), now).expect("credit");
        assert_eq!(window.take(&id(3), now), Err(NoCredit { in_flight: 2 }));
        assert!(window.ack(&id(1)));
        assert!(!window.ack(&id(9)));
        assert_eq!(window.release(&id(1)), Some(Delivery { sent_at: now, acked: true }));
        window.take(&id(3), now).expect("the result returned a credit");
    }

    #[test]
    fn resumed_commands_hold_credits_beyond_the_limit() {
        let mut window = CreditWindow::new(1);
        window.resume(&id(1), Timestamp::ZERO);
        window.resume(&id(2), Timestamp::ZERO);
        assert_eq!(window.credits(), 0);
        assert!(window.take(&id(3), Timestamp::ZERO).is_err());
        assert_eq!(window.drain().len(), 2);
        assert_eq!(window.credits(), 1);
    }

    proptest! {
        #[test]
        fn sends_never_exceed_the_advertised_concurrency(
            limit in 1usize..8,
            ops in proptest::collection::vec((0u8..3, 0u8..16), 0..200),
        ) {
            let mut window = CreditWindow::new(limit);
            for (op, n) in ops {
                match op {
                    0 => { let _ = window.take(&id(n), Timestamp::ZERO); }
                    1 => { window.ack(&id(n)); }
                    _ => { window.release(&id(n)); }
                }
                prop_assert!(window.len() <= limit);
            }
        }
    }
}
