//! Guarantee 2: the log is the buffer. Sockets that stop reading while 100k
//! events are appended cost the server no more memory than the same appends
//! cost with nobody connected (plus a stated slack), and afterwards each
//! receives every one of those events, in order, from the log.
//!
//! Why a control: appending 100k events grows the server's RSS by itself
//! (sled's cache and page table, allocator arenas: measured ~60-100 MiB in
//! debug builds), so an absolute bound on growth would measure sled, not the
//! socket. The test therefore appends the same 100k-event workload twice on
//! one server: first with no socket open (control growth `C`), then with
//! `READERS` sockets that have stopped reading (growth `S`), and asserts
//! `S <= C + SLACK`. A socket that holds at most one page costs ~64 frames
//! (~40 KiB) plus its fixed WebSocket buffers; one that buffered the backlog
//! in memory would cost `READERS` × 100k × ~500 B ≈ 200 MB, far above `SLACK`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use threadline_tests::{
    append_thinking, rss_of, seq, started_run, token, Api, Options, TestServer,
};

const TASKS: usize = 4;
const BATCH: usize = 1000;
const PAD: usize = 200;
const EVENTS: usize = 100_000;
const READERS: usize = 4;
const SLACK: u64 = 64 << 20;

/// Appends `events` (a multiple of TASKS × BATCH) from TASKS concurrent tasks,
/// one run each, sampling the server's RSS meanwhile; returns the peak RSS.
async fn append_sampling(
    server: &TestServer,
    agent: &Api,
    runs: &[String],
    first: u64,
    events: usize,
) -> u64 {
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(server.rss_bytes()));
    let pid = server.pid();
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let tasks: Vec<_> = runs
        .iter()
        .cloned()
        .map(|run| {
            let agent = agent.clone();
            tokio::spawn(async move {
                for b in 0..events / TASKS / BATCH {
                    let from = first + (b * BATCH) as u64;
                    append_thinking(&agent, &run, from, BATCH, PAD).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("appender");
    }
    done.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    peak.load(Ordering::Relaxed).max(server.rss_bytes())
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_reader_is_served_from_the_log_with_bounded_server_memory() {
    let started = Instant::now();
    // These readers pause for the whole append phase. A socket that takes no byte for
    // the send deadline is a non-reader and is dropped (issue 11); a slow reader is
    // not. The deadline is set beyond the append phase so that the pause is "slow".
    let server = TestServer::spawn_with(Options::env(&[("THREADLINE_WS_SEND_TIMEOUT", "10m")]));
    let agent = server.api(&token("bot", "agent"));
    let mut runs = Vec::new();
    for _ in 0..TASKS {
        runs.push(started_run(&agent, "slow").await.1);
    }
    let user = token("slow", "user");

    // Warm-up: some history, and one socket that replays it all.
    append_sampling(&server, &agent, &runs, 0, 20_000).await;
    let mut warm = server.socket(&user, "after=0").await.unwrap();
    warm.welcome().await.unwrap();
    let (replayed, _) = warm.until("caught_up").await.unwrap();
    assert_eq!(replayed.len(), 20_000 + 3 * TASKS);
    drop(warm);

    // Control: the workload with no socket open.
    let base_control = server.rss_bytes();
    let peak_control = append_sampling(&server, &agent, &runs, 20_000, EVENTS).await;
    let control = peak_control.saturating_sub(base_control);

    // The same workload while READERS sockets have stopped reading.
    let mut readers = Vec::new();
    for k in 0..READERS {
        let mut s = server
            .socket(&user, &format!("after=latest&client_id=slow{k}"))
            .await
            .unwrap();
        s.welcome().await.unwrap();
        let (none, caught_up) = s.until("caught_up").await.unwrap();
        assert!(none.is_empty(), "after=latest replays nothing: {none:?}");
        readers.push((s, seq(&caught_up)));
    }
    let head_before = readers[0].1;
    let base_slow = server.rss_bytes();
    let appended_at = Instant::now();
    let peak_slow = append_sampling(&server, &agent, &runs, 0, EVENTS).await;
    let append_time = appended_at.elapsed();
    let slow = peak_slow.saturating_sub(base_slow);
    eprintln!(
        "slow reader: control base {} MiB peak {} MiB growth {} MiB; with {READERS} stalled sockets base {} MiB peak {} MiB growth {} MiB; bound control + {} MiB; 100k appended in {:.1?}",
        base_control / MIB, peak_control / MIB, control / MIB,
        base_slow / MIB, peak_slow / MIB, slow / MIB, SLACK / MIB, append_time
    );
    assert!(
        slow <= control + SLACK,
        "stalled sockets grew the server by {} MiB, the same appends without them by {} MiB (slack {} MiB)",
        slow / MIB,
        control / MIB,
        SLACK / MIB
    );

    // Now they read: every event, consecutive user_seq, each run's events in order.
    let read_at = Instant::now();
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|(mut s, head)| {
            tokio::spawn(async move {
                let mut last_i = std::collections::HashMap::new();
                for n in 1..=EVENTS as u64 {
                    let f = s.frame().await.expect("frame");
                    assert_eq!(f["type"], "event", "{f}");
                    assert_eq!(seq(&f), head + n, "consecutive user_seq");
                    let i = f["data"]["i"].as_u64().unwrap();
                    let prev = last_i.insert(f["run_id"].as_str().unwrap().to_owned(), i);
                    assert!(
                        prev.is_none_or(|p| p + 1 == i),
                        "run order: {prev:?} then {i}"
                    );
                }
                // Nothing else queued: the next frame answers a ping.
                s.send(json!({"type": "ping"})).await.unwrap();
                assert_eq!(s.frame().await.unwrap(), json!({"type": "pong"}));
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("reader");
    }
    assert_eq!(head_before, (20_000 + 3 * TASKS) as u64 + EVENTS as u64);
    eprintln!(
        "slow reader: {READERS} sockets read 100k each in {:.1?}; test took {:.1?}",
        read_at.elapsed(),
        started.elapsed()
    );
}
