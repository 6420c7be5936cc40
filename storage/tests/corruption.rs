//! Corruption behind the log's back, done through sled itself on the layout
//! documented in `src/sled_log.rs` (format 2: tree `log`, `G` + first
//! position as u64 BE → one frame of consecutive records, `h` → head).
//!
//! A damaged, missing or misplaced record is reported as
//! `StorageError::Corrupt` naming its position, never returned as data.
//! Serving (`SledOptions::default()`) refuses to open such a log at all; the
//! tolerant open that `verify` and `audit` use still opens it, names each
//! damaged position on read and returns every other record unchanged.
//! (Damage to the files themselves, below sled, is in `faults.rs`.)

use std::ops::Range;
use std::path::{Path, PathBuf};

use threadline_storage::{
    EventLog, NewEvent, Position, Record, SledLog, SledOptions, StorageError,
};
use uuid::Uuid;

const EVENTS: u64 = 12;
/// One group commit per batch, so frames start at 1, 4, 5, 9 and 11.
const BATCHES: [u64; 5] = [3, 1, 4, 2, 2];
const FRAMES: [u64; 5] = [1, 4, 5, 9, 11];

/// The open `verify` and `audit` use (they build the indexes lazily; a
/// tolerant open that builds them at once must read the same).
fn tolerant(lazy_indexes: bool) -> SledOptions {
    SledOptions {
        create: false,
        tolerate_damage: true,
        lazy_indexes,
        ..SledOptions::default()
    }
}

fn frame_key(first: u64) -> Vec<u8> {
    let mut k = vec![b'G'];
    k.extend_from_slice(&first.to_be_bytes());
    k
}

fn stream_of(i: u64) -> &'static str {
    if i.is_multiple_of(2) {
        "thread:even"
    } else {
        "thread:odd"
    }
}

/// A fresh, closed log with `EVENTS` events in `BATCHES` (in `<tmp>/log`, so
/// that anything the log writes beside its directory stays in the temporary one).
fn filled_log() -> (tempfile::TempDir, PathBuf, Vec<Record>) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("log");
    let log = SledLog::open(&dir, SledOptions::default()).unwrap();
    let mut i = 0;
    for n in BATCHES {
        let batch = (i..i + n)
            .map(|i| NewEvent {
                event_id: Uuid::new_v4(),
                stream: stream_of(i).into(),
                expected_version: None,
                actor: "user:test".into(),
                event_type: "message_posted".into(),
                payload: format!("payload number {i} with some length to it").into_bytes(),
            })
            .collect();
        log.append(batch).wait().unwrap();
        i += n;
    }
    let records = log.read_from(Position(1), 100).unwrap();
    assert_eq!(records.len() as u64, EVENTS);
    log.close().unwrap();
    (root, dir, records)
}

/// Opens the closed log's sled db directly, waiting (with a deadline) for the
/// lock that sled releases from a background thread after a close.
fn raw_open(dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("opening {}: {e}", dir.display()),
        }
    }
}

/// Lets `damage` edit the "log" tree of the closed log, through sled.
fn tamper(dir: &Path, damage: impl FnOnce(&sled::Tree)) {
    let db = raw_open(dir);
    let tree = db.open_tree("log").unwrap();
    damage(&tree);
    tree.flush().unwrap();
    db.flush().unwrap();
}

fn frame(tree: &sled::Tree, first: u64) -> Vec<u8> {
    tree.get(frame_key(first)).unwrap().unwrap().to_vec()
}

/// The byte range of `position`'s body inside the frame value `bytes`
/// (header 40 bytes, then per record: len u32 LE, crc u32 LE, body).
fn body_of(bytes: &[u8], first: u64, position: u64) -> Range<usize> {
    let mut at = 40;
    for p in first.. {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if p == position {
            return at + 8..at + 8 + len;
        }
        at += 8 + len;
    }
    unreachable!()
}

fn assert_corrupt_at<T: std::fmt::Debug>(result: Result<T, StorageError>, at: u64, what: &str) {
    match result {
        Err(StorageError::Corrupt { position, .. }) => {
            assert_eq!(position, Position(at), "{what}: wrong position named")
        }
        other => panic!("{what}: expected Corrupt at {at}, got {other:?}"),
    }
}

/// Serving refuses the log, naming a damaged position.
fn assert_serving_refuses(dir: &Path, named: &[u64], what: &str) {
    match SledLog::open(dir, SledOptions::default()).map(|_| ()) {
        Err(StorageError::Corrupt { position, .. }) if named.contains(&position.0) => {}
        other => {
            panic!("{what}: serving must refuse with Corrupt at one of {named:?}, got {other:?}")
        }
    }
}

/// The tolerant open reads every record outside `bad` unchanged (singly and
/// in ranges up to it and from after it), each one in `bad` as `Corrupt`
/// naming it, and every range across them as `Corrupt` naming the first.
fn assert_tolerant_reads(dir: &Path, records: &[Record], bad: Range<u64>, what: &str) {
    for lazy in [true, false] {
        tolerant_reads(
            dir,
            records,
            bad.clone(),
            &format!("{what} (lazy indexes: {lazy})"),
            lazy,
        );
    }
}

fn tolerant_reads(dir: &Path, records: &[Record], bad: Range<u64>, what: &str, lazy: bool) {
    let log = SledLog::open(dir, tolerant(lazy))
        .unwrap_or_else(|e| panic!("{what}: the tolerant open fails: {e}"));
    assert_eq!(
        log.head(),
        Position(EVENTS),
        "{what}: damage must not move the head"
    );
    for r in records {
        let p = r.position.0;
        if bad.contains(&p) {
            assert_corrupt_at(log.read_at(r.position), p, &format!("{what}: read_at"));
            assert_corrupt_at(
                log.read_from(r.position, 1),
                p,
                &format!("{what}: read_from"),
            );
        } else {
            assert_eq!(log.read_at(r.position).unwrap().as_ref(), Some(r), "{what}");
        }
    }
    let (first, end) = (bad.start, bad.end);
    assert_corrupt_at(
        log.read_from(Position(1), 100),
        first,
        &format!("{what}: read_from 1"),
    );
    assert_corrupt_at(
        log.read_from(Position(first - 1), 3),
        first,
        &format!("{what}: a page across it"),
    );
    let before = (first - 1) as usize;
    assert_eq!(
        log.read_from(Position(1), before).unwrap(),
        records[..before],
        "{what}"
    );
    let after = (end - 1) as usize;
    assert_eq!(
        log.read_from(Position(end), 100).unwrap(),
        records[after..],
        "{what}"
    );
    log.close().unwrap();
}

#[test]
fn a_flipped_byte_in_a_stored_frame_names_its_position() {
    let (_root, dir, records) = filled_log();
    let bad = 6u64; // the second record of the frame at 5
    tamper(&dir, |tree| {
        let mut value = frame(tree, 5);
        let body = body_of(&value, 5, bad);
        value[(body.start + body.end) / 2] ^= 0x5a;
        tree.insert(frame_key(5), value).unwrap();
    });
    assert_serving_refuses(&dir, &[bad], "flipped byte");
    assert_tolerant_reads(&dir, &records, bad..bad + 1, "flipped byte");
}

#[test]
fn flipped_bytes_anywhere_in_a_stored_frame_are_never_read_as_data() {
    // Header, record headers and bodies: a sample of offsets by default, every
    // byte with THREADLINE_FAULT_CASES=all.
    let (_root, dir, records) = filled_log();
    let original = frame(&raw_open(&dir).open_tree("log").unwrap(), 5);
    let every = std::env::var("THREADLINE_FAULT_CASES").is_ok_and(|v| v == "all");
    let offsets: Vec<usize> = if every {
        (0..original.len()).collect()
    } else {
        let mut o = vec![0, 9, 17, 37, 40, 44];
        o.extend((48..original.len()).step_by(original.len() / 5));
        o.push(original.len() - 1);
        o
    };
    for i in offsets {
        tamper(&dir, |tree| {
            let mut value = original.clone();
            value[i] ^= 0x01;
            tree.insert(frame_key(5), value).unwrap();
        });
        let what = format!("byte {i} of {}", original.len());
        match SledLog::open(&dir, SledOptions::default()).map(|_| ()) {
            Err(StorageError::Corrupt { position, .. }) => {
                assert!(
                    (5..=8).contains(&position.0),
                    "{what}: Corrupt at {position}"
                )
            }
            other => panic!("{what}: serving must refuse: {other:?}"),
        }
        let log = SledLog::open(&dir, tolerant(true)).unwrap();
        let mut named = 0;
        for r in &records {
            match log.read_at(r.position) {
                Ok(Some(got)) => assert_eq!(&got, r, "{what}: a damaged record read as data"),
                Err(StorageError::Corrupt { position, .. }) => {
                    assert!((5..=8).contains(&position.0), "{what}: {position}");
                    named += 1;
                }
                other => panic!("{what}: read_at({}): {other:?}", r.position),
            }
        }
        assert!(named > 0, "{what}: the flip went unnoticed");
        log.close().unwrap();
    }
}

#[test]
fn a_removed_frame_is_a_gap_naming_its_positions() {
    let (_root, dir, records) = filled_log();
    tamper(&dir, |tree| {
        assert!(tree.remove(frame_key(5)).unwrap().is_some());
    });
    assert_serving_refuses(&dir, &[5], "removed frame");
    assert_tolerant_reads(&dir, &records, 5..9, "removed frame");
}

#[test]
fn a_frame_under_the_wrong_key_is_never_read_at_the_wrong_positions() {
    // The frame of 5..=8, intact, moved to the key of position 6.
    let (_root, dir, records) = filled_log();
    tamper(&dir, |tree| {
        let value = frame(tree, 5);
        tree.remove(frame_key(5)).unwrap();
        tree.insert(frame_key(6), value).unwrap();
    });
    assert_serving_refuses(&dir, &[5, 6], "moved frame");
    assert_tolerant_reads(&dir, &records, 5..9, "moved frame");
}

#[test]
fn a_removed_last_frame_is_refused_and_the_rest_stays_readable() {
    // The head marker says 12 but the frame holding 11 and 12 is gone: recovery
    // must not quietly shrink the log (that would un-acknowledge events).
    let (_root, dir, records) = filled_log();
    let last = *FRAMES.last().unwrap();
    tamper(&dir, |tree| {
        assert!(tree.remove(frame_key(last)).unwrap().is_some());
    });
    assert_serving_refuses(&dir, &[last, EVENTS], "removed last frame");
    assert_tolerant_reads(&dir, &records, last..EVENTS + 1, "removed last frame");
}

#[test]
fn a_record_unreadable_after_a_broken_length_is_named_by_its_own_position() {
    // A flipped bit in the length of the frame's first record (5) leaves the
    // rest of the frame unreadable: reading 7 must name 7, not 5 or 6.
    let (_root, dir, records) = filled_log();
    tamper(&dir, |tree| {
        let mut value = frame(tree, 5);
        value[40] ^= 0x01;
        tree.insert(frame_key(5), value).unwrap();
    });
    let log = SledLog::open(&dir, tolerant(true)).unwrap();
    for p in 5..=8 {
        assert_corrupt_at(log.read_at(Position(p)), p, &format!("read_at({p})"));
    }
    assert_eq!(
        log.read_at(Position(9)).unwrap().as_ref(),
        Some(&records[8])
    );
    log.close().unwrap();
}

type Damage = fn(&sled::Tree);

#[test]
fn a_stream_read_across_a_damaged_record_never_skips_it() {
    // The tolerant open leaves a damaged record out of the stream index; a
    // stream read across it must still say so rather than return the stream
    // without it (versions 1, 2, 4, … and no error).
    let cases: [(&str, Damage); 2] = [
        ("flipped byte at 6", |tree| {
            let mut value = frame(tree, 5);
            let body = body_of(&value, 5, 6);
            value[(body.start + body.end) / 2] ^= 0x5a;
            tree.insert(frame_key(5), value).unwrap();
        }),
        ("removed frame 5..=8", |tree| {
            tree.remove(frame_key(5)).unwrap();
        }),
    ];
    for (what, damage) in cases {
        let (_root, dir, records) = filled_log();
        tamper(&dir, damage);
        let damaged = if what.starts_with("flipped") {
            6..7
        } else {
            5..9
        };
        for lazy in [true, false] {
            let what = &format!("{what} (lazy indexes: {lazy})");
            let log = SledLog::open(&dir, tolerant(lazy)).unwrap();
            for stream in ["thread:even", "thread:odd"] {
                let own: Vec<&Record> = records.iter().filter(|r| r.stream == stream).collect();
                let Some(first_bad) = own.iter().find(|r| damaged.contains(&r.position.0)) else {
                    continue;
                };
                let read = log.read_stream(stream, 1, 100).map(|rs| {
                    rs.iter()
                        .map(|r| (r.position.0, r.stream_version))
                        .collect::<Vec<_>>()
                });
                let named = matches!(&read, Err(StorageError::Corrupt { position, .. })
                    if damaged.contains(&position.0));
                assert!(
                    named,
                    "{what}: read_stream({stream}) across the damaged record at {} must name it; \
                     it returned (position, version) {read:?}",
                    first_bad.position,
                );
                let intact_before = own
                    .iter()
                    .take_while(|r| r.position < first_bad.position)
                    .count();
                assert_eq!(
                    log.read_stream(stream, 1, intact_before).unwrap().len(),
                    intact_before,
                    "{what}: {stream} before the damage"
                );
            }
            log.close().unwrap();
        }
    }
}
