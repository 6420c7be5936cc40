//! [`ReadModel`]: every projection plus the position it reflects, folded by
//! one function and stored as one checkpoint so state and position move together.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use threadline_engine::{Event, EventMeta, Registry, UserId};
use threadline_storage::{Position, Record};

use crate::{decode_event, Acks, Delivery, Nudges, ProjectionError, Streams};
use uuid::Uuid;

/// The checkpoint key of the read model.
pub const CHECKPOINT_NAME: &str = "read-model";
/// 2: threads without metadata, per-user thread counts (issue 11).
/// 3: streamed messages (issue 18): run message state, the streams projection.
/// 4: the delivery ledger (`acks`, issue 14).
/// 5: runs carry their cancel request, inputs and signal count (issue 19).
/// 6: a CRC32C of the body after the tag: a damaged checkpoint is refused before
///    it is decoded (fuzzing found a damaged length prefix aborting the process
///    on a multi-exabyte allocation).
/// 7: the pending nudges (issue 19's webhook).
const CHECKPOINT_FORMAT: u8 = 7;
/// Formats an older build wrote. Checkpoints are advisory: one of these is
/// dropped and the model rebuilt from the log.
const OLDER_CHECKPOINT_FORMATS: &[u8] = &[1, 2, 3, 4, 5, 6];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadModel {
    position: Position,
    registry: Registry,
    delivery: Delivery,
    streams: Streams,
    acks: Acks,
    nudges: Nudges,
}

/// A deterministic digest of each projection's state (SHA-256 of its encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    pub position: Position,
    pub registry: [u8; 32],
    pub delivery: [u8; 32],
    /// Open messages' texts and the chained digest of completed ones.
    pub streams: [u8; 32],
    /// The delivery ledger: every forward move of every client's cursor.
    pub acks: [u8; 32],
    /// The pending nudges.
    pub nudges: [u8; 32],
}

impl Digests {
    /// Names of the projections whose digests differ.
    pub fn differing(&self, other: &Digests) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.registry != other.registry {
            out.push("registry");
        }
        if self.delivery != other.delivery {
            out.push("delivery");
        }
        if self.streams != other.streams {
            out.push("streams");
        }
        if self.acks != other.acks {
            out.push("acks");
        }
        if self.nudges != other.nudges {
            out.push("nudges");
        }
        out
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl std::fmt::Display for Digests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "position {} registry {} delivery {} streams {} acks {} nudges {}",
            self.position,
            hex(&self.registry),
            hex(&self.delivery),
            hex(&self.streams),
            hex(&self.acks),
            hex(&self.nudges)
        )
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("encoding into a Vec is infallible")
}

impl ReadModel {
    /// The last position folded in.
    pub fn position(&self) -> Position {
        self.position
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// The delivery ledger: every forward move of every client's cursor.
    pub fn acks(&self) -> &Acks {
        &self.acks
    }

    /// The events whose owner may be nudged: unacknowledged, no outcome recorded.
    pub fn nudges(&self) -> &Nudges {
        &self.nudges
    }

    /// Folds the next record in. Records must come in order, each once:
    /// anything else is refused, so replay can never apply an event twice.
    /// Returns the user whose delivery queue grew, if one did.
    pub fn apply(&mut self, record: &Record) -> Result<Option<UserId>, ProjectionError> {
        if record.position != self.position.next() {
            return Err(ProjectionError::OutOfOrder {
                at: self.position,
                got: record.position,
            });
        }
        if record
            .stream
            .starts_with(threadline_storage::SYSTEM_STREAM_PREFIX)
        {
            // The log's own records (an accepted loss) change no projection.
            self.position = record.position;
            return Ok(None);
        }
        let event = decode_event(&record.payload).map_err(|reason| ProjectionError::Decode {
            position: record.position,
            reason,
        })?;
        Ok(self.apply_event(
            &event,
            record.position,
            record.event_id,
            record.recorded_at_ms,
        ))
    }

    fn apply_event(
        &mut self,
        event: &Event,
        position: Position,
        event_id: Uuid,
        recorded_at_ms: u64,
    ) -> Option<UserId> {
        let meta = EventMeta {
            position: position.0,
            recorded_at_ms,
        };
        self.registry.apply(event, &meta);
        self.position = position;
        match event {
            Event::CursorAdvanced {
                user_id,
                client_id,
                user_seq,
            } => {
                self.delivery.advance(user_id, client_id, *user_seq);
                self.acks
                    .record(user_id, client_id, *user_seq, position, recorded_at_ms);
                self.nudges.acknowledged(user_id, *user_seq);
                None
            }
            Event::NudgeRecorded(n) => {
                self.nudges.resolved(&n.user_id, n.subject_position);
                None
            }
            other => {
                let owner = other
                    .thread_id()
                    .and_then(|t| self.registry.owner_of(t))
                    .cloned()?;
                let user_seq = self.delivery.enqueue(&owner, position);
                self.streams.apply(other, &owner, user_seq);
                let acked = self.delivery.furthest_cursor(&owner);
                self.nudges.subject(
                    other,
                    &owner,
                    user_seq,
                    acked,
                    position.0,
                    event_id,
                    recorded_at_ms,
                );
                Some(owner)
            }
        }
    }

    pub fn digests(&self) -> Digests {
        Digests {
            position: self.position,
            registry: Sha256::digest(encode(&self.registry)).into(),
            delivery: Sha256::digest(encode(&self.delivery)).into(),
            streams: Sha256::digest(encode(&self.streams)).into(),
            acks: Sha256::digest(encode(&self.acks)).into(),
            nudges: Sha256::digest(encode(&self.nudges)).into(),
        }
    }

    /// The checkpoint bytes: `[format][crc32c of the body, LE][bincode(model)]`.
    pub fn to_checkpoint(&self) -> Vec<u8> {
        let body = encode(self);
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(CHECKPOINT_FORMAT);
        out.extend(crc32c::crc32c(&body).to_le_bytes());
        out.extend(body);
        out
    }

    /// Whether `bytes` is a checkpoint an older build wrote (to be rebuilt, not read).
    pub fn is_older_checkpoint(bytes: &[u8]) -> bool {
        bytes
            .first()
            .is_some_and(|f| OLDER_CHECKPOINT_FORMATS.contains(f))
    }

    pub fn from_checkpoint(bytes: &[u8]) -> Result<ReadModel, ProjectionError> {
        match bytes.split_first() {
            Some((&CHECKPOINT_FORMAT, rest)) if rest.len() >= 4 => {
                let (crc, body) = rest.split_at(4);
                let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
                if crc32c::crc32c(body) != stored {
                    return Err(ProjectionError::Checkpoint(
                        "the checkpoint fails its checksum".into(),
                    ));
                }
                bincode::serde::decode_from_slice(body, bincode::config::standard())
                    .map(|(m, _)| m)
                    .map_err(|e| ProjectionError::Checkpoint(e.to_string()))
            }
            _ => Err(ProjectionError::Checkpoint(
                "unknown checkpoint format".into(),
            )),
        }
    }
}
