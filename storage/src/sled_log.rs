//! [`SledLog`]: the event log on sled, with one writer thread that group-commits.
//!
//! Layout (format 2), in sled tree `log`:
//! - `G` + first position (u64 BE) → one frame of consecutive records (`frame.rs`),
//!   one per group commit or per 32 KiB of it
//! - `h` → head position (u64 BE), written in the same `apply_batch` as the frames
//! - `v` → layout version (2)
//!
//! Beside sled, in the same directory: the durable-head record (`evidence.rs`).
//! The stream and event-id indexes live in memory, built from the frames at
//! open: the writer is the only one that adds to them, and readers filter
//! them by the durable head.
//!
//! Durability: the writer applies a group's batch; a flusher thread then runs
//! sled's `flush` (which writes with `sync_file_range`, not fsync) followed by
//! `fdatasync` of sled's file, and only then publishes the new durable head,
//! answers the appenders, and hands the head to the evidence thread. Readers
//! never look past the published head.
//!
//! Opening: the raw scan (`salvage.rs`) runs first, before sled's recovery can
//! discard anything, and the open is refused when any position up to the
//! recorded durable head has no intact copy, or when sled comes back shorter
//! than that head.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::checkpoints::DirCheckpoints;
use crate::evidence::{self, Evidence, EvidenceFile};
use crate::frame::{self, FrameWriter};
use crate::plan::{Committed, Planner};
use crate::salvage;
use crate::{
    now_ms, Appended, Checkpoints, EventLog, LossReport, NewEvent, PendingAppend, Position, Record,
    StorageError,
};

const HEAD_KEY: &[u8] = b"h";
const LAYOUT_KEY: &[u8] = b"v";
const LAYOUT_V2: &[u8] = &[2];
/// Format-1 record keys start with this byte (`e` + position).
const V1_RECORD_PREFIX: &[u8] = b"e";
/// Upper bound on batches folded into one group commit (bounds one fsync's work).
const MAX_GROUP: usize = 1024;

/// Tuning for [`SledLog::open`].
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Create the log when the directory holds none (false for read-only tools).
    pub create: bool,
    /// Open even when records are damaged (for `verify` and `audit`): damaged
    /// records are left out of the indexes and read as `Corrupt`. Never for serving.
    pub tolerate_damage: bool,
    /// Build the stream and event-id indexes on first use instead of at open
    /// (for tools that only read in position order). A server builds them at
    /// open, so that a damaged record refuses the open rather than an append.
    pub lazy_indexes: bool,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_bytes: 64 * 1024 * 1024,
            create: true,
            tolerate_damage: false,
            lazy_indexes: false,
        }
    }
}

/// The sled-backed [`EventLog`].
#[derive(Debug)]
pub struct SledLog {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    evidence: Mutex<Option<JoinHandle<()>>>,
    /// Declared last: dropped after `shared` (and so after sled), it leaves the clean-close mark.
    closer: CleanCloser,
}

/// Writes the clean-close mark once sled has closed, if the log closed cleanly.
#[derive(Debug)]
struct CleanCloser {
    dir: std::path::PathBuf,
    clean: AtomicBool,
    /// What the open's scan read, so that files sled left alone are not read again.
    scanned: (
        salvage::Fingerprint,
        std::collections::BTreeMap<String, salvage::Stamp>,
    ),
}

impl Drop for CleanCloser {
    fn drop(&mut self) {
        if !self.clean.load(Ordering::Acquire) {
            return;
        }
        let marked = salvage::fingerprint(&self.dir, &self.scanned.0, &self.scanned.1)
            .and_then(|files| evidence::write_clean_mark(&self.dir, &files));
        if let Err(e) = marked {
            tracing::warn!(error = %e, "cannot leave the clean-close mark; the next open tries sled's recovery on a copy first");
        }
    }
}

#[derive(Debug)]
struct Shared {
    db: sled::Db,
    log: sled::Tree,
    /// Where checkpoints lived before [`DirCheckpoints`]: read, never written.
    checkpoints: sled::Tree,
    checkpoint_files: DirCheckpoints,
    /// sled's data file, for the `fdatasync` that sled's `flush` does not do.
    data_file: File,
    generation: u32,
    durable: AtomicU64,
    head_tx: watch::Sender<Position>,
    failed: AtomicBool,
    /// Built once, at open or on first use (see [`SledOptions::lazy_indexes`]).
    index: OnceLock<RwLock<Index>>,
    index_build: Mutex<()>,
    /// The head at open: what a first index build covers (nothing is applied before it).
    opened_head: Position,
    tolerate_damage: bool,
}

impl Shared {
    /// The indexes, built now if they were not yet.
    fn index(&self) -> Result<&RwLock<Index>, StorageError> {
        if let Some(index) = self.index.get() {
            return Ok(index);
        }
        let _building = self.index_build.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(index) = self.index.get() {
            return Ok(index);
        }
        let started = std::time::Instant::now();
        let built = build_index(&self.log, self.opened_head, self.tolerate_damage)?;
        tracing::debug!(elapsed = ?started.elapsed(), events = built.ids.len(), "log indexes built");
        Ok(self.index.get_or_init(|| RwLock::new(built)))
    }
}

/// The in-memory indexes: every applied record's event id and stream version.
#[derive(Debug, Default)]
struct Index {
    /// Event id → (position, stream version): a repeat is answered from memory.
    ids: HashMap<Uuid, (u64, u64)>,
    /// Positions of each stream's versions 1, 2, … (non-decreasing: a version
    /// whose record was unreadable holds the next readable one's position).
    streams: HashMap<String, Vec<u64>>,
    /// Only in a log opened with damage tolerated: versions whose record was
    /// unreadable, with the damaged position that most likely held them.
    gaps: HashMap<(String, u64), u64>,
}

impl Index {
    fn add(&mut self, position: u64, event_id: Uuid, stream: &str) {
        let version = match self.streams.get_mut(stream) {
            Some(v) => {
                v.push(position);
                v.len()
            }
            None => {
                self.streams.insert(stream.to_owned(), vec![position]);
                1
            }
        };
        self.ids.insert(event_id, (position, version as u64));
    }
}

#[derive(Debug)]
struct Job {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Vec<Appended>, StorageError>>,
}

fn frame_key(first: u64) -> [u8; 9] {
    let mut k = [b'G'; 9];
    k[1..].copy_from_slice(&first.to_be_bytes());
    k
}

fn be_u64(bytes: &[u8]) -> Result<u64, StorageError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StorageError::Io(format!("index entry of {} bytes", bytes.len())))
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::Io(format!("{}: {e}", path.display()))
}

impl SledLog {
    /// Opens (or, with `options.create`, creates) the log in `dir`, recovering
    /// the exact durable head. Refuses a log that lost acknowledged events.
    pub fn open(dir: impl AsRef<Path>, options: SledOptions) -> Result<SledLog, StorageError> {
        let dir = dir.as_ref();
        let exists = dir.join("conf").exists();
        if !options.create && !exists {
            return Err(StorageError::NotFound(dir.display().to_string()));
        }
        if options.create {
            create_private_dir(dir)?;
        }
        if exists {
            wait_unlocked(dir)?;
        }
        // Before sled touches anything: what does the disk hold?
        let scan = salvage::scan(dir, false)?;
        // Unchanged since a clean close: sled's recovery finds what sled left.
        let trusted = exists && evidence::read_clean_mark(dir).as_ref() == Some(&scan.fingerprint);
        evidence::clear_clean_mark(dir)?;
        let evidence = match (&scan.evidence, &scan.evidence_problem) {
            (_, Some(problem)) if !options.tolerate_damage => {
                return Err(lost(dir, &scan, None, problem.clone()));
            }
            (e, _) => *e,
        };
        let acknowledged = scan.acknowledged();
        let missing = scan.missing(acknowledged);
        if !missing.is_empty() && !options.tolerate_damage {
            return Err(lost(
                dir,
                &scan,
                None,
                "no intact stored copy of them is left".into(),
            ));
        }
        // sled's recovery discards everything past a damaged message it reads,
        // and some damage (a zeroed segment header, a frame whose magic is
        // gone) is invisible to the scan: unless the files are exactly as a
        // clean close left them, let sled recover a scratch copy first, and
        // refuse (changing nothing) if it would come back short.
        if exists && !trusted {
            let trial = trial_recovery(dir, options.cache_bytes, options.tolerate_damage);
            let (recovered, reason) = match trial {
                // Our own finding (a record missing below the head): name it as it is.
                Err(e @ StorageError::Corrupt { .. }) => return Err(e),
                Ok(None) => (None, None), // not a format-2 log: said below
                Ok(Some(head)) if head >= acknowledged => (None, None),
                Ok(Some(head)) => (
                    Some(head),
                    Some(format!(
                        "a damaged stored copy would make sled's recovery stop at position {head}"
                    )),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "sled's recovery fails on a copy of the log");
                    (
                        None,
                        Some("sled's recovery fails on a damaged stored copy".into()),
                    )
                }
            };
            if let Some(reason) = reason {
                return Err(lost(dir, &scan, recovered, reason));
            }
        }

        let db = open_db(dir, options.cache_bytes)?;
        let log = db.open_tree("log")?;
        let checkpoints = db.open_tree("checkpoints")?;
        match log.get(LAYOUT_KEY)? {
            Some(v) if v.as_ref() == LAYOUT_V2 => {}
            Some(v) => {
                return Err(StorageError::Io(format!(
                    "{}: unknown log layout {:?}",
                    dir.display(),
                    v.as_ref()
                )))
            }
            None if log.scan_prefix(V1_RECORD_PREFIX).next().is_some()
                || log.get(HEAD_KEY)?.is_some() =>
            {
                return Err(StorageError::OldLayout(dir.display().to_string()));
            }
            None => {
                if evidence.is_some_and(|e| e.head > Position::ZERO) && !options.tolerate_damage {
                    return Err(lost(
                        dir,
                        &scan,
                        Some(Position::ZERO),
                        "sled holds no log at all".into(),
                    ));
                }
                log.insert(LAYOUT_KEY, LAYOUT_V2)?;
                db.flush()?;
            }
        }
        if evidence.is_none() && log.get(HEAD_KEY)?.is_some() && !options.tolerate_damage {
            return Err(lost(
                dir,
                &scan,
                None,
                format!(
                    "the durable-head record {} is missing, so a shortened log cannot be told from a whole one",
                    evidence::EVIDENCE_FILE
                ),
            ));
        }
        let head = recover(&log, options.tolerate_damage)?;
        if head < acknowledged {
            if options.tolerate_damage {
                tracing::error!(%head, %acknowledged, "the log lost acknowledged events");
            } else {
                return Err(lost(
                    dir,
                    &scan,
                    Some(head),
                    format!("sled recovered the log only up to position {head}"),
                ));
            }
        }
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(io_at(&data_path))?;
        let last = evidence.unwrap_or_default();
        let generation = last.generation.wrapping_add(1).max(1);
        let mut evidence_file = EvidenceFile::open(dir, last)?;
        evidence_file.write(generation, head)?;

        let shared = Arc::new(Shared {
            db,
            log,
            checkpoints,
            checkpoint_files: DirCheckpoints::new(dir.join(crate::CHECKPOINT_DIR)),
            data_file,
            generation,
            durable: AtomicU64::new(head.0),
            head_tx: watch::Sender::new(head),
            failed: AtomicBool::new(false),
            index: OnceLock::new(),
            index_build: Mutex::new(()),
            opened_head: head,
            tolerate_damage: options.tolerate_damage,
        });
        if !options.lazy_indexes {
            shared.index()?;
        }
        let (to_evidence, evidence_rx) = mpsc::channel();
        let evidence_shared = shared.clone();
        let evidence_thread = std::thread::Builder::new()
            .name("threadline-log-evidence".into())
            .spawn(move || evidence_loop(&evidence_shared, evidence_file, evidence_rx))
            .map_err(|e| StorageError::Io(e.to_string()))?;
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("threadline-log-writer".into())
            .spawn(move || Writer::new(writer_shared).run(rx, to_evidence))
            .map_err(|e| StorageError::Io(e.to_string()))?;
        tracing::info!(dir = %dir.display(), head = head.0, generation, "event log opened");
        Ok(SledLog {
            shared,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            evidence: Mutex::new(Some(evidence_thread)),
            closer: CleanCloser {
                dir: dir.to_owned(),
                clean: AtomicBool::new(false),
                scanned: (scan.fingerprint, scan.stamps),
            },
        })
    }

    /// Stops the writer after it has committed everything queued, then flushes.
    /// Appends after this answer [`StorageError::Closed`].
    fn shut(&self) -> Result<(), StorageError> {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
        if let Some(handle) = self
            .evidence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = handle.join();
        }
        self.shared.db.flush()?;
        let clean = !self.shared.failed.load(Ordering::Acquire);
        self.closer.clean.store(clean, Ordering::Release);
        Ok(())
    }

    fn durable(&self) -> Position {
        Position(self.shared.durable.load(Ordering::Acquire))
    }

    fn get_record(&self, position: Position) -> Result<Option<Record>, StorageError> {
        if position.0 == 0 || position > self.durable() {
            return Ok(None);
        }
        read_record(&self.shared.log, position).map(Some)
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn lost(
    dir: &Path,
    scan: &salvage::Salvage,
    recovered: Option<Position>,
    reason: String,
) -> StorageError {
    let acknowledged = scan.acknowledged();
    let missing = scan.missing(acknowledged);
    StorageError::Lost(Box::new(LossReport {
        dir: dir.display().to_string(),
        acknowledged,
        recovered,
        missing: missing.iter().map(|r| (*r.start(), *r.end())).collect(),
        damaged_copies: scan.damaged_upto(acknowledged).count(),
        reason,
    }))
}

/// Creates `dir` (and its parents) readable by its owner only.
fn create_private_dir(dir: &Path) -> Result<(), StorageError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_at(dir))
}

/// The head sled's recovery reaches on a scratch copy of the log directory
/// (removed afterwards), so that its recovery never runs on the original when
/// it might discard data.
fn trial_recovery(
    dir: &Path,
    cache_bytes: u64,
    tolerate: bool,
) -> Result<Option<Position>, StorageError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "log".into());
    let copy = dir.with_file_name(format!("{name}.trial-{}", now_ms()));
    let result = copy_dir(dir, &copy).and_then(|()| {
        let db = open_db(&copy, cache_bytes)?;
        let log = db.open_tree("log")?;
        let head = match log.get(LAYOUT_KEY)? {
            Some(v) if v.as_ref() == LAYOUT_V2 => recover(&log, tolerate).map(Some),
            // A format-1 log (or another layout): the open names it.
            Some(_) => Ok(None),
            None if log.get(HEAD_KEY)?.is_some() => Ok(None),
            // sled recovered nothing at all.
            None => Ok(Some(Position::ZERO)),
        };
        drop(log);
        drop(db);
        head
    });
    let _ = std::fs::remove_dir_all(&copy);
    result
}

pub(crate) fn copy_dir(from: &Path, to: &Path) -> Result<(), StorageError> {
    create_private_dir(to)?;
    for entry in std::fs::read_dir(from).map_err(io_at(from))? {
        let entry = entry.map_err(io_at(from))?;
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() && entry.file_name() == crate::CHECKPOINT_DIR {
            // Not log data: a trial recovery needs none of it.
        } else if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            std::fs::copy(&path, &target).map_err(io_at(&path))?;
        }
    }
    Ok(())
}

/// sled reports a held database as `Error::Io` of kind `Other` with the text
/// `could not acquire lock on "<dir>/db": Os { code: 11, kind: WouldBlock, .. }`;
/// only that is `Locked` (matching "lock" anywhere would also catch a path like `/srv/blocks`).
fn open_error(dir: &Path, e: sled::Error) -> StorageError {
    let held = match &e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().starts_with("could not acquire lock on ")
        }
        _ => false,
    };
    if held {
        StorageError::Locked(dir.display().to_string())
    } else {
        StorageError::Io(format!("opening {}: {e}", dir.display()))
    }
}

/// How long `open` waits for the file lock of a log closed in this process:
/// sled releases it from a background thread shortly after the last handle drops.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits (up to [`LOCK_WAIT`]) until no process holds sled's lock on the log,
/// so that the raw scan never reads a log another process is writing.
pub(crate) fn wait_unlocked(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join("db");
    let Ok(file) = File::open(&path) else {
        return Ok(()); // sled reports a missing or unreadable file itself
    };
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()), // released when `file` drops
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StorageError::Locked(dir.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_at(&path)(e)),
        }
    }
}

pub(crate) fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StorageError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| open_error(dir, e));
        match opened {
            Err(StorageError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// The frame holding `position`: the last frame key at or before it.
fn frame_for(log: &sled::Tree, position: Position) -> Result<(u64, sled::IVec), StorageError> {
    let missing = || StorageError::Corrupt {
        position,
        reason: "record missing below the durable head".into(),
    };
    let (key, bytes) = log
        .range(frame_key(1)..=frame_key(position.0))
        .next_back()
        .ok_or_else(missing)??;
    Ok((be_u64(&key[1..])?, bytes))
}

fn read_record(log: &sled::Tree, position: Position) -> Result<Record, StorageError> {
    let (first, bytes) = frame_for(log, position)?;
    let header =
        frame::parse_header(&bytes).map_err(|reason| StorageError::Corrupt { position, reason })?;
    if header.first != first || !header.contains(position.0) {
        return Err(StorageError::Corrupt {
            position,
            reason: "record missing below the durable head".into(),
        });
    }
    for slot in frame::slots(&header, &bytes) {
        let slot = slot.map_err(|e| match e {
            StorageError::Corrupt {
                position: p,
                reason,
            } if p != position => StorageError::Corrupt {
                position,
                reason: format!(
                    "unreadable after the damaged record at {p} in its frame ({reason})"
                ),
            },
            other => other,
        })?;
        if slot.position == position.0 {
            return slot.record(header.recorded_at_ms);
        }
    }
    Err(StorageError::Corrupt {
        position,
        reason: "record missing from its frame".into(),
    })
}

/// Finds the durable head and drops anything past it. A frame past the head
/// marker can only come from a group whose flush never finished, so it was
/// never acknowledged; a record missing below it is corruption.
fn recover(log: &sled::Tree, tolerate: bool) -> Result<Position, StorageError> {
    let head = match log.get(HEAD_KEY)? {
        Some(b) => Position(be_u64(&b)?),
        None => Position::ZERO,
    };
    let mut stale = sled::Batch::default();
    let mut dropped = 0;
    for entry in log.range(frame_key(head.0 + 1)..=frame_key(u64::MAX)) {
        let (key, _) = entry?;
        stale.remove(key);
        dropped += 1;
    }
    if dropped > 0 {
        tracing::warn!(%head, frames = dropped, "dropping frames of an unfinished commit");
        log.apply_batch(stale)?;
        log.flush()?;
    }
    if head > Position::ZERO {
        // The frame holding the head must be there and reach it.
        match log.range(frame_key(1)..=frame_key(head.0)).next_back() {
            Some(entry) => {
                let (key, bytes) = entry?;
                let first = be_u64(&key[1..])?;
                let reaches = frame::parse_header(&bytes)
                    .map(|h| h.contains(head.0))
                    .unwrap_or(true); // a damaged header is reported when it is read
                if !reaches {
                    let e = StorageError::Corrupt {
                        position: head,
                        reason: format!("the frame at {first} ends before the head marker {head}"),
                    };
                    if !tolerate {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "the log's last records are missing");
                }
            }
            None => {
                let e = StorageError::Corrupt {
                    position: Position(1),
                    reason: format!("the log holds no record but its head marker says {head}"),
                };
                if !tolerate {
                    return Err(e);
                }
                tracing::warn!(error = %e, "the log's records are missing");
            }
        }
    }
    Ok(head)
}

/// Reads every frame up to `head` into the indexes, checking that positions are dense.
fn build_index(log: &sled::Tree, head: Position, tolerate: bool) -> Result<Index, StorageError> {
    let mut index = Index::default();
    let mut next = 1u64;
    let mut unreadable = std::collections::BTreeSet::new();
    let problem = |e: StorageError| -> Result<(), StorageError> {
        if tolerate {
            tracing::warn!(error = %e, "left out of the indexes");
            Ok(())
        } else {
            Err(e)
        }
    };
    for entry in log.range(frame_key(1)..=frame_key(head.0)) {
        let (key, bytes) = entry?;
        let first = be_u64(&key[1..])?;
        if first != next {
            problem(StorageError::Corrupt {
                position: Position(next),
                reason: "record missing (gap in positions)".into(),
            })?;
            unreadable.extend(next..first);
        }
        let header = match frame::parse_header(&bytes) {
            Ok(h) if h.first == first => h,
            Ok(_) | Err(_) => {
                problem(StorageError::Corrupt {
                    position: Position(first),
                    reason: "frame header damaged".into(),
                })?;
                unreadable.insert(first);
                next = first + 1;
                continue;
            }
        };
        for slot in frame::slots(&header, &bytes) {
            match slot.and_then(|s| s.index_view().map(|v| (s.position, v))) {
                Ok((p, view)) => {
                    let have = index.streams.get(&view.stream).map_or(0, Vec::len) as u64;
                    if view.stream_version != have + 1 {
                        problem(StorageError::Corrupt {
                            position: Position(p),
                            reason: format!(
                                "stream {:?} version {} follows {have}",
                                view.stream, view.stream_version
                            ),
                        })?;
                        // Tolerated: stand in for each skipped version, so that
                        // versions keep their place and reading one is an error.
                        let previous = index
                            .streams
                            .get(&view.stream)
                            .and_then(|v| v.last().copied());
                        for version in have + 1..view.stream_version {
                            let damaged = unreadable
                                .range(previous.map_or(1, |q| q + 1)..p)
                                .next()
                                .copied()
                                .unwrap_or(p);
                            index.gaps.insert((view.stream.clone(), version), damaged);
                            index
                                .streams
                                .entry(view.stream.clone())
                                .or_default()
                                .push(p);
                        }
                    }
                    index.add(p, Uuid::from_bytes(view.event_id), &view.stream)
                }
                Err(e) => {
                    if let StorageError::Corrupt { position, .. } = &e {
                        unreadable.insert(position.0);
                    }
                    problem(e)?
                }
            }
        }
        next = header.last() + 1;
    }
    if next <= head.0 {
        problem(StorageError::Corrupt {
            position: Position(next),
            reason: "record missing (gap in positions)".into(),
        })?;
    }
    Ok(index)
}

/// The single writer: the only code that assigns positions.
struct Writer {
    shared: Arc<Shared>,
    head: Position,
}

/// The writer's view of committed state: everything applied, durable or not.
struct Lookup<'a> {
    index: &'a Index,
}

impl Committed for Lookup<'_> {
    fn stream_version(&mut self, stream: &str) -> Result<u64, StorageError> {
        Ok(self.index.streams.get(stream).map_or(0, |v| v.len() as u64))
    }

    fn find_event(&mut self, id: Uuid) -> Result<Option<Appended>, StorageError> {
        Ok(self.index.ids.get(&id).map(|&(p, v)| appended_at(p, v)))
    }
}

fn appended_at(position: u64, stream_version: u64) -> Appended {
    Appended {
        position: Position(position),
        stream_version,
        duplicate: true,
    }
}

impl Writer {
    fn new(shared: Arc<Shared>) -> Writer {
        let head = Position(shared.durable.load(Ordering::Acquire));
        Writer { shared, head }
    }

    /// Applies groups as they come and hands them to a flusher thread, so
    /// applying group N+1 overlaps the fsync of group N. Appenders are answered
    /// by the flusher, only once a flush that began after their group was
    /// applied has returned.
    fn run(self, rx: mpsc::Receiver<Job>, to_evidence: mpsc::Sender<Position>) {
        let (to_flusher, flusher_rx) = mpsc::channel();
        let shared = self.shared.clone();
        let flusher = std::thread::Builder::new()
            .name("threadline-log-flusher".into())
            .spawn(move || flush_loop(&shared, flusher_rx, to_evidence));
        let flusher = match flusher {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the log flusher");
                self.shared.failed.store(true, Ordering::Release);
                return;
            }
        };
        let mut writer = self;
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            if let Some(applied) = writer.apply(jobs) {
                // The flusher outlives this loop, so the send only fails if it panicked.
                let _ = to_flusher.send(applied);
            }
        }
        drop(to_flusher);
        let _ = flusher.join();
    }

    /// Plans and applies one group (not yet durable); None when it failed and
    /// its appenders were already answered.
    fn apply(&mut self, jobs: Vec<Job>) -> Option<Applied> {
        if self.shared.failed.load(Ordering::Acquire) {
            for job in jobs {
                let _ = job.reply.send(Err(StorageError::Closed));
            }
            return None;
        }
        let recorded_at = now_ms();
        let mut planner = Planner::new(self.head, recorded_at);
        let mut frames = FrameWriter::new(self.shared.generation, recorded_at);
        let mut added = Vec::new();
        let mut replies = Vec::with_capacity(jobs.len());
        let index_lock = match self.shared.index() {
            Ok(index) => index,
            Err(e) => {
                let replies = jobs
                    .into_iter()
                    .map(|j| (j.reply, Ok(Vec::new())))
                    .collect();
                fail(
                    &self.shared,
                    &format!("cannot build the log's indexes: {e}"),
                    replies,
                );
                return None;
            }
        };
        {
            let index = index_lock.read().unwrap_or_else(|p| p.into_inner());
            for job in jobs {
                let mut lookup = Lookup { index: &index };
                let outcome = planner
                    .plan(&mut lookup, job.events)
                    .map(|(results, records)| {
                        for r in records {
                            frames.push(&r);
                            added.push((r.position.0, r.event_id, r.stream));
                        }
                        results
                    });
                replies.push((job.reply, outcome));
            }
        }
        let head = planner.head();
        if head > self.head {
            let mut batch = sled::Batch::default();
            for (first, bytes) in frames.finish() {
                batch.insert(&frame_key(first)[..], bytes);
            }
            batch.insert(HEAD_KEY, &head.0.to_be_bytes()[..]);
            if let Err(e) = self.shared.log.apply_batch(batch) {
                fail(&self.shared, &e.to_string(), replies);
                return None;
            }
            let mut index = index_lock.write().unwrap_or_else(|p| p.into_inner());
            for (position, id, stream) in &added {
                index.add(*position, *id, stream);
            }
            self.head = head;
        }
        // Even a group that appended nothing goes through the flusher: its
        // duplicates may point at events of a group still being flushed.
        Some(Applied { head, replies })
    }
}

type Reply = (
    oneshot::Sender<Result<Vec<Appended>, StorageError>>,
    Result<Vec<Appended>, StorageError>,
);

/// A group applied to sled, waiting for a flush.
struct Applied {
    head: Position,
    replies: Vec<Reply>,
}

impl Applied {
    /// This group merged with every group already waiting in `rx` (one flush or sync for all).
    fn with_waiting(mut self, rx: &mpsc::Receiver<Applied>) -> Applied {
        while let Ok(mut more) = rx.try_recv() {
            self.replies.append(&mut more.replies);
            self.head = self.head.max(more.head);
        }
        self
    }
}

/// Stops the log: after a failed write or flush the state on disk is unknown,
/// so nothing more is acknowledged on top of it.
fn fail(shared: &Shared, error: &str, replies: Vec<Reply>) {
    tracing::error!(error, "log commit failed; the log stops accepting appends");
    shared.failed.store(true, Ordering::Release);
    for (reply, _) in replies {
        let _ = reply.send(Err(StorageError::Io(error.to_owned())));
    }
}

/// Writes whatever groups are waiting to sled's file with one sled `flush`,
/// then hands them to the syncer. sled's flush writes with `sync_file_range`,
/// which neither flushes the device cache nor persists the file's size: the
/// syncer's `fdatasync` does, while this thread already writes the next groups.
fn flush_loop(shared: &Shared, rx: mpsc::Receiver<Applied>, to_evidence: mpsc::Sender<Position>) {
    let (to_syncer, syncer_rx) = mpsc::channel::<Applied>();
    let durable = Position(shared.durable.load(Ordering::Acquire));
    std::thread::scope(|scope| {
        let syncer = std::thread::Builder::new()
            .name("threadline-log-syncer".into())
            .spawn_scoped(scope, || sync_loop(shared, syncer_rx, to_evidence, durable));
        if syncer.is_err() {
            tracing::error!("cannot start the log syncer");
            shared.failed.store(true, Ordering::Release);
        }
        while let Ok(first) = rx.recv() {
            let group = first.with_waiting(&rx);
            if shared.failed.load(Ordering::Acquire) {
                fail(shared, "an earlier commit failed", group.replies);
                continue;
            }
            // Every group taken here was applied before this flush starts.
            if let Err(e) = shared.db.flush() {
                fail(shared, &e.to_string(), group.replies);
                continue;
            }
            let _ = to_syncer.send(group);
        }
        drop(to_syncer);
    });
}

/// Makes what the flusher wrote durable with one `fdatasync` for everything
/// waiting, then publishes the new durable head, answers the appenders and
/// passes the head on to the durable-head record.
fn sync_loop(
    shared: &Shared,
    rx: mpsc::Receiver<Applied>,
    to_evidence: mpsc::Sender<Position>,
    mut durable: Position,
) {
    while let Ok(first) = rx.recv() {
        let group = first.with_waiting(&rx);
        if shared.failed.load(Ordering::Acquire) {
            fail(shared, "an earlier commit failed", group.replies);
            continue;
        }
        if group.head > durable {
            // Started after sled's flush of every group taken here returned.
            if let Err(e) = shared.data_file.sync_data() {
                fail(shared, &format!("fdatasync: {e}"), group.replies);
                continue;
            }
            durable = group.head;
            shared.durable.store(durable.0, Ordering::Release);
            shared.head_tx.send_replace(durable);
            let _ = to_evidence.send(durable);
        }
        for (reply, outcome) in group.replies {
            let _ = reply.send(outcome);
        }
    }
}

/// How often, at most, the durable-head record is rewritten under load: each
/// write costs an `fdatasync`, and this bounds how far it lags the durable head.
pub const EVIDENCE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Keeps the durable-head record up with the durable head: one write and
/// `fdatasync` at a time and at most one per [`EVIDENCE_INTERVAL`], each
/// taking the newest head that arrived meanwhile; the last head is written
/// before the log closes.
fn evidence_loop(shared: &Shared, mut file: EvidenceFile, rx: mpsc::Receiver<Position>) {
    let mut last_write: Option<std::time::Instant> = None;
    while let Ok(mut head) = rx.recv() {
        // Rate limit: wait out the interval, still taking newer heads (and the close).
        let mut closing = false;
        if let Some(at) = last_write {
            let until = at + EVIDENCE_INTERVAL;
            loop {
                let now = std::time::Instant::now();
                if now >= until {
                    break;
                }
                match rx.recv_timeout(until - now) {
                    Ok(newer) => head = newer,
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        closing = true;
                        break;
                    }
                }
            }
        }
        while let Ok(newer) = rx.try_recv() {
            head = newer;
        }
        if let Err(e) = file.write(shared.generation, head) {
            // Without it a later loss could go unnoticed: stop acknowledging.
            tracing::error!(error = %e, "cannot write the durable-head record; the log stops accepting appends");
            shared.failed.store(true, Ordering::Release);
            return;
        }
        last_write = Some(std::time::Instant::now());
        if closing {
            return;
        }
    }
}

impl EventLog for SledLog {
    fn close(&self) -> Result<(), StorageError> {
        self.shut()
    }

    fn accepting(&self) -> bool {
        !self.shared.failed.load(Ordering::Acquire)
    }

    fn append(&self, events: Vec<NewEvent>) -> PendingAppend {
        let (reply, pending) = PendingAppend::channel();
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match jobs.as_ref() {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(Job { events, reply }) {
                    let _ = job.reply.send(Err(StorageError::Closed));
                }
            }
            None => {
                let _ = reply.send(Err(StorageError::Closed));
            }
        }
        pending
    }

    fn head(&self) -> Position {
        self.durable()
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.shared.head_tx.subscribe()
    }

    fn read_from(&self, from: Position, limit: usize) -> Result<Vec<Record>, StorageError> {
        let durable = self.durable();
        let start = from.0.max(1);
        if start > durable.0 || limit == 0 {
            return Ok(Vec::new());
        }
        let end = durable.0.min(start.saturating_add(limit as u64 - 1));
        let log = &self.shared.log;
        let (first, _) = frame_for(log, Position(start))?;
        let mut out = Vec::with_capacity((end - start + 1).min(1024) as usize);
        let mut expected = start;
        for entry in log.range(frame_key(first)..=frame_key(end)) {
            let (key, bytes) = entry?;
            let key_first = be_u64(&key[1..])?;
            if key_first > expected {
                return Err(StorageError::Corrupt {
                    position: Position(expected),
                    reason: "record missing (gap in positions)".into(),
                });
            }
            let (_, records) = frame::decode(key_first, &bytes).map_err(|e| match e {
                StorageError::Corrupt { reason, .. } => StorageError::Corrupt {
                    position: Position(expected),
                    reason,
                },
                other => other,
            })?;
            for (p, r) in (key_first..).zip(records) {
                if p < expected {
                    continue;
                }
                if p > end {
                    break;
                }
                out.push(r?);
                expected += 1;
            }
        }
        if expected <= end {
            return Err(StorageError::Corrupt {
                position: Position(expected),
                reason: "record missing (gap in positions)".into(),
            });
        }
        Ok(out)
    }

    fn read_at(&self, position: Position) -> Result<Option<Record>, StorageError> {
        self.get_record(position)
    }

    /// Reads each frame once for all the positions it holds.
    fn read_many(&self, positions: &[Position]) -> Result<Vec<Record>, StorageError> {
        let durable = self.durable();
        let log = &self.shared.log;
        let mut out = Vec::with_capacity(positions.len());
        let mut frame: Option<(frame::Header, sled::IVec)> = None;
        for &position in positions {
            if position.0 == 0 || position > durable {
                return Err(StorageError::InvalidInput(format!(
                    "position {position} is not durable"
                )));
            }
            if !frame.as_ref().is_some_and(|(h, _)| h.contains(position.0)) {
                let (first, bytes) = frame_for(log, position)?;
                match frame::parse_header(&bytes) {
                    Ok(h) if h.first == first && h.contains(position.0) => {
                        frame = Some((h, bytes));
                    }
                    // Let the single read name what is wrong.
                    _ => {
                        out.push(read_record(log, position)?);
                        frame = None;
                        continue;
                    }
                }
            }
            let (header, bytes) = frame.as_ref().expect("set above");
            match frame::slots(header, bytes).find_map(|slot| match slot {
                Ok(s) if s.position == position.0 => Some(Ok(s)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }) {
                Some(Ok(slot)) => out.push(slot.record(header.recorded_at_ms)?),
                _ => out.push(read_record(log, position)?),
            }
        }
        Ok(out)
    }

    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let durable = self.durable().0;
        let positions: Vec<Result<u64, u64>> = {
            let index = self
                .shared
                .index()?
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let Some(all) = index.streams.get(stream) else {
                return Ok(Vec::new());
            };
            let first = from_version.max(1);
            let skip = usize::try_from(first - 1).unwrap_or(usize::MAX);
            all.iter()
                .skip(skip)
                .take_while(|&&p| p <= durable)
                .take(limit)
                .zip(first..)
                .map(
                    |(&p, version)| match index.gaps.get(&(stream.to_owned(), version)) {
                        Some(&damaged) => Err(damaged),
                        None => Ok(p),
                    },
                )
                .collect()
        };
        positions
            .into_iter()
            .map(|p| match p {
                Ok(p) => read_record(&self.shared.log, Position(p)),
                Err(damaged) => Err(StorageError::Corrupt {
                    position: Position(damaged),
                    reason: format!("a record of stream {stream:?} is unreadable"),
                }),
            })
            .collect()
    }

    fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        let durable = self.durable().0;
        let index = self
            .shared
            .index()?
            .read()
            .unwrap_or_else(|p| p.into_inner());
        Ok(index
            .streams
            .get(stream)
            .map_or(0, |v| v.partition_point(|&p| p <= durable) as u64))
    }

    fn find_event(&self, event_id: Uuid) -> Result<Option<Appended>, StorageError> {
        let position = {
            let index = self
                .shared
                .index()?
                .read()
                .unwrap_or_else(|p| p.into_inner());
            index.ids.get(&event_id).copied()
        };
        match position {
            Some((p, v)) if p <= self.durable().0 => Ok(Some(appended_at(p, v))),
            _ => Ok(None),
        }
    }
}

impl Checkpoints for SledLog {
    /// From the checkpoint files; a log written before they existed kept its
    /// checkpoints in sled's `checkpoints` tree, read when there is no file.
    fn load_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        match self.shared.checkpoint_files.load(name)? {
            Some(bytes) => Ok(Some(bytes)),
            None => Ok(self.shared.checkpoints.get(name)?.map(|v| v.to_vec())),
        }
    }

    /// As a file beside sled's (not into sled: see [`DirCheckpoints`]); an old copy in
    /// sled's tree is dropped once the file is durable.
    fn store_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.shared.checkpoint_files.store(name, bytes)?;
        if self.shared.checkpoints.contains_key(name)? {
            self.shared.checkpoints.remove(name)?;
        }
        Ok(())
    }
}

/// Writes a new format-2 log in `dir` (which must not hold one) holding exactly
/// `records`, whose positions must run densely from 1. Used by `migrate` and
/// `repair`; answers the head it wrote.
pub fn write_log(
    dir: &Path,
    records: impl IntoIterator<Item = Result<Record, StorageError>>,
) -> Result<Position, StorageError> {
    if dir.join("conf").exists() {
        return Err(StorageError::InvalidInput(format!(
            "{} already holds a log",
            dir.display()
        )));
    }
    create_private_dir(dir)?;
    let db = open_db(dir, 64 * 1024 * 1024)?;
    let log = db.open_tree("log")?;
    log.insert(LAYOUT_KEY, LAYOUT_V2)?;
    let mut head = 0u64;
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut pending: Vec<Record> = Vec::new();
    let commit = |pending: &mut Vec<Record>, head: u64| -> Result<(), StorageError> {
        if pending.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        // Records keep their own timestamps: one frame per run of equal ones.
        let mut i = 0;
        while i < pending.len() {
            let at = pending[i].recorded_at_ms;
            let mut w = FrameWriter::new(1, at);
            while i < pending.len() && pending[i].recorded_at_ms == at {
                w.push(&pending[i]);
                i += 1;
            }
            for (first, bytes) in w.finish() {
                batch.insert(&frame_key(first)[..], bytes);
            }
        }
        batch.insert(HEAD_KEY, &head.to_be_bytes()[..]);
        log.apply_batch(batch)?;
        pending.clear();
        Ok(())
    };
    for r in records {
        let r = r?;
        if r.position.0 != head + 1 {
            return Err(StorageError::InvalidInput(format!(
                "position {} follows {head}",
                r.position
            )));
        }
        let v = versions.entry(r.stream.clone()).or_insert(0);
        if r.stream_version != *v + 1 {
            return Err(StorageError::InvalidInput(format!(
                "stream {:?} version {} at position {} follows {}",
                r.stream, r.stream_version, r.position, v
            )));
        }
        *v += 1;
        head += 1;
        pending.push(r);
        if pending.len() >= 1000 {
            commit(&mut pending, head)?;
        }
    }
    commit(&mut pending, head)?;
    db.flush()?;
    let data_path = dir.join("db");
    File::open(&data_path)
        .and_then(|f| f.sync_data())
        .map_err(io_at(&data_path))?;
    let mut evidence = EvidenceFile::open(dir, Evidence::default())?;
    evidence.write(1, Position(head))?;
    drop(log);
    drop(db);
    Ok(Position(head))
}

/// Reads a format-1 log (the layout before format 2: `e` + position →
/// record, written by Threadline 0.1) in position order.
pub(crate) fn read_v1(
    dir: &Path,
) -> Result<impl Iterator<Item = Result<Record, StorageError>>, StorageError> {
    let db = open_db(dir, 64 * 1024 * 1024)?;
    let log = db.open_tree("log")?;
    let head = match log.get(HEAD_KEY)? {
        Some(b) => be_u64(&b)?,
        None => 0,
    };
    let mut next = 1u64;
    let iter = log.scan_prefix(V1_RECORD_PREFIX);
    Ok(iter
        .map(move |entry| {
            let _keep_open = &db;
            let (key, bytes) = entry?;
            let position = Position(be_u64(&key[1..])?);
            if position.0 > head {
                return Ok(None);
            }
            if position.0 != next {
                return Err(StorageError::Corrupt {
                    position: Position(next),
                    reason: "record missing (gap in positions)".into(),
                });
            }
            next += 1;
            Record::decode(position, &bytes).map(Some)
        })
        .filter_map(Result::transpose))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::salvage::format_ranges;

    #[test]
    fn a_second_open_of_a_held_log_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _held = SledLog::open(dir.path(), SledOptions::default()).unwrap();
        let second = SledLog::open(dir.path(), SledOptions::default()).unwrap_err();
        assert_eq!(
            second,
            StorageError::Locked(dir.path().display().to_string())
        );
    }

    #[test]
    fn other_open_failures_are_io_even_when_the_path_says_lock() {
        let dir = Path::new("/srv/blocklock");
        let denied = sled::Error::Io(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "Permission denied",
        ));
        assert!(matches!(open_error(dir, denied), StorageError::Io(_)));
    }

    #[test]
    fn checkpoints_are_files_and_a_legacy_one_in_sled_is_read_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A log from before checkpoint files: its checkpoint sits in sled's tree.
            let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
            log.shared
                .checkpoints
                .insert("projections", &b"old"[..])
                .unwrap();
            log.close().unwrap();
        }
        let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
        assert_eq!(
            log.load_checkpoint("projections").unwrap().as_deref(),
            Some(&b"old"[..])
        );
        log.store_checkpoint("projections", b"new").unwrap();
        let file = dir
            .path()
            .join(crate::CHECKPOINT_DIR)
            .join("projections.ckpt");
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert!(!log.shared.checkpoints.contains_key("projections").unwrap());
        log.close().unwrap();
        drop(log);
        // A checkpoint written after a clean close does not make the log look tampered
        // with: checkpoint files are not log data.
        let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
        log.store_checkpoint("projections", b"newer").unwrap();
        log.close().unwrap();
        drop(log);
        let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
        assert_eq!(
            log.load_checkpoint("projections").unwrap().as_deref(),
            Some(&b"newer"[..])
        );
    }

    #[test]
    fn missing_positions_format_as_ranges() {
        assert_eq!(format_ranges(&[54..=254, 300..=300]), "54..=254, 300");
    }
}
