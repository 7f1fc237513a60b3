//! Shared fixtures for the ViWorkS benchmarks.
//!
//! This crate currently holds no benchmark.
