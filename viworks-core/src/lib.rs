//! The ViWorkS protocol, without I/O.
//!
//! `viworks-core` holds everything the host and the gateway agree on: the wire format
//! ([`wire`]), message authentication and replay protection ([`auth`]), and the time and
//! randomness types they are driven with ([`Timestamp`], [`Entropy`]). It opens no socket,
//! reads no clock and draws no randomness of its own: callers pass `now` and seed
//! [`Entropy`], so every behaviour is reproducible in a test.
//!
//! The byte-level protocol is specified in `docs/protocol.md`; the test vectors in
//! `viworks-core/tests/vectors/` let other implementations check themselves against this one.

#![forbid(unsafe_code)]

pub mod auth;
mod entropy;
pub mod flow;
mod hex;
pub mod idempotency;
pub mod session;
mod time;
pub mod verbs;
pub mod wire;

pub use entropy::Entropy;
pub use time::Timestamp;
