//! Issue 13: the Rust client (`threadline-client`) against the real server, through
//! faults a chat client meets: the server killed mid-stream and restarted on its data
//! dir, the TCP connection dropped or gone silent, a token expiring, a thousand events
//! appended while disconnected, and a relay that drops, repeats or swaps a frame.
//! Every case ends with every event delivered exactly once and in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use threadline_client::{
    AckMode, Backoff, Client, Config, Error, Event, Handle, Payload, Resume, State, TokenSource,
    Update,
};
use threadline_tests::{
    append_thinking, eventually, now_secs, sign, started_run, token, Options, Proxy, ProxyMode,
    Relay, Tamper, TestServer,
};

/// What a consumer saw, in order.
#[derive(Debug, Default)]
struct Seen {
    events: Vec<Event>,
    errors: Vec<Error>,
    states: Vec<State>,
    caught_up: Vec<u64>,
    ended: bool,
}

/// A consumer reading a client's stream in a task, which can be held at a count of
/// events (the client then stops reading its socket: the rest stays in the server's log).
#[derive(Clone)]
struct Consumer {
    seen: Arc<Mutex<Seen>>,
    hold_at: Arc<AtomicU64>,
    release: Arc<tokio::sync::Notify>,
    handle: Handle,
}

impl Consumer {
    fn start(client: Client) -> Consumer {
        let c = Consumer {
            seen: Arc::default(),
            hold_at: Arc::new(AtomicU64::new(u64::MAX)),
            release: Arc::default(),
            handle: client.handle(),
        };
        let me = c.clone();
        tokio::spawn(async move {
            let mut client = client;
            while let Some(update) = client.next().await {
                let held = {
                    let mut seen = me.seen.lock().unwrap();
                    match update {
                        Update::Event(e) => seen.events.push(e),
                        Update::Error(e) => seen.errors.push(e),
                        Update::State(s) => seen.states.push(s),
                        Update::CaughtUp { user_seq } => seen.caught_up.push(user_seq),
                    }
                    seen.events.len() as u64 == me.hold_at.load(Ordering::Acquire)
                };
                if held {
                    me.release.notified().await;
                }
            }
            me.seen.lock().unwrap().ended = true;
        });
        c
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().events.len()
    }

    /// Waits until `n` events were delivered.
    async fn events(&self, n: usize) {
        eventually(&format!("{n} events"), || async {
            (self.count() >= n).then_some(())
        })
        .await;
    }

    /// Holds the consumer once it has `n` events and waits for that.
    async fn hold_at(&self, n: usize) {
        self.hold_at.store(n as u64, Ordering::Release);
        self.events(n).await;
    }

    /// Moves the hold to `n` events (from a held consumer: it goes on until then).
    fn move_hold(&self, n: usize) {
        self.hold_at.store(n as u64, Ordering::Release);
        self.release.notify_one();
    }

    fn release(&self) {
        self.hold_at.store(u64::MAX, Ordering::Release);
        self.release.notify_one();
    }

    async fn ended(&self) {
        eventually("the stream to end", || async {
            self.seen.lock().unwrap().ended.then_some(())
        })
        .await;
    }

    fn errors(&self) -> Vec<Error> {
        self.seen.lock().unwrap().errors.clone()
    }

    fn states(&self) -> Vec<State> {
        self.seen.lock().unwrap().states.clone()
    }

    /// Every event `1..=n` exactly once, in order, each with its `data.i` as appended.
    fn assert_exactly_once(&self, n: u64) {
        let seen = self.seen.lock().unwrap();
        let seqs: Vec<u64> = seen.events.iter().map(|e| e.user_seq).collect();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "errors: {:?}",
            seen.errors
        );
        // Events 4.. are agent_thinking with i = user_seq - 4 (one started run first).
        for e in &seen.events[3..] {
            match &e.payload {
                Payload::AgentThinking(d) => assert_eq!(d["i"], json!(e.user_seq - 4)),
                other => panic!("user_seq {}: {other:?}", e.user_seq),
            }
        }
    }
}

fn fast_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        factor: 2.0,
    }
}

fn config(url: String, jwt: &str) -> Config {
    Config::new(url, TokenSource::fixed(jwt))
        .client_id("test")
        .backoff(fast_backoff())
}

fn has(errors: &[Error], f: impl Fn(&Error) -> bool) -> bool {
    errors.iter().any(f)
}

#[tokio::test]
async fn the_client_replays_goes_live_and_flush_makes_its_acks_durable() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 10, 0).await; // 1..=13
    let alice = token("alice", "user");
    let c = Consumer::start(Client::connect(config(server.ws_url(""), &alice)));
    c.events(13).await;
    append_thinking(&agent, &run, 10, 5, 0).await; // 14..=18, live
    c.events(18).await;
    assert_eq!(c.handle.flush().await, Ok(18));
    // The pong came after the ack was durable: a new socket resumes after it at once.
    let mut s = server.socket(&alice, "client_id=test").await.unwrap();
    assert_eq!(s.welcome().await.unwrap()["resume_after"], 18);
    c.handle.close().await;
    c.ended().await;
    c.assert_exactly_once(18);
    assert_eq!(
        c.states(),
        vec![
            State::Connecting,
            State::Replaying,
            State::Live,
            State::Closed
        ]
    );
    assert_eq!(c.seen.lock().unwrap().caught_up, vec![13]);
    assert!(c.errors().is_empty(), "{:?}", c.errors());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_mid_stream_and_restarted_loses_and_repeats_nothing() {
    let mut server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    for k in 0..3 {
        append_thinking(&agent, &run, k * 1000, 1000, 300).await; // 1..=3003
    }
    let proxy = Proxy::start(server.addr).await;
    let mut cfg = config(proxy.ws_url(), &token("alice", "user"));
    cfg.buffer = 8;
    let c = Consumer::start(Client::connect(cfg));
    c.hold_at(300).await;
    // Mid-replay: SIGKILL, no shutdown code runs.
    server.kill();
    c.release();
    server = TestServer::start(server.data.clone(), Options::default()).expect("restart");
    proxy.retarget(server.addr);
    let agent = server.api(&token("bot", "agent"));
    append_thinking(&agent, &run, 3000, 1000, 0).await; // 3004..=4003
    c.events(4003).await;
    c.assert_exactly_once(4003);
    assert!(c.states().contains(&State::Reconnecting));
    // Acks went on across the restart: the durable cursor is at the end.
    assert_eq!(c.handle.flush().await, Ok(4003));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_tcp_connections_mid_stream_lose_and_repeat_nothing() {
    // The real binary, so that the replay runs beside the test, not on its runtime.
    let server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    for k in 0..3 {
        append_thinking(&agent, &run, k * 1000, 1000, 300).await; // 1..=3003
    }
    let proxy = Proxy::start(server.addr).await;
    let mut cfg = config(proxy.ws_url(), &token("alice", "user"));
    cfg.buffer = 8;
    let c = Consumer::start(Client::connect(cfg));
    c.events(1).await;
    // Three cuts mid-replay: the consumer is held at a count, the link cut, the next
    // hold set before it goes on, so the replay cannot outrun the next cut.
    let mut at = 100;
    c.hold_at(at).await;
    for round in 0..3 {
        let before = proxy.accepted();
        proxy.cut();
        at += 900;
        c.move_hold(if round < 2 { at } else { u64::MAX as usize });
        eventually("a reconnect", || async {
            (proxy.accepted() > before).then_some(())
        })
        .await;
        if round < 2 {
            c.events(at).await;
        }
    }
    // And once live, with appends racing the cuts.
    c.events(3003).await;
    let appending = {
        let agent = agent.clone();
        let run = run.clone();
        tokio::spawn(async move {
            for k in 0..10 {
                append_thinking(&agent, &run, 3000 + k * 50, 50, 0).await;
            }
        })
    };
    for _ in 0..2 {
        let before = proxy.accepted();
        proxy.cut();
        eventually("a reconnect", || async {
            (proxy.accepted() > before).then_some(())
        })
        .await;
    }
    appending.await.unwrap();
    c.events(3503).await;
    c.assert_exactly_once(3503);
    assert!(proxy.accepted() >= 6, "{} connections", proxy.accepted());
}

#[tokio::test]
async fn a_connection_gone_silent_is_detected_and_replaced() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    let proxy = Proxy::start(server.addr).await;
    let cfg = config(proxy.ws_url(), &token("alice", "user")).keepalive(Duration::from_millis(300));
    let c = Consumer::start(Client::connect(cfg));
    c.events(3).await;
    proxy.freeze();
    append_thinking(&agent, &run, 0, 20, 0).await; // 4..=23, swallowed on the frozen link
    c.events(23).await;
    c.assert_exactly_once(23);
    assert!(
        has(&c.errors(), |e| matches!(e, Error::Timeout(_))),
        "{:?}",
        c.errors()
    );
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_appended_while_disconnected_arrive_once_in_order() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    let proxy = Proxy::start(server.addr).await;
    let c = Consumer::start(Client::connect(config(
        proxy.ws_url(),
        &token("alice", "user"),
    )));
    c.events(3).await;
    proxy.set_mode(ProxyMode::Refuse);
    proxy.cut();
    append_thinking(&agent, &run, 0, 1000, 0).await; // 4..=1003
    let refused = proxy.accepted() + 2;
    eventually("two refused reconnects", || async {
        (proxy.accepted() >= refused).then_some(())
    })
    .await;
    assert_eq!(c.count(), 3);
    proxy.set_mode(ProxyMode::Pass);
    c.events(1003).await;
    c.assert_exactly_once(1003);
}

/// Mints tokens for `sub` that live `ttl` seconds, counting the calls.
fn minting(sub: &'static str, ttl: u64, calls: Arc<AtomicU64>) -> TokenSource {
    TokenSource::provider(move || {
        calls.fetch_add(1, Ordering::Relaxed);
        let t = sign(&json!({"sub": sub, "role": "user", "exp": now_secs() + ttl}));
        async move { Ok::<_, std::convert::Infallible>(t) }
    })
}

#[tokio::test]
async fn a_token_provider_renews_before_exp_on_the_open_socket() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    let proxy = Proxy::start(server.addr).await;
    let calls = Arc::new(AtomicU64::new(0));
    let cfg =
        Config::new(proxy.ws_url(), minting("alice", 2, calls.clone())).backoff(fast_backoff());
    let c = Consumer::start(Client::connect(cfg));
    c.events(3).await;
    // Three renewals of a two-second token: well past the first token's exp.
    eventually("three renewals", || async {
        (calls.load(Ordering::Relaxed) >= 4).then_some(())
    })
    .await;
    append_thinking(&agent, &run, 0, 10, 0).await;
    c.events(13).await;
    c.assert_exactly_once(13);
    assert_eq!(proxy.accepted(), 1, "renewal needed no reconnect");
    assert!(!c.states().contains(&State::Reconnecting));
    assert!(c.errors().is_empty(), "{:?}", c.errors());
}

#[tokio::test]
async fn an_expired_token_4001_gets_a_new_token_and_a_reconnect() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    // A provider that will not renew early: a new token only half a second after the
    // current one expired, so the server's 4001 comes first.
    let current: Arc<Mutex<Option<u64>>> = Arc::default();
    let source = {
        let current = current.clone();
        TokenSource::provider(move || {
            let mut cur = current.lock().unwrap();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let result = match *cur {
                Some(exp) if now_ms < exp * 1000 + 500 => Err("too early to renew".to_owned()),
                _ => {
                    let exp = now_secs() + 2;
                    *cur = Some(exp);
                    Ok(sign(&json!({"sub": "alice", "exp": exp})))
                }
            };
            async move { result }
        })
    };
    let cfg = Config::new(server.ws_url(""), source)
        .client_id("t")
        .backoff(fast_backoff());
    let c = Consumer::start(Client::connect(cfg));
    c.events(3).await;
    eventually("a 4001", || async {
        has(&c.errors(), |e| {
            matches!(e, Error::Closed { code: 4001, .. })
        })
        .then_some(())
    })
    .await;
    append_thinking(&agent, &run, 0, 10, 0).await;
    c.events(13).await;
    c.assert_exactly_once(13);
    assert_eq!(c.handle.flush().await, Ok(13));
}

async fn tampered(tamper: Tamper, thread_filter: bool) -> Consumer {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (thread, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 17, 0).await; // 1..=20
    let relay = Relay::start(server.addr, tamper).await;
    let mut cfg = config(relay.ws_url(), &token("alice", "user")).resume(Resume::After(0));
    if thread_filter {
        cfg = cfg.thread_id(thread);
    }
    let c = Consumer::start(Client::connect(cfg));
    c.events(20).await;
    c.assert_exactly_once(20);
    // Keep the server until the consumer is done with it.
    c.handle.close().await;
    drop(server);
    c
}

#[tokio::test]
async fn a_dropped_frame_is_reported_as_a_gap_and_fetched_again() {
    let c = tampered(Tamper::Drop(5), false).await;
    assert_eq!(
        c.errors()[0],
        Error::Gap {
            expected: 5,
            got: 6,
            resume_after: 4
        }
    );
    let c = tampered(Tamper::Drop(5), true).await;
    assert!(
        matches!(
            c.errors()[0],
            Error::VersionGap {
                last: 4,
                got: 6,
                resume_after: 4,
                ..
            }
        ),
        "{:?}",
        c.errors()
    );
}

#[tokio::test]
async fn a_repeated_or_reordered_frame_is_reported_and_nothing_is_delivered_twice() {
    let c = tampered(Tamper::Repeat(5), false).await;
    assert_eq!(c.errors()[0], Error::Duplicate { got: 5, last: 5 });
    let c = tampered(Tamper::Swap(5), false).await;
    assert_eq!(
        c.errors()[0],
        Error::Gap {
            expected: 5,
            got: 6,
            resume_after: 4
        }
    );
    let c = tampered(Tamper::Repeat(7), true).await;
    assert_eq!(c.errors()[0], Error::Duplicate { got: 7, last: 7 });
}

#[tokio::test]
async fn a_flush_interrupted_by_a_dropped_connection_completes_on_the_next() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 47, 0).await; // 1..=50
    let proxy = Proxy::start(server.addr).await;
    let alice = token("alice", "user");
    let cfg = config(proxy.ws_url(), &alice).ack_mode(AckMode::Manual);
    let c = Consumer::start(Client::connect(cfg));
    c.events(50).await;
    c.handle.ack(40);
    // No ack has gone out yet (the batch waits up to 250 ms): the flush's ack and
    // ping go on a connection that is frozen, so only the next one can answer.
    proxy.freeze();
    let flush = tokio::spawn({
        let h = c.handle.clone();
        async move { h.flush().await }
    });
    proxy.cut();
    assert_eq!(flush.await.unwrap(), Ok(40));
    let mut s = server.socket(&alice, "client_id=test").await.unwrap();
    assert_eq!(s.welcome().await.unwrap()["resume_after"], 40);
}

#[tokio::test]
async fn what_cannot_work_ends_the_stream_with_the_reason() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    started_run(&agent, "alice").await; // head 3
    let bad = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";
    let expired = sign(&json!({"sub": "alice", "exp": now_secs() - 10}));
    type Expect = fn(&Error) -> bool;
    let cases: Vec<(&str, Config, Expect)> = vec![
        ("bad token", config(server.ws_url(""), bad), |e| {
            matches!(e, Error::Unauthorized(_))
        }),
        ("expired token", config(server.ws_url(""), &expired), |e| {
            matches!(e, Error::TokenExpired)
        }),
        (
            "after beyond head",
            config(server.ws_url(""), &token("alice", "user")).resume(Resume::After(4)),
            |e| matches!(e, Error::BadRequest(_)),
        ),
        (
            "wss",
            config("wss://127.0.0.1:1".into(), &token("alice", "user")),
            |e| matches!(e, Error::Config(_)),
        ),
    ];
    for (what, cfg, expected) in cases {
        let c = Consumer::start(Client::connect(cfg));
        c.ended().await;
        let errors = c.errors();
        assert!(errors.last().is_some_and(expected), "{what}: {errors:?}");
        assert!(errors.last().unwrap().is_fatal(), "{what}");
        assert_eq!(c.states().last(), Some(&State::Closed), "{what}");
        assert_eq!(c.count(), 0, "{what}");
    }
}

#[tokio::test]
async fn dropping_the_stream_stops_the_client_and_frees_its_socket() {
    let server = TestServer::spawn_with(Options {
        args: vec!["--max-connections-per-user".into(), "1".into()],
        ..Options::default()
    });
    let agent = server.api(&token("bot", "agent"));
    started_run(&agent, "alice").await;
    let alice = token("alice", "user");
    let c = Consumer::start(Client::connect(config(server.ws_url(""), &alice)));
    c.events(3).await;
    let handle = c.handle.clone();
    c.handle.close().await;
    drop(c);
    // A client whose stream is gone, with only a handle left, stops too, even when it
    // has nothing more to hand over (caught up and idle).
    let mut client = Client::connect(config(server.ws_url(""), &alice));
    let h = client.handle();
    threadline_tests::client_caught_up(&mut client)
        .await
        .unwrap();
    assert_eq!(h.state(), State::Live);
    drop(client);
    eventually("the client to stop", || async {
        (h.state() == State::Closed).then_some(())
    })
    .await;
    assert_eq!(handle.state(), State::Closed);
    // Its per-user slot (one allowed) is free again.
    eventually("a free slot", || async {
        let mut s = server.socket(&alice, "after=latest").await.ok()?;
        (s.frame().await.ok()?["type"] == "welcome").then_some(())
    })
    .await;
}
