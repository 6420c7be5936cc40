//! The storage error type: conflicts, corruption and I/O kept apart.

use crate::Position;

/// Everything the log can answer instead of a success.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    /// Optimistic concurrency: the stream is not at the version the caller expected.
    #[error("version conflict on stream {stream}: expected {expected}, current {current}")]
    Conflict {
        stream: String,
        expected: u64,
        current: u64,
    },
    /// A stored record failed its checksum or could not be decoded.
    #[error("corrupt record at position {position}: {reason}")]
    Corrupt { position: Position, reason: String },
    /// The caller passed something the log cannot store (empty batch, bad stream name).
    #[error("invalid append: {0}")]
    InvalidInput(String),
    /// The data directory holds no log (and read-only tools never create one).
    #[error("no event log at {0}")]
    NotFound(String),
    /// Another process holds the log open.
    #[error("the event log at {0} is in use by another process (is a server running on it?)")]
    Locked(String),
    /// The disk or the database failed; the append may not be durable.
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// The log was closed, or failed earlier and stopped accepting appends.
    #[error("the event log is closed")]
    Closed,
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}
