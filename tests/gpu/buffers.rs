//! Transitional: the `Result<_, String>` helpers that `tests/gpu/redundancy.rs` and
//! `tests/gpu/dropout_redundancy.rs` still use; delete this module (and its `mod` line) when
//! they use [`crate::prelude`] like every other file.

/// A test result whose error is a message.
pub type R<T> = Result<T, String>;

/// Any displayable error as a test failure message.
pub fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}
