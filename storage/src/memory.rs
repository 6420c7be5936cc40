//! [`MemoryLog`]: the log contract kept in memory, for tests of the layers
//! above and as the reference the sled backend is compared with.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

use crate::clock::{Clock, Stamps, SystemClock};
use crate::plan::{Committed, Planner};
use crate::{
    Appended, Checkpoints, EventLog, NewEvent, PendingAppend, Position, Record, StorageError,
};

/// An in-memory [`EventLog`]: same semantics as [`crate::SledLog`], no durability.
#[derive(Debug)]
pub struct MemoryLog {
    state: Mutex<State>,
    head_tx: watch::Sender<Position>,
    stamps: Stamps,
}

#[derive(Debug, Default)]
struct State {
    /// Encoded records, index = position - 1 (so reads exercise the codec too).
    records: Vec<Vec<u8>>,
    streams: HashMap<String, Vec<Position>>,
    ids: HashMap<Uuid, Appended>,
    checkpoints: HashMap<String, Vec<u8>>,
}

impl Committed for State {
    fn stream_version(&mut self, stream: &str) -> Result<u64, StorageError> {
        Ok(self.streams.get(stream).map_or(0, |v| v.len() as u64))
    }
    fn find_event(&mut self, id: Uuid) -> Result<Option<Appended>, StorageError> {
        Ok(self.ids.get(&id).copied())
    }
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLog {
    pub fn new() -> MemoryLog {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// A log whose `recorded_at` stamps come from `clock` (kept monotonic, see
    /// [`crate::clock`]); tests use a [`crate::ManualClock`].
    pub fn with_clock(clock: Arc<dyn Clock>) -> MemoryLog {
        MemoryLog {
            state: Mutex::new(State::default()),
            head_tx: watch::Sender::new(Position::ZERO),
            stamps: Stamps::new(clock, 0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated
        // (appends mutate only after planning succeeded), so poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn decode(state: &State, position: Position) -> Result<Option<Record>, StorageError> {
        match state.records.get((position.0 as usize).wrapping_sub(1)) {
            Some(bytes) if position.0 > 0 => Record::decode(position, bytes).map(Some),
            _ => Ok(None),
        }
    }
}

impl EventLog for MemoryLog {
    fn append(&self, events: Vec<NewEvent>) -> PendingAppend {
        let mut state = self.lock();
        let head = Position(state.records.len() as u64);
        let mut planner = Planner::new(head, self.stamps.stamp());
        let (results, records) = match planner.plan(&mut *state, events) {
            Ok(planned) => planned,
            Err(e) => return PendingAppend::ready(Err(e)),
        };
        for record in records {
            state
                .streams
                .entry(record.stream.clone())
                .or_default()
                .push(record.position);
            state.ids.insert(
                record.event_id,
                Appended {
                    position: record.position,
                    stream_version: record.stream_version,
                    duplicate: false,
                },
            );
            state.records.push(record.encode());
        }
        let head = planner.head();
        drop(state);
        self.head_tx.send_replace(head);
        PendingAppend::ready(Ok(results))
    }

    fn head(&self) -> Position {
        Position(self.lock().records.len() as u64)
    }

    fn now_ms(&self) -> u64 {
        self.stamps.now()
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.head_tx.subscribe()
    }

    fn read_from(&self, from: Position, limit: usize) -> Result<Vec<Record>, StorageError> {
        let state = self.lock();
        let start = from.0.max(1);
        let end = (state.records.len() as u64).min(start.saturating_add(limit as u64) - 1);
        (start..=end)
            .filter_map(|p| Self::decode(&state, Position(p)).transpose())
            .collect()
    }

    fn read_at(&self, position: Position) -> Result<Option<Record>, StorageError> {
        Self::decode(&self.lock(), position)
    }

    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let state = self.lock();
        let Some(positions) = state.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let skip = from_version.saturating_sub(1) as usize;
        positions
            .iter()
            .skip(skip)
            .take(limit)
            .filter_map(|p| Self::decode(&state, *p).transpose())
            .collect()
    }

    fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        self.lock().stream_version(stream)
    }

    fn find_event(&self, event_id: Uuid) -> Result<Option<Appended>, StorageError> {
        self.lock().find_event(event_id)
    }
}

impl Checkpoints for MemoryLog {
    fn load_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().checkpoints.get(name).cloned())
    }
    fn store_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.lock().checkpoints.insert(name.into(), bytes.to_vec());
        Ok(())
    }
}
