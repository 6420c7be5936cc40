//! Memory of the sled log alone, per event: appends 16-event batches of ~350 B events
//! over 1000 streams, prints RSS every 100k events, closes, reopens (indexes rebuilt by
//! a scan) and prints it again. `cargo run --release -p threadline-storage --example
//! memory -- 2000000`; see docs/reliability.md (soak).
use threadline_storage::{EventLog, NewEvent, SledLog, SledOptions};
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096 / 1048576
}
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let n: usize = std::env::args()
        .nth(1)
        .map_or(600_000, |s| s.parse().unwrap());
    {
        let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
        let mut pending = Vec::new();
        for i in 0..n / 16 {
            let batch = (0..16)
                .map(|j| NewEvent {
                    event_id: uuid::Uuid::new_v4(),
                    stream: format!("thread-{}", (i * 16 + j) % 1000),
                    expected_version: None,
                    actor: "agent:a".into(),
                    event_type: "agent_thinking".into(),
                    payload: vec![b'x'; 300],
                })
                .collect();
            pending.push(log.append(batch));
            if pending.len() == 64 {
                for p in pending.drain(..) {
                    p.wait().unwrap();
                }
            }
            if (i * 16) % 100_000 < 16 {
                println!("{:>8} events: RSS {} MiB", i * 16, rss());
            }
        }
        for p in pending.drain(..) {
            p.wait().unwrap();
        }
        println!("{:>8} events: RSS {} MiB", n, rss());
        log.close().unwrap();
    }
    println!("closed: RSS {} MiB", rss());
    let log = SledLog::open(dir.path(), SledOptions::default()).unwrap();
    let _ = log.find_event(uuid::Uuid::new_v4());
    println!("reopened, indexes built: RSS {} MiB", rss());
}
