//! Threadline's domain: validated ids, commands, events, `decide` and `apply`.
//!
//! Architecture invariant: no I/O, no async runtime, no storage or wire format. Everything
//! here is a pure function of its inputs, time included.

pub mod command;
pub mod decide;
pub mod error;
pub mod event;
pub mod ids;
pub mod state;

pub use command::*;
pub use decide::*;
pub use error::*;
pub use event::*;
pub use ids::*;
pub use state::*;
