//! The durable-head record: evidence of what was acknowledged, kept outside sled.
//!
//! sled's recovery treats a damaged message in its log as a torn tail: it
//! stops there and discards the rest. Everything sled keeps (our head marker
//! included) is rolled back with it, so only evidence held elsewhere can tell
//! a shortened log from a whole one. This file holds the highest position
//! known durable and the log's open generation, in two slots in separate 4 KiB
//! blocks written alternately, each with its own checksum: a torn or damaged
//! write leaves the other slot readable. It is only ever written with a head
//! that sled has already flushed, so it never claims more than the log holds.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Position, StorageError};

/// The file's name inside the log directory.
pub const EVIDENCE_FILE: &str = "threadline.head";
/// The clean-close mark: the fingerprint of sled's files after a clean close.
pub const CLEAN_FILE: &str = "threadline.clean";
const MAGIC: [u8; 8] = *b"TLHEAD01";
const SLOT_LEN: usize = 40;
const SLOT_OFFSETS: [u64; 2] = [0, 4096];

/// What the durable-head record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Evidence {
    /// Increases with every write.
    pub seq: u64,
    /// Increases with every open of the log; stamped on the frames it writes.
    pub generation: u32,
    /// Every position up to this one was durable and acknowledged.
    pub head: Position,
}

fn encode(e: &Evidence) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&e.seq.to_le_bytes());
    b[16..20].copy_from_slice(&e.generation.to_le_bytes());
    b[24..32].copy_from_slice(&e.head.0.to_le_bytes());
    let crc = crc32c::crc32c(&b[..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<Evidence> {
    if b.len() < SLOT_LEN || b[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([b[32], b[33], b[34], b[35]]);
    if crc32c::crc32c(&b[..32]) != crc {
        return None;
    }
    let u64_at = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    Some(Evidence {
        seq: u64_at(8),
        generation: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        head: Position(u64_at(24)),
    })
}

fn io(path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("{}: {e}", path.display()))
}

/// Reads the record in `dir`: `Ok(None)` when the file does not exist, an
/// error when it exists but neither slot is readable.
pub fn read(dir: &Path) -> Result<Option<Evidence>, StorageError> {
    let path = dir.join(EVIDENCE_FILE);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut f) => f.read_to_end(&mut bytes).map_err(|e| io(&path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path, e)),
    };
    SLOT_OFFSETS
        .iter()
        .filter_map(|&at| bytes.get(at as usize..).and_then(decode))
        .max_by_key(|e| e.seq)
        .map(Some)
        .ok_or_else(|| {
            StorageError::Io(format!(
                "{}: the durable-head record is damaged (no readable slot)",
                path.display()
            ))
        })
}

/// The open record, written by one thread at a time.
#[derive(Debug)]
pub(crate) struct EvidenceFile {
    path: PathBuf,
    file: File,
    last: Evidence,
}

impl EvidenceFile {
    /// Opens (creating when absent) the record in `dir`, continuing from `last`.
    pub(crate) fn open(dir: &Path, last: Evidence) -> Result<EvidenceFile, StorageError> {
        let path = dir.join(EVIDENCE_FILE);
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&path).map_err(|e| io(&path, e))?;
        Ok(EvidenceFile { path, file, last })
    }

    #[cfg(test)]
    pub(crate) fn last(&self) -> Evidence {
        self.last
    }

    /// Durably records `generation` and `head` (in the slot the last write did not use).
    pub(crate) fn write(&mut self, generation: u32, head: Position) -> Result<(), StorageError> {
        let next = Evidence {
            seq: self.last.seq + 1,
            generation,
            head,
        };
        let at = SLOT_OFFSETS[(next.seq % 2) as usize];
        self.file
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.file.write_all(&encode(&next)))
            .and_then(|_| self.file.sync_data())
            .map_err(|e| io(&self.path, e))?;
        self.last = next;
        Ok(())
    }
}

/// Writes the clean-close mark: after a clean close, the length and CRC32C of
/// every file of the log directory. An open that finds the files exactly so
/// knows sled's recovery will find what sled itself left, and needs no trial.
pub(crate) fn write_clean_mark(
    dir: &Path,
    files: &crate::salvage::Fingerprint,
) -> Result<(), StorageError> {
    let mut text = String::new();
    for (name, (len, crc)) in files {
        text.push_str(&format!("{len} {crc:08x} {name}\n"));
    }
    text.push_str(&format!("end {:08x}\n", crc32c::crc32c(text.as_bytes())));
    let path = dir.join(CLEAN_FILE);
    let tmp = dir.join(format!("{CLEAN_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| io(&path, e))
}

/// Reads the clean-close mark, if there is a whole one.
pub(crate) fn read_clean_mark(dir: &Path) -> Option<crate::salvage::Fingerprint> {
    let text = std::fs::read_to_string(dir.join(CLEAN_FILE)).ok()?;
    let (body, end) = text.rsplit_once("end ")?;
    let stored = u32::from_str_radix(end.trim(), 16).ok()?;
    if crc32c::crc32c(body.as_bytes()) != stored {
        return None;
    }
    body.lines()
        .map(|line| {
            let mut parts = line.splitn(3, ' ');
            let len = parts.next()?.parse().ok()?;
            let crc = u32::from_str_radix(parts.next()?, 16).ok()?;
            Some((parts.next()?.to_owned(), (len, crc)))
        })
        .collect()
}

/// Removes the clean-close mark (durably) before anything may change the files.
pub(crate) fn clear_clean_mark(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join(CLEAN_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_readable_slot_wins_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let mut f = EvidenceFile::open(dir.path(), Evidence::default()).unwrap();
        f.write(1, Position(10)).unwrap();
        f.write(1, Position(20)).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().head, Position(20));

        // Damage the newest slot: the older one still stands.
        let path = dir.path().join(EVIDENCE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let newest = SLOT_OFFSETS[(f.last().seq % 2) as usize] as usize;
        bytes[newest + 25] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().head, Position(10));

        // Both damaged: an error, never a guess.
        let other = SLOT_OFFSETS[((f.last().seq + 1) % 2) as usize] as usize;
        bytes[other + 25] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read(dir.path()).is_err());
    }
}
