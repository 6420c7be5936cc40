//! Event log throughput, in events/s (criterion's `thrpt`, elements/s).
//!
//! The number to watch: `sled/append_50_appenders`: events/s with 50
//! concurrent appenders, each waiting for its own acknowledgement (after
//! fsync). Group commit is what keeps it far above `sled/append_1_appender`
//! (one fsync per event); if the two come close, group commit is broken.
//!
//! Also measured: batches of 16 and 100 from one appender, a full scan with
//! checksum and decode of a 100k-event log, and the same 1- and 50-appender
//! cases on `MemoryLog` (no disk) for the ratio against the sled backend.
//!
//! Run: `cargo bench -p threadline-storage --bench log` (under a minute of
//! measuring, plus the first release build).
//! Every event carries a 256-byte payload.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use threadline_storage::{EventLog, MemoryLog, NewEvent, Position, SledLog, SledOptions};
use uuid::Uuid;

const PAYLOAD: usize = 256;
const APPENDERS: usize = 50;
const SCAN_EVENTS: u64 = 100_000;
const SCAN_PAGE: usize = 1000;
const SLED_TIME: Duration = Duration::from_secs(5);
/// Short, so the largest sample's in-memory log stays a few hundred MB at most.
const MEMORY_TIME: Duration = Duration::from_secs(2);

fn event(stream: &str) -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        stream: stream.to_owned(),
        expected_version: None,
        actor: "agent:bench".into(),
        event_type: "agent_thinking".into(),
        payload: vec![0x5a; PAYLOAD],
    }
}

fn sled_log() -> (SledLog, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
    (log, dir)
}

/// One appender, each event acknowledged (durable) before the next. `log`
/// is called once per sample (a fresh `MemoryLog` keeps memory bounded).
fn one_appender(
    c: &mut Criterion,
    name: &str,
    time: Duration,
    log: impl Fn() -> Arc<dyn EventLog>,
) {
    let mut group = c.benchmark_group(name);
    group.measurement_time(time);
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_1_appender", |b| {
        b.iter_custom(|iters| {
            let log = log();
            let began = Instant::now();
            for _ in 0..iters {
                log.append(vec![event("bench:one")]).wait().unwrap();
            }
            began.elapsed()
        })
    });
    group.finish();
}

/// `APPENDERS` threads, each appending one event at a time and waiting for
/// its own acknowledgement; an iteration is one append per thread.
fn many_appenders(
    c: &mut Criterion,
    name: &str,
    time: Duration,
    log: impl Fn() -> Arc<dyn EventLog>,
) {
    let mut group = c.benchmark_group(name);
    group.measurement_time(time);
    group.throughput(Throughput::Elements(APPENDERS as u64));
    group.bench_function(format!("append_{APPENDERS}_appenders"), |b| {
        b.iter_custom(|iters| {
            let log = log();
            let start = Arc::new(Barrier::new(APPENDERS + 1));
            let threads: Vec<_> = (0..APPENDERS)
                .map(|t| {
                    let log = log.clone();
                    let start = start.clone();
                    std::thread::spawn(move || {
                        let stream = format!("bench:{t}");
                        start.wait();
                        for _ in 0..iters {
                            log.append(vec![event(&stream)]).wait().unwrap();
                        }
                    })
                })
                .collect();
            start.wait();
            let began = Instant::now();
            for t in threads {
                t.join().unwrap();
            }
            began.elapsed()
        })
    });
    group.finish();
}

fn bench_sled_appends(c: &mut Criterion) {
    // One log per case, kept across samples (as a server keeps its log).
    let (log, _dir) = sled_log();
    let log: Arc<dyn EventLog> = Arc::new(log);
    one_appender(c, "sled", SLED_TIME, || log.clone());
    drop(log);

    let (log, _dir) = sled_log();
    let log: Arc<dyn EventLog> = Arc::new(log);
    many_appenders(c, "sled", SLED_TIME, || log.clone());
    drop(log);

    let mut group = c.benchmark_group("sled");
    for size in [16usize, 100] {
        let (log, _dir) = sled_log();
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::new("append_batch", size), &size, |b, &size| {
            b.iter(|| {
                let batch = (0..size).map(|_| event("bench:batch")).collect();
                log.append(batch).wait().unwrap()
            })
        });
    }
    group.finish();
}

fn bench_sled_scan(c: &mut Criterion) {
    let (log, _dir) = sled_log();
    for chunk in 0..SCAN_EVENTS / 1000 {
        let batch = (0..1000)
            .map(|i| event(&format!("bench:scan:{}", (chunk * 1000 + i) % 64)))
            .collect();
        log.append(batch).wait().unwrap();
    }
    assert_eq!(log.head(), Position(SCAN_EVENTS));

    let mut group = c.benchmark_group("sled");
    group.throughput(Throughput::Elements(SCAN_EVENTS));
    group.bench_function("scan_100k_with_decode", |b| {
        b.iter(|| {
            let mut from = Position(1);
            let mut n = 0u64;
            loop {
                let page = log.read_from(from, SCAN_PAGE).unwrap();
                let Some(last) = page.last() else { break };
                from = last.position.next();
                n += page.len() as u64;
            }
            assert_eq!(n, SCAN_EVENTS);
            n
        })
    });
    group.finish();
}

fn bench_memory(c: &mut Criterion) {
    one_appender(c, "memory", MEMORY_TIME, || Arc::new(MemoryLog::new()));
    many_appenders(c, "memory", MEMORY_TIME, || Arc::new(MemoryLog::new()));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(SLED_TIME);
    targets = bench_sled_appends, bench_sled_scan, bench_memory
}
criterion_main!(benches);
