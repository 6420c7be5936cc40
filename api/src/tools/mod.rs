//! The operator and auditor tools of the `threadline` binary.

pub mod audit;
pub mod rebuild;
pub mod token;
pub mod verify;
