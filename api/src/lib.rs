//! Threadline's edge: the axum HTTP + WebSocket API with JWT auth, generic
//! over the event log. `serve(listener, state, shutdown)` is its entry point;
//! the binary (crate `threadline-cli`) wires it over sled.
//!
//! Architecture invariant: this is the only crate that knows HTTP, JSON wire
//! types and tokens; it turns requests into engine commands and projections
//! reads, and nothing else. It names no concrete log type: the router, the
//! state and `serve` take any `L: EventLog + Checkpoints`.

mod app;
pub mod audit;
pub mod auth;
pub mod config;
mod conn;
mod console;
pub mod deliveries;
mod error;
mod extract;
mod http;
pub mod metrics;
pub mod nudge;
pub mod openapi;
mod presence;
mod rate;
mod server;
mod stream;
pub mod verify;
pub mod wire;
mod ws;

pub use app::{AppState, Log, MAX_BATCH, MAX_LIMIT};
pub use conn::raise_nofile_limit;
pub use error::AppError;
pub use http::router;
pub use server::{serve, shutdown_signal, ServeError};
