//! Format 2: the group frame, one sled value per group commit (or per 32 KiB of it).
//!
//! ```text
//! header, 40 bytes, little endian:
//!   magic [u8; 8] = "\x89TLFRM\x02\n"   found by the salvage scan in raw files
//!   first_position u64                  position of the first record
//!   count u32                           records in this frame (at least 1)
//!   generation u32                      the log's open generation that wrote it
//!   recorded_at_ms u64                  one clock reading per group commit
//!   body_len u32                        bytes of the records that follow
//!   header_crc u32                      crc32c of the 36 bytes before it
//! then `count` records, each:
//!   len u32 | crc u32 = crc32c(position u64 LE ++ body) | body (bincode, BodyV2)
//! ```
//!
//! Every record carries its own checksum bound to its position, so one damaged
//! record leaves the others of its frame readable, and a record copied to the
//! wrong place is caught. The magic and the header checksum let a raw scan of
//! sled's files find every stored copy of every frame without sled (`salvage.rs`).
//! Format 2 is frozen like format 1: a new layout gets a new magic.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Position, Record, StorageError};

/// The frame format this build writes.
pub const FRAME_FORMAT: u8 = 2;
pub(crate) const MAGIC: [u8; 8] = *b"\x89TLFRM\x02\n";
pub(crate) const HEADER_LEN: usize = 40;
const RECORD_HEADER_LEN: usize = 8;
/// A frame is closed once its records pass this size (a single larger record gets its own).
pub(crate) const MAX_FRAME_BYTES: usize = 32 * 1024;
/// No record body is larger than this (the API caps a request at 1 MiB).
pub(crate) const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Field order is part of format 2: fixed-size fields first so an index build
/// can decode [`IndexView`] without touching the payload. Never reorder.
#[derive(Deserialize)]
struct BodyV2 {
    stream_version: u64,
    event_id: [u8; 16],
    stream: String,
    actor: String,
    event_type: String,
    /// As bytes, not a sequence of u8: the same encoding, decoded in one copy.
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// [`BodyV2`] borrowed from a record, for encoding without copies.
#[derive(Serialize)]
struct BodyV2Ref<'a> {
    stream_version: u64,
    event_id: [u8; 16],
    stream: &'a str,
    actor: &'a str,
    event_type: &'a str,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
}

/// The leading fields of [`BodyV2`], all an index needs.
#[derive(Deserialize)]
pub(crate) struct IndexView {
    pub(crate) stream_version: u64,
    pub(crate) event_id: [u8; 16],
    pub(crate) stream: String,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// A parsed, checksum-verified frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) first: u64,
    pub(crate) count: u32,
    pub(crate) generation: u32,
    pub(crate) recorded_at_ms: u64,
    pub(crate) body_len: u32,
}

impl Header {
    /// The last position this frame holds.
    pub(crate) fn last(&self) -> u64 {
        self.first + u64::from(self.count) - 1
    }

    pub(crate) fn contains(&self, position: u64) -> bool {
        (self.first..=self.last()).contains(&position)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses and verifies the header at the start of `bytes` (which may run on
/// past the frame, as in a raw file).
pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!("frame of {} bytes", bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err("not a format-2 frame (bad magic)".into());
    }
    if crc32c::crc32c(&bytes[..36]) != u32_at(bytes, 36) {
        return Err("frame header checksum mismatch".into());
    }
    let header = Header {
        first: u64_at(bytes, 8),
        count: u32_at(bytes, 16),
        generation: u32_at(bytes, 20),
        recorded_at_ms: u64_at(bytes, 24),
        body_len: u32_at(bytes, 32),
    };
    if header.first == 0
        || header.count == 0
        || header.first.checked_add(u64::from(header.count)).is_none()
    {
        return Err(format!(
            "frame header names positions {} + {}",
            header.first, header.count
        ));
    }
    Ok(header)
}

/// Builds frames from the records of one group commit.
#[derive(Debug)]
pub(crate) struct FrameWriter {
    generation: u32,
    recorded_at_ms: u64,
    frames: Vec<(u64, Vec<u8>)>,
    current: Option<(u64, u32, Vec<u8>)>,
}

impl FrameWriter {
    pub(crate) fn new(generation: u32, recorded_at_ms: u64) -> FrameWriter {
        FrameWriter {
            generation,
            recorded_at_ms,
            frames: Vec::new(),
            current: None,
        }
    }

    /// Adds the next record (positions must be consecutive).
    pub(crate) fn push(&mut self, r: &Record) {
        let body = BodyV2Ref {
            stream_version: r.stream_version,
            event_id: *r.event_id.as_bytes(),
            stream: &r.stream,
            actor: &r.actor,
            event_type: &r.event_type,
            payload: &r.payload,
        };
        let (_, count, buf) = self
            .current
            .get_or_insert_with(|| (r.position.0, 0, vec![0u8; HEADER_LEN]));
        let start = buf.len();
        buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
        bincode::serde::encode_into_std_write(&body, buf, config())
            .expect("encoding into a Vec is infallible");
        let len = (buf.len() - start - RECORD_HEADER_LEN) as u32;
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&r.position.0.to_le_bytes()),
            &buf[start + RECORD_HEADER_LEN..],
        );
        buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        *count += 1;
        if buf.len() >= MAX_FRAME_BYTES {
            self.seal();
        }
    }

    fn seal(&mut self) {
        if let Some((first, count, mut buf)) = self.current.take() {
            let body_len = (buf.len() - HEADER_LEN) as u32;
            buf[..8].copy_from_slice(&MAGIC);
            buf[8..16].copy_from_slice(&first.to_le_bytes());
            buf[16..20].copy_from_slice(&count.to_le_bytes());
            buf[20..24].copy_from_slice(&self.generation.to_le_bytes());
            buf[24..32].copy_from_slice(&self.recorded_at_ms.to_le_bytes());
            buf[32..36].copy_from_slice(&body_len.to_le_bytes());
            let crc = crc32c::crc32c(&buf[..36]);
            buf[36..40].copy_from_slice(&crc.to_le_bytes());
            self.frames.push((first, buf));
        }
    }

    /// The finished frames, each with its first position.
    pub(crate) fn finish(mut self) -> Vec<(u64, Vec<u8>)> {
        self.seal();
        self.frames
    }
}

/// One record's bytes inside a frame, located but not yet verified.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot<'a> {
    pub(crate) position: u64,
    crc: u32,
    pub(crate) body: &'a [u8],
}

impl Slot<'_> {
    pub(crate) fn verify(&self) -> Result<(), StorageError> {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&self.position.to_le_bytes()), self.body);
        if crc != self.crc {
            return Err(corrupt(self.position, "checksum mismatch".into()));
        }
        Ok(())
    }

    /// The full record, checksum verified.
    pub(crate) fn record(&self, recorded_at_ms: u64) -> Result<Record, StorageError> {
        self.verify()?;
        let (body, used): (BodyV2, usize) = bincode::serde::decode_from_slice(self.body, config())
            .map_err(|e| corrupt(self.position, format!("undecodable body: {e}")))?;
        if used != self.body.len() {
            return Err(corrupt(
                self.position,
                "trailing bytes after the body".into(),
            ));
        }
        Ok(Record {
            position: Position(self.position),
            stream: body.stream,
            stream_version: body.stream_version,
            event_id: Uuid::from_bytes(body.event_id),
            recorded_at_ms,
            actor: body.actor,
            event_type: body.event_type,
            payload: body.payload,
        })
    }

    /// The fields an index needs, checksum verified.
    pub(crate) fn index_view(&self) -> Result<IndexView, StorageError> {
        self.verify()?;
        bincode::serde::decode_from_slice(self.body, config())
            .map(|(v, _)| v)
            .map_err(|e| corrupt(self.position, format!("undecodable body: {e}")))
    }
}

fn corrupt(position: u64, reason: String) -> StorageError {
    StorageError::Corrupt {
        position: Position(position),
        reason,
    }
}

/// Walks the record slots of a frame whose header was parsed from `bytes`.
/// Yields `Err` for the first slot whose length runs past the frame, then stops.
pub(crate) fn slots<'a>(
    header: &Header,
    bytes: &'a [u8],
) -> impl Iterator<Item = Result<Slot<'a>, StorageError>> + 'a {
    let end = (HEADER_LEN + header.body_len as usize).min(bytes.len());
    let mut at = HEADER_LEN;
    let mut position = header.first;
    let last = header.last();
    let mut broken = false;
    std::iter::from_fn(move || {
        if broken || position > last {
            return None;
        }
        let p = position;
        position += 1;
        if at + RECORD_HEADER_LEN > end {
            broken = true;
            return Some(Err(corrupt(p, "record missing from its frame".into())));
        }
        let len = u32_at(bytes, at) as usize;
        let crc = u32_at(bytes, at + 4);
        let start = at + RECORD_HEADER_LEN;
        if len > MAX_RECORD_BYTES || start + len > end {
            broken = true;
            return Some(Err(corrupt(
                p,
                format!("record length {len} runs past its frame"),
            )));
        }
        at = start + len;
        Some(Ok(Slot {
            position: p,
            crc,
            body: &bytes[start..start + len],
        }))
    })
}

/// Decodes a whole stored frame value: its header and every record (each `Err` names its position).
pub(crate) fn decode(
    key_first: u64,
    bytes: &[u8],
) -> Result<(Header, Vec<Result<Record, StorageError>>), StorageError> {
    let header = parse_header(bytes).map_err(|r| corrupt(key_first, r))?;
    if header.first != key_first {
        return Err(corrupt(
            key_first,
            format!(
                "frame stored under {key_first} claims position {}",
                header.first
            ),
        ));
    }
    let mut out = Vec::with_capacity(header.count as usize);
    let mut positions = header.first..=header.last();
    for slot in slots(&header, bytes) {
        positions.next();
        out.push(slot.and_then(|s| s.record(header.recorded_at_ms)));
    }
    // A broken length leaves the rest of the frame unreadable: name each position.
    for p in positions {
        out.push(Err(corrupt(
            p,
            "record unreadable after a damaged one in its frame".into(),
        )));
    }
    Ok((header, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(position: u64, payload_len: usize) -> Record {
        Record {
            position: Position(position),
            stream: format!("thread:{}", position % 3),
            stream_version: position,
            event_id: Uuid::from_u128(u128::from(position)),
            recorded_at_ms: 1_700_000_000_000,
            actor: "agent:bot".into(),
            event_type: "agent_thinking".into(),
            payload: vec![position as u8; payload_len],
        }
    }

    fn frames(records: &[Record]) -> Vec<(u64, Vec<u8>)> {
        let mut w = FrameWriter::new(7, 1_700_000_000_000);
        records.iter().for_each(|r| w.push(r));
        w.finish()
    }

    #[test]
    fn round_trips_and_splits_large_groups() {
        let records: Vec<Record> = (5..105).map(|p| record(p, 1000)).collect();
        let frames = frames(&records);
        assert!(frames.len() > 1, "100 KB of records must span frames");
        let mut back = Vec::new();
        for (first, bytes) in &frames {
            let (header, rs) = decode(*first, bytes).unwrap();
            assert_eq!(header.generation, 7);
            back.extend(rs.into_iter().map(Result::unwrap));
        }
        assert_eq!(back, records);
    }

    #[test]
    fn every_flipped_byte_is_caught_and_names_its_position() {
        let records: Vec<Record> = (1..4).map(|p| record(p, 20)).collect();
        let (first, bytes) = frames(&records).remove(0);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            match decode(first, &b) {
                Err(StorageError::Corrupt { .. }) => {}
                Ok((_, rs)) => {
                    let bad: Vec<_> = rs.iter().filter(|r| r.is_err()).collect();
                    assert!(!bad.is_empty(), "byte {i}: a flip went unnoticed");
                    // The records that still decode are exactly the originals.
                    for r in rs.iter().flatten() {
                        assert_eq!(r, &records[(r.position.0 - 1) as usize], "byte {i}");
                    }
                }
                Err(other) => panic!("byte {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn payload_as_bytes_encodes_exactly_as_a_sequence_of_u8() {
        // Frames written before `serde_bytes` was used must keep decoding.
        #[derive(Serialize)]
        struct AsSeq {
            payload: Vec<u8>,
        }
        #[derive(Serialize)]
        struct AsBytes<'a> {
            #[serde(with = "serde_bytes")]
            payload: &'a [u8],
        }
        for len in [0usize, 1, 250, 251, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let seq = bincode::serde::encode_to_vec(
                AsSeq {
                    payload: payload.clone(),
                },
                config(),
            )
            .unwrap();
            let bytes =
                bincode::serde::encode_to_vec(AsBytes { payload: &payload }, config()).unwrap();
            assert_eq!(seq, bytes, "payload of {len} bytes");
        }
    }

    #[test]
    fn golden_frame_decodes_and_reencodes_byte_for_byte() {
        // Format 2 is frozen: these bytes must stay readable forever.
        let golden: &[u8] = include_bytes!("../tests/fixtures/frame_v2.bin");
        let (header, records) = decode(41, golden).unwrap();
        assert_eq!((header.first, header.count, header.generation), (41, 3, 7));
        let records: Vec<Record> = records.into_iter().map(Result::unwrap).collect();
        assert_eq!(records, golden_records());
        let mut w = FrameWriter::new(7, 1_700_000_000_000);
        records.iter().for_each(|r| w.push(r));
        assert_eq!(w.finish(), vec![(41, golden.to_vec())]);
    }

    fn golden_records() -> Vec<Record> {
        (41..44)
            .map(|p| Record {
                position: Position(p),
                stream: format!("thread:golden-{}", p % 2),
                stream_version: p / 2,
                event_id: Uuid::from_u128(
                    0x0123_4567_89ab_cdef_0000_0000_0000_0000 + u128::from(p),
                ),
                recorded_at_ms: 1_700_000_000_000,
                actor: "agent:golden".into(),
                event_type: "agent_thinking".into(),
                payload: format!("{{\"n\":{p},\"text\":\"golden payload\"}}").into_bytes(),
            })
            .collect()
    }

    #[test]
    fn a_frame_under_the_wrong_key_is_refused() {
        let (_, bytes) = frames(&[record(9, 10)]).remove(0);
        assert!(decode(8, &bytes).is_err());
    }

    /// Fuzzing without nightly: stored bytes are untrusted input. Each target runs
    /// proptest's default cases (`PROPTEST_CASES`, 256) in `cargo test`, or for
    /// `THREADLINE_FUZZ_SECS` seconds (the long runs in docs/reliability.md).
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Any bytes under any key: an error or records, never a panic, and a
        /// record that decodes carries a position of the frame it was read from.
        #[test]
        fn arbitrary_bytes_never_panic() {
            let input = (0u64..1_000, proptest::collection::vec(any::<u8>(), 0..600));
            threadline_fuzz::run("frame_arbitrary_bytes", input, |(first, bytes)| {
                if let Ok((header, records)) = decode(first, &bytes) {
                    for r in records.into_iter().flatten() {
                        prop_assert!(header.contains(r.position.0));
                    }
                }
                Ok(())
            });
        }

        /// A valid frame with bytes overwritten anywhere: never a panic, never a
        /// record that differs from the one written at its position.
        #[test]
        fn damaged_frames_never_yield_wrong_records() {
            let input = (
                1u64..6,
                0usize..64,
                proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            );
            threadline_fuzz::run("frame_damaged", input, |(count, len, damage)| {
                let records: Vec<Record> = (1..=count).map(|p| record(p, len)).collect();
                let (first, mut bytes) = frames(&records).remove(0);
                for (at, value) in damage {
                    let i = at.index(bytes.len());
                    bytes[i] = value;
                }
                if let Ok((_, rs)) = decode(first, &bytes) {
                    for r in rs.iter().flatten() {
                        prop_assert_eq!(r, &records[(r.position.0 - 1) as usize]);
                    }
                }
                Ok(())
            });
        }

        /// The frozen format-1 record envelope: any bytes, never a panic.
        #[test]
        fn record_envelopes_never_panic() {
            let input = proptest::collection::vec(any::<u8>(), 0..300);
            threadline_fuzz::run("record_envelope", input, |bytes| {
                let _ = Record::decode(Position(1), &bytes);
                Ok(())
            });
        }
    }
}
