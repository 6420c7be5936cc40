//! Sequencing shared by every backend: assigns positions and stream versions,
//! checks expected versions and resolves duplicate event ids, for one group of
//! batches, without touching storage. Backends commit what it plans.

use std::collections::HashMap;

use uuid::Uuid;

use crate::{Appended, NewEvent, Position, Record, StorageError};

/// The longest stream name the log accepts.
pub(crate) const MAX_STREAM_LEN: usize = 512;

/// What the planner needs to know about committed state.
pub trait Committed {
    /// The committed version of `stream` (0 when absent).
    fn stream_version(&mut self, stream: &str) -> Result<u64, StorageError>;
    /// The committed position and version of an event id.
    fn find_event(&mut self, id: Uuid) -> Result<Option<Appended>, StorageError>;
}

/// Plans the batches of one group commit on top of committed state.
#[derive(Debug)]
pub struct Planner {
    next: Position,
    versions: HashMap<String, u64>,
    ids: HashMap<Uuid, Appended>,
    recorded_at_ms: u64,
}

impl Planner {
    /// A planner whose first new record gets position `head + 1`.
    pub fn new(head: Position, recorded_at_ms: u64) -> Planner {
        Planner {
            next: head.next(),
            versions: HashMap::new(),
            ids: HashMap::new(),
            recorded_at_ms,
        }
    }

    /// The head after every batch planned so far.
    pub fn head(&self) -> Position {
        Position(self.next.0 - 1)
    }

    /// Plans one batch: all of its new events, or (on error) none of them.
    pub fn plan(
        &mut self,
        committed: &mut dyn Committed,
        events: Vec<NewEvent>,
    ) -> Result<(Vec<Appended>, Vec<Record>), StorageError> {
        if events.is_empty() {
            return Err(StorageError::InvalidInput("empty batch".into()));
        }
        // Local overlays: merged into the group's only when the whole batch fits.
        let mut versions: HashMap<String, u64> = HashMap::new();
        let mut ids: HashMap<Uuid, Appended> = HashMap::new();
        let mut results = Vec::with_capacity(events.len());
        let mut records = Vec::new();
        let mut next = self.next;
        for event in events {
            validate_stream(&event.stream)?;
            let known = match ids.get(&event.event_id).or(self.ids.get(&event.event_id)) {
                Some(a) => Some(*a),
                None => committed.find_event(event.event_id)?,
            };
            if let Some(original) = known {
                results.push(Appended {
                    duplicate: true,
                    ..original
                });
                continue;
            }
            let current = match versions
                .get(&event.stream)
                .or(self.versions.get(&event.stream))
            {
                Some(v) => *v,
                None => committed.stream_version(&event.stream)?,
            };
            if let Some(expected) = event.expected_version {
                if expected != current {
                    return Err(StorageError::Conflict {
                        stream: event.stream,
                        expected,
                        current,
                    });
                }
            }
            let appended = Appended {
                position: next,
                stream_version: current + 1,
                duplicate: false,
            };
            versions.insert(event.stream.clone(), current + 1);
            ids.insert(event.event_id, appended);
            results.push(appended);
            records.push(Record {
                position: next,
                stream: event.stream,
                stream_version: current + 1,
                event_id: event.event_id,
                recorded_at_ms: self.recorded_at_ms,
                actor: event.actor,
                event_type: event.event_type,
                payload: event.payload,
            });
            next = next.next();
        }
        self.versions.extend(versions);
        self.ids.extend(ids);
        self.next = next;
        Ok((results, records))
    }
}

fn validate_stream(stream: &str) -> Result<(), StorageError> {
    if stream.is_empty() || stream.len() > MAX_STREAM_LEN || stream.contains('\0') {
        return Err(StorageError::InvalidInput(format!(
            "stream name must be 1 to {MAX_STREAM_LEN} bytes without NUL"
        )));
    }
    Ok(())
}
