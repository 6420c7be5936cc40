//! Issue 4, point 3, guarantee 1: while agents append thousands of events
//! concurrently, clients connect over and over from different resume points
//! (`after=0`, a point in the middle, `after=latest`, their acked cursor);
//! every connection sees `user_seq` = resume point + 1, + 2, … with no gap,
//! duplicate or reordering, across the replay → live hand-over.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use threadline_client::Resume;
use threadline_tests::{append_thinking, client_caught_up, seq, started_run, token, TestServer};

const APPENDERS: usize = 4;
const PER_APPENDER: usize = 5_000;
const CLIENTS: u64 = 4;
/// Live frames a connection reads after `caught_up` before it disconnects.
const LIVE: u64 = 150;
/// Events before the race: thread_created, run_registered, agent_started per appender.
const SETUP: u64 = 3 * APPENDERS as u64;
const FINAL: u64 = SETUP + (APPENDERS * PER_APPENDER) as u64;
/// Batch sizes the appenders cycle through (sum 1001; single events and big batches).
const SIZES: [usize; 8] = [1, 7, 250, 3, 40, 500, 1, 199];

#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    /// Connections whose replay ended while appends were still running and
    /// that then received live frames: the hand-over under concurrency.
    handovers: AtomicU64,
    frames: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_sees_consecutive_user_seq_across_the_hand_over() {
    let started = Instant::now();
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let user = token("race", "user");
    let mut runs = Vec::new();
    for _ in 0..APPENDERS {
        runs.push(started_run(&agent, "race").await.1);
    }
    let head = Arc::new(AtomicU64::new(SETUP));
    let done = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());

    let appenders: Vec<_> = runs
        .into_iter()
        .enumerate()
        .map(|(a, run)| {
            let (agent, head) = (agent.clone(), head.clone());
            tokio::spawn(async move {
                let (mut sent, mut k) = (0, a);
                while sent < PER_APPENDER {
                    let n = SIZES[k % SIZES.len()].min(PER_APPENDER - sent);
                    let results = append_thinking(&agent, &run, sent as u64, n, 0).await;
                    let last = results.iter().map(seq).max().unwrap();
                    head.fetch_max(last, Ordering::Relaxed);
                    sent += n;
                    k += 1;
                }
            })
        })
        .collect();

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (server_url, user, head, done, tally) = (
                server.ws_url("/v1/ws"),
                user.clone(),
                head.clone(),
                done.clone(),
                tally.clone(),
            );
            tokio::spawn(async move {
                let mut acked = 0;
                // Bounded: each connection ends by FINAL at the latest.
                for round in 0..10_000u64 {
                    if done.load(Ordering::Relaxed) && round > 0 {
                        break;
                    }
                    let observed = head.load(Ordering::Relaxed);
                    let (query, expect) = match (round + c) % 4 {
                        0 => ("after=0".to_owned(), Some(0)),
                        1 => {
                            let mid = observed * (1 + round % 7) / 8;
                            (format!("after={mid}"), Some(mid))
                        }
                        2 => ("after=latest".to_owned(), None),
                        _ => (format!("client_id=c{c}"), Some(acked)),
                    };
                    let url = format!("{server_url}?{query}");
                    let auth = format!("Bearer {user}");
                    let mut s =
                        threadline_tests::Socket::open(&url, &[], &[("authorization", &auth)])
                            .await
                            .expect("connect");
                    let w = s.welcome().await.expect("welcome");
                    let resume = w["resume_after"].as_u64().unwrap();
                    if let Some(e) = expect {
                        assert_eq!(resume, e, "{query}: resume point");
                    }
                    assert!(resume <= w["head"].as_u64().unwrap());
                    let mut last = resume;
                    let mut caught = None;
                    let mut live = 0;
                    loop {
                        let target = caught.map(|c: u64| (c + LIVE).min(FINAL));
                        if target.is_some_and(|t| last >= t) {
                            break;
                        }
                        let f = s.frame().await.expect("frame");
                        match f["type"].as_str() {
                            Some("event") => {
                                let n = seq(&f);
                                assert_eq!(
                                    n,
                                    last + 1,
                                    "{query}: after {last} came {n} (resume {resume})"
                                );
                                last = n;
                                if caught.is_some() {
                                    live += 1;
                                }
                                tally.frames.fetch_add(1, Ordering::Relaxed);
                            }
                            Some("caught_up") => {
                                assert!(caught.is_none(), "{query}: a second caught_up");
                                assert_eq!(seq(&f), last, "{query}: caught_up after {last}");
                                caught = Some(last);
                                if live == 0 && !done.load(Ordering::Relaxed) && last < FINAL {
                                    tally.handovers.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => panic!("{query}: unexpected frame {f}"),
                        }
                    }
                    if query.starts_with("client_id") {
                        acked = last;
                        s.send(json!({"type": "ack", "user_seq": last}))
                            .await
                            .unwrap();
                        s.send(json!({"type": "ping"})).await.unwrap();
                        loop {
                            let f = s.frame().await.expect("pong");
                            if f["type"] == "pong" {
                                break;
                            }
                            assert_eq!(seq(&f), last + 1, "{query}: frames stay consecutive");
                            last += 1;
                        }
                    }
                    tally.connections.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    for a in appenders {
        a.await.expect("appender");
    }
    let appended_in = started.elapsed();
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    assert_eq!(head.load(Ordering::Relaxed), FINAL);

    // Afterwards one more replay from 0, with the client, sees the whole history, dense.
    let mut client = server.client(&user, |c| c.resume(Resume::After(0)));
    let (all, caught_up) = client_caught_up(&mut client).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.user_seq).collect::<Vec<_>>(),
        (1..=FINAL).collect::<Vec<_>>()
    );
    assert_eq!(caught_up, FINAL);

    let connections = tally.connections.load(Ordering::Relaxed);
    let handovers = tally.handovers.load(Ordering::Relaxed);
    eprintln!(
        "hand-over: {FINAL} events appended by {APPENDERS} tasks in {appended_in:.1?}; {connections} connections, {handovers} hand-overs during appends, {} frames checked; test took {:.1?}",
        tally.frames.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(
        handovers >= CLIENTS,
        "the race was not exercised: only {handovers} connections caught up while appends ran"
    );
}
