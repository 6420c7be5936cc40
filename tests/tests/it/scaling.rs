//! Issue 15: several stateless gateways over one replicated JetStream log, on
//! a real 3-node `nats-server` cluster on 127.0.0.1 (skipped with a message
//! when nats-server is not installed; CI installs it and requires it).
//! Each gateway is a full server over its own `NatsLog` connection, own
//! local fold and own checkpoints; all of them share one stream.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

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

    /// A gateway in this process over its own connection to the stream.
    async fn gateway(&self, name: &str) -> TestServer {
        let options = self.options(name);
        let log = tokio::task::spawn_blocking(move || NatsLog::connect(options))
            .await
            .unwrap()
            .expect("connect to the JetStream log");
        TestServer::spawn_on(Arc::new(log))
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
    // A clean stop stores A's checkpoint in its data dir.
    a.shut_down().await.unwrap();

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
    // A gateway that never served has no checkpoint: verify says so and still passes.
    let (code, out, err) = tool(&["verify"], &log.data("fresh"));
    assert_eq!(code, Some(0), "verify on a fresh gateway dir: {out}{err}");
    assert!(out.contains("no projection checkpoint"), "{out}");
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
    let mut a = TestServer::spawn_with(Options {
        args: vec![
            "--log".into(),
            log.urls(),
            "--nats-stream".into(),
            log.stream.clone(),
            "--nats-subject-prefix".into(),
            log.stream.to_lowercase(),
        ],
        ..Options::default()
    });
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
