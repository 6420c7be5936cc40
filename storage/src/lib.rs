//! Threadline's durable event log: one append-only, checksummed log with dense
//! global positions, per-stream versions, optimistic concurrency, idempotent
//! event ids and group commit.
//!
//! The contract lives in [`EventLog`]; [`SledLog`] keeps it on disk and
//! [`MemoryLog`] in memory (for tests of the layers above). Both pass the same
//! contract suite (`tests/contract.rs`).

mod error;
mod log;
mod memory;
mod plan;
mod record;
mod sled_log;

pub use error::StorageError;
pub use log::{Appended, Checkpoints, EventLog, NewEvent, PendingAppend, Position};
pub use memory::MemoryLog;
pub use record::{Record, FORMAT_VERSION};
pub use sled_log::{SledLog, SledOptions};

/// Milliseconds since the Unix epoch, as stamped on records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
