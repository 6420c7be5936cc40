//! The log contract: one suite, run against every [`EventLog`] implementation
//! (the JetStream one against a real 3-node cluster the suite starts).

use std::sync::Arc;

use threadline_storage::{
    Checkpoints, EventLog, MemoryLog, NewEvent, Position, SledLog, SledOptions, StorageError,
};
use threadline_storage_nats::{cluster, NatsLog, NatsOptions};
use uuid::Uuid;

fn ev(stream: &str, expected: Option<u64>) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        stream: stream.into(),
        expected_version: expected,
        actor: "agent:test".into(),
        event_type: "agent_thinking".into(),
        payload: format!("payload of {stream}").into_bytes(),
    }
}

fn append(
    log: &dyn EventLog,
    events: Vec<NewEvent>,
) -> Result<Vec<threadline_storage::Appended>, StorageError> {
    log.append(events).wait()
}

fn empty_log_has_nothing(log: &dyn EventLog) {
    assert_eq!(log.head(), Position::ZERO);
    assert!(log.read_from(Position(1), 10).unwrap().is_empty());
    assert!(log.read_at(Position(1)).unwrap().is_none());
    assert_eq!(log.stream_version("thread:a").unwrap(), 0);
    assert!(log.read_stream("thread:a", 1, 10).unwrap().is_empty());
}

fn positions_and_versions_are_dense(log: &dyn EventLog) {
    for i in 0..30 {
        let stream = ["thread:a", "thread:b", "thread:c"][i % 3];
        let a = append(log, vec![ev(stream, None)]).unwrap();
        assert_eq!(a[0].position, Position(i as u64 + 1));
        assert_eq!(a[0].stream_version, (i / 3) as u64 + 1);
        assert!(!a[0].duplicate);
    }
    assert_eq!(log.head(), Position(30));
    let all = log.read_from(Position(1), 1000).unwrap();
    assert_eq!(all.len(), 30);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.position, Position(i as u64 + 1));
    }
    // Paging.
    let page = log.read_from(Position(11), 5).unwrap();
    assert_eq!(
        page.iter().map(|r| r.position.0).collect::<Vec<_>>(),
        vec![11, 12, 13, 14, 15]
    );
    assert!(log.read_from(Position(31), 5).unwrap().is_empty());
    // Streams.
    let b = log.read_stream("thread:b", 4, 3).unwrap();
    assert_eq!(
        b.iter().map(|r| r.stream_version).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    assert!(b.iter().all(|r| r.stream == "thread:b"));
    assert_eq!(log.stream_version("thread:c").unwrap(), 10);
    let at = log.read_at(Position(2)).unwrap().unwrap();
    assert_eq!((at.stream.as_str(), at.stream_version), ("thread:b", 1));
    assert_eq!(at.payload, b"payload of thread:b");
}

/// Long reads (a deep replay, a fold from the start) return every record in
/// order, whatever a log keeps in memory; a JetStream gateway without a cache
/// reads long runs through a consumer and the rest one by one.
fn long_reads_return_every_record_in_order(log: &dyn EventLog) {
    let mut ids = Vec::new();
    for i in 0..6 {
        let batch: Vec<NewEvent> = (0..50)
            .map(|k| ev(["thread:a", "thread:b", "thread:c"][(i + k) % 3], None))
            .collect();
        ids.extend(batch.iter().map(|e| e.event_id));
        append(log, batch).unwrap();
    }
    let all = log.read_from(Position(1), 1000).unwrap();
    assert_eq!(all.iter().map(|r| r.event_id).collect::<Vec<_>>(), ids);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.position, Position(i as u64 + 1));
    }
    let middle = log.read_from(Position(101), 150).unwrap();
    assert_eq!(middle.len(), 150);
    assert_eq!(middle[0].event_id, ids[100]);
    assert_eq!(middle[149].event_id, ids[249]);
    // Runs and singles mixed, ascending, as a replay asks for them.
    let mut wanted: Vec<Position> = (20..=120).map(Position).collect();
    wanted.extend([130, 150, 151, 299, 300].map(Position));
    let many = log.read_many(&wanted).unwrap();
    assert_eq!(many.iter().map(|r| r.position).collect::<Vec<_>>(), wanted);
    assert!(many
        .iter()
        .all(|r| r.event_id == ids[r.position.0 as usize - 1]));
    let a = log.read_stream("thread:a", 1, 1000).unwrap();
    assert_eq!(a.len(), 100);
    assert!(a
        .iter()
        .enumerate()
        .all(|(i, r)| r.stream == "thread:a" && r.stream_version == i as u64 + 1));
}

fn read_many_reads_what_read_at_reads(log: &dyn EventLog) {
    // Batches so that several records share a group commit (and a frame).
    for i in 0..10 {
        let batch = (0..5)
            .map(|k| ev(["thread:a", "thread:b"][(i + k) % 2], None))
            .collect();
        append(log, batch).unwrap();
    }
    let wanted: Vec<Position> = [1, 2, 3, 7, 8, 21, 22, 23, 49, 50]
        .into_iter()
        .map(Position)
        .collect();
    let many = log.read_many(&wanted).unwrap();
    let single: Vec<_> = wanted
        .iter()
        .map(|&p| log.read_at(p).unwrap().unwrap())
        .collect();
    assert_eq!(many, single);
    assert!(log.read_many(&[]).unwrap().is_empty());
    assert!(matches!(
        log.read_many(&[Position(50), Position(51)]),
        Err(StorageError::InvalidInput(_))
    ));
}

fn batches_are_all_or_nothing(log: &dyn EventLog) {
    append(log, vec![ev("s1", None), ev("s2", None)]).unwrap();
    let bad = vec![ev("s1", Some(1)), ev("s3", None), ev("s2", Some(7))];
    let err = append(log, bad).unwrap_err();
    assert_eq!(
        err,
        StorageError::Conflict {
            stream: "s2".into(),
            expected: 7,
            current: 1
        }
    );
    assert_eq!(log.head(), Position(2));
    assert_eq!(log.stream_version("s1").unwrap(), 1);
    assert_eq!(log.stream_version("s3").unwrap(), 0);
    // A batch spanning streams lands at consecutive positions.
    let ok = append(
        log,
        vec![ev("s1", Some(1)), ev("s3", Some(0)), ev("s1", Some(2))],
    )
    .unwrap();
    assert_eq!(
        ok.iter().map(|a| a.position.0).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(
        ok.iter().map(|a| a.stream_version).collect::<Vec<_>>(),
        vec![2, 1, 3]
    );
}

fn expected_versions_are_enforced(log: &dyn EventLog) {
    append(log, vec![ev("t", Some(0))]).unwrap();
    let err = append(log, vec![ev("t", Some(0))]).unwrap_err();
    assert_eq!(
        err,
        StorageError::Conflict {
            stream: "t".into(),
            expected: 0,
            current: 1
        }
    );
    append(log, vec![ev("t", Some(1))]).unwrap();
    assert_eq!(log.stream_version("t").unwrap(), 2);
}

fn event_ids_are_idempotent(log: &dyn EventLog) {
    let first = ev("t", None);
    let a = append(log, vec![first.clone()]).unwrap()[0];
    append(log, vec![ev("t", None)]).unwrap();
    // A retry, even with a now-stale expectation, returns the original.
    let mut retry = first.clone();
    retry.expected_version = Some(0);
    let again = append(log, vec![retry]).unwrap()[0];
    assert!(again.duplicate);
    assert_eq!(
        (again.position, again.stream_version),
        (a.position, a.stream_version)
    );
    assert_eq!(log.head(), Position(2));
    assert_eq!(
        log.find_event(first.event_id).unwrap().unwrap().position,
        a.position
    );
    assert!(log.find_event(Uuid::now_v7()).unwrap().is_none());
    // Mixed batch: stored ids answered with originals, new ones appended together.
    let fresh = ev("u", None);
    let mixed = append(log, vec![first.clone(), fresh.clone(), fresh.clone()]).unwrap();
    assert!(mixed[0].duplicate && mixed[0].position == a.position);
    assert!(!mixed[1].duplicate && mixed[1].position == Position(3));
    assert!(mixed[2].duplicate && mixed[2].position == Position(3));
    assert_eq!(log.head(), Position(3));
}

fn bad_input_is_rejected(log: &dyn EventLog) {
    assert!(matches!(
        append(log, vec![]),
        Err(StorageError::InvalidInput(_))
    ));
    assert!(matches!(
        append(log, vec![ev("", None)]),
        Err(StorageError::InvalidInput(_))
    ));
    assert!(matches!(
        append(log, vec![ev("a\0b", None)]),
        Err(StorageError::InvalidInput(_))
    ));
    assert!(matches!(
        append(log, vec![ev(&"x".repeat(513), None)]),
        Err(StorageError::InvalidInput(_))
    ));
    assert_eq!(log.head(), Position::ZERO);
}

fn head_watchers_see_durable_heads(log: &dyn EventLog) {
    let mut rx = log.watch_head();
    assert_eq!(*rx.borrow_and_update(), Position::ZERO);
    append(log, vec![ev("w", None), ev("w", None)]).unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), Position(2));
}

fn concurrent_appenders_get_unique_dense_positions(log: Arc<dyn EventLog>) {
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| append(&*log, vec![ev(&format!("c{t}"), None)]).unwrap()[0])
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut positions: Vec<u64> = Vec::new();
    for t in threads {
        let got = t.join().unwrap();
        // Each appender's own stream versions are dense and in its order.
        assert_eq!(
            got.iter().map(|a| a.stream_version).collect::<Vec<_>>(),
            (1..=50).collect::<Vec<_>>()
        );
        positions.extend(got.iter().map(|a| a.position.0));
    }
    positions.sort();
    assert_eq!(positions, (1..=400).collect::<Vec<_>>());
    assert_eq!(log.head(), Position(400));
}

fn checkpoints_round_trip(store: &dyn Checkpoints) {
    assert!(store.load_checkpoint("registry").unwrap().is_none());
    store.store_checkpoint("registry", b"one").unwrap();
    store.store_checkpoint("registry", b"two").unwrap();
    assert_eq!(store.load_checkpoint("registry").unwrap().unwrap(), b"two");
}

macro_rules! contract_suite {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;
            #[test]
            fn empty_log() {
                let Some((log, _g)) = $make else { return };
                empty_log_has_nothing(&*log);
            }
            #[test]
            fn dense() {
                let Some((log, _g)) = $make else { return };
                positions_and_versions_are_dense(&*log);
            }
            #[test]
            fn read_many() {
                let Some((log, _g)) = $make else { return };
                read_many_reads_what_read_at_reads(&*log);
            }
            #[test]
            fn long_reads() {
                let Some((log, _g)) = $make else { return };
                long_reads_return_every_record_in_order(&*log);
            }
            #[test]
            fn atomic_batches() {
                let Some((log, _g)) = $make else { return };
                batches_are_all_or_nothing(&*log);
            }
            #[test]
            fn expected_versions() {
                let Some((log, _g)) = $make else { return };
                expected_versions_are_enforced(&*log);
            }
            #[test]
            fn idempotent_ids() {
                let Some((log, _g)) = $make else { return };
                event_ids_are_idempotent(&*log);
            }
            #[test]
            fn bad_input() {
                let Some((log, _g)) = $make else { return };
                bad_input_is_rejected(&*log);
            }
            #[test]
            fn head_watch() {
                let Some((log, _g)) = $make else { return };
                head_watchers_see_durable_heads(&*log);
            }
            #[test]
            fn concurrent() {
                let Some((log, _g)) = $make else { return };
                concurrent_appenders_get_unique_dense_positions(log);
            }
            #[test]
            fn checkpoints() {
                let Some((log, _g)) = $make else { return };
                checkpoints_round_trip(&*log);
            }
        }
    };
}

fn memory() -> Option<(Arc<MemoryLog>, ())> {
    Some((Arc::new(MemoryLog::new()), ()))
}

fn sled() -> (Arc<SledLog>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        Arc::new(SledLog::open(dir.path(), SledOptions::default()).unwrap()),
        dir,
    )
}

/// A fresh stream (own name and subjects) on the shared 3-node cluster.
fn nats(cache_records: Option<usize>) -> Option<(Arc<NatsLog>, impl Sized)> {
    let cluster = cluster::shared()?;
    let dir = tempfile::tempdir().unwrap();
    let name = Uuid::new_v4().simple().to_string();
    let mut options = NatsOptions::new(&cluster.lock().unwrap().urls(), dir.path().into());
    options.stream = format!("T{name}");
    options.subject_prefix = format!("t{name}");
    if let Some(n) = cache_records {
        options.cache_records = n;
    }
    let log = NatsLog::connect(options).unwrap();
    Some((Arc::new(log), (cluster, dir)))
}

contract_suite!(memory_log, memory());
contract_suite!(sled_log, Some(sled()));
contract_suite!(nats_log, nats(None));
// Every read goes to the stream: no record is kept in memory.
contract_suite!(nats_log_uncached, nats(Some(0)));

#[test]
fn sled_log_survives_reopen_and_continues_dense() {
    let dir = tempfile::tempdir().unwrap();
    let first = ev("t", None);
    {
        let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
        append(&log, vec![first.clone(), ev("t", None), ev("u", None)]).unwrap();
        log.close().unwrap();
    }
    let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
    assert_eq!(log.head(), Position(3));
    assert_eq!(log.stream_version("t").unwrap(), 2);
    let a = append(&log, vec![ev("t", Some(2))]).unwrap()[0];
    assert_eq!((a.position, a.stream_version), (Position(4), 3));
    // Idempotency holds across restarts.
    let dup = append(&log, vec![first]).unwrap()[0];
    assert!(dup.duplicate && dup.position == Position(1));
}

#[test]
fn read_only_open_never_creates_a_log() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let err = SledLog::open(
        &missing,
        SledOptions {
            create: false,
            ..SledOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, StorageError::NotFound(_)), "{err:?}");
    assert!(!missing.exists());
}

#[test]
fn closed_log_refuses_appends() {
    let (log, _g) = sled();
    log.close().unwrap();
    assert_eq!(
        append(&*log, vec![ev("t", None)]),
        Err(StorageError::Closed)
    );
}
