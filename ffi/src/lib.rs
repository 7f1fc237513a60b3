//! C API over `viworks-core`, for control planes written in other languages.
//!
//! Everything the Rust crate offers a driver is reachable from C through `include/viworks.h`:
//! key derivation, sealing and opening messages, the HELLO nonce cache, SPKI pins, and both
//! session state machines. The C side owns the sockets, the clock and the randomness, exactly
//! as a Rust driver would: every function takes `now_ms`, and every constructor that needs
//! randomness takes a 32-byte seed.
//!
//! Rules every function follows (see `docs/ffi.md`):
//! - It returns a [`viw_status`]: [`VIW_OK`] or a negative error, and on error leaves a message
//!   for [`viw_last_error`] on the calling thread. No panic crosses the boundary.
//! - Every pointer is checked for null (and every output pointer for alignment) before use;
//!   lengths are taken as given, so a pointer must be valid for the length passed with it.
//! - Handles are opaque; each comes with a `_free`, and so does every structure that holds
//!   library-owned memory ([`viw_bytes`], [`viw_event`], [`viw_refusal`]). Memory is never
//!   freed across the boundary by the other side's allocator.

#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_camel_case_types)]

pub mod agent;
mod boundary;
mod driver;
pub mod event;
pub mod host;
pub mod keys;
pub mod memory;
pub mod nonce_cache;
pub mod pin;
pub mod status;

pub use agent::*;
pub use event::*;
pub use host::*;
pub use keys::*;
pub use memory::*;
pub use nonce_cache::*;
pub use pin::*;
pub use status::*;
