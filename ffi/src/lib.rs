//! C API over `viworks-core`, for control planes written in other languages.
//!
//! This crate currently exports nothing; the C ABI is added on top of the core's public API.
