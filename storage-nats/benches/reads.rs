//! Reads of a JetStream log that a gateway does not hold in memory (a fresh
//! gateway's fold from the start, a deep replay), beside sled's reads of the
//! same records, in one run. Prints a table.
//!
//! - `sled read_from`: pages of 1000 off a local sled log (the embedded default).
//! - `nats connect`: a fresh gateway following the whole stream into its index.
//! - `nats read_from`: pages of 1000 with no record cached: one ordered consumer per
//!   run of consecutive positions.
//! - `nats read_many, every other`: positions 1, 3, 5, … in pages of 1000: no two
//!   consecutive, so one request each (32 in flight), as every uncached read was
//!   before runs were read through a consumer.
//!
//! Run: `cargo bench -p threadline-storage-nats --bench reads` (needs nats-server:
//! `NATS_SERVER_BIN` or `PATH`; starts its own 3-node cluster on 127.0.0.1).
//! `THREADLINE_READS_EVENTS` sets the log's size (default 20 000; 256-byte payloads).

use std::time::{Duration, Instant};

use threadline_storage::{EventLog, NewEvent, Position, SledLog, SledOptions};
use threadline_storage_nats::{cluster, NatsLog, NatsOptions};
use uuid::Uuid;

const PAYLOAD: usize = 256;
const PAGE: usize = 1000;
const BATCH: usize = 500;

fn event(i: usize) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        stream: format!("thread:{}", i % 100),
        expected_version: None,
        actor: "agent:bench".into(),
        event_type: "agent_thinking".into(),
        payload: vec![0x5a; PAYLOAD],
    }
}

fn fill(log: &dyn EventLog, n: usize) {
    for start in (0..n).step_by(BATCH) {
        let batch = (start..n.min(start + BATCH)).map(event).collect();
        log.append(batch).wait().expect("append");
    }
}

/// Reads positions `1..=n` in pages; the records read.
fn read_all(log: &dyn EventLog, n: u64) -> usize {
    let mut read = 0;
    let mut from = 1;
    while from <= n {
        let page = log.read_from(Position(from), PAGE).expect("read_from");
        assert!(!page.is_empty(), "nothing at {from}");
        assert_eq!(page[0].position, Position(from));
        read += page.len();
        from += page.len() as u64;
    }
    read
}

/// Reads every other position (no two consecutive) in pages; the records read.
fn read_every_other(log: &dyn EventLog, n: u64) -> usize {
    let positions: Vec<Position> = (1..=n).step_by(2).map(Position).collect();
    let mut read = 0;
    for page in positions.chunks(PAGE) {
        let records = log.read_many(page).expect("read_many");
        assert_eq!(records.len(), page.len());
        read += records.len();
    }
    read
}

struct Row {
    what: &'static str,
    events: usize,
    took: Duration,
}

fn timed(what: &'static str, f: impl FnOnce() -> usize) -> Row {
    let t = Instant::now();
    let events = f();
    Row {
        what,
        events,
        took: t.elapsed(),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` (and `cargo test --benches`) ask for names.
    }
    let n: usize = std::env::var("THREADLINE_READS_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let Some(cluster) = cluster::own() else {
        return;
    };
    let mut rows = Vec::new();

    let sled_dir = tempfile::tempdir().unwrap();
    let sled = SledLog::open(sled_dir.path(), SledOptions::default()).unwrap();
    fill(&sled, n);
    rows.push(timed("sled read_from", || read_all(&sled, n as u64)));

    let dir = tempfile::tempdir().unwrap();
    let options = |name: &str, cache_records: usize| {
        let mut o = NatsOptions::new(&cluster.urls(), dir.path().join(name));
        o.stream = "READS".into();
        o.cache_records = cache_records;
        o
    };
    let writer = NatsLog::connect(options("writer", 16_384)).unwrap();
    fill(&writer, n);
    let mut reader = None;
    rows.push(timed("nats connect (fold into the index)", || {
        let log = NatsLog::connect(options("reader", 0)).unwrap();
        let head = log.head().0 as usize;
        reader = Some(log);
        head
    }));
    let reader = reader.unwrap();
    rows.push(timed("nats read_from, nothing cached", || {
        read_all(&reader, n as u64)
    }));
    rows.push(timed("nats read_many every other, nothing cached", || {
        read_every_other(&reader, n as u64)
    }));

    let sled_rate = rows[0].events as f64 / rows[0].took.as_secs_f64();
    println!("reads of {n} events ({PAYLOAD}-byte payloads), pages of {PAGE}; 3-node nats-server cluster on loopback");
    println!(
        "| {:<44} | {:>8} | {:>9} | {:>10} | {:>7} |",
        "", "events", "seconds", "events/s", "÷ sled"
    );
    println!(
        "|{:-<46}|{:->10}|{:->11}|{:->12}|{:->9}|",
        "", "", "", "", ""
    );
    for r in &rows {
        let rate = r.events as f64 / r.took.as_secs_f64();
        println!(
            "| {:<44} | {:>8} | {:>9.2} | {:>10.0} | {:>7.3} |",
            r.what,
            r.events,
            r.took.as_secs_f64(),
            rate,
            rate / sled_rate
        );
    }
    reader.close().unwrap();
    writer.close().unwrap();
}
