//! Media faults on the real files of a closed log. Every fault must end in a
//! named failure (`Lost` naming the missing positions, or `Corrupt` naming a
//! position) or in a log whose every acknowledged record reads back byte for
//! byte; never in a log that opens shorter or returns other bytes. A refused
//! open must leave the directory as it found it, so `repair` can still use
//! every intact copy.
//!
//! A log of a few hundred events (several streams, several group commits,
//! payloads from a few bytes to 130 KiB, so that sled keeps some pages as
//! blobs) is written and closed once per test; each fault is then applied to
//! a fresh copy of it. The stored copies of each record are found by
//! searching the raw bytes of every file of the log directory (`db`,
//! `blobs/*`) for the frame magic and walking the frame (`src/frame.rs`),
//! cross-checked against every occurrence of each record's unique payload
//! marker.
//!
//! Default runs are small (about 30 faults: every copy of three records, an
//! early one, the 130 KiB one and the last; six truncations; the first block
//! of every file and three random ones). Wider runs:
//! `THREADLINE_FAULT_CASES=<n>` faults every copy of n records (the first, the
//! middle, the last, the rest random), n truncation offsets and n blocks of
//! each file; `THREADLINE_FAULT_CASES=all` every copy of every record and
//! every block of every file (25 took about 2 minutes on 2 cores). `THREADLINE_FAULT_SEED=<u64>` replays the choices of
//! a run (its seed is printed; sled's layout also depends on timing).
//! `THREADLINE_FAULT_VERBOSE=1` prints each fault's outcome and time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use threadline_storage::maintenance::{self, RepairError};
use threadline_storage::{
    evidence, salvage, EventLog, NewEvent, Position, Record, SledLog, SledOptions, StorageError,
    LOG_STREAM, LOSS_ACCEPTED,
};
use uuid::Uuid;

const MAGIC: &[u8; 8] = b"\x89TLFRM\x02\n";
const HEADER_LEN: usize = 40;
const BLOCK: usize = 4096;
const EVENTS: u64 = 200;
const BIG_PAYLOAD: usize = 130 * 1024;
const STREAMS: [&str; 5] = [
    "thread:alpha",
    "thread:beta",
    "thread:gamma",
    "agent:delta",
    "user:epsilon",
];

// ------------------------------------------------------------------ set-up

fn seeded_rng() -> StdRng {
    let seed = match std::env::var("THREADLINE_FAULT_SEED") {
        Ok(s) => s.parse().expect("THREADLINE_FAULT_SEED must be a u64"),
        Err(_) => rand::thread_rng().gen(),
    };
    eprintln!("fault seed {seed} (replay with THREADLINE_FAULT_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// `THREADLINE_FAULT_CASES`: None by default, `usize::MAX` for `all`.
fn cases_wanted() -> Option<usize> {
    let v = std::env::var("THREADLINE_FAULT_CASES").ok()?;
    if v == "all" {
        return Some(usize::MAX);
    }
    Some(
        v.parse()
            .expect("THREADLINE_FAULT_CASES must be a number or `all`"),
    )
}

/// The unique bytes every payload starts with.
fn marker(position: u64) -> Vec<u8> {
    format!("\u{1}rec#{position:06}\u{2}").into_bytes()
}

/// Appends `events` events to a new log in `dir` (over [`STREAMS`], one group
/// commit per batch of 1..=24, payload sizes varying, a 130 KiB one at 90 %
/// of the way), closes it, and returns every record as read back before the close.
fn fill(dir: &Path, events: u64, rng: &mut StdRng) -> Vec<Record> {
    let log = SledLog::open(dir, SledOptions::default()).unwrap();
    let big = events * 9 / 10;
    let mut next = 1u64;
    while next <= events {
        let n = rng.gen_range(1..=24u64).min(events + 1 - next);
        let batch: Vec<NewEvent> = (next..next + n)
            .map(|position| {
                let len = if position == big {
                    BIG_PAYLOAD
                } else if rng.gen_bool(0.15) {
                    rng.gen_range(512..=3 * 1024)
                } else {
                    rng.gen_range(0..=200)
                };
                let mut payload = marker(position);
                payload.extend((0..len).map(|_| rng.gen::<u8>()));
                NewEvent {
                    event_id: Uuid::new_v4(),
                    stream: STREAMS[rng.gen_range(0..STREAMS.len())].into(),
                    expected_version: None,
                    actor: "agent:fault".into(),
                    event_type: "message_posted".into(),
                    payload,
                }
            })
            .collect();
        // Appended one after another: each batch is its own group commit.
        let acks = log.append(batch).wait().unwrap();
        assert_eq!(acks.last().unwrap().position, Position(next + n - 1));
        next += n;
    }
    let records = log.read_from(Position(1), usize::MAX).unwrap();
    assert_eq!(records.len() as u64, events);
    log.close().unwrap();
    records
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The files of the log dir that hold log data (relative): `db` and `blobs/*`.
fn data_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("db")];
    if let Ok(blobs) = std::fs::read_dir(dir.join("blobs")) {
        for entry in blobs {
            out.push(Path::new("blobs").join(entry.unwrap().file_name()));
        }
    }
    out.sort();
    out
}

/// Every file's bytes, the durable-head record included.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = data_files(dir);
    files.push(evidence::EVIDENCE_FILE.into());
    files
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(dir.join(&f)).unwrap_or_default();
            (f, bytes)
        })
        .collect()
}

// ----------------------------------------------------------- stored copies

/// One stored copy of one record: bytes `start..end` of `file` are its slot
/// (length, checksum, body), in the frame copy whose header starts at
/// `frame_at`, after the slots whose length fields start at `before`.
#[derive(Debug, Clone)]
struct Copy {
    file: PathBuf,
    position: u64,
    frame_at: usize,
    before: Vec<usize>,
    start: usize,
    end: usize,
}

impl Copy {
    /// Whether a raw scan of `now` still finds this copy intact: the frame
    /// header, the length fields it is reached by and the slot itself unchanged.
    fn survives(&self, was: &[u8], now: &[u8]) -> bool {
        let same = |r: std::ops::Range<usize>| now.get(r.clone()) == Some(&was[r]);
        same(self.frame_at..self.frame_at + HEADER_LEN)
            && self.before.iter().all(|&at| same(at..at + 4))
            && same(self.start..self.end)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The intact record copies in `bytes`, by the frame layout of `src/frame.rs`.
fn copies_in(file: &Path, bytes: &[u8]) -> Vec<Copy> {
    let mut out = Vec::new();
    for at in memchr::memmem::find_iter(bytes, MAGIC) {
        let h = &bytes[at..];
        if h.len() < HEADER_LEN || crc32c::crc32c(&h[..36]) != u32_at(h, 36) {
            continue;
        }
        let (first, count) = (u64_at(h, 8), u64::from(u32_at(h, 16)));
        let end = (at + HEADER_LEN + u32_at(h, 32) as usize).min(bytes.len());
        let mut slot = at + HEADER_LEN;
        let mut before = Vec::new();
        for position in first..first + count {
            if slot + 8 > end {
                break;
            }
            let body = slot + 8..slot + 8 + u32_at(bytes, slot) as usize;
            if body.end > end {
                break;
            }
            let crc = crc32c::crc32c_append(
                crc32c::crc32c(&position.to_le_bytes()),
                &bytes[body.clone()],
            );
            if crc == u32_at(bytes, slot + 4) {
                out.push(Copy {
                    file: file.to_owned(),
                    position,
                    frame_at: at,
                    before: before.clone(),
                    start: slot,
                    end: body.end,
                });
            }
            before.push(slot);
            slot = body.end;
        }
    }
    out
}

/// A closed log, pristine: its records, its files' bytes and where each record is stored.
struct Pristine {
    _root: tempfile::TempDir,
    dir: PathBuf,
    records: Vec<Record>,
    files: BTreeMap<PathBuf, Vec<u8>>,
    copies: BTreeMap<u64, Vec<Copy>>,
}

impl Pristine {
    fn new(events: u64, rng: &mut StdRng) -> Pristine {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("log");
        let records = fill(&dir, events, rng);
        let files: BTreeMap<PathBuf, Vec<u8>> = data_files(&dir)
            .into_iter()
            .map(|f| {
                let bytes = std::fs::read(dir.join(&f)).unwrap();
                (f, bytes)
            })
            .collect();
        let mut copies: BTreeMap<u64, Vec<Copy>> = BTreeMap::new();
        for (file, bytes) in &files {
            for c in copies_in(file, bytes) {
                copies.entry(c.position).or_default().push(c);
            }
        }
        // Every record is stored, and every occurrence of its payload is one of its copies.
        for r in &records {
            let p = r.position.0;
            let found = copies.get(&p).map_or(&[][..], Vec::as_slice);
            assert!(!found.is_empty(), "no stored copy of position {p}");
            for (file, bytes) in &files {
                for at in memchr::memmem::find_iter(bytes, &marker(p)) {
                    assert!(
                        found
                            .iter()
                            .any(|c| &c.file == file && (c.start..c.end).contains(&at)),
                        "the payload of {p} at {}:{at} is in no frame copy found by its magic",
                        file.display()
                    );
                }
            }
        }
        let pristine = Pristine {
            _root: root,
            dir,
            records,
            files,
            copies,
        };
        let n: Vec<usize> = pristine.copies.values().map(Vec::len).collect();
        let sizes: Vec<String> = pristine
            .files
            .iter()
            .map(|(f, b)| format!("{} {} B", f.display(), b.len()))
            .collect();
        eprintln!(
            "{} records, {} stored copies ({}..={} a record) in {}",
            pristine.records.len(),
            n.iter().sum::<usize>(),
            n.iter().min().unwrap(),
            n.iter().max().unwrap(),
            sizes.join(", ")
        );
        pristine
    }

    fn head(&self) -> Position {
        Position(self.records.len() as u64)
    }

    /// A fresh copy of the log in a new temporary directory (as `<tmp>/log`).
    fn copy(&self) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("log");
        copy_dir(&self.dir, &dir);
        (root, dir)
    }

    /// Positions with no intact stored copy left in `dir`.
    fn gone_in(&self, dir: &Path) -> BTreeSet<u64> {
        let now: HashMap<&PathBuf, Vec<u8>> = self
            .files
            .keys()
            .map(|f| (f, std::fs::read(dir.join(f)).unwrap_or_default()))
            .collect();
        self.copies
            .iter()
            .filter(|(_, copies)| {
                !copies
                    .iter()
                    .any(|c| c.survives(&self.files[&c.file], &now[&c.file]))
            })
            .map(|(&p, _)| p)
            .collect()
    }

    /// The stored copies of `position` in `db`, by offset.
    fn db_copies(&self, position: u64) -> Vec<&Copy> {
        self.copies[&position]
            .iter()
            .filter(|c| c.file == Path::new("db"))
            .collect()
    }
}

fn ranges(positions: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in positions {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == p => *end = p,
            _ => out.push((p, p)),
        }
    }
    out
}

fn pairs(r: &[RangeInclusive<u64>]) -> Vec<(u64, u64)> {
    r.iter().map(|r| (*r.start(), *r.end())).collect()
}

// ------------------------------------------------------------------ faults

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Flip { file: PathBuf, at: usize, mask: u8 },
    ZeroBlock { file: PathBuf, block: usize },
    Truncate { file: PathBuf, len: usize },
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Flip { .. } => "flip a byte",
            Fault::ZeroBlock { .. } => "zero a 4 KiB block",
            Fault::Truncate { .. } => "truncate",
        }
    }

    fn apply(&self, dir: &Path) {
        match self {
            Fault::Flip { file, at, mask } => {
                let path = dir.join(file);
                let mut b = std::fs::read(&path).unwrap();
                b[*at] ^= mask;
                std::fs::write(&path, b).unwrap();
            }
            Fault::ZeroBlock { file, block } => {
                let path = dir.join(file);
                let mut b = std::fs::read(&path).unwrap();
                let end = (block + BLOCK).min(b.len());
                b[*block..end].fill(0);
                std::fs::write(&path, b).unwrap();
            }
            Fault::Truncate { file, len } => std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(file))
                .and_then(|f| f.set_len(*len as u64))
                .unwrap(),
        }
    }
}

/// How a fault ended (every one of them keeps the promise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Opened with every acknowledged record intact.
    Intact,
    /// Refused: `Lost` naming the positions left without any intact copy.
    LostNoCopy,
    /// Refused: `Lost` because sled's recovery would stop short (`recovered: Some`).
    LostRecovered,
    /// Refused: `Lost` naming no position (every position still has an intact copy).
    LostUnnamed,
    /// Refused: `Corrupt { position }`.
    Corrupt,
}

/// Fails the current case with a message; cases collect their failures so
/// that one run reports every fault that broke the promise.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Every acknowledged record reads back exactly, by every read path.
fn reads_everything(log: &SledLog, records: &[Record]) -> Result<(), String> {
    let head = Position(records.len() as u64);
    ensure!(
        log.head() == head,
        "opened with head {} instead of {head}: a silent shortfall",
        log.head()
    );
    let all = log
        .read_from(Position(1), usize::MAX)
        .map_err(|e| format!("read_from: {e}"))?;
    if let Some(i) = (0..records.len()).find(|&i| all.get(i) != Some(&records[i])) {
        return Err(format!("the record at {} reads back different", i + 1));
    }
    ensure!(all.len() == records.len(), "{} records read", all.len());
    for r in records.iter().step_by(7) {
        let got = log
            .read_at(r.position)
            .map_err(|e| format!("read_at: {e}"))?;
        ensure!(got.as_ref() == Some(r), "read_at({}) differs", r.position);
    }
    for stream in STREAMS {
        let want: Vec<&Record> = records.iter().filter(|r| r.stream == stream).collect();
        let got = log
            .read_stream(stream, 1, usize::MAX)
            .map_err(|e| format!("read_stream: {e}"))?;
        ensure!(
            got.iter().eq(want.iter().copied()),
            "stream {stream} differs"
        );
        ensure!(
            log.stream_version(stream) == Ok(want.len() as u64),
            "the version of {stream}"
        );
    }
    let last = records.last().unwrap();
    let found = log
        .find_event(last.event_id)
        .map_err(|e| format!("find_event: {e}"))?;
    ensure!(
        found.map(|a| a.position) == Some(last.position),
        "find_event of the last record"
    );
    Ok(())
}

/// Applies `fault` to a fresh copy of the pristine log and checks the promise;
/// with `repair`, a refused open is then taken through `maintenance::repair`.
fn run_case(pristine: &Pristine, fault: &Fault, repair: bool) -> Result<Outcome, String> {
    let (_root, dir) = pristine.copy();
    fault.apply(&dir);
    let gone = pristine.gone_in(&dir);
    let acknowledged = pristine.head();

    // The raw scan names exactly the positions left without an intact copy.
    let scan = salvage::scan(&dir, false).map_err(|e| format!("scan: {e}"))?;
    ensure!(
        scan.acknowledged() == acknowledged,
        "the scan reads the acknowledged head as {}",
        scan.acknowledged()
    );
    let named = pairs(&scan.missing(acknowledged));
    ensure!(
        named == ranges(&gone),
        "the scan names {named:?} missing, the positions without an intact copy are {:?}",
        ranges(&gone)
    );

    let before = snapshot(&dir);
    let outcome = match SledLog::open(&dir, SledOptions::default()) {
        Ok(log) => {
            ensure!(
                gone.is_empty(),
                "opened although {:?} have no intact copy",
                ranges(&gone)
            );
            let read = reads_everything(&log, &pristine.records);
            log.close().unwrap();
            read?;
            Outcome::Intact
        }
        Err(StorageError::Lost(report)) => {
            let changed: Vec<PathBuf> = snapshot(&dir)
                .into_iter()
                .filter(|(f, b)| before.get(f) != Some(b))
                .map(|(f, _)| f)
                .collect();
            if !changed.is_empty() {
                return Err(format!(
                    "the refused open changed {changed:?}: positions without an intact copy \
                     were {:?} before it, {:?} after it (the scan saw {} damaged copies); {report}",
                    ranges(&gone),
                    ranges(&pristine.gone_in(&dir)),
                    scan.damaged_upto(acknowledged).count(),
                ));
            }
            ensure!(report.acknowledged == acknowledged, "{report}");
            // `missing` is exactly the positions with no intact copy left; a
            // log sled would shorten although every copy exists names where
            // sled's recovery stops (or that it fails) instead.
            ensure!(
                report.missing == ranges(&gone),
                "Lost names {:?}, gone are {:?}: {report}",
                report.missing,
                ranges(&gone)
            );
            match report.recovered {
                _ if !report.missing.is_empty() => Outcome::LostNoCopy,
                Some(head) => {
                    ensure!(head < acknowledged, "{report}");
                    Outcome::LostRecovered
                }
                None => {
                    ensure!(
                        report.reason.contains("sled"),
                        "an unnamed refusal: {report}"
                    );
                    Outcome::LostUnnamed
                }
            }
        }
        Err(StorageError::Corrupt { position, reason }) => {
            ensure!(
                position.0 >= 1 && position <= acknowledged,
                "Corrupt at {position} ({reason})"
            );
            Outcome::Corrupt
        }
        Err(other) => return Err(format!("an unnamed failure: {other:?}")),
    };
    if repair && outcome != Outcome::Intact {
        check_repair(pristine, &dir, &gone)?;
    }
    Ok(outcome)
}

/// `repair` without accepting loss recovers every record when each has an
/// intact copy, and otherwise changes nothing and names the missing ranges;
/// accepting the loss keeps everything before the first missing position,
/// followed by the `$log` stream's `log_loss_accepted` record.
fn check_repair(pristine: &Pristine, dir: &Path, gone: &BTreeSet<u64>) -> Result<(), String> {
    match maintenance::repair(dir, false, "test") {
        Ok(repaired) => {
            ensure!(
                gone.is_empty(),
                "repair recovered {gone:?}, which have no copy"
            );
            ensure!(
                repaired.lost.is_empty() && repaired.head == pristine.head(),
                "repair: {repaired:?}"
            );
            ensure!(repaired.kept.exists(), "repair kept nothing");
            let log = SledLog::open(dir, SledOptions::default())
                .map_err(|e| format!("the repaired log does not open: {e}"))?;
            let read = reads_everything(&log, &pristine.records);
            log.close().unwrap();
            read.map_err(|e| format!("repaired: {e}"))
        }
        Err(RepairError::LossNotAccepted {
            acknowledged,
            missing,
        }) => {
            let first = gone.first().copied().unwrap_or(0);
            ensure!(
                acknowledged == pristine.head() && !gone.is_empty(),
                "repair refused ({missing}) though every position has an intact copy"
            );
            ensure!(
                missing.starts_with(&first.to_string()),
                "repair names {missing}, gone are {:?}",
                ranges(gone)
            );
            let repaired = maintenance::repair(dir, true, "test")
                .map_err(|e| format!("repair accepting loss: {e}"))?;
            ensure!(
                repaired.kept.exists(),
                "repair must keep the damaged log: {repaired:?}"
            );
            ensure!(
                repaired.lost.first().map(|l| l.0) == Some(first),
                "{repaired:?}"
            );
            let log = SledLog::open(dir, SledOptions::default())
                .map_err(|e| format!("the repaired log does not open: {e}"))?;
            let checked = (|| {
                ensure!(
                    log.head() == Position(first),
                    "repaired head {}",
                    log.head()
                );
                let all = log
                    .read_from(Position(1), usize::MAX)
                    .map_err(|e| e.to_string())?;
                let kept = first as usize - 1;
                ensure!(
                    all[..kept] == pristine.records[..kept],
                    "records before the loss differ"
                );
                let loss = &all[kept];
                ensure!(
                    loss.stream == LOG_STREAM && loss.event_type == LOSS_ACCEPTED,
                    "{loss:?}"
                );
                Ok(())
            })();
            log.close().unwrap();
            checked
        }
        Err(e) => Err(format!("repair failed: {e}")),
    }
}

/// Runs `faults`, prints the outcomes per kind of fault, and fails listing
/// every fault that broke the promise.
fn run_all(pristine: &Pristine, faults: &[Fault], repair_every: usize) {
    let started = std::time::Instant::now();
    let verbose = std::env::var_os("THREADLINE_FAULT_VERBOSE").is_some();
    let mut outcomes: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, fault) in faults.iter().enumerate() {
        let case_started = std::time::Instant::now();
        let result = run_case(pristine, fault, i % repair_every == 0);
        if verbose {
            eprintln!("{fault:?}: {result:?} in {:?}", case_started.elapsed());
        }
        let label = match &result {
            Ok(o) => format!("{o:?}"),
            Err(_) => "FAILED".into(),
        };
        *outcomes
            .entry(fault.kind())
            .or_default()
            .entry(label)
            .or_default() += 1;
        if let Err(e) = result {
            failures.push(format!("{fault:?}: {e}"));
        }
    }
    for (kind, counts) in &outcomes {
        eprintln!(
            "{kind}: {} cases: {counts:?}",
            counts.values().sum::<usize>()
        );
    }
    eprintln!("{} cases in {:?}", faults.len(), started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {} faults broke the promise:\n{}",
        failures.len(),
        faults.len(),
        failures.join("\n")
    );
}

/// The records whose every copy is faulted.
fn targets(pristine: &Pristine, rng: &mut StdRng) -> Vec<u64> {
    let head = pristine.head().0;
    let big = pristine
        .records
        .iter()
        .max_by_key(|r| r.payload.len())
        .unwrap()
        .position
        .0;
    let (mut t, n): (BTreeSet<u64>, usize) = match cases_wanted() {
        Some(usize::MAX) => return (1..=head).collect(),
        Some(n) => ([1, head / 2, head].into(), n),
        None => ([head / 4, big, head].into(), 3),
    };
    while t.len() < n.min(head as usize) {
        t.insert(rng.gen_range(1..=head));
    }
    t.into_iter().collect()
}

// ------------------------------------------------------------------- tests

#[test]
fn every_stored_copy_of_a_record_survives_a_flipped_byte_or_a_zeroed_block_detectably() {
    let mut rng = seeded_rng();
    let pristine = Pristine::new(EVENTS, &mut rng);
    let targets = targets(&pristine, &mut rng);
    let mut flips = BTreeSet::new();
    let mut zeroes = BTreeSet::new();
    for p in &targets {
        for c in &pristine.copies[p] {
            let at = rng.gen_range(c.start..c.end);
            flips.insert(Fault::Flip {
                file: c.file.clone(),
                at,
                mask: rng.gen_range(1..=255),
            });
            zeroes.insert(Fault::ZeroBlock {
                file: c.file.clone(),
                block: at / BLOCK * BLOCK,
            });
        }
    }
    eprintln!(
        "every copy of positions {targets:?}: {} flipped bytes, {} zeroed blocks",
        flips.len(),
        zeroes.len()
    );
    let faults: Vec<Fault> = flips.into_iter().chain(zeroes).collect();
    run_all(&pristine, &faults, 5);
}

#[test]
fn a_zeroed_block_anywhere_in_the_files_is_detected_or_intact() {
    // Blocks chosen without regard to record copies: the first block of each
    // file (sled's segment and blob headers), then random ones.
    let mut rng = seeded_rng();
    let pristine = Pristine::new(EVENTS, &mut rng);
    let mut blocks = BTreeSet::new();
    for (file, bytes) in &pristine.files {
        let n = bytes.len().div_ceil(BLOCK);
        let wanted = match cases_wanted() {
            Some(usize::MAX) => n,
            Some(k) => k.min(n),
            None if file == Path::new("db") => 4.min(n),
            None => 1,
        };
        blocks.insert(Fault::ZeroBlock {
            file: file.clone(),
            block: 0,
        });
        let mut chosen = 1;
        while chosen < wanted {
            let block = if wanted == n {
                chosen
            } else {
                rng.gen_range(0..n)
            };
            chosen += usize::from(blocks.insert(Fault::ZeroBlock {
                file: file.clone(),
                block: block * BLOCK,
            }));
        }
    }
    let faults: Vec<Fault> = blocks.into_iter().collect();
    run_all(&pristine, &faults, 4);
}

#[test]
fn a_truncated_db_is_detected_or_intact() {
    let mut rng = seeded_rng();
    let pristine = Pristine::new(EVENTS, &mut rng);
    let len = pristine.files[Path::new("db")].len();
    let n = cases_wanted().map_or(6, |n| n.min(len));
    let mut cuts: BTreeSet<usize> = BTreeSet::new();
    // Inside the last stored copy of the last record, then anywhere.
    if let Some(c) = pristine.db_copies(pristine.head().0).last() {
        cuts.insert((c.start + c.end) / 2);
    }
    while cuts.len() < n {
        cuts.insert(rng.gen_range(0..len));
    }
    let faults: Vec<Fault> = cuts
        .into_iter()
        .map(|len| Fault::Truncate {
            file: "db".into(),
            len,
        })
        .collect();
    run_all(&pristine, &faults, 2);
}

/// Issue 10's case at storage level: ~250 events, one byte flipped in the
/// middle of `db` inside a stored frame of an early position. Before format 2
/// sled's recovery stopped at the damaged message and the log reopened with
/// head 53 instead of 254, and nothing said so.
#[test]
fn a_flipped_byte_in_sled_file_never_shortens_the_log_silently() {
    let mut rng = seeded_rng();
    let pristine = Pristine::new(250, &mut rng);
    let target = 50;
    let copies = pristine.db_copies(target);
    assert!(!copies.is_empty(), "position {target} has no copy in db");
    for (i, c) in copies.into_iter().enumerate() {
        let fault = Fault::Flip {
            file: c.file.clone(),
            at: (c.start + c.end) / 2,
            mask: 0x5a,
        };
        let what = format!("{fault:?} (a copy of position {target})");
        // Serving: a named refusal, or the whole log (and, checked on the
        // first copy, `repair` rebuilds all 250 from the other copies).
        let outcome = run_case(&pristine, &fault, i == 0).unwrap_or_else(|e| panic!("{what}: {e}"));
        eprintln!("{what}: {outcome:?}");

        // `verify` and `audit` open with `tolerate_damage`: never a shorter head either.
        let (_root, dir) = pristine.copy();
        fault.apply(&dir);
        match SledLog::open(&dir, tolerant()) {
            Ok(log) => {
                assert_eq!(log.head(), pristine.head(), "{what}: tolerant open");
                log.close().unwrap();
            }
            Err(StorageError::Lost(report)) => {
                assert!(
                    !report.missing.is_empty()
                        || report.recovered.is_some_and(|h| h < report.acknowledged)
                        || report.reason.contains("sled"),
                    "{what}: {report}"
                );
            }
            Err(StorageError::Corrupt { .. }) => {}
            Err(other) => panic!("{what}: tolerant open: {other:?}"),
        }
    }
}

/// Repair, deterministically: one damaged copy of a record leaves others to
/// rebuild from (nothing lost); every copy damaged needs the operator to
/// accept the loss, which the log then records.
#[test]
fn repair_rebuilds_from_intact_copies_and_records_an_accepted_loss() {
    let mut rng = seeded_rng();
    let pristine = Pristine::new(EVENTS, &mut rng);
    let target = 60;
    let copies = &pristine.copies[&target];
    let flip = |dir: &Path, c: &Copy| {
        Fault::Flip {
            file: c.file.clone(),
            at: (c.start + c.end) / 2,
            mask: 0xff,
        }
        .apply(dir)
    };

    // One copy damaged (when there are others): repair recovers everything.
    if copies.len() > 1 {
        let (_root, dir) = pristine.copy();
        flip(&dir, &copies[0]);
        let repaired = maintenance::repair(&dir, false, "test").unwrap();
        assert!(repaired.lost.is_empty(), "{repaired:?}");
        assert_eq!(repaired.head, pristine.head());
        assert!(repaired.kept.exists());
        let log = SledLog::open(&dir, SledOptions::default()).unwrap();
        reads_everything(&log, &pristine.records).unwrap();
        log.close().unwrap();
    }

    // Every copy damaged: a named refusal, then an explicit, recorded loss.
    let (_root, dir) = pristine.copy();
    for c in copies {
        flip(&dir, c);
    }
    match SledLog::open(&dir, SledOptions::default()) {
        Err(StorageError::Lost(report)) => {
            assert_eq!(report.missing, vec![(target, target)], "{report}");
            assert_eq!(report.recovered, None, "{report}");
        }
        other => panic!("expected Lost naming {target}: {other:?}"),
    }
    match maintenance::repair(&dir, false, "test") {
        Err(RepairError::LossNotAccepted {
            acknowledged,
            missing,
        }) => {
            assert_eq!(acknowledged, pristine.head());
            assert_eq!(missing, target.to_string());
        }
        other => panic!("expected LossNotAccepted: {other:?}"),
    }
    let repaired = maintenance::repair(&dir, true, "alice").unwrap();
    assert_eq!(repaired.acknowledged, pristine.head());
    assert_eq!(repaired.lost, vec![(target, pristine.head().0)]);
    assert_eq!(repaired.dropped_intact, pristine.head().0 - target);
    assert_eq!(repaired.head, Position(target));
    assert!(repaired.kept.exists(), "the damaged log is kept");
    let kept = salvage::scan(&repaired.kept, false).unwrap();
    assert_eq!(
        pairs(&kept.missing(pristine.head())),
        vec![(target, target)]
    );

    let log = SledLog::open(&dir, SledOptions::default()).unwrap();
    assert_eq!(log.head(), Position(target));
    let all = log.read_from(Position(1), usize::MAX).unwrap();
    assert_eq!(
        all[..target as usize - 1],
        pristine.records[..target as usize - 1]
    );
    let loss = &all[target as usize - 1];
    assert_eq!(loss.position, Position(target));
    assert_eq!((loss.stream.as_str(), loss.stream_version), (LOG_STREAM, 1));
    assert_eq!(loss.event_type, LOSS_ACCEPTED);
    assert_eq!(loss.actor, "operator:alice");
    let payload = String::from_utf8(loss.payload.clone()).unwrap();
    assert!(
        payload.contains(&format!("\"lost_from\":{target}")),
        "{payload}"
    );
    assert_eq!(log.stream_version(LOG_STREAM).unwrap(), 1);
    // The repaired log goes on from there.
    let next = log
        .append(vec![NewEvent {
            event_id: Uuid::new_v4(),
            stream: STREAMS[0].into(),
            expected_version: None,
            actor: "agent:fault".into(),
            event_type: "message_posted".into(),
            payload: b"after the repair".to_vec(),
        }])
        .wait()
        .unwrap();
    assert_eq!(next[0].position, Position(target + 1));
    log.close().unwrap();
}

// ---------------------------------------------------------------- evidence

fn small_log() -> (tempfile::TempDir, PathBuf, Vec<Record>) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("log");
    let records = fill(&dir, 30, &mut StdRng::seed_from_u64(30));
    (root, dir, records)
}

/// The open `verify` and `audit` use.
fn tolerant() -> SledOptions {
    SledOptions {
        create: false,
        tolerate_damage: true,
        lazy_indexes: true,
        ..SledOptions::default()
    }
}

#[test]
fn a_non_empty_log_without_its_durable_head_record_is_refused() {
    let (_root, dir, records) = small_log();
    std::fs::remove_file(dir.join(evidence::EVIDENCE_FILE)).unwrap();
    match SledLog::open(&dir, SledOptions::default()) {
        Err(StorageError::Lost(report)) => {
            assert!(
                report.reason.contains(evidence::EVIDENCE_FILE)
                    && report.reason.contains("missing"),
                "the reason must name the missing record: {report}"
            );
        }
        other => panic!("expected Lost: {other:?}"),
    }
    assert!(
        !dir.join(evidence::EVIDENCE_FILE).exists(),
        "a refused open must not write a new record"
    );
    // `verify` still reads every record.
    let log = SledLog::open(&dir, tolerant()).unwrap();
    reads_everything(&log, &records).unwrap();
    log.close().unwrap();
}

#[test]
fn one_damaged_durable_head_slot_still_opens_and_two_are_refused() {
    let (_root, pristine, records) = small_log();
    let damage = |dir: &Path, slot: usize| {
        let path = dir.join(evidence::EVIDENCE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[slot * 4096 + 25] ^= 0xff; // inside the head field
        std::fs::write(&path, bytes).unwrap();
    };
    for slot in [0, 1] {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("log");
        copy_dir(&pristine, &dir);
        damage(&dir, slot);
        let log = SledLog::open(&dir, SledOptions::default())
            .unwrap_or_else(|e| panic!("slot {slot} damaged: {e}"));
        reads_everything(&log, &records).unwrap();
        log.close().unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("log");
    copy_dir(&pristine, &dir);
    damage(&dir, 0);
    damage(&dir, 1);
    match SledLog::open(&dir, SledOptions::default()) {
        Err(StorageError::Lost(report)) => {
            assert!(report.reason.contains("damaged"), "{report}");
        }
        other => panic!("expected Lost: {other:?}"),
    }
}
