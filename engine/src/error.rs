//! Why `decide` rejected a command, with a stable code per reason for the edge to map.

use crate::ids::{EventId, IdError, MessageId, RunId, ThreadId};

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DomainError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("thread {0} not found")]
    ThreadNotFound(ThreadId),
    #[error("run {0} not found")]
    RunNotFound(RunId),
    #[error("thread {0} already exists")]
    ThreadExists(ThreadId),
    #[error("run {0} already exists")]
    RunExists(RunId),
    #[error("run {0} is closed: it already ended with agent_completed or agent_error")]
    RunClosed(RunId),
    #[error("run {0} has expired after being idle too long")]
    RunExpired(RunId),
    /// The `event_id` was already used for another event (another run, type or data).
    #[error("event_id {} was already used for a different event", .0.as_uuid())]
    EventIdConflict(EventId),
    #[error("invalid lifecycle: {0}")]
    InvalidLifecycle(String),
    #[error("{what} is too large (limit {limit})")]
    TooLarge { what: &'static str, limit: usize },
    /// A per-user or per-run quota is used up.
    #[error("quota exceeded: at most {limit} {what}")]
    QuotaExceeded { what: &'static str, limit: u64 },
    #[error("invalid request: {0}")]
    InvalidInput(String),
    #[error("message {0} not found in this run")]
    MessageNotFound(MessageId),
    #[error("message {0} already exists in this run")]
    MessageExists(MessageId),
    #[error("message {0} is complete: it takes no more deltas")]
    MessageClosed(MessageId),
    /// Deltas must come in order: the next one is `expected`.
    #[error("message {message_id}: delta seq {got} is out of order, the next is {expected}")]
    SequenceGap {
        message_id: MessageId,
        expected: u64,
        got: u64,
    },
    /// A per-second rate is used up; retry after `retry_after_ms`.
    #[error("rate limited: at most {limit} {what}")]
    RateLimited {
        what: &'static str,
        limit: u32,
        retry_after_ms: u64,
    },
}

impl DomainError {
    /// The stable snake_case code clients see in `{"error":{"code":…}}`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidId(_) => "invalid_id",
            Self::Forbidden(_) => "forbidden",
            Self::ThreadNotFound(_) => "thread_not_found",
            Self::RunNotFound(_) => "run_not_found",
            Self::ThreadExists(_) => "thread_exists",
            Self::RunExists(_) => "run_exists",
            Self::RunClosed(_) => "run_closed",
            Self::RunExpired(_) => "run_expired",
            Self::EventIdConflict(_) => "event_id_conflict",
            Self::InvalidLifecycle(_) => "invalid_lifecycle",
            Self::TooLarge { .. } => "payload_too_large",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::InvalidInput(_) => "invalid_request",
            Self::MessageNotFound(_) => "message_not_found",
            Self::MessageExists(_) => "message_exists",
            Self::MessageClosed(_) => "message_closed",
            Self::SequenceGap { .. } => "sequence_gap",
            Self::RateLimited { .. } => "rate_limited",
        }
    }
}
