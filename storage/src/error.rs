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
    /// Acknowledged events are missing: the log refuses to open rather than
    /// serve a shortened history.
    #[error("{0}")]
    Lost(Box<LossReport>),
    /// The directory holds a log in the format-1 layout of an earlier build.
    #[error("the event log at {0} is in the format-1 layout of an earlier Threadline and must be migrated")]
    OldLayout(String),
}

/// What was lost, as far as the disk can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossReport {
    pub dir: String,
    /// The durable head recorded beside sled (what was acknowledged).
    pub acknowledged: Position,
    /// The head sled's recovery reached (on the log or a scratch copy of it), when it ran.
    pub recovered: Option<Position>,
    /// Acknowledged positions with no intact stored copy left, as inclusive ranges
    /// (empty when every one can still be recovered by `repair`).
    pub missing: Vec<(u64, u64)>,
    /// Stored copies that failed their checksums.
    pub damaged_copies: usize,
    pub reason: String,
}

impl LossReport {
    /// The missing positions as `54..=254, 300`.
    pub fn missing_text(&self) -> String {
        crate::salvage::format_ranges(&self.missing.iter().map(|&(a, b)| a..=b).collect::<Vec<_>>())
    }
}

impl std::fmt::Display for LossReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.missing.is_empty() {
            write!(
                f,
                "the event log at {} cannot be opened without losing acknowledged events ({} were acknowledged): {}",
                self.dir, self.acknowledged, self.reason
            )?;
        } else {
            write!(
                f,
                "the event log at {} has lost acknowledged events: {} were acknowledged, positions {} are missing ({})",
                self.dir,
                self.acknowledged,
                self.missing_text(),
                self.reason
            )?;
        }
        if self.damaged_copies > 0 {
            write!(f, "; {} damaged stored copies found", self.damaged_copies)?;
        }
        if self.missing.is_empty() {
            write!(
                f,
                "; every acknowledged position still has an intact stored copy, so `repair` recovers them all"
            )?;
        }
        Ok(())
    }
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}
