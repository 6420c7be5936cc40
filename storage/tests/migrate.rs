//! A data dir written by Threadline 0.1 (format 1) is refused as
//! `OldLayout`, never misread, and `maintenance::migrate` rewrites it as
//! format 2 record for record.
//!
//! The format-1 log is built with sled directly, in the layout of 0.1: tree
//! `log` with `e` + position (u64 BE) → `Record::encode()` (format 1),
//! `s` + stream + `\0` + version (u64 BE) → position (u64 BE), `i` + event id
//! (16 bytes) → position (u64 BE) and `h` → head (u64 BE).

use std::path::Path;

use threadline_storage::maintenance;
use threadline_storage::{
    EventLog, NewEvent, Position, Record, SledLog, SledOptions, StorageError,
};
use uuid::Uuid;

const EVENTS: u64 = 40;

fn v1_records() -> Vec<Record> {
    (1..=EVENTS)
        .scan(std::collections::HashMap::new(), |versions, p| {
            let stream = ["thread:a", "thread:b", "agent:c"][(p % 3) as usize];
            let version = versions.entry(stream).or_insert(0u64);
            *version += 1;
            Some(Record {
                position: Position(p),
                stream: stream.into(),
                stream_version: *version,
                event_id: Uuid::new_v4(),
                // Runs of equal timestamps (one group commit) and single ones.
                recorded_at_ms: 1_700_000_000_000 + p / 4 * 1000 + u64::from(p > 30) * p,
                actor: format!("user:{}", p % 5),
                event_type: "message_posted".into(),
                payload: format!("{{\"text\":\"event {p}\"}}")
                    .into_bytes()
                    .into_iter()
                    .chain((0..p as u8).map(|b| b.wrapping_mul(37)))
                    .collect(),
            })
        })
        .collect()
}

fn write_v1(dir: &Path, records: &[Record]) {
    let db = sled::Config::new().path(dir).open().unwrap();
    let log = db.open_tree("log").unwrap();
    for r in records {
        let p = r.position.0.to_be_bytes();
        let mut e = b"e".to_vec();
        e.extend_from_slice(&p);
        log.insert(e, r.encode()).unwrap();
        let mut s = b"s".to_vec();
        s.extend_from_slice(r.stream.as_bytes());
        s.push(0);
        s.extend_from_slice(&r.stream_version.to_be_bytes());
        log.insert(s, &p[..]).unwrap();
        let mut i = b"i".to_vec();
        i.extend_from_slice(r.event_id.as_bytes());
        log.insert(i, &p[..]).unwrap();
    }
    log.insert(b"h", &(records.len() as u64).to_be_bytes()[..])
        .unwrap();
    db.open_tree("checkpoints")
        .unwrap()
        .insert("projection:threads", &b"old checkpoint"[..])
        .unwrap();
    db.flush().unwrap();
}

#[test]
fn a_format_1_log_is_refused_as_old_layout_and_migrates_record_for_record() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("log");
    let records = v1_records();
    write_v1(&dir, &records);

    for options in [
        SledOptions::default(),
        SledOptions {
            tolerate_damage: true,
            create: false,
            ..SledOptions::default()
        },
    ] {
        match SledLog::open(&dir, options.clone()) {
            Err(StorageError::OldLayout(at)) => assert_eq!(at, dir.display().to_string()),
            other => panic!("{options:?}: expected OldLayout, got {other:?}"),
        }
    }

    let migrated = maintenance::migrate(&dir).unwrap();
    assert_eq!(migrated.head, Position(EVENTS));
    assert!(migrated.kept.exists(), "the format-1 log is kept");

    let log = SledLog::open(&dir, SledOptions::default()).unwrap();
    assert_eq!(log.head(), Position(EVENTS));
    assert_eq!(log.read_from(Position(1), 1000).unwrap(), records);
    for r in &records {
        assert_eq!(log.read_at(r.position).unwrap().as_ref(), Some(r));
        let found = log.find_event(r.event_id).unwrap().unwrap();
        assert_eq!(
            (found.position, found.stream_version),
            (r.position, r.stream_version)
        );
    }
    for stream in ["thread:a", "thread:b", "agent:c"] {
        let own: Vec<Record> = records
            .iter()
            .filter(|r| r.stream == stream)
            .cloned()
            .collect();
        assert_eq!(log.read_stream(stream, 1, 1000).unwrap(), own);
        assert_eq!(log.stream_version(stream).unwrap(), own.len() as u64);
    }
    // The migrated log goes on where the old one stopped.
    let next = log
        .append(vec![NewEvent {
            event_id: Uuid::new_v4(),
            stream: "thread:a".into(),
            expected_version: Some(records.iter().filter(|r| r.stream == "thread:a").count() as u64),
            actor: "user:0".into(),
            event_type: "message_posted".into(),
            payload: b"after the migration".to_vec(),
        }])
        .wait()
        .unwrap();
    assert_eq!(next[0].position, Position(EVENTS + 1));
    // An event id stored before the migration is still a duplicate.
    let again = log
        .append(vec![NewEvent {
            event_id: records[0].event_id,
            stream: records[0].stream.clone(),
            expected_version: None,
            actor: records[0].actor.clone(),
            event_type: records[0].event_type.clone(),
            payload: records[0].payload.clone(),
        }])
        .wait()
        .unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].position, Position(1));
    log.close().unwrap();
}
