//! [`Intercepted`]: a log that hands every call to another log, except those an
//! [`Intercept`] takes over (a fault on append, a held or altered read, a stopped
//! log). Tests inject faults and races with it without restating the whole
//! [`EventLog`] trait, and without silently losing a method a wrapper forgot
//! (the log's clock, batched reads, close).

use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    Appended, Checkpoints, EventLog, NewEvent, PendingAppend, Position, Record, StorageError,
};

/// The calls an interceptor may take over; each defaults to the inner log's.
pub trait Intercept<L: EventLog>: Send + Sync + 'static {
    fn append(&self, inner: &L, events: Vec<NewEvent>) -> PendingAppend {
        inner.append(events)
    }
    fn read_from(
        &self,
        inner: &L,
        from: Position,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        inner.read_from(from, limit)
    }
    fn head(&self, inner: &L) -> Position {
        inner.head()
    }
    fn accepting(&self, inner: &L) -> bool {
        inner.accepting()
    }
}

/// `inner` with the calls `hooks` takes over; checkpoints are the inner log's.
#[derive(Debug, Default)]
pub struct Intercepted<L, I> {
    pub inner: L,
    pub hooks: I,
}

impl<L, I> Intercepted<L, I> {
    pub fn new(inner: L, hooks: I) -> Intercepted<L, I> {
        Intercepted { inner, hooks }
    }
}

impl<L: EventLog, I: Intercept<L>> EventLog for Intercepted<L, I> {
    fn append(&self, events: Vec<NewEvent>) -> PendingAppend {
        self.hooks.append(&self.inner, events)
    }
    fn head(&self) -> Position {
        self.hooks.head(&self.inner)
    }
    fn now_ms(&self) -> u64 {
        self.inner.now_ms()
    }
    fn committed_head(&self) -> Result<Position, StorageError> {
        self.inner.committed_head()
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
    }
    fn read_from(&self, from: Position, limit: usize) -> Result<Vec<Record>, StorageError> {
        self.hooks.read_from(&self.inner, from, limit)
    }
    fn read_at(&self, position: Position) -> Result<Option<Record>, StorageError> {
        self.inner.read_at(position)
    }
    fn read_many(&self, positions: &[Position]) -> Result<Vec<Record>, StorageError> {
        self.inner.read_many(positions)
    }
    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        self.inner.read_stream(stream, from_version, limit)
    }
    fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        self.inner.stream_version(stream)
    }
    fn find_event(&self, event_id: Uuid) -> Result<Option<Appended>, StorageError> {
        self.inner.find_event(event_id)
    }
    fn close(&self) -> Result<(), StorageError> {
        self.inner.close()
    }
    fn accepting(&self) -> bool {
        self.hooks.accepting(&self.inner)
    }
}

impl<L: Checkpoints, I: Send + Sync + 'static> Checkpoints for Intercepted<L, I> {
    fn load_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.load_checkpoint(name)
    }
    fn store_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.inner.store_checkpoint(name, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryLog;

    /// Refuses every append; everything else is the inner log's.
    struct Refuse;
    impl<L: EventLog> Intercept<L> for Refuse {
        fn append(&self, _: &L, _: Vec<NewEvent>) -> PendingAppend {
            PendingAppend::ready(Err(StorageError::Closed))
        }
        fn accepting(&self, _: &L) -> bool {
            false
        }
    }

    #[test]
    fn only_the_intercepted_calls_change() {
        let log = Intercepted::new(MemoryLog::new(), Refuse);
        let event = NewEvent {
            event_id: Uuid::now_v7(),
            stream: "s".into(),
            expected_version: None,
            actor: "a".into(),
            event_type: "t".into(),
            payload: b"{}".to_vec(),
        };
        assert!(matches!(
            log.append(vec![event.clone()]).wait(),
            Err(StorageError::Closed)
        ));
        assert!(!log.accepting());
        // The inner log is reachable and the rest delegates to it.
        log.inner.append(vec![event]).wait().unwrap();
        assert_eq!(log.head(), Position(1));
        assert_eq!(log.read_from(Position(1), 10).unwrap().len(), 1);
        assert_eq!(log.stream_version("s").unwrap(), 1);
    }
}
