//! The [`EventLog`] trait: the one contract every log backend keeps.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::{Record, StorageError};

/// A global log position: dense, gap-free, starting at 1. `Position(0)` means
/// "before the first record".
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position(pub u64);

impl Position {
    pub const ZERO: Position = Position(0);
    pub fn get(self) -> u64 {
        self.0
    }
    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Idempotency key: the log stores each id at most once, for its whole life.
    pub event_id: Uuid,
    /// The stream this event extends (no NUL byte, at most 512 bytes).
    pub stream: String,
    /// When set, the stream must be at exactly this version right before this
    /// event (0 = the stream must not exist yet).
    pub expected_version: Option<u64>,
    /// Who appended it (kept for audit).
    pub actor: String,
    /// The event's type name (kept outside the payload so audits can filter cheaply).
    pub event_type: String,
    /// Opaque payload bytes.
    pub payload: Vec<u8>,
}

/// Where an event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub position: Position,
    pub stream_version: u64,
    /// True when the event id was already stored: nothing was appended and this
    /// is the original position and version.
    pub duplicate: bool,
}

/// The durable, append-only event log.
///
/// Batch semantics: the new events of a batch are appended all or none, in
/// order, at consecutive positions. An event whose id is already stored (or
/// appears earlier in the same batch) is not appended again: it is answered
/// with its original position and version, marked `duplicate`, and its
/// `expected_version` is not checked. A batch of only stored ids appends nothing.
pub trait EventLog: Send + Sync + 'static {
    /// Queues `events` for the next group commit; the result resolves only once they are on disk.
    fn append(&self, events: Vec<NewEvent>) -> PendingAppend;
    /// The highest durable position (`Position::ZERO` for an empty log).
    fn head(&self) -> Position;
    /// The log's time, in ms since the Unix epoch: what it would stamp as `recorded_at`
    /// on a record appended now. The logs here never go back from the last stamp (see
    /// [`crate::clock`]); the default is the wall clock.
    fn now_ms(&self) -> u64 {
        crate::now_ms()
    }
    /// The highest position committed to the log by any process, which this one may
    /// not have read yet when the log is shared (gateways over JetStream ask the
    /// stream's leader). Blocks for that answer; for a log only this process writes,
    /// it is [`head`](Self::head).
    fn committed_head(&self) -> Result<Position, StorageError> {
        Ok(self.head())
    }
    /// A receiver that sees the durable head move; sending to it never blocks the writer.
    fn watch_head(&self) -> watch::Receiver<Position>;
    /// Up to `limit` durable records from position `from` on, in order, checksums verified.
    fn read_from(&self, from: Position, limit: usize) -> Result<Vec<Record>, StorageError>;
    /// The durable record at `position`, if any, checksum verified.
    fn read_at(&self, position: Position) -> Result<Option<Record>, StorageError>;
    /// The durable records at `positions` (ascending), in that order; a position
    /// past the durable head is `InvalidInput`. Backends may read them together.
    fn read_many(&self, positions: &[Position]) -> Result<Vec<Record>, StorageError> {
        positions
            .iter()
            .map(|&p| {
                self.read_at(p)?.ok_or_else(|| {
                    StorageError::InvalidInput(format!("position {p} is not durable"))
                })
            })
            .collect()
    }
    /// Up to `limit` durable records of `stream` from version `from_version` on, in order.
    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError>;
    /// The durable version of `stream` (0 when it has no event).
    fn stream_version(&self, stream: &str) -> Result<u64, StorageError>;
    /// Where the event with this id was durably stored, if it was.
    fn find_event(&self, event_id: Uuid) -> Result<Option<Appended>, StorageError>;
    /// Finishes every append already accepted, makes it durable and stops the
    /// log's threads; later appends fail. (Dropping the log does the same.)
    fn close(&self) -> Result<(), StorageError> {
        Ok(())
    }
    /// Whether the log still accepts appends: false once a failed commit has
    /// stopped it (fail-stop) or it was closed.
    fn accepting(&self) -> bool {
        true
    }
}

/// Named, durable blobs beside the log (projection checkpoints).
pub trait Checkpoints: Send + Sync + 'static {
    /// The blob stored under `name`, if any.
    fn load_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Replaces the blob under `name` atomically and durably.
    fn store_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError>;
}

/// What an append is answered: where each event landed, or why none did.
pub type AppendResult = Result<Vec<Appended>, StorageError>;

/// An append on its way to disk: `.await` it, or `wait()` for it from a
/// thread that is not running an async runtime.
#[derive(Debug)]
pub struct PendingAppend {
    rx: oneshot::Receiver<AppendResult>,
}

impl PendingAppend {
    /// An append answered later through the sender (for a log implementation or a
    /// wrapper around one, such as a fault-injecting test log). A dropped sender
    /// answers [`StorageError::Closed`].
    pub fn channel() -> (oneshot::Sender<AppendResult>, PendingAppend) {
        let (tx, rx) = oneshot::channel();
        (tx, PendingAppend { rx })
    }

    /// An append answered at once.
    pub fn ready(result: AppendResult) -> PendingAppend {
        let (tx, pending) = Self::channel();
        let _ = tx.send(result);
        pending
    }

    /// Blocks the current thread until the append is durable (or failed).
    pub fn wait(self) -> AppendResult {
        self.rx.blocking_recv().unwrap_or(Err(StorageError::Closed))
    }
}

impl Future for PendingAppend {
    type Output = AppendResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AppendResult> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StorageError::Closed)))
    }
}
