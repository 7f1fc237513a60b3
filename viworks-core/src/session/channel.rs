//! The established part of a session, shared by both sides: sequence numbers, the session
//! keys, the transmit queue, heartbeat and liveness timers, and the violation count.

use std::collections::VecDeque;

use super::{SessionError, Timers, Violation};
use crate::Timestamp;
use crate::auth::{self, MacKey};
use crate::wire::{Close, CloseCode, Envelope, Heartbeat, Limits, Message, Text};

#[derive(Debug)]
pub(crate) struct Channel {
    send_key: MacKey,
    recv_key: MacKey,
    next_send: u64,
    next_recv: u64,
    limits: Limits,
    transmit: VecDeque<Vec<u8>>,
    max_transmit: usize,
    timers: Timers,
    last_sent: Timestamp,
    last_heard: Timestamp,
    violations: u32,
    max_violations: u32,
}

/// What the channel made of one received message.
pub(crate) enum Received {
    /// A verified, in-sequence message from the peer.
    Message(Message),
    /// A message refused; the channel stays open unless `close` names the code to end it with.
    Refused { violation: Violation, close: Option<CloseCode> },
}

impl Channel {
    /// A channel whose handshake (sequence 0 each way) is done.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn established(
        send_key: MacKey,
        recv_key: MacKey,
        limits: Limits,
        max_transmit: usize,
        timers: Timers,
        max_violations: u32,
        now: Timestamp,
    ) -> Self {
        Channel {
            send_key,
            recv_key,
            next_send: 1,
            next_recv: 1,
            limits,
            transmit: VecDeque::new(),
            max_transmit,
            timers,
            last_sent: now,
            last_heard: now,
            violations: 0,
            max_violations: max_violations.max(1),
        }
    }

    /// Verifies `bytes` and checks their sequence number. Refusals are counted; the caller
    /// closes the session when `close` is set.
    pub(crate) fn receive(&mut self, now: Timestamp, bytes: &[u8]) -> Received {
        let covered = match auth::verify(&self.recv_key, bytes, self.limits) {
            Ok(covered) => covered,
            // Unauthenticated bytes may be an attacker's, not the peer's: count them.
            Err(error) => return self.refuse(Violation::from_auth(&error)),
        };
        // The tag was verified above; from here on the bytes are the peer's.
        let envelope = match crate::wire::decode(covered) {
            Ok(envelope) => envelope,
            // The peer itself sent something unreadable, so its sequence is lost: end it.
            Err(error) => {
                self.violations = self.violations.saturating_add(1);
                return Received::Refused {
                    violation: Violation::Undecodable(error.code()),
                    close: Some(CloseCode::ProtocolViolation),
                };
            }
        };
        if envelope.seq != self.next_recv {
            return self.refuse(Violation::OutOfSequence { expected: self.next_recv, got: envelope.seq });
        }
        self.next_recv += 1;
        self.last_heard = now;
        Received::Message(envelope.message)
    }

    fn refuse(&mut self, violation: Violation) -> Received {
        self.violations = self.violations.saturating_add(1);
        let close = (self.violations >= self.max_violations).then_some(CloseCode::TooManyViolations);
        Received::Refused { violation, close }
    }

    /// Seals and queues `message`. Fails when the transmit queue is full (the driver is not
    /// draining it) or the message cannot be encoded.
    pub(crate) fn send(&mut self, now: Timestamp, message: Message) -> Result<(), SessionError> {
        if self.transmit.len() >= self.max_transmit {
            return Err(SessionError::TransmitFull);
        }
        self.push(now, message)
    }

    /// Queues a CLOSE even when the transmit queue is full: the session ends either way.
    pub(crate) fn send_close(&mut self, now: Timestamp, code: CloseCode, message: &str) {
        let close = Message::Close(Close { code, message: Text::lossy(message) });
        // A CLOSE always encodes; if it somehow did not, the connection still ends.
        let _ = self.push(now, close);
    }

    /// Queues a message sealed elsewhere (the handshake's WELCOME, sequence 0).
    pub(crate) fn queue_sealed(&mut self, sealed: Vec<u8>) {
        self.transmit.push_back(sealed);
    }

    fn push(&mut self, now: Timestamp, message: Message) -> Result<(), SessionError> {
        let envelope = Envelope { seq: self.next_send, ts: now, message };
        let sealed = auth::seal(&self.send_key, &envelope).map_err(SessionError::Unencodable)?;
        if sealed.len() > self.limits.max_message_len {
            return Err(SessionError::TooLarge { len: sealed.len(), max: self.limits.max_message_len });
        }
        self.next_send += 1;
        self.last_sent = now;
        self.transmit.push_back(sealed);
        Ok(())
    }

    pub(crate) fn room(&self) -> usize {
        self.max_transmit.saturating_sub(self.transmit.len())
    }

    pub(crate) fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    pub(crate) fn liveness_deadline(&self) -> Timestamp {
        self.last_heard.saturating_add(self.timers.liveness_timeout)
    }

    fn heartbeat_due(&self) -> Timestamp {
        self.last_sent.saturating_add(self.timers.heartbeat_interval)
    }

    /// The next instant [`Channel::on_timeout`] has work to do: a heartbeat due, or the first
    /// instant past the liveness deadline.
    pub(crate) fn next_timeout(&self) -> Timestamp {
        self.liveness_deadline().saturating_add(std::time::Duration::from_millis(1)).min(self.heartbeat_due())
    }

    /// Sends a heartbeat when one is due. Returns true when the peer has been silent past
    /// the liveness timeout, in which case the caller closes the session.
    pub(crate) fn on_timeout(&mut self, now: Timestamp) -> bool {
        if now > self.liveness_deadline() {
            return true;
        }
        if now >= self.heartbeat_due() {
            // A full transmit queue cannot take it, but then the peer is hearing from us anyway
            // as soon as the driver drains it; the push still moves the deadline on.
            if self.send(now, Message::Heartbeat(Heartbeat {})).is_err() {
                self.last_sent = now;
            }
        }
        false
    }
}
