//! The on-disk record envelope: `[format version][crc32c][bincode body]`.
//!
//! The checksum covers the version byte and the whole body, so any flipped
//! byte of a stored record is caught on read. Format 1 is frozen: the golden
//! fixture test (`tests/golden.rs`) keeps its bytes decodable forever; a new
//! layout gets a new version byte and a new decoder beside this one.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Position, StorageError};

/// The envelope format this build writes.
pub const FORMAT_VERSION: u8 = 1;

const HEADER_LEN: usize = 5;

/// One stored event, as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub position: Position,
    pub stream: String,
    pub stream_version: u64,
    pub event_id: Uuid,
    pub recorded_at_ms: u64,
    pub actor: String,
    pub event_type: String,
    pub payload: Vec<u8>,
}

/// Field order is part of format 1: never reorder, only add a new format.
#[derive(Serialize, Deserialize)]
struct BodyV1 {
    position: u64,
    stream: String,
    stream_version: u64,
    event_id: [u8; 16],
    recorded_at_ms: u64,
    actor: String,
    event_type: String,
    payload: Vec<u8>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

impl Record {
    /// The record's bytes in the current format.
    pub fn encode(&self) -> Vec<u8> {
        let body = BodyV1 {
            position: self.position.0,
            stream: self.stream.clone(),
            stream_version: self.stream_version,
            event_id: *self.event_id.as_bytes(),
            recorded_at_ms: self.recorded_at_ms,
            actor: self.actor.clone(),
            event_type: self.event_type.clone(),
            payload: self.payload.clone(),
        };
        let mut out = vec![FORMAT_VERSION, 0, 0, 0, 0];
        // Encoding plain owned fields into a Vec cannot fail.
        bincode::serde::encode_into_std_write(&body, &mut out, config())
            .expect("encoding into a Vec is infallible");
        let crc = checksum(&out);
        out[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and verifies a record stored at `position`.
    pub fn decode(position: Position, bytes: &[u8]) -> Result<Record, StorageError> {
        let corrupt = |reason: String| StorageError::Corrupt { position, reason };
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(format!("record is {} bytes long", bytes.len())));
        }
        let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        if checksum(bytes) != stored {
            return Err(corrupt("checksum mismatch".into()));
        }
        if bytes[0] != FORMAT_VERSION {
            return Err(corrupt(format!("unknown format version {}", bytes[0])));
        }
        let (body, used): (BodyV1, usize) =
            bincode::serde::decode_from_slice(&bytes[HEADER_LEN..], config())
                .map_err(|e| corrupt(format!("undecodable body: {e}")))?;
        if used != bytes.len() - HEADER_LEN {
            return Err(corrupt("trailing bytes after the body".into()));
        }
        if body.position != position.0 {
            return Err(corrupt(format!("record claims position {}", body.position)));
        }
        Ok(Record {
            position,
            stream: body.stream,
            stream_version: body.stream_version,
            event_id: Uuid::from_bytes(body.event_id),
            recorded_at_ms: body.recorded_at_ms,
            actor: body.actor,
            event_type: body.event_type,
            payload: body.payload,
        })
    }
}

/// CRC32C over the version byte and the body (the checksum field itself is skipped).
fn checksum(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&bytes[..1]);
    crc32c::crc32c_append(crc, &bytes[HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            position: Position(7),
            stream: "thread:abc".into(),
            stream_version: 3,
            event_id: Uuid::from_u128(42),
            recorded_at_ms: 1_700_000_000_000,
            actor: "agent:bot".into(),
            event_type: "agent_thinking".into(),
            payload: b"hello".to_vec(),
        }
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(Record::decode(Position(7), &r.encode()).unwrap(), r);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let err = Record::decode(Position(7), &b).unwrap_err();
            assert!(
                matches!(
                    err,
                    StorageError::Corrupt {
                        position: Position(7),
                        ..
                    }
                ),
                "byte {i}: {err:?}"
            );
        }
    }

    #[test]
    fn truncation_and_wrong_position_are_caught() {
        let bytes = sample().encode();
        assert!(Record::decode(Position(7), &bytes[..3]).is_err());
        assert!(Record::decode(Position(7), &bytes[..bytes.len() - 1]).is_err());
        assert!(Record::decode(Position(8), &bytes).is_err());
    }
}
