//! The raw scan: finds every stored copy of every format-2 frame in a log
//! directory's files without opening sled.
//!
//! sled keeps a value in its log message and again in later page rewrites, and
//! its recovery discards everything past a damaged message. The scan runs
//! before sled is opened, so it sees what is on disk before sled's recovery
//! changes anything: which positions have at least one intact copy, and which
//! copies are damaged. `SledLog::open` uses it to refuse a log that lost
//! acknowledged events; `verify` to name them; `repair` to rebuild a log from
//! the intact copies. A frame found inside an intact frame's records (a forged
//! frame in event data) is skipped with it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use crate::evidence::{self, Evidence, CLEAN_FILE, EVIDENCE_FILE};
use crate::frame::{self, HEADER_LEN, MAGIC, MAX_RECORD_BYTES};
use crate::{Position, Record, StorageError};

const CHUNK: usize = 8 * 1024 * 1024;
/// Positions beyond this are not believed (a header can only claim them by accident).
const MAX_POSITION: u64 = 1 << 40;

/// A stored copy that failed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedCopy {
    pub file: PathBuf,
    pub offset: u64,
    /// The position of the damaged record, when its frame header was readable.
    pub position: Option<Position>,
    pub reason: String,
}

/// What the scan found.
#[derive(Debug, Default)]
pub struct Salvage {
    /// The durable-head record, when present and readable.
    pub evidence: Option<Evidence>,
    /// Why the durable-head record could not be used, when it could not.
    pub evidence_problem: Option<String>,
    /// For each position with an intact copy, the generation of the newest one.
    pub generations: BTreeMap<u64, u32>,
    /// The chosen intact records, when the scan was asked to keep them.
    pub records: BTreeMap<u64, Record>,
    pub damaged: Vec<DamagedCopy>,
    pub bytes_scanned: u64,
    /// Every scanned file (relative to the log directory): its length and CRC32C.
    pub fingerprint: Fingerprint,
    /// Every scanned file's length and modification time when it was scanned.
    pub stamps: BTreeMap<String, Stamp>,
}

/// A file's length and modification time: unchanged, its CRC need not be read again.
pub type Stamp = (u64, Option<std::time::SystemTime>);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()))
}

fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).display().to_string()
}

/// The length and CRC32C of every file of a log directory, by relative path.
pub type Fingerprint = BTreeMap<String, (u64, u32)>;

impl Salvage {
    /// The head the log must reach: the evidence's, or 0 without evidence.
    pub fn acknowledged(&self) -> Position {
        self.evidence.map(|e| e.head).unwrap_or_default()
    }

    /// Positions in `1..=upto` with no intact copy, as ranges.
    pub fn missing(&self, upto: Position) -> Vec<RangeInclusive<u64>> {
        let mut out: Vec<RangeInclusive<u64>> = Vec::new();
        let mut next = 1u64;
        let mut push = |from: u64, to: u64| {
            if from <= to {
                out.push(from..=to);
            }
        };
        if upto.0 == 0 {
            return out;
        }
        for &p in self.generations.range(1..=upto.0).map(|(p, _)| p) {
            push(next, p - 1);
            next = p + 1;
        }
        push(next, upto.0);
        out
    }

    /// The highest position reachable from 1 without a missing one.
    pub fn contiguous_head(&self) -> Position {
        let mut head = 0;
        for &p in self.generations.keys() {
            if p != head + 1 {
                break;
            }
            head = p;
        }
        Position(head)
    }

    /// Damaged copies of positions up to `upto` (later ones are an unacknowledged torn tail).
    pub fn damaged_upto(&self, upto: Position) -> impl Iterator<Item = &DamagedCopy> {
        self.damaged
            .iter()
            .filter(move |d| d.position.is_none_or(|p| p <= upto))
    }

    fn found(&mut self, generation: u32, record: Option<Record>, position: u64) {
        let best = self.generations.entry(position).or_insert(0);
        if generation >= *best {
            *best = generation;
            if let Some(r) = record {
                self.records.insert(position, r);
            }
        }
    }
}

/// Formats position ranges as `54..=254, 300`.
pub fn format_ranges(ranges: &[RangeInclusive<u64>]) -> String {
    ranges
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}..={}", r.start(), r.end())
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Scans every file of the log directory `dir` (sled's files and blobs).
/// With `keep_records`, the newest intact copy of each record is kept too.
pub fn scan(dir: &Path, keep_records: bool) -> Result<Salvage, StorageError> {
    let mut salvage = Salvage::default();
    match evidence::read(dir) {
        Ok(e) => salvage.evidence = e,
        Err(e) => salvage.evidence_problem = Some(e.to_string()),
    }
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    // One buffer for every file: a log holds many small blob files.
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + HEADER_LEN);
    for path in files {
        buf.clear();
        let before = stamp(&path);
        let (len, crc) = scan_file(&path, keep_records, &mut salvage, &mut buf)?;
        let name = relative(dir, &path);
        // Only a file that did not change while it was read has a reusable stamp.
        if let Some(s) = before.filter(|s| Some(*s) == stamp(&path) && s.0 == len) {
            salvage.stamps.insert(name.clone(), s);
        }
        salvage.fingerprint.insert(name, (len, crc));
    }
    Ok(salvage)
}

/// The length and CRC32C of every file of the log directory (what a scan
/// records). A file whose length and modification time are those `stamps`
/// recorded keeps its `known` CRC instead of being read again (a stale one
/// only costs the next open a trial recovery).
pub fn fingerprint(
    dir: &Path,
    known: &Fingerprint,
    stamps: &BTreeMap<String, Stamp>,
) -> Result<Fingerprint, StorageError> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    let mut out = Fingerprint::new();
    // One buffer for every file: a log holds many small blob files.
    let mut buf = vec![0u8; CHUNK];
    for path in files {
        let name = relative(dir, &path);
        let unchanged = stamps.get(&name).is_some_and(|s| Some(*s) == stamp(&path));
        if let (true, Some(&known)) = (unchanged, known.get(&name)) {
            out.insert(name, known);
            continue;
        }
        let io = |e: std::io::Error| StorageError::Io(format!("reading {}: {e}", path.display()));
        let mut file = File::open(&path).map_err(io)?;
        let mut sum = Checksum::default();
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    sum.crc = crc32c::crc32c_append(sum.crc, &buf[..n]);
                    sum.len += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        out.insert(name, (sum.len, sum.crc));
    }
    Ok(out)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), StorageError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StorageError::Io(format!("reading {}: {e}", dir.display())))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| StorageError::Io(format!("reading {}: {e}", dir.display())))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| StorageError::Io(format!("{}: {e}", path.display())))?;
        if kind.is_dir() && entry.file_name() == crate::CHECKPOINT_DIR {
            // Projection checkpoints: not log data, and they change while a log is open.
        } else if kind.is_dir() {
            collect_files(&path, out)?;
        } else if kind.is_file()
            && entry.file_name() != EVIDENCE_FILE
            && entry.file_name() != CLEAN_FILE
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Scans one file; answers its length and CRC32C.
fn scan_file(
    path: &Path,
    keep: bool,
    salvage: &mut Salvage,
    buf: &mut Vec<u8>,
) -> Result<(u64, u32), StorageError> {
    let io = |e: std::io::Error| StorageError::Io(format!("reading {}: {e}", path.display()));
    let mut file = File::open(path).map_err(io)?;
    let finder = memchr::memmem::Finder::new(&MAGIC);
    // `buf` holds the file from offset `base` on.
    let mut base = 0u64;
    let mut at = 0usize;
    let mut eof = false;
    let mut sum = Checksum::default();
    loop {
        let found = finder.find(&buf[at..]).map(|i| at + i);
        let Some(i) = found else {
            if eof {
                break;
            }
            // Keep a possible partial magic at the end.
            let keep_from = buf
                .len()
                .saturating_sub(MAGIC.len() - 1)
                .max(at.min(buf.len()));
            refill(&mut file, buf, &mut base, keep_from, &mut eof, &mut sum).map_err(io)?;
            at = 0;
            continue;
        };
        if buf.len() - i < HEADER_LEN && !eof {
            refill(&mut file, buf, &mut base, i, &mut eof, &mut sum).map_err(io)?;
            at = 0;
            continue;
        }
        let offset = base + i as u64;
        let header = match frame::parse_header(&buf[i..]) {
            Ok(h) if h.last() <= MAX_POSITION && (h.body_len as usize) <= MAX_RECORD_BYTES * 2 => h,
            Ok(_) | Err(_) => {
                salvage.damaged.push(DamagedCopy {
                    file: path.to_owned(),
                    offset,
                    position: None,
                    reason: "frame header damaged".into(),
                });
                at = i + 1;
                continue;
            }
        };
        let need = HEADER_LEN + header.body_len as usize;
        if buf.len() - i < need && !eof {
            refill(&mut file, buf, &mut base, i, &mut eof, &mut sum).map_err(io)?;
            at = 0;
            continue;
        }
        let bytes = &buf[i..(i + need).min(buf.len())];
        let mut intact = 0u32;
        let mut seen = 0u32;
        for slot in frame::slots(&header, bytes) {
            seen += 1;
            let checked = slot.and_then(|s| {
                if keep {
                    s.record(header.recorded_at_ms)
                        .map(|r| (s.position, Some(r)))
                } else {
                    s.verify().map(|()| (s.position, None))
                }
            });
            match checked {
                Ok((p, record)) => {
                    intact += 1;
                    salvage.found(header.generation, record, p);
                }
                Err(StorageError::Corrupt { position, reason }) => {
                    salvage.damaged.push(DamagedCopy {
                        file: path.to_owned(),
                        offset,
                        position: Some(position),
                        reason,
                    });
                }
                Err(other) => return Err(other),
            }
        }
        for p in (header.first + u64::from(seen))..=header.last() {
            salvage.damaged.push(DamagedCopy {
                file: path.to_owned(),
                offset,
                position: Some(Position(p)),
                reason: "record unreadable after a damaged one in its frame".into(),
            });
        }
        // An intact frame is skipped whole, so frames forged inside event data are never read.
        at = if intact == header.count {
            i + need
        } else {
            i + 1
        };
    }
    salvage.bytes_scanned += sum.len;
    Ok((sum.len, sum.crc))
}

/// A running CRC32C and length of the bytes read so far.
#[derive(Default)]
struct Checksum {
    len: u64,
    crc: u32,
}

/// Drops `buf[..keep_from]` and appends the next chunk of the file.
fn refill(
    file: &mut File,
    buf: &mut Vec<u8>,
    base: &mut u64,
    keep_from: usize,
    eof: &mut bool,
    sum: &mut Checksum,
) -> std::io::Result<()> {
    buf.drain(..keep_from);
    *base += keep_from as u64;
    let start = buf.len();
    // Appends without zeroing the buffer first (`read_to_end` retries on EINTR).
    let read = (&mut *file).take(CHUNK as u64).read_to_end(buf)?;
    if read < CHUNK {
        *eof = true;
    }
    let filled = start + read;
    sum.crc = crc32c::crc32c_append(sum.crc, &buf[start..filled]);
    sum.len += (filled - start) as u64;
    Ok(())
}

/// The intact records a scan kept, read as a log (read-only): what `audit`
/// reads when sled cannot open the log without losing records. A position
/// with no intact copy reads as `Corrupt`.
#[derive(Debug)]
pub struct SalvagedLog {
    records: BTreeMap<u64, Record>,
    head: Position,
    head_tx: tokio::sync::watch::Sender<Position>,
}

impl SalvagedLog {
    /// The records of `salvage` (scanned with `keep_records`) up to the
    /// acknowledged head or the last intact record, whichever is higher.
    pub fn new(salvage: Salvage) -> SalvagedLog {
        let last = salvage.records.keys().next_back().copied().unwrap_or(0);
        let head = Position(salvage.acknowledged().0.max(last));
        SalvagedLog {
            records: salvage.records,
            head,
            head_tx: tokio::sync::watch::Sender::new(head),
        }
    }

    fn get(&self, p: u64) -> Result<Record, StorageError> {
        self.records.get(&p).cloned().ok_or(StorageError::Corrupt {
            position: Position(p),
            reason: "no intact stored copy".into(),
        })
    }
}

impl crate::EventLog for SalvagedLog {
    fn append(&self, _events: Vec<crate::NewEvent>) -> crate::PendingAppend {
        crate::PendingAppend::ready(Err(StorageError::Closed))
    }
    fn head(&self) -> Position {
        self.head
    }
    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        self.head_tx.subscribe()
    }
    fn read_from(&self, from: Position, limit: usize) -> Result<Vec<Record>, StorageError> {
        let end = from
            .0
            .max(1)
            .saturating_add(limit as u64)
            .min(self.head.0 + 1);
        (from.0.max(1)..end).map(|p| self.get(p)).collect()
    }
    fn read_at(&self, position: Position) -> Result<Option<Record>, StorageError> {
        if position.0 == 0 || position > self.head {
            return Ok(None);
        }
        self.get(position.0).map(Some)
    }
    fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        Ok(self
            .records
            .values()
            .filter(|r| r.stream == stream && r.stream_version >= from)
            .take(limit)
            .cloned()
            .collect())
    }
    fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        Ok(self
            .records
            .values()
            .filter(|r| r.stream == stream)
            .map(|r| r.stream_version)
            .max()
            .unwrap_or(0))
    }
    fn find_event(&self, event_id: uuid::Uuid) -> Result<Option<crate::Appended>, StorageError> {
        Ok(self
            .records
            .values()
            .find(|r| r.event_id == event_id)
            .map(|r| crate::Appended {
                position: r.position,
                stream_version: r.stream_version,
                duplicate: true,
            }))
    }
}

impl crate::Checkpoints for SalvagedLog {
    fn load_checkpoint(&self, _name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(None)
    }
    fn store_checkpoint(&self, _name: &str, _bytes: &[u8]) -> Result<(), StorageError> {
        Err(StorageError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ranges_and_contiguous_head() {
        let mut s = Salvage::default();
        for p in [1, 2, 3, 6, 7, 9] {
            s.found(1, None, p);
        }
        assert_eq!(s.missing(Position(10)), vec![4..=5, 8..=8, 10..=10]);
        assert_eq!(s.contiguous_head(), Position(3));
        assert_eq!(format_ranges(&s.missing(Position(10))), "4..=5, 8, 10");
        assert!(s.missing(Position(3)).is_empty());
    }
}
