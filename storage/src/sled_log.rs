//! [`SledLog`]: the event log on sled, with one writer thread that group-commits.
//!
//! Layout, all in one sled tree so that a group commit is one atomic
//! `apply_batch`:
//! - `e` + position (u64 BE) → encoded [`Record`]
//! - `s` + stream + `\0` + version (u64 BE) → position (u64 BE)
//! - `i` + event id (16 bytes) → position (u64 BE)
//! - `h` → head position (u64 BE), written in the same batch as the records
//!
//! Durability: the writer applies a group's batch, then `flush`es (fsync), and
//! only then publishes the new durable head and answers the appenders. Readers
//! never look past the published head, so nothing is readable before it is on
//! disk even though sled may hold newer, unflushed entries in memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::plan::{Committed, Planner};
use crate::{
    now_ms, Appended, Checkpoints, EventLog, NewEvent, PendingAppend, Position, Record,
    StorageError,
};

const HEAD_KEY: &[u8] = b"h";
/// Upper bound on batches folded into one group commit (bounds one fsync's work).
const MAX_GROUP: usize = 1024;

/// Tuning for [`SledLog::open`].
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Create the log when the directory holds none (false for read-only tools).
    pub create: bool,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_bytes: 64 * 1024 * 1024,
            create: true,
        }
    }
}

/// The sled-backed [`EventLog`].
#[derive(Debug)]
pub struct SledLog {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    db: sled::Db,
    log: sled::Tree,
    checkpoints: sled::Tree,
    durable: AtomicU64,
    head_tx: watch::Sender<Position>,
    failed: AtomicBool,
}

#[derive(Debug)]
struct Job {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Vec<Appended>, StorageError>>,
}

fn record_key(position: Position) -> [u8; 9] {
    let mut k = [b'e'; 9];
    k[1..].copy_from_slice(&position.0.to_be_bytes());
    k
}

fn stream_prefix(stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 10);
    k.push(b's');
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k
}

fn stream_key(stream: &str, version: u64) -> Vec<u8> {
    let mut k = stream_prefix(stream);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn id_key(id: Uuid) -> [u8; 17] {
    let mut k = [b'i'; 17];
    k[1..].copy_from_slice(id.as_bytes());
    k
}

fn be_u64(bytes: &[u8]) -> Result<u64, StorageError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StorageError::Io(format!("index entry of {} bytes", bytes.len())))
}

impl SledLog {
    /// Opens (or, with `options.create`, creates) the log in `dir`, recovering
    /// the exact durable head.
    pub fn open(dir: impl AsRef<Path>, options: SledOptions) -> Result<SledLog, StorageError> {
        let dir = dir.as_ref();
        if !options.create && !dir.join("conf").exists() {
            return Err(StorageError::NotFound(dir.display().to_string()));
        }
        let db = open_db(dir, options.cache_bytes)?;
        let log = db.open_tree("log")?;
        let checkpoints = db.open_tree("checkpoints")?;
        let head = recover(&log)?;
        let shared = Arc::new(Shared {
            db,
            log,
            checkpoints,
            durable: AtomicU64::new(head.0),
            head_tx: watch::Sender::new(head),
            failed: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("threadline-log-writer".into())
            .spawn(move || Writer::new(writer_shared).run(rx))
            .map_err(|e| StorageError::Io(e.to_string()))?;
        tracing::info!(dir = %dir.display(), head = head.0, "event log opened");
        Ok(SledLog {
            shared,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Stops the writer after it has committed everything queued, then flushes.
    /// Appends after this answer [`StorageError::Closed`].
    pub fn close(&self) -> Result<(), StorageError> {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
        self.shared.db.flush()?;
        Ok(())
    }

    fn durable(&self) -> Position {
        Position(self.shared.durable.load(Ordering::Acquire))
    }

    fn get_record(&self, position: Position) -> Result<Option<Record>, StorageError> {
        if position.0 == 0 || position > self.durable() {
            return Ok(None);
        }
        match self.shared.log.get(record_key(position))? {
            Some(bytes) => Record::decode(position, &bytes).map(Some),
            None => Err(StorageError::Corrupt {
                position,
                reason: "record missing below the durable head".into(),
            }),
        }
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        let _ = self.close();
    }
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

fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StorageError> {
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

/// Finds the durable head and drops anything past it. A record past the head
/// marker can only come from a group whose flush never finished, so it was
/// never acknowledged; a record missing below it is corruption.
fn recover(log: &sled::Tree) -> Result<Position, StorageError> {
    let head = match log.get(HEAD_KEY)? {
        Some(b) => Position(be_u64(&b)?),
        None => Position::ZERO,
    };
    let last = match log.scan_prefix(b"e").next_back() {
        Some(entry) => Position(be_u64(&entry?.0[1..])?),
        None => Position::ZERO,
    };
    if last < head {
        return Err(StorageError::Corrupt {
            position: last.next(),
            reason: format!("log ends at {last} but its head marker says {head}"),
        });
    }
    if last > head {
        tracing::warn!(%head, %last, "dropping records of an unfinished commit");
        let mut batch = sled::Batch::default();
        for p in head.0 + 1..=last.0 {
            let key = record_key(Position(p));
            if let Some(bytes) = log.get(key)? {
                if let Ok(r) = Record::decode(Position(p), &bytes) {
                    batch.remove(stream_key(&r.stream, r.stream_version));
                    batch.remove(&id_key(r.event_id)[..]);
                }
            }
            batch.remove(&key[..]);
        }
        log.apply_batch(batch)?;
        log.flush()?;
    }
    Ok(head)
}

/// The single writer: the only code that assigns positions.
struct Writer {
    shared: Arc<Shared>,
    head: Position,
    /// Committed stream versions seen so far (the writer is the only one that changes them).
    versions: HashMap<String, u64>,
}

struct Lookup<'a> {
    log: &'a sled::Tree,
    versions: &'a mut HashMap<String, u64>,
}

impl Committed for Lookup<'_> {
    fn stream_version(&mut self, stream: &str) -> Result<u64, StorageError> {
        if let Some(v) = self.versions.get(stream) {
            return Ok(*v);
        }
        let version = match self.log.scan_prefix(stream_prefix(stream)).next_back() {
            Some(entry) => {
                let (k, _) = entry?;
                be_u64(&k[k.len() - 8..])?
            }
            None => 0,
        };
        self.versions.insert(stream.to_owned(), version);
        Ok(version)
    }

    fn find_event(&mut self, id: Uuid) -> Result<Option<Appended>, StorageError> {
        find_event(self.log, id, u64::MAX)
    }
}

fn find_event(log: &sled::Tree, id: Uuid, durable: u64) -> Result<Option<Appended>, StorageError> {
    let Some(pos) = log.get(id_key(id))? else {
        return Ok(None);
    };
    let position = Position(be_u64(&pos)?);
    if position.0 > durable {
        return Ok(None);
    }
    let bytes = log
        .get(record_key(position))?
        .ok_or(StorageError::Corrupt {
            position,
            reason: "event id points at a missing record".into(),
        })?;
    let record = Record::decode(position, &bytes)?;
    Ok(Some(Appended {
        position,
        stream_version: record.stream_version,
        duplicate: true,
    }))
}

impl Writer {
    fn new(shared: Arc<Shared>) -> Writer {
        let head = Position(shared.durable.load(Ordering::Acquire));
        Writer {
            shared,
            head,
            versions: HashMap::new(),
        }
    }

    /// Applies groups as they come and hands them to a flusher thread, so
    /// applying group N+1 overlaps the fsync of group N. Appenders are answered
    /// by the flusher, only once a flush that began after their group was
    /// applied has returned.
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let (to_flusher, flusher_rx) = mpsc::channel();
        let shared = self.shared.clone();
        let flusher = std::thread::Builder::new()
            .name("threadline-log-flusher".into())
            .spawn(move || flush_loop(&shared, flusher_rx));
        let flusher = match flusher {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the log flusher");
                self.shared.failed.store(true, Ordering::Release);
                return;
            }
        };
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            if let Some(applied) = self.apply(jobs) {
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
        let mut planner = Planner::new(self.head, now_ms());
        let mut batch = sled::Batch::default();
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut lookup = Lookup {
                log: &self.shared.log,
                versions: &mut self.versions,
            };
            let outcome = planner
                .plan(&mut lookup, job.events)
                .map(|(results, records)| {
                    for r in records {
                        batch.insert(
                            stream_key(&r.stream, r.stream_version),
                            &r.position.0.to_be_bytes()[..],
                        );
                        batch.insert(&id_key(r.event_id)[..], &r.position.0.to_be_bytes()[..]);
                        batch.insert(&record_key(r.position)[..], r.encode());
                    }
                    results
                });
            replies.push((job.reply, outcome));
        }
        let head = planner.head();
        if head > self.head {
            batch.insert(HEAD_KEY, &head.0.to_be_bytes()[..]);
            if let Err(e) = self.shared.log.apply_batch(batch) {
                fail(&self.shared, &e.to_string(), replies);
                return None;
            }
            self.versions
                .extend(planner.versions().iter().map(|(k, v)| (k.clone(), *v)));
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

/// Stops the log: after a failed write or flush the state on disk is unknown,
/// so nothing more is acknowledged on top of it.
fn fail(shared: &Shared, error: &str, replies: Vec<Reply>) {
    tracing::error!(error, "log commit failed; the log stops accepting appends");
    shared.failed.store(true, Ordering::Release);
    for (reply, _) in replies {
        let _ = reply.send(Err(StorageError::Io(error.to_owned())));
    }
}

/// Flushes whatever groups are waiting with one fsync, then publishes the
/// new durable head and answers their appenders.
fn flush_loop(shared: &Shared, rx: mpsc::Receiver<Applied>) {
    let mut durable = Position(shared.durable.load(Ordering::Acquire));
    while let Ok(first) = rx.recv() {
        let mut groups = vec![first];
        while let Ok(more) = rx.try_recv() {
            groups.push(more);
        }
        let replies = groups
            .iter_mut()
            .flat_map(|g| g.replies.drain(..))
            .collect::<Vec<_>>();
        // Groups arrive in apply order, so the last one holds the highest head;
        // every one of them was applied before this flush starts.
        let head = groups.iter().map(|g| g.head).max().unwrap_or(durable);
        if shared.failed.load(Ordering::Acquire) {
            fail(shared, "an earlier commit failed", replies);
            continue;
        }
        if head > durable {
            if let Err(e) = shared.db.flush() {
                fail(shared, &e.to_string(), replies);
                continue;
            }
            durable = head;
            shared.durable.store(head.0, Ordering::Release);
            shared.head_tx.send_replace(head);
        }
        for (reply, outcome) in replies {
            let _ = reply.send(outcome);
        }
    }
}

impl EventLog for SledLog {
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
        let mut out = Vec::with_capacity(limit.min(1024));
        let range = record_key(Position(start))..=record_key(durable);
        for (i, entry) in self.shared.log.range(range).take(limit).enumerate() {
            let (key, bytes) = entry?;
            let position = Position(be_u64(&key[1..])?);
            let expected = Position(start + i as u64);
            if position != expected {
                return Err(StorageError::Corrupt {
                    position: expected,
                    reason: "record missing (gap in positions)".into(),
                });
            }
            out.push(Record::decode(position, &bytes)?);
        }
        Ok(out)
    }

    fn read_at(&self, position: Position) -> Result<Option<Record>, StorageError> {
        self.get_record(position)
    }

    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let durable = self.durable();
        let start = stream_key(stream, from_version.max(1));
        let end = stream_key(stream, u64::MAX);
        let mut out = Vec::new();
        for entry in self.shared.log.range(start..=end) {
            if out.len() >= limit {
                break;
            }
            let (_, pos) = entry?;
            let position = Position(be_u64(&pos)?);
            if position > durable {
                break;
            }
            match self.get_record(position)? {
                Some(r) => out.push(r),
                None => break,
            }
        }
        Ok(out)
    }

    fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        let durable = self.durable();
        for entry in self.shared.log.scan_prefix(stream_prefix(stream)).rev() {
            let (key, pos) = entry?;
            if be_u64(&pos)? <= durable.0 {
                return be_u64(&key[key.len() - 8..]);
            }
        }
        Ok(0)
    }

    fn find_event(&self, event_id: Uuid) -> Result<Option<Appended>, StorageError> {
        find_event(&self.shared.log, event_id, self.durable().0)
    }
}

impl Checkpoints for SledLog {
    fn load_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.shared.checkpoints.get(name)?.map(|v| v.to_vec()))
    }

    fn store_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.shared.checkpoints.insert(name, bytes)?;
        self.shared.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
