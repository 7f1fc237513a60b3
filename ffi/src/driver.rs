//! What the host and agent session handles share: the state the C side drives through
//! `handle_message`, `handle_timeout` and the `poll_*` functions, kept the same on both sides.
//!
//! A handle keeps the message a short buffer could not take, so that asking again with a
//! larger buffer gets the same message, and its own copy of the session's events, so that
//! `handle_message` can report a refused message in its status as well as in an event.

use std::collections::VecDeque;

use viworks_core::Timestamp;
use viworks_core::session::{AgentEvent, AgentSession, HostEvent, HostSession, Violation};

use crate::event::viw_event;
use crate::memory::{check_out, copy_out, viw_bytes, write};
use crate::status::{Failure, VIW_ERR_CLOSED, violation_failure};

/// A session state machine as the C API drives it.
pub(crate) trait Session {
    type Event;
    fn handle_message(&mut self, now: Timestamp, bytes: &[u8]);
    fn handle_timeout(&mut self, now: Timestamp);
    fn poll_transmit(&mut self) -> Option<Vec<u8>>;
    fn poll_event(&mut self) -> Option<Self::Event>;
    fn poll_timeout(&self) -> Option<Timestamp>;
    fn is_closed(&self) -> bool;
    fn violation(event: &Self::Event) -> Option<&Violation>;
    fn to_c(event: &Self::Event) -> Result<viw_event, Failure>;
}

impl Session for HostSession {
    type Event = HostEvent;

    fn handle_message(&mut self, now: Timestamp, bytes: &[u8]) {
        HostSession::handle_message(self, now, bytes);
    }

    fn handle_timeout(&mut self, now: Timestamp) {
        HostSession::handle_timeout(self, now);
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        HostSession::poll_transmit(self)
    }

    fn poll_event(&mut self) -> Option<HostEvent> {
        HostSession::poll_event(self)
    }

    fn poll_timeout(&self) -> Option<Timestamp> {
        HostSession::poll_timeout(self)
    }

    fn is_closed(&self) -> bool {
        HostSession::is_closed(self)
    }

    fn violation(event: &HostEvent) -> Option<&Violation> {
        match event {
            HostEvent::Violation(violation) => Some(violation),
            _ => None,
        }
    }

    fn to_c(event: &HostEvent) -> Result<viw_event, Failure> {
        viw_event::from_host(event)
    }
}

impl Session for AgentSession {
    type Event = AgentEvent;

    fn handle_message(&mut self, now: Timestamp, bytes: &[u8]) {
        AgentSession::handle_message(self, now, bytes);
    }

    fn handle_timeout(&mut self, now: Timestamp) {
        AgentSession::handle_timeout(self, now);
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        AgentSession::poll_transmit(self)
    }

    fn poll_event(&mut self) -> Option<AgentEvent> {
        AgentSession::poll_event(self)
    }

    fn poll_timeout(&self) -> Option<Timestamp> {
        AgentSession::poll_timeout(self)
    }

    fn is_closed(&self) -> bool {
        AgentSession::is_closed(self)
    }

    fn violation(event: &AgentEvent) -> Option<&Violation> {
        match event {
            AgentEvent::Violation(violation) => Some(violation),
            _ => None,
        }
    }

    fn to_c(event: &AgentEvent) -> Result<viw_event, Failure> {
        viw_event::from_agent(event)
    }
}

/// A session plus the message and events the C side has not taken yet.
#[derive(Debug)]
pub(crate) struct Driven<S: Session> {
    pub(crate) session: S,
    pending: Option<Vec<u8>>,
    events: VecDeque<S::Event>,
}

impl<S: Session> Driven<S> {
    pub(crate) fn new(session: S) -> Self {
        Driven { session, pending: None, events: VecDeque::new() }
    }

    /// Handles one message; fails with the refusal's status when the session refused it (the
    /// refusal is also queued as a Violation event) and with `VIW_ERR_CLOSED` once closed.
    pub(crate) fn handle_message(&mut self, now: Timestamp, bytes: &[u8]) -> Result<(), Failure> {
        if self.session.is_closed() {
            return Err(Failure::new(VIW_ERR_CLOSED, "the session is closed"));
        }
        let before = self.events.len();
        self.session.handle_message(now, bytes);
        self.take_events();
        match self.events.iter().skip(before).find_map(S::violation) {
            Some(violation) => Err(violation_failure(violation)),
            None => Ok(()),
        }
    }

    pub(crate) fn handle_timeout(&mut self, now: Timestamp) {
        self.session.handle_timeout(now);
        self.take_events();
    }

    /// Moves the session's events into this handle's queue, in order.
    pub(crate) fn take_events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            self.events.push_back(event);
        }
    }

    /// Copies the next message to send into the caller's buffer; `*out_len` is 0 when there
    /// is none. A message too large for `cap` stays queued.
    ///
    /// # Safety
    ///
    /// As [`copy_out`].
    pub(crate) unsafe fn poll_transmit_into(
        &mut self,
        buf: *mut u8,
        cap: usize,
        out_len: *mut usize,
    ) -> Result<(), Failure> {
        check_out(out_len, "out_len")?;
        if self.pending.is_none() {
            self.pending = self.session.poll_transmit();
        }
        let message = self.pending.as_deref().unwrap_or_default();
        // SAFETY: forwarded contract.
        unsafe { copy_out(message, buf, cap, out_len) }?;
        self.pending = None;
        Ok(())
    }

    /// Hands the next message to send to the caller as library-owned bytes; empty when there
    /// is none.
    ///
    /// # Safety
    ///
    /// `out` is null or valid for writes of a `viw_bytes`.
    pub(crate) unsafe fn poll_transmit_owned(&mut self, out: *mut viw_bytes) -> Result<(), Failure> {
        check_out(out, "out")?;
        let message = self.pending.take().or_else(|| self.session.poll_transmit()).unwrap_or_default();
        // SAFETY: forwarded contract.
        unsafe { write(out, viw_bytes::from_vec(message), "out") }
    }

    /// Fills `*out` with the next event, or an event of kind None when there is none.
    ///
    /// # Safety
    ///
    /// `out` is null or valid for writes of a `viw_event`.
    pub(crate) unsafe fn poll_event(&mut self, out: *mut viw_event) -> Result<(), Failure> {
        check_out(out, "out")?;
        self.take_events();
        let event = match self.events.front() {
            Some(event) => S::to_c(event)?,
            None => viw_event::EMPTY,
        };
        // The event was converted above; only now does it leave the queue.
        self.events.pop_front();
        // SAFETY: forwarded contract.
        unsafe { write(out, event, "out") }
    }

    /// Writes when to call `handle_timeout` next, and whether there is such a time at all.
    ///
    /// # Safety
    ///
    /// Both pointers are null or valid for writes.
    pub(crate) unsafe fn poll_timeout(&self, out_has: *mut bool, out_at_ms: *mut u64) -> Result<(), Failure> {
        check_out(out_has, "out_has")?;
        check_out(out_at_ms, "out_at_ms")?;
        let next = self.session.poll_timeout();
        // SAFETY: forwarded contract.
        unsafe {
            write(out_has, next.is_some(), "out_has")?;
            write(out_at_ms, next.map_or(0, Timestamp::as_millis), "out_at_ms")
        }
    }
}
