//! Threadline's durable event log: one append-only, checksummed log with dense
//! global positions, per-stream versions, optimistic concurrency, idempotent
//! event ids and group commit.
//!
//! The contract lives in [`EventLog`]; [`SledLog`] keeps it on disk and
//! [`MemoryLog`] in memory (for tests of the layers above). Both pass the same
//! contract suite (`tests/contract.rs`).

mod checkpoints;
pub mod clock;
mod error;
pub mod evidence;
mod frame;
pub mod intercept;
mod log;
pub mod maintenance;
mod memory;
pub mod plan;
mod record;
pub mod salvage;
mod sled_log;

pub use checkpoints::{DirCheckpoints, CHECKPOINT_DIR};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{LossReport, StorageError};
pub use frame::FRAME_FORMAT;
pub use intercept::{Intercept, Intercepted};
pub use log::{AppendResult, Appended, Checkpoints, EventLog, NewEvent, PendingAppend, Position};
pub use memory::MemoryLog;
pub use record::{Record, FORMAT_VERSION};
pub use sled_log::{write_log, SledLog, SledOptions};

/// Streams whose name starts with this belong to the log itself (the record
/// of an accepted loss), not to any projection.
pub const SYSTEM_STREAM_PREFIX: &str = "$";
/// The stream of the log's own records.
pub const LOG_STREAM: &str = "$log";
/// The event type recorded when an operator accepts a loss.
pub const LOSS_ACCEPTED: &str = "log_loss_accepted";

/// Milliseconds since the Unix epoch, as stamped on records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
