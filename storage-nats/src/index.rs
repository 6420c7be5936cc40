//! The gateway's local fold of the stream: head, per-stream positions, the
//! event-id index and a cache of the newest record bytes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use threadline_storage::plan::Committed;
use threadline_storage::{Appended, Position, Record, StorageError};
use uuid::Uuid;

/// How many of the newest records a gateway keeps in memory for reads.
pub(crate) const CACHE_RECORDS: usize = 16_384;

#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Every position up to here has been applied, in order.
    pub(crate) head: u64,
    /// The latest `recorded_at` applied: new records are never stamped before it,
    /// whichever gateway's clock stamped it (see `threadline_storage::clock`).
    pub(crate) last_recorded_at: u64,
    streams: HashMap<String, Vec<Position>>,
    ids: HashMap<Uuid, Appended>,
    /// Encoded records of positions `cache_first ..= head`.
    cache: VecDeque<Arc<[u8]>>,
    cache_first: u64,
    /// The most records `cache` holds.
    cache_records: usize,
    /// Set when the stream showed something the log contract forbids (a gap,
    /// a damaged record): the index stops there and appends are refused.
    pub(crate) broken: Option<String>,
}

impl Committed for Index {
    fn stream_version(&mut self, stream: &str) -> Result<u64, StorageError> {
        Ok(Index::version(self, stream))
    }
    fn find_event(&mut self, id: Uuid) -> Result<Option<Appended>, StorageError> {
        Ok(self.ids.get(&id).copied())
    }
}

impl Index {
    /// An empty index that keeps the newest `cache_records` records in memory.
    pub(crate) fn with_cache(cache_records: usize) -> Index {
        Index {
            cache_records,
            ..Index::default()
        }
    }

    /// The log's time: the wall clock, never before the last record's stamp.
    pub(crate) fn now_ms(&self) -> u64 {
        threadline_storage::now_ms().max(self.last_recorded_at)
    }

    pub(crate) fn version(&self, stream: &str) -> u64 {
        self.streams.get(stream).map_or(0, |v| v.len() as u64)
    }

    pub(crate) fn find(&self, id: &Uuid) -> Option<Appended> {
        self.ids.get(id).copied()
    }

    /// The positions of `stream` from version `from_version` on (at most `limit`).
    pub(crate) fn stream_positions(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Vec<Position> {
        let Some(positions) = self.streams.get(stream) else {
            return Vec::new();
        };
        positions
            .iter()
            .skip(from_version.saturating_sub(1) as usize)
            .take(limit)
            .copied()
            .collect()
    }

    /// The cached bytes of `position`, when it is recent enough.
    pub(crate) fn cached(&self, position: u64) -> Option<Arc<[u8]>> {
        if position < self.cache_first || position > self.head || self.cache.is_empty() {
            return None;
        }
        self.cache
            .get((position - self.cache_first) as usize)
            .cloned()
    }

    /// Applies the message stored at stream sequence `seq`. Sequences at or
    /// below the head were applied already (by the writer or the follower)
    /// and are skipped; anything else must be the next one, hold an intact
    /// record that claims this position and extend its stream by one version.
    /// Returns whether the head moved.
    pub(crate) fn apply(&mut self, seq: u64, bytes: &[u8]) -> Result<bool, StorageError> {
        if let Some(reason) = &self.broken {
            return Err(StorageError::Io(reason.clone()));
        }
        if seq <= self.head {
            return Ok(false);
        }
        let result = self.apply_next(seq, bytes);
        if let Err(e) = &result {
            self.broken = Some(format!("the JetStream log cannot be followed: {e}"));
        }
        result.map(|()| true)
    }

    fn apply_next(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        let position = Position(seq);
        if seq != self.head + 1 {
            return Err(StorageError::Corrupt {
                position,
                reason: format!(
                    "stream sequence {seq} follows {}: positions must be gap-free (was a message deleted?)",
                    self.head
                ),
            });
        }
        let record = Record::decode(position, bytes)?;
        let version = self.version(&record.stream);
        if record.stream_version != version + 1 {
            return Err(StorageError::Corrupt {
                position,
                reason: format!(
                    "record has version {} of stream {}, which is at version {version}",
                    record.stream_version, record.stream
                ),
            });
        }
        if self.ids.contains_key(&record.event_id) {
            return Err(StorageError::Corrupt {
                position,
                reason: format!("event id {} is stored twice", record.event_id),
            });
        }
        self.ids.insert(
            record.event_id,
            Appended {
                position,
                stream_version: record.stream_version,
                duplicate: false,
            },
        );
        self.streams
            .entry(record.stream)
            .or_default()
            .push(position);
        if self.cache.is_empty() {
            self.cache_first = seq;
        }
        self.cache.push_back(Arc::from(bytes));
        if self.cache.len() > self.cache_records {
            self.cache.pop_front();
            self.cache_first += 1;
        }
        self.last_recorded_at = self.last_recorded_at.max(record.recorded_at_ms);
        self.head = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(position: u64, recorded_at_ms: u64) -> Vec<u8> {
        Record {
            position: Position(position),
            stream: "thread:t".into(),
            stream_version: position,
            event_id: Uuid::from_u128(position.into()),
            recorded_at_ms,
            actor: "agent:bot".into(),
            event_type: "agent_thinking".into(),
            payload: b"{}".to_vec(),
        }
        .encode()
    }

    /// A record stamped ahead of this gateway's clock (another gateway's clock
    /// runs fast) holds this gateway's time at its stamp: never before it.
    #[test]
    fn the_logs_time_never_goes_before_the_last_stamp_applied() {
        let mut index = Index::default();
        let ahead = threadline_storage::now_ms() + 3_600_000;
        index.apply(1, &record(1, ahead)).unwrap();
        assert!(index.now_ms() >= ahead);
        // An older stamp after it does not move the time back.
        index.apply(2, &record(2, 1_700_000_000_000)).unwrap();
        assert!(index.now_ms() >= ahead);
    }
}
