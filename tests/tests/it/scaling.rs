//! Issue 15: several stateless gateways over one replicated JetStream log, on
//! a real 3-node `nats-server` cluster on 127.0.0.1 (skipped with a message
//! when nats-server is not installed; CI installs it and requires it).
//! Each gateway is a full server over its own `NatsLog` connection, own
//! local fold and own checkpoints; all of them share one stream.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use threadline_client::{AckMode, Resume};
use threadline_storage_nats::{cluster, NatsLog, NatsOptions};
use threadline_tests::{
    append_thinking, client_caught_up, client_events, eventually, started_run, token, Options,
    TestServer,
};

/// A test's own stream on the shared cluster, and gateways over it.
struct Log {
    cluster: Arc<Mutex<cluster::NatsCluster>>,
    stream: String,
    dirs: tempfile::TempDir,
}

impl Log {
    fn new() -> Option<Log> {
        trace();
        let cluster = cluster::shared()?;
        Some(Log {
            cluster,
            stream: format!("S{}", uuid::Uuid::new_v4().simple()),
            dirs: tempfile::tempdir().unwrap(),
        })
    }

    /// A log on a cluster of this test's own, for a test that kills its nodes
    /// (the shared cluster's other tests must not lose a node under them).
    fn own() -> Option<Log> {
        trace();
        Some(Log {
            cluster: Arc::new(Mutex::new(cluster::own()?)),
            stream: format!("S{}", uuid::Uuid::new_v4().simple()),
            dirs: tempfile::tempdir().unwrap(),
        })
    }

    fn urls(&self) -> String {
        self.cluster.lock().unwrap().urls()
    }

    /// The options a gateway with data dir `<dirs>/<name>` uses (as `serve --log` would).
    fn options(&self, name: &str) -> NatsOptions {
        let data = self.dirs.path().join(name);
        let mut options = NatsOptions::new(&self.urls(), data.join("nats").join(&self.stream));
        options.stream = self.stream.clone();
        // Streams on one cluster may not share subjects.
        options.subject_prefix = self.stream.to_lowercase();
        options
    }

    /// A connection of gateway `name` to the stream.
    async fn connect(&self, name: &str) -> NatsLog {
        let options = self.options(name);
        tokio::task::spawn_blocking(move || NatsLog::connect(options))
            .await
            .unwrap()
            .expect("connect to the JetStream log")
    }

    /// A gateway in this process over its own connection to the stream.
    async fn gateway(&self, name: &str) -> TestServer {
        TestServer::spawn_on(Arc::new(self.connect(name).await))
    }

    /// A gateway whose view of the stream the test can hold ([`Held::hold`]).
    async fn held_gateway(&self, name: &str) -> (Arc<HeldLog>, TestServer) {
        let log = Arc::new(HeldLog::new(self.connect(name).await, Held::default()));
        (Arc::clone(&log), TestServer::spawn_on(log))
    }

    /// A gateway as a real `threadline serve` process over the stream, with `args` added.
    fn process(&self, args: &[&str]) -> TestServer {
        let mut all = vec![
            "--log".to_owned(),
            self.urls(),
            "--nats-stream".into(),
            self.stream.clone(),
            "--nats-subject-prefix".into(),
            self.stream.to_lowercase(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        TestServer::spawn_with(Options {
            args: all,
            ..Options::default()
        })
    }

    fn data(&self, name: &str) -> std::path::PathBuf {
        self.dirs.path().join(name)
    }
}

/// The JetStream backend's own log lines in a failing test's output.
fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("threadline_storage_nats=debug")
        .with_test_writer()
        .try_init();
}

/// What must show, 1: an agent appends through A, a user's socket on B gets
/// every event in order with a dense `user_seq`, across replay → live.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_socket_on_gateway_b_receives_what_gateway_a_appended_in_order() {
    let Some(log) = Log::new() else { return };
    let a = log.gateway("a").await;
    let b = log.gateway("b").await;
    let agent = a.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "ann").await;
    // Replayed part: appended before the socket exists.
    append_thinking(&agent, &run, 0, 40, 0).await;
    append_thinking(&agent, &run, 40, 1, 0).await;

    let mut client = b.client(&token("ann", "user"), |c| c);
    let (replayed, caught_up) = client_caught_up(&mut client).await.unwrap();
    assert!(caught_up >= 3 + 41, "caught up at {caught_up}");
    // Live part: appended through A while B's socket is live, in batches of mixed sizes.
    let appender = tokio::spawn(async move {
        let mut sent = 41;
        for n in [1, 7, 1, 25, 3, 60, 1, 1, 12] {
            append_thinking(&agent, &run, sent, n, 0).await;
            sent += n as u64;
        }
        sent
    });
    let total = 3 + 41 + (1 + 7 + 1 + 25 + 3 + 60 + 1 + 1 + 12);
    let live = client_events(&mut client, total - replayed.len())
        .await
        .unwrap();
    assert_eq!(appender.await.unwrap(), 41 + 111);
    let all: Vec<_> = replayed.iter().chain(&live).collect();
    assert_eq!(
        all.iter().map(|e| e.user_seq).collect::<Vec<_>>(),
        (1..=total as u64).collect::<Vec<_>>(),
        "user_seq on gateway B must be dense and in order"
    );
    // Positions are the stream's sequences: increasing with the user's order.
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    // The thinking events arrive in the order A appended them.
    let order: Vec<u64> = all
        .iter()
        .filter(|e| e.payload.event_type() == "agent_thinking")
        .map(|e| e.payload.data()["i"].as_u64().unwrap())
        .collect();
    assert_eq!(order, (0..152).collect::<Vec<_>>());
}

/// A gateway's log whose view can be held: while held, the gateway's
/// projector reads nothing and the log's head stays where it was when the hold
/// began (the gateway's view trails the stream, as if it had not heard of what
/// others appended since).
#[derive(Debug, Default)]
struct Held {
    /// The head while held.
    held: Mutex<Option<threadline_storage::Position>>,
    released: std::sync::Condvar,
}

impl Held {
    /// Holds `log`'s view until the returned guard is dropped (also when the test fails).
    fn hold(log: &HeldLog) -> Holding<'_> {
        *log.hooks.held.lock().unwrap() = Some(threadline_storage::EventLog::head(&log.inner));
        Holding(&log.hooks)
    }
}

type HeldLog = threadline_storage::Intercepted<NatsLog, Held>;

struct Holding<'a>(&'a Held);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        *self.0.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.0.released.notify_all();
    }
}

impl threadline_storage::Intercept<NatsLog> for Held {
    fn read_from(
        &self,
        inner: &NatsLog,
        from: threadline_storage::Position,
        limit: usize,
    ) -> Result<Vec<threadline_storage::Record>, threadline_storage::StorageError> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        drop(
            self.released
                .wait_while(held, |held| held.is_some())
                .unwrap_or_else(|p| p.into_inner()),
        );
        threadline_storage::EventLog::read_from(inner, from, limit)
    }

    fn head(&self, inner: &NatsLog) -> threadline_storage::Position {
        let held = *self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.unwrap_or_else(|| threadline_storage::EventLog::head(inner))
    }
}

/// A socket's history is the log's as of its connect, on any gateway: B, whose
/// fold trails what A acknowledged, answers `welcome` only once it has folded
/// that. Without the wait, `after=latest` replayed the event as if it were new,
/// the default resume ended its replay (`caught_up`) before it, and `after=N`
/// naming it (a client resuming on B what it had seen on A) was refused as
/// beyond the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_socket_on_a_trailing_gateway_starts_from_what_another_had_acknowledged() {
    let Some(log) = Log::new() else { return };
    let a = log.gateway("a").await;
    let (b_log, b) = log.held_gateway("b").await;
    let agent = a.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "ann").await; // ann's user_seq 1..=3

    let mut sent = 0;
    // (query, whether the socket replays the user's history up to that event)
    for (query, replays) in [
        ("after=latest", false),
        ("client_id=fresh", true),
        ("after=", false),
    ] {
        let holding = Held::hold(&b_log);
        append_thinking(&agent, &run, sent, 1, 0).await; // acknowledged through A
        sent += 1;
        let seen = 3 + sent; // its user_seq
        let query = match query {
            "after=" => format!("after={seen}"),
            q => q.to_owned(),
        };
        let mut socket = b.socket(&token("ann", "user"), &query).await.unwrap();
        // Until B's fold moves, its view ends before `seen`: it must not welcome.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), socket.welcome())
                .await
                .is_err(),
            "{query}: welcomed on a view that trails the log"
        );
        drop(holding);
        let welcome = socket.welcome().await.unwrap();
        assert_eq!(welcome["head"].as_u64(), Some(seen), "{query}: {welcome}");
        let (history, caught_up) = socket.until("caught_up").await.unwrap();
        assert_eq!(caught_up["user_seq"].as_u64(), Some(seen), "{query}");
        let history: Vec<u64> = history
            .iter()
            .map(|e| e["user_seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            history,
            if replays {
                (1..=seen).collect()
            } else {
                vec![]
            },
            "{query}: the replay up to caught_up"
        );
        // And then live, right after it.
        append_thinking(&agent, &run, sent, 1, 0).await;
        sent += 1;
        let live = socket.events(1).await.unwrap();
        assert_eq!(live[0]["user_seq"].as_u64(), Some(seen + 1), "{query}");
        assert_eq!(live[0]["data"]["i"].as_u64(), Some(sent - 1), "{query}");
    }
}

/// A command's rejection is judged on the log as of its arrival, on any
/// gateway: an agent that registered a run through A and appends to it through
/// B, whose fold trails, is answered once B has folded the run (201), not
/// `404 run_not_found` on B's trailing view.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trailing_gateway_judges_a_command_on_what_another_had_acknowledged() {
    let Some(log) = Log::new() else { return };
    let a = log.gateway("a").await;
    let (b_log, b) = log.held_gateway("b").await;
    let holding = Held::hold(&b_log);
    let (_thread, run) = started_run(&a.api(&token("bot", "agent")), "ann").await;
    let on_b = b.api(&token("bot", "agent"));
    let mut append = tokio::spawn(async move {
        on_b.post(
            &format!("/v1/runs/{run}/events"),
            &json!({"type": "agent_thinking", "data": {"i": 0}}),
        )
        .await
    });
    // Until B's fold moves, its view has no such run: it must not answer.
    if let Ok(answered) = tokio::time::timeout(Duration::from_millis(300), &mut append).await {
        panic!(
            "answered on a view that trails the log: {:?}",
            answered.unwrap().body
        );
    }
    drop(holding);
    let r = append.await.unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["user_seq"].as_u64(), Some(4), "{}", r.body);
}

/// One agent writer on gateway `api`: appends `n` events tagged `who` to
/// `run`, each on the thread version it last saw (If-Match); a 409 is
/// answered by reading the thread's version again and retrying.
async fn writer(api: threadline_tests::Api, run: String, thread: String, who: &str, n: u64) -> u64 {
    let mut conflicts = 0;
    let mut version = thread_version(&api, &thread).await;
    for k in 0..n {
        loop {
            let r = api
                .post_if_match(
                    &format!("/v1/runs/{run}/events"),
                    &json!({"type": "agent_thinking", "data": {"who": who, "k": k}}),
                    version,
                )
                .await;
            match r.status {
                201 => {
                    version = r.body["thread_version"].as_u64().unwrap();
                    break;
                }
                409 => {
                    assert_eq!(r.body["error"]["code"], "version_conflict", "{}", r.body);
                    conflicts += 1;
                    version = thread_version(&api, &thread).await;
                }
                s => panic!("append answered {s}: {}", r.body),
            }
        }
    }
    conflicts
}

/// The thread's version as this gateway's read model has it (a gateway that
/// has not folded the thread yet answers 404 for a moment).
async fn thread_version(api: &threadline_tests::Api, thread: &str) -> u64 {
    threadline_tests::eventually("the gateway to know the thread", || async {
        let r = api.get(&format!("/v1/threads/{thread}")).await;
        assert!(matches!(r.status, 200 | 404), "{}", r.body);
        r.body["version"].as_u64()
    })
    .await
}

/// What must show, 2: concurrent appends to one thread through both gateways,
/// each on its expected version: every append lands exactly once, none is
/// lost or duplicated, and the losers of a race get 409 and retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_through_two_gateways_lose_nothing_and_duplicate_nothing() {
    let Some(log) = Log::new() else { return };
    let a = log.gateway("a").await;
    let b = log.gateway("b").await;
    let (agent_a, agent_b) = (a.api(&token("bot", "agent")), b.api(&token("bot", "agent")));
    let (thread, run) = started_run(&agent_a, "cy").await;
    const N: u64 = 60;
    let wa = tokio::spawn(writer(agent_a.clone(), run.clone(), thread.clone(), "a", N));
    let wb = tokio::spawn(writer(agent_b.clone(), run.clone(), thread.clone(), "b", N));
    let conflicts = wa.await.unwrap() + wb.await.unwrap();

    for api in [&agent_a, &agent_b] {
        // Both gateways' read models reach the same thread (reads may trail the log briefly).
        let events: Vec<Value> = threadline_tests::eventually("both gateways folded", || async {
            let events = api.thread_events(&thread).await;
            (events.len() as u64 == 3 + 2 * N).then_some(events)
        })
        .await;
        let versions: Vec<u64> = events
            .iter()
            .map(|e| e["thread_version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, (1..=3 + 2 * N).collect::<Vec<_>>());
        let mut seen = HashSet::new();
        for e in events.iter().filter(|e| e["event"] == "agent_thinking") {
            let key = (
                e["data"]["who"].as_str().unwrap().to_owned(),
                e["data"]["k"].as_u64().unwrap(),
            );
            assert!(seen.insert(key.clone()), "duplicate {key:?}");
        }
        assert_eq!(seen.len() as u64, 2 * N, "every append exactly once");
    }
    eprintln!("two gateways, {N} appends each: {conflicts} conflicts answered 409 and retried");
}

/// What must show, 5: `threadline verify` and `threadline rebuild` read the
/// JetStream log (every record's checksum, dense positions and versions) and
/// compare and replace a gateway's stored projections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_and_rebuild_work_against_the_jetstream_log() {
    let Some(log) = Log::new() else { return };
    let a = log.gateway("a").await;
    let agent = a.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "vi").await;
    append_thinking(&agent, &run, 0, 30, 10).await;
    append_thinking(&agent, &run, 30, 1, 10).await;
    let tool = |args: &[&str], data: &Path| {
        let out = std::process::Command::new(threadline_tests::binary())
            .args(args)
            .arg("--data")
            .arg(data)
            .args([
                "--log",
                &log.urls(),
                "--nats-stream",
                &log.stream,
                "--quiet",
            ])
            .args(["--nats-subject-prefix", &log.stream.to_lowercase()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let data = log.data("a");
    // A serving gateway holds its dir: a rebuild on it is refused, and changes nothing.
    let (code, _, err) = tool(&["rebuild"], &data);
    assert_ne!(code, Some(0), "rebuild under a serving gateway: {err}");
    assert!(err.contains("in use"), "{err}");
    // A clean stop stores A's checkpoint in its data dir and lets it go.
    a.shut_down().await.unwrap();
    let (code, out, err) = tool(&["verify"], &data);
    assert_eq!(code, Some(0), "verify: {out}{err}");
    assert!(out.contains("head position 34"), "{out}");
    assert!(out.contains("positions checked: 1 to 34 (0 bad)"), "{out}");
    let (code, out, err) = tool(&["rebuild"], &data);
    assert_eq!(code, Some(0), "rebuild: {out}{err}");
    assert!(out.contains("from 34 events"), "{out}");
    assert!(
        out.contains("registry: the replaced checkpoint matched the rebuild"),
        "{out}"
    );
    // A data dir that does not exist is an error, and the tool does not create it.
    let (code, _, err) = tool(&["verify"], &log.data("missing"));
    assert_ne!(code, Some(0));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!log.data("missing").exists(), "verify created the data dir");
    // A gateway that never served has no checkpoint: verify says so, compares
    // nothing (and says that too), and passes.
    std::fs::create_dir_all(log.data("fresh")).unwrap();
    let (code, out, err) = tool(&["verify"], &log.data("fresh"));
    assert_eq!(code, Some(0), "verify on a fresh gateway dir: {out}{err}");
    assert!(out.contains("no projection checkpoint to compare"), "{out}");
    // A stream that does not exist is named, not created.
    let (code, _, err) = {
        let out = std::process::Command::new(threadline_tests::binary())
            .args(["verify", "--quiet", "--data"])
            .arg(&data)
            .args(["--log", &log.urls(), "--nats-stream", "NO_SUCH_STREAM"])
            .output()
            .unwrap();
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_ne!(code, Some(0));
    assert!(err.contains("NO_SUCH_STREAM"), "{err}");
}

/// What must show, 4: gateway A, a real `threadline serve` process, is SIGKILLed
/// while a user's socket on it is mid-stream; the client reconnects to gateway B
/// and resumes after its durable cursor (acks are records in the shared stream):
/// nothing lost, nothing at or before the cursor delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_of_a_killed_gateway_resumes_on_another_after_its_durable_cursor() {
    let Some(log) = Log::new() else { return };
    let mut a = log.process(&[]);
    let b = log.gateway("b").await;
    let agent = b.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "kai").await;
    append_thinking(&agent, &run, 0, 20, 0).await;
    let user = token("kai", "user");
    // Acks only what the test marks, so the durable cursor is known exactly.
    let manual = |mut c: threadline_client::Config| {
        c.acks.mode = AckMode::Manual;
        c.resume(Resume::Cursor)
    };

    let mut on_a = a.client(&user, manual);
    let (replayed, caught_up) = client_caught_up(&mut on_a).await.unwrap();
    assert_eq!((replayed.len(), caught_up), (23, 23));
    // Live through B while the socket on A reads: 100 more events.
    let appender = {
        let agent = agent.clone();
        let run = run.clone();
        tokio::spawn(async move {
            for k in 0..20 {
                append_thinking(&agent, &run, 20 + 5 * k, 5, 0).await;
            }
        })
    };
    let live = client_events(&mut on_a, 30).await.unwrap();
    assert_eq!(live.last().unwrap().user_seq, 53);
    on_a.handle().ack(53);
    assert_eq!(on_a.handle().flush().await.unwrap(), 53, "durable cursor");
    // Read past the cursor without acking, then A dies mid-stream.
    let unacked = client_events(&mut on_a, 10).await.unwrap();
    assert_eq!(unacked.last().unwrap().user_seq, 63);
    a.kill();
    drop(on_a);
    appender.await.unwrap();

    // B has folded the ack (it is a record of the stream) before the client returns.
    let auditor = b.api(&token("audrey", "auditor"));
    eventually("gateway B to fold the ack through A", || {
        let auditor = auditor.clone();
        async move {
            let r = auditor.get("/v1/audit/deliveries?user_id=kai").await;
            let acked = r.body["deliveries"]
                .as_array()?
                .iter()
                .any(|d| d["client_id"] == "test" && d["user_seq"].as_u64() == Some(53));
            acked.then_some(())
        }
    })
    .await;
    let mut on_b = b.client(&user, manual);
    let (resumed, caught_up) = client_caught_up(&mut on_b).await.unwrap();
    assert_eq!(caught_up, 123, "3 + 120 events of kai");
    assert_eq!(
        resumed.iter().map(|e| e.user_seq).collect::<Vec<_>>(),
        (54..=123).collect::<Vec<_>>(),
        "resumed right after the durable cursor, dense, nothing twice"
    );
    // The ten read but not acked on A come again (at least once), the same events.
    for (again, first) in resumed.iter().zip(&unacked) {
        assert_eq!(again.event_id, first.event_id);
    }
}

/// What one agent writer of check 3 has had acknowledged.
#[derive(Default)]
struct Acked {
    /// (event id, position) of every acknowledged append, in order.
    events: Mutex<Vec<(String, u64)>>,
    /// The longest time one append took to be acknowledged, retries included.
    longest: Mutex<Duration>,
    /// Answers other than 201/200 (or no answer) seen on the way, by status (0 = none).
    refused: Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Acked {
    fn count(&self) -> usize {
        self.events.lock().unwrap().len()
    }
}

/// Appends `agent_thinking` events to `run` through `api`, one at a time, until
/// `stop`; an append that is not acknowledged (a 5xx, no answer) is sent again
/// with the same event id until it is, so the writer's record is exactly what
/// the log must hold. Panics when one append stays unacknowledged for 60 s:
/// the gateway stopped serving.
async fn acked_writer(
    api: threadline_tests::Api,
    run: String,
    acked: Arc<Acked>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut k = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let id = uuid::Uuid::new_v4().to_string();
        let body = json!({"type": "agent_thinking", "data": {"k": k}, "event_id": id});
        let started = Instant::now();
        let position = loop {
            let reply = api.try_post(&format!("/v1/runs/{run}/events"), &body).await;
            match reply {
                Some(r) if matches!(r.status, 200 | 201) => {
                    break r.body["position"].as_u64().expect("position");
                }
                Some(r) if r.status < 500 => panic!("append answered {}: {}", r.status, r.body),
                other => {
                    let status = other.map_or(0, |r| r.status);
                    *acked.refused.lock().unwrap().entry(status).or_default() += 1;
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "the gateway acknowledged nothing for 60 s (last answer {status})"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let took = started.elapsed();
        let mut longest = acked.longest.lock().unwrap();
        *longest = (*longest).max(took);
        drop(longest);
        acked.events.lock().unwrap().push((id, position));
        k += 1;
    }
}

/// Waits until `f` holds, failing with `what` after `within`.
async fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What must show, 3: the stream leader, a real `nats-server`, is SIGKILLed
/// while agents append through both gateways and a user's socket on B is live.
/// Every acknowledged event is in the stream at the position its answer named,
/// exactly once, with gap-free positions; both gateways keep acknowledging
/// appends (each writer gets 100 more after the kill, the socket gets every
/// event of its user in order); the node, started again, catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_node_killed_mid_ingest_loses_nothing_acknowledged_and_gateways_keep_serving() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(log) = Log::own() else { return };
    let a = log.gateway("a").await;
    let b = log.gateway("b").await;
    let (agent_a, agent_b) = (a.api(&token("bot", "agent")), b.api(&token("bot", "agent")));
    let (ann_thread, ann_run) = started_run(&agent_a, "ann").await;
    let (bob_thread, bob_run) = started_run(&agent_b, "bob").await;
    let mut ann = b.client(&token("ann", "user"), |c| c);
    let (replayed, _) = client_caught_up(&mut ann).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (acked_a, acked_b) = (Arc::new(Acked::default()), Arc::new(Acked::default()));
    let wa = tokio::spawn(acked_writer(
        agent_a.clone(),
        ann_run,
        Arc::clone(&acked_a),
        Arc::clone(&stop),
    ));
    let wb = tokio::spawn(acked_writer(
        agent_b.clone(),
        bob_run,
        Arc::clone(&acked_b),
        Arc::clone(&stop),
    ));
    let both = |n: usize| acked_a.count() >= n && acked_b.count() >= n;
    wait_until(
        "100 appends through each gateway",
        Duration::from_secs(60),
        || both(100),
    )
    .await;

    // SIGKILL the stream's leader mid-ingest.
    let leader = {
        let cluster = log.cluster.lock().unwrap();
        let name = cluster
            .replica_state(0, &log.stream)
            .and_then(|s| s.2)
            .expect("a stream leader");
        cluster.index_of(&name).expect("the leader is a node")
    };
    let before = (acked_a.count(), acked_b.count());
    log.cluster.lock().unwrap().kill(leader).unwrap();
    let killed = Instant::now();
    wait_until(
        "100 more appends through each gateway after the kill",
        Duration::from_secs(90),
        || acked_a.count() >= before.0 + 100 && acked_b.count() >= before.1 + 100,
    )
    .await;
    let serving_again = killed.elapsed();

    // Start it again while the appends go on; it must catch up.
    log.cluster.lock().unwrap().restart(leader).unwrap();
    let restarted = (acked_a.count(), acked_b.count());
    let restart = Instant::now();
    wait_until(
        "50 more appends through each gateway after the restart",
        Duration::from_secs(90),
        || acked_a.count() >= restarted.0 + 50 && acked_b.count() >= restarted.1 + 50,
    )
    .await;
    let after_restart = restart.elapsed();
    stop.store(true, Ordering::SeqCst);
    wa.await.unwrap();
    wb.await.unwrap();
    // A replica that rejoins catches up from the leader (a snapshot, then the
    // entries it missed): seconds, more on a loaded machine.
    let stopped = Instant::now();
    let caught_up = || {
        let cluster = log.cluster.lock().unwrap();
        let states: Option<Vec<(u64, u64)>> = (0..3)
            .map(|i| cluster.replica_state(i, &log.stream).map(|s| (s.0, s.1)))
            .collect();
        states
            .filter(|s| s.iter().all(|x| *x == s[0]))
            .map(|s| s[0])
    };
    wait_until(
        "the restarted node to catch up",
        Duration::from_secs(120),
        || caught_up().is_some(),
    )
    .await;
    let catch_up = stopped.elapsed();
    let (last, messages) = caught_up().unwrap();
    assert_eq!(
        messages, last,
        "every node holds sequences 1..={last} with no gap"
    );

    // Every acknowledged append is in the stream at its position, once; nothing else was written.
    let reader = {
        let mut options = log.options("reader");
        options.create = false;
        tokio::task::spawn_blocking(move || NatsLog::connect(options))
            .await
            .unwrap()
            .unwrap()
    };
    use threadline_storage::{EventLog, Position};
    let records = reader.read_from(Position(1), last as usize + 10).unwrap();
    assert_eq!(
        records.iter().map(|r| r.position.0).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "positions are gap-free"
    );
    let stored: std::collections::HashMap<String, u64> = records
        .iter()
        .map(|r| (r.event_id.to_string(), r.position.0))
        .collect();
    assert_eq!(stored.len(), records.len(), "no event id stored twice");
    for acked in [&acked_a, &acked_b] {
        for (id, position) in acked.events.lock().unwrap().iter() {
            assert_eq!(
                stored.get(id),
                Some(position),
                "acknowledged event {id} at {position}"
            );
        }
    }
    for (agent, thread, acked) in [
        (&agent_a, &ann_thread, &acked_a),
        (&agent_b, &bob_thread, &acked_b),
    ] {
        let n = acked.count();
        let events = eventually("the gateway to fold every append", || async {
            let events = agent.thread_events(thread).await;
            (events.len() == 3 + n).then_some(events)
        })
        .await;
        assert_eq!(
            events
                .iter()
                .map(|e| e["thread_version"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            (1..=3 + n as u64).collect::<Vec<_>>(),
            "one thread event per acknowledged append, dense"
        );
    }
    // Ann's socket on B got every event of hers, in order, across the kill.
    let n = 3 + acked_a.count();
    let live = client_events(&mut ann, n - replayed.len()).await.unwrap();
    let seqs: Vec<u64> = replayed.iter().chain(&live).map(|e| e.user_seq).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
    eprintln!(
        "killed the stream leader {} mid-ingest: both gateways acknowledged 100 more each {serving_again:?} later \
         (50 more each {after_restart:?} after its restart, caught up {catch_up:?} after the appends stopped); \
         longest single append {:?} (A) / {:?} (B); answers before an ack: {:?} (A) / {:?} (B); {last} positions",
        log.cluster.lock().unwrap().name(leader),
        acked_a.longest.lock().unwrap(),
        acked_b.longest.lock().unwrap(),
        acked_a.refused.lock().unwrap(),
        acked_b.refused.lock().unwrap(),
    );
    // Stop the gateways while their cluster still runs.
    drop(ann);
    a.shut_down().await.unwrap();
    b.shut_down().await.unwrap();
}

/// Run TTL expiry with two gateways, each sweeping idle runs several times per
/// TTL on its own: every idle run gets exactly one `run_expired` (the loser of
/// the race plans on a thread version that moved and is judged again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_expire_each_idle_run_exactly_once() {
    let Some(log) = Log::new() else { return };
    let a = log.process(&["--run-ttl", "1s"]);
    let b = log.process(&["--run-ttl", "1s"]);
    let (agent_a, agent_b) = (a.api(&token("bot", "agent")), b.api(&token("bot", "agent")));
    let mut runs = Vec::new();
    for t in 0..4 {
        let thread = agent_a.create_thread(json!({"user_id": "eve"})).await;
        for r in 0..5 {
            // Registered through both gateways, some started, some never.
            let agent = if (t + r) % 2 == 0 { &agent_a } else { &agent_b };
            let run = thread_run(agent, &thread).await;
            if r % 2 == 0 {
                // The run may already have expired when the gateway is slow: both are fine.
                let r = agent.event(&run, "agent_started", json!({})).await;
                assert!(r.status == 201 || r.code() == "run_expired", "{}", r.body);
            }
            runs.push((thread.clone(), run));
        }
    }
    for api in [&agent_a, &agent_b] {
        for (thread, run) in &runs {
            eventually("every run to expire on both gateways", || async {
                let r = api.get(&format!("/v1/threads/{thread}")).await;
                let status = r.body["runs"]
                    .as_array()?
                    .iter()
                    .find(|x| x["run_id"] == json!(run))?["status"]
                    .clone();
                (status == "expired").then_some(())
            })
            .await;
        }
    }
    let auditor = b.api(&token("audrey", "auditor"));
    let expired = auditor.audit_events("type=run_expired&user_id=eve").await;
    for (_, run) in &runs {
        let n = expired.iter().filter(|e| e["run_id"] == json!(run)).count();
        assert_eq!(n, 1, "run {run} expired {n} times");
    }
    assert_eq!(expired.len(), runs.len());
}

/// Registers a run on `thread` through `agent` (the gateway may not have folded
/// the thread created through the other one yet: 404 for a moment).
async fn thread_run(agent: &threadline_tests::Api, thread: &str) -> String {
    eventually("the gateway to know the thread", || async {
        let r = agent
            .post(
                &format!("/v1/threads/{thread}/runs"),
                &json!({"agent_name": "ttl"}),
            )
            .await;
        assert!(matches!(r.status, 201 | 404), "{}", r.body);
        r.body["run_id"].as_str().map(String::from)
    })
    .await
}
