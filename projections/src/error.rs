//! Errors of the projection layer.

use threadline_storage::{Position, StorageError};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProjectionError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A record's payload is not an event this build understands.
    #[error("record at position {position} has an undecodable payload: {reason}")]
    Decode { position: Position, reason: String },
    /// Records must be applied in order, each exactly once.
    #[error("projection at {at} cannot apply position {got}")]
    OutOfOrder { at: Position, got: Position },
    /// The stored checkpoint is unreadable or ahead of the log.
    #[error("checkpoint is unusable: {0}")]
    Checkpoint(String),
    /// The fold stopped (the server is shutting down).
    #[error("the projections stopped folding")]
    Stopped,
}
