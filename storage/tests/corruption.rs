//! Corruption: damage done to stored records behind the log's back is reported
//! as `StorageError::Corrupt` naming the damaged position, never returned as data.
//!
//! The damage is done with sled directly, on the layout documented in
//! `src/sled_log.rs` (`e` + position as u64 BE → encoded record, tree "log").

use std::path::Path;

use threadline_storage::{
    EventLog, NewEvent, Position, Record, SledLog, SledOptions, StorageError,
};
use uuid::Uuid;

const EVENTS: u64 = 12;

fn record_key(position: u64) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(&position.to_be_bytes());
    k
}

/// A fresh log with `EVENTS` events (positions 1..=EVENTS) on two streams, closed.
fn filled_log(dir: &Path) -> Vec<Record> {
    let log = SledLog::open(dir, SledOptions::default()).unwrap();
    for i in 0..EVENTS {
        let stream = if i % 2 == 0 {
            "thread:even"
        } else {
            "thread:odd"
        };
        log.append(vec![NewEvent {
            event_id: Uuid::new_v4(),
            stream: stream.into(),
            expected_version: None,
            actor: "user:test".into(),
            event_type: "message_posted".into(),
            payload: format!("payload number {i} with some length to it").into_bytes(),
        }])
        .wait()
        .unwrap();
    }
    let records = log.read_from(Position(1), 100).unwrap();
    assert_eq!(records.len() as u64, EVENTS);
    log.close().unwrap();
    records
}

/// Opens the closed log with sled itself and lets `damage` edit the "log" tree.
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

fn tamper(dir: &Path, damage: impl FnOnce(&sled::Tree)) {
    let db = raw_open(dir);
    let tree = db.open_tree("log").unwrap();
    damage(&tree);
    tree.flush().unwrap();
    db.flush().unwrap();
}

fn assert_corrupt_at<T: std::fmt::Debug>(result: Result<T, StorageError>, at: u64, what: &str) {
    match result {
        Err(StorageError::Corrupt { position, .. }) => {
            assert_eq!(position, Position(at), "{what}: wrong position named")
        }
        other => panic!("{what}: expected Corrupt at {at}, got {other:?}"),
    }
}

#[test]
fn flipped_byte_is_a_checksum_error_naming_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let records = filled_log(dir.path());
    let bad = 7u64;
    tamper(dir.path(), |tree| {
        let mut value = tree.get(record_key(bad)).unwrap().unwrap().to_vec();
        let mid = value.len() / 2;
        value[mid] ^= 0x5a;
        tree.insert(record_key(bad), value).unwrap();
    });

    let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
    assert_eq!(
        log.head(),
        Position(EVENTS),
        "corruption must not move the head"
    );

    assert_corrupt_at(log.read_at(Position(bad)), bad, "read_at");
    assert_corrupt_at(log.read_from(Position(1), 100), bad, "read_from from 1");
    assert_corrupt_at(log.read_from(Position(bad), 1), bad, "read_from at it");
    assert_corrupt_at(log.read_from(Position(bad - 2), 5), bad, "page across it");
    let damaged = &records[(bad - 1) as usize];
    assert_corrupt_at(
        log.read_stream(&damaged.stream, 1, 100),
        bad,
        "read_stream across it",
    );
    assert_corrupt_at(log.find_event(damaged.event_id), bad, "find_event");

    // Everything around it still reads, unchanged.
    let before = log.read_from(Position(1), (bad - 1) as usize).unwrap();
    assert_eq!(before, records[..(bad - 1) as usize]);
    for r in &records[..(bad - 1) as usize] {
        assert_eq!(log.read_at(r.position).unwrap().as_ref(), Some(r));
    }
    let after = log.read_from(Position(bad + 1), 100).unwrap();
    assert_eq!(after, records[bad as usize..]);
    log.close().unwrap();
}

#[test]
fn every_flipped_byte_of_a_stored_record_is_caught() {
    // A byte flipped anywhere in the stored value, not just the middle.
    let dir = tempfile::tempdir().unwrap();
    filled_log(dir.path());
    let bad = 3u64;
    let original = {
        let db = raw_open(dir.path());
        let value = db.open_tree("log").unwrap().get(record_key(bad)).unwrap();
        value.unwrap().to_vec()
    };
    for i in 0..original.len() {
        tamper(dir.path(), |tree| {
            let mut value = original.clone();
            value[i] ^= 0x01;
            tree.insert(record_key(bad), value).unwrap();
        });
        let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
        assert_corrupt_at(log.read_at(Position(bad)), bad, &format!("byte {i}"));
        log.close().unwrap();
        drop(log);
    }
}

#[test]
fn missing_record_below_the_head_is_a_gap_naming_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let records = filled_log(dir.path());
    let gap = 5u64;
    tamper(dir.path(), |tree| {
        assert!(tree.remove(record_key(gap)).unwrap().is_some());
    });

    let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
    assert_eq!(log.head(), Position(EVENTS));
    assert_corrupt_at(
        log.read_from(Position(1), 100),
        gap,
        "read_from over the gap",
    );
    assert_corrupt_at(log.read_from(Position(gap), 3), gap, "read_from at the gap");
    assert_corrupt_at(log.read_at(Position(gap)), gap, "read_at the gap");
    let lost = &records[(gap - 1) as usize];
    assert_corrupt_at(
        log.find_event(lost.event_id),
        gap,
        "find_event of the lost record",
    );

    assert_eq!(
        log.read_from(Position(1), (gap - 1) as usize).unwrap(),
        records[..(gap - 1) as usize]
    );
    assert_eq!(
        log.read_from(Position(gap + 1), 100).unwrap(),
        records[gap as usize..]
    );
    log.close().unwrap();
}

#[test]
fn missing_last_record_is_refused_at_open() {
    // The head marker says EVENTS but the record there is gone: recovery must
    // not quietly shrink the log (that would un-acknowledge an event).
    let dir = tempfile::tempdir().unwrap();
    filled_log(dir.path());
    tamper(dir.path(), |tree| {
        assert!(tree.remove(record_key(EVENTS)).unwrap().is_some());
    });
    assert_corrupt_at(
        SledLog::open(dir.path(), SledOptions::default()).map(|_| ()),
        EVENTS,
        "open",
    );
}
