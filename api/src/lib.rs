//! Threadline's edge: the axum HTTP + WebSocket API with JWT auth, and the
//! pieces of the `threadline` binary.
//!
//! Architecture invariant: this is the only crate that knows HTTP, JSON wire
//! types and tokens; it turns requests into engine commands and projections
//! reads, and nothing else.

pub mod app;
pub mod auth;
pub mod config;
pub mod conn;
pub mod error;
pub mod extract;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod rate;
pub mod server;
pub mod tools;
pub mod wire;
pub mod ws;
