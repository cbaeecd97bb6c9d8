//! End-to-end tests live in `main.rs` and its modules; this crate has no library code.
