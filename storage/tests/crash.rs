//! Crash test with real processes: a child appends from many threads and
//! prints each acknowledgement; the parent SIGKILLs it at a random moment,
//! reopens the log and checks that every acknowledged event survived exactly
//! where it was acknowledged, and that the log is dense and verifiable.
//!
//! The child is this same test binary re-run on `crash_child` with
//! `THREADLINE_CRASH_CHILD_DIR` set. Iterations: 20, or
//! `THREADLINE_CRASH_ITERATIONS`. Every iteration re-verifies the whole,
//! growing log, so time grows faster than the count (debug build, 2 cores:
//! 20 iterations ≈ 25–45 s, 50 ≈ 2 min).
#![cfg(unix)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use threadline_storage::{EventLog, NewEvent, Position, Record, SledLog, SledOptions};
use uuid::Uuid;

const CHILD_DIR_VAR: &str = "THREADLINE_CRASH_CHILD_DIR";
const ITERATIONS_VAR: &str = "THREADLINE_CRASH_ITERATIONS";
const CHILD_THREADS: usize = 16;
const SHARED_STREAMS: usize = 8;
const MAX_BATCH: usize = 4;
/// Most payloads are small, like most events; one in five is up to 4 KB.
const SMALL_PAYLOAD: usize = 256;
const MAX_PAYLOAD: usize = 4 * 1024;
const PAGE: usize = 1000;

/// The payload is a function of the event id, so the parent can tell that a
/// record's payload belongs to its id (no torn or mixed-up records).
fn payload_for(id: Uuid, len: usize) -> Vec<u8> {
    let b = id.as_bytes();
    (0..len).map(|i| b[i % 16] ^ (i as u8)).collect()
}

fn payload_len(rng: &mut impl Rng) -> usize {
    if rng.gen_bool(0.2) {
        rng.gen_range(0..=MAX_PAYLOAD)
    } else {
        rng.gen_range(0..=SMALL_PAYLOAD)
    }
}

fn payload_matches(id: Uuid, payload: &[u8]) -> bool {
    let b = id.as_bytes();
    payload
        .iter()
        .enumerate()
        .all(|(i, &p)| p == b[i % 16] ^ (i as u8))
}

/// The child: appends forever until killed. Each thread's events carry its
/// actor name and a per-thread sequence number (`seq:<n>`) in the event type.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    // Ends libtest's "test crash_child ... " line so the first ACK starts a line.
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "\nREADY").unwrap();
        out.flush().unwrap();
    }
    let log = match SledLog::open(&dir, SledOptions::default()) {
        Ok(log) => Arc::new(log),
        Err(e) => {
            println!("ERR open {e}");
            std::process::exit(2);
        }
    };
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let threads: Vec<_> = (0..CHILD_THREADS)
        .map(|t| {
            let log = log.clone();
            let run = run.clone();
            std::thread::spawn(move || child_appender(&*log, &run, t))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn child_appender(log: &dyn EventLog, run: &str, t: usize) {
    let mut rng = rand::thread_rng();
    let actor = format!("crash:{run}:{t}");
    let private = format!("crash:private:{run}:{t}");
    let mut private_version = 0u64;
    let mut seq = 0u64;
    loop {
        let n = rng.gen_range(1..=MAX_BATCH);
        let with_private = rng.gen_bool(0.3);
        let private_at = rng.gen_range(0..n);
        let mut events = Vec::with_capacity(n);
        for i in 0..n {
            let event_id = Uuid::new_v4();
            let (stream, expected_version) = if with_private && i == private_at {
                (private.clone(), Some(private_version))
            } else {
                (
                    format!("crash:shared:{}", rng.gen_range(0..SHARED_STREAMS)),
                    None,
                )
            };
            events.push(NewEvent {
                event_id,
                stream,
                expected_version,
                actor: actor.clone(),
                event_type: format!("seq:{}", seq + i as u64),
                payload: payload_for(event_id, payload_len(&mut rng)),
            });
        }
        seq += n as u64;
        let acks = match log.append(events.clone()).wait() {
            Ok(acks) => acks,
            Err(e) => {
                println!("ERR {actor} {e}");
                return;
            }
        };
        let mut lines = String::new();
        for (event, ack) in events.iter().zip(&acks) {
            if event.stream == private {
                private_version = ack.stream_version;
            }
            lines.push_str(&format!(
                "ACK {} {} {} {}\n",
                event.event_id, ack.position.0, event.stream, ack.stream_version
            ));
        }
        let mut out = std::io::stdout().lock();
        out.write_all(lines.as_bytes()).unwrap();
        out.flush().unwrap();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    position: u64,
    stream: String,
    version: u64,
}

fn parse_ack(line: &str) -> (Uuid, Ack) {
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts.len(), 5, "malformed ack line {line:?}");
    let id = Uuid::parse_str(parts[1]).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let ack = Ack {
        position: parts[2].parse().unwrap_or_else(|e| panic!("{line:?}: {e}")),
        stream: parts[3].to_owned(),
        version: parts[4].parse().unwrap_or_else(|e| panic!("{line:?}: {e}")),
    };
    (id, ack)
}

/// Runs one child until it has acknowledged at least `min_acks` events, kills
/// it at a random moment after that, and returns the complete stdout lines.
fn run_and_kill_child(dir: &Path, min_acks: usize) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR_VAR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let (tx, rx) = mpsc::channel::<String>();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match stdout.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                // A line cut short by the kill has no newline: it never counted.
                Ok(_) if buf.last() != Some(&b'\n') => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut lines = Vec::new();
    let mut acks = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failure = None;
    while acks < min_acks {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.starts_with("ACK ") {
                    acks += 1;
                } else if line.starts_with("ERR ") {
                    failure = Some(format!("child reported {line:?}"));
                    break;
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                failure = Some(format!("only {acks} acks within 60 s"));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                failure = Some(format!("child exited after {acks} acks"));
                break;
            }
        }
    }
    if failure.is_none() {
        // The kill lands at a random point of the append/flush/ack cycle.
        let extra = rand::thread_rng().gen_range(0..=300);
        std::thread::sleep(Duration::from_millis(extra));
    }
    let killed = child.kill(); // SIGKILL on unix
    let status = child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let stderr = stderr_reader.join().unwrap();
    if let Some(failure) = failure {
        panic!("{failure}; child status {status}; stderr:\n{stderr}");
    }
    killed.unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the child must die of SIGKILL: {status}"
    );
    if let Some(err) = lines.iter().find(|l| l.starts_with("ERR ")) {
        panic!("child reported {err:?}; stderr:\n{stderr}");
    }
    lines
}

/// Reads the whole log in pages and checks everything that must hold after
/// any crash. Returns the records, index = position - 1.
fn verify_log(log: &SledLog) -> Vec<Record> {
    let head = log.head();
    let mut records = Vec::with_capacity(head.0 as usize);
    let mut from = Position(1);
    loop {
        let page = log
            .read_from(from, PAGE)
            .unwrap_or_else(|e| panic!("read_from({from}) failed: {e}"));
        if page.is_empty() {
            break;
        }
        for r in page {
            assert_eq!(r.position, from, "positions must be dense");
            from = from.next();
            records.push(r);
        }
    }
    assert_eq!(records.len() as u64, head.0, "records up to the head");
    assert!(log.read_at(head.next()).unwrap().is_none());

    let mut ids = HashSet::with_capacity(records.len());
    let mut versions: HashMap<&str, u64> = HashMap::new();
    for r in &records {
        assert!(ids.insert(r.event_id), "event id {} twice", r.event_id);
        let v = versions.entry(&r.stream).or_default();
        assert_eq!(
            r.stream_version,
            *v + 1,
            "stream {} not dense at {}",
            r.stream,
            r.position
        );
        *v = r.stream_version;
        assert!(
            payload_matches(r.event_id, &r.payload),
            "payload of {} at {} is not its own",
            r.event_id,
            r.position
        );
    }
    for (stream, v) in versions {
        assert_eq!(
            log.stream_version(stream).unwrap(),
            v,
            "version of {stream}"
        );
    }
    records
}

#[test]
fn acknowledged_events_survive_sigkill() {
    let iterations: usize = std::env::var(ITERATIONS_VAR)
        .ok()
        .map(|v| {
            v.parse()
                .expect("THREADLINE_CRASH_ITERATIONS must be a number")
        })
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashMap<Uuid, Ack> = HashMap::new();
    let mut rng = rand::thread_rng();
    let mut previous_head = 0;

    for iteration in 0..iterations {
        let min_acks = rng.gen_range(1..=40);
        let started = Instant::now();
        let lines = run_and_kill_child(dir.path(), min_acks);
        let mut new_acks = Vec::new();
        for line in lines.iter().filter(|l| l.starts_with("ACK ")) {
            let (id, ack) = parse_ack(line);
            assert!(
                acked.insert(id, ack.clone()).is_none(),
                "event {id} acknowledged twice"
            );
            new_acks.push((id, ack));
        }
        assert!(new_acks.len() >= min_acks, "iteration {iteration}");

        let child_time = started.elapsed();
        let log = SledLog::open(dir.path(), SledOptions::default())
            .unwrap_or_else(|e| panic!("iteration {iteration}: reopen failed: {e}"));
        let records = verify_log(&log);
        let head = records.len() as u64;
        assert!(
            head >= previous_head + new_acks.len() as u64,
            "iteration {iteration}: head {head} after {previous_head} + {} acks",
            new_acks.len()
        );
        previous_head = head;

        // Every acknowledgement, from this run and every earlier one, holds.
        for (id, ack) in &acked {
            let r = records
                .get((ack.position as usize).wrapping_sub(1))
                .unwrap_or_else(|| {
                    panic!("iteration {iteration}: acked {id} at {} lost", ack.position)
                });
            assert_eq!(
                r.event_id, *id,
                "iteration {iteration}: at {}",
                ack.position
            );
            assert_eq!(r.stream, ack.stream, "iteration {iteration}: {id}");
            assert_eq!(r.stream_version, ack.version, "iteration {iteration}: {id}");
        }
        for (id, ack) in &new_acks {
            let found = log.find_event(*id).unwrap().expect("acked id is findable");
            assert_eq!(found.position, Position(ack.position));
            assert_eq!(found.stream_version, ack.version);
        }

        // Per child thread: what is stored is a dense prefix of what it sent,
        // in order, and at most its one in-flight batch was not acknowledged.
        let mut sent: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for r in &records {
            let seq = r
                .event_type
                .strip_prefix("seq:")
                .and_then(|s| s.parse().ok())
                .expect("seq event type");
            sent.entry(&r.actor).or_default().push(seq);
        }
        for (actor, seqs) in &sent {
            let expected: Vec<u64> = (0..seqs.len() as u64).collect();
            assert_eq!(seqs, &expected, "{actor}: events out of order or missing");
        }
        let mut acked_seqs: HashMap<&str, Vec<u64>> = HashMap::new();
        for (_, ack) in &new_acks {
            let r = &records[ack.position as usize - 1];
            let seq = r.event_type["seq:".len()..].parse().unwrap();
            acked_seqs.entry(&r.actor).or_default().push(seq);
        }
        for (actor, mut seqs) in acked_seqs {
            seqs.sort_unstable();
            let n = seqs.len();
            assert_eq!(seqs, (0..n as u64).collect::<Vec<_>>(), "{actor}: acks");
            let stored = sent[actor].len();
            assert!(
                stored >= n && stored - n <= MAX_BATCH,
                "{actor}: {stored} stored, {n} acknowledged"
            );
        }

        log.close().unwrap();
        drop(log);
        eprintln!(
            "iteration {iteration}: {} acks, head {head}, child {child_time:?}, check {:?}",
            new_acks.len(),
            started.elapsed() - child_time
        );
    }
    assert!(acked.len() >= iterations);
}
