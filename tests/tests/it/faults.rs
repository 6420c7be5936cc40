//! Storage faults injected through the log trait (the redb way): a wrapper
//! around a real `SledLog` that fails commits at a chosen point, before or
//! after the write reached the disk. The server must answer 503
//! `storage_unavailable`, never acknowledge what the log did not commit,
//! stop taking writes (fail-stop), and after a restart hold everything it
//! acknowledged, exactly once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use threadline_storage::{
    AppendResult, EventLog, Intercept, Intercepted, NewEvent, PendingAppend, SledLog, SledOptions,
    StorageError,
};
use threadline_tests::{started_run, token, Api, TestServer};
use uuid::Uuid;

/// What the next commit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Commits normally.
    None,
    /// Fails before anything is written, as a full disk does (`ENOSPC`).
    NoSpace,
    /// Writes, then fails, as an `fsync` error after the write does: the event
    /// may be on disk, but the commit was not acknowledged.
    AfterWrite,
}

/// The real log, with commits that fail when armed.
type Faulty = Intercepted<SledLog, Faults>;

#[derive(Debug)]
struct Faults {
    next: Mutex<Fault>,
    /// Set once a fault fired: like the real log, the wrapper then stops.
    stopped: AtomicBool,
}

fn open_faulty(dir: &std::path::Path) -> Arc<Faulty> {
    Arc::new(Intercepted::new(
        SledLog::open(dir, SledOptions::default()).expect("open log"),
        Faults {
            next: Mutex::new(Fault::None),
            stopped: AtomicBool::new(false),
        },
    ))
}

impl Faults {
    fn arm(&self, fault: Fault) {
        *self.next.lock().unwrap() = fault;
    }
}

fn no_space() -> StorageError {
    StorageError::Io("No space left on device (os error 28)".into())
}

impl Intercept<SledLog> for Faults {
    fn append(&self, inner: &SledLog, events: Vec<NewEvent>) -> PendingAppend {
        if self.stopped.load(Ordering::Acquire) {
            return PendingAppend::ready(Err(StorageError::Closed));
        }
        let fault = std::mem::replace(&mut *self.next.lock().unwrap(), Fault::None);
        match fault {
            Fault::None => inner.append(events),
            Fault::NoSpace => {
                self.stopped.store(true, Ordering::Release);
                PendingAppend::ready(Err(no_space()))
            }
            Fault::AfterWrite => {
                self.stopped.store(true, Ordering::Release);
                let written = inner.append(events);
                let (answer, pending) = PendingAppend::channel();
                std::thread::spawn(move || {
                    let result: AppendResult = written.wait().and(Err(no_space()));
                    let _ = answer.send(result);
                });
                pending
            }
        }
    }
    fn accepting(&self, inner: &SledLog) -> bool {
        !self.stopped.load(Ordering::Acquire) && inner.accepting()
    }
}

/// Appends one `agent_thinking` with `event_id`; the reply.
async fn think(agent: &Api, run: &str, event_id: Uuid, n: usize) -> threadline_tests::Reply {
    agent
        .post(
            &format!("/v1/runs/{run}/events"),
            &json!({"type": "agent_thinking", "data": {"n": n}, "event_id": event_id.to_string()}),
        )
        .await
}

/// Acknowledged appends, then `fault`, then a restart: what must hold at each step.
async fn acknowledged_then_fault(fault: Fault) {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let log = open_faulty(&log_dir);
    let server = TestServer::spawn_on(log.clone());
    let agent = server.api(&token("planner", "agent"));
    let (thread, run) = started_run(&agent, "alice").await;

    let mut acked: Vec<(Uuid, u64)> = Vec::new();
    for n in 0..20 {
        let id = Uuid::now_v7();
        let reply = think(&agent, &run, id, n).await;
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        acked.push((id, reply.body["position"].as_u64().unwrap()));
    }

    // The fault: the commit fails; the client must not hear success.
    log.hooks.arm(fault);
    let faulted = Uuid::now_v7();
    let reply = think(&agent, &run, faulted, 20).await;
    reply.assert_error(503, "storage_unavailable");
    // Fail-stop: later writes are refused too, and the server says it is not ready.
    let later = think(&agent, &run, Uuid::now_v7(), 21).await;
    later.assert_error(503, "storage_unavailable");
    let ready = server.anonymous().get("/readyz").await;
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert_eq!(ready.body["ready"], false);
    // Reads keep working from what was committed.
    let frames = agent
        .get(&format!("/v1/threads/{thread}/events?limit=1000"))
        .await;
    assert_eq!(frames.status, 200);

    server.shut_down().await.expect("clean shutdown");
    drop(log);

    // The fault clears (a restart): everything acknowledged is there, at its position.
    let reopened = SledLog::open(&log_dir, SledOptions::default()).expect("reopen");
    for (id, position) in &acked {
        let found = reopened.find_event(*id).unwrap();
        assert_eq!(
            found.map(|a| a.position.0),
            Some(*position),
            "acknowledged event {id} is not at {position}"
        );
    }
    let stored = reopened.find_event(faulted).unwrap();
    // Refused before writing: nothing of it may be there. (Written but not
    // acknowledged, it may or may not be: both are allowed.)
    if fault == Fault::NoSpace {
        assert!(stored.is_none(), "a refused event was stored");
    }
    drop(reopened);

    // A client that retries with the same event_id gets exactly one copy.
    let log = open_faulty(&log_dir);
    let server = TestServer::spawn_on(log.clone());
    let agent = server.api(&token("planner", "agent"));
    let retry = think(&agent, &run, faulted, 20).await;
    let expected = if stored.is_some() { 200 } else { 201 };
    assert_eq!(retry.status, expected, "{:?}", retry.body);
    if let Some(at) = stored {
        assert_eq!(retry.body["position"].as_u64(), Some(at.position.0));
    }
    // And alice replays every event once, in order, with dense user_seq.
    let mut socket = server
        .socket(&token("alice", "user"), "after=0")
        .await
        .unwrap();
    let (frames, caught_up) = socket.until("caught_up").await.unwrap();
    let events: Vec<&Value> = frames.iter().filter(|f| f["type"] == "event").collect();
    let seqs: Vec<u64> = events
        .iter()
        .map(|f| f["user_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(caught_up["user_seq"].as_u64(), Some(seqs.len() as u64));
    // thread_created, run_registered, agent_started, 20 acknowledged, the retried one.
    assert_eq!(events.len(), 3 + 20 + 1);
    let ids: std::collections::HashSet<&str> = events
        .iter()
        .map(|f| f["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "an event was delivered twice");
    server.shut_down().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_full_disk_is_answered_503_and_nothing_refused_is_stored() {
    acknowledged_then_fault(Fault::NoSpace).await;
}

#[tokio::test]
async fn a_commit_that_fails_after_writing_is_never_acknowledged_and_a_retry_is_idempotent() {
    acknowledged_then_fault(Fault::AfterWrite).await;
}

/// A real full disk: the real binary on a small tmpfs the test mounts itself.
/// Needs the right to mount (root in a container that allows it); without it the
/// test says so and checks nothing.
#[tokio::test]
async fn a_real_full_disk_stops_writes_without_acknowledging_and_loses_nothing() {
    use threadline_tests::Options;
    let root = tempfile::tempdir().unwrap();
    let mount = root.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&mount)
        .output();
    match &mounted {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!(
                "SKIPPED a_real_full_disk…: cannot mount a 24 MiB tmpfs here ({other:?}); \
                 the injected faults above still run"
            );
            return;
        }
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.clone());

    let data = Arc::new(tempfile::tempdir_in(&mount).unwrap());
    let mut server = TestServer::start(data.clone(), Options::default()).expect("start");
    let agent = server.api(&token("planner", "agent"));
    let (thread, run) = started_run(&agent, "alice").await;
    let pad = "x".repeat(60 * 1024);
    let mut acked: Vec<(String, u64)> = Vec::new();
    // What a full disk may do: answer 503 (the log stops taking writes), or stop the
    // server outright (fail-stop; a connection refused). Never acknowledge.
    let mut refused = None;
    for n in 0..2000 {
        let id = Uuid::now_v7().to_string();
        let reply = agent
            .try_post(
                &format!("/v1/runs/{run}/events"),
                &json!({"type": "agent_thinking", "data": {"n": n, "pad": pad}, "event_id": id}),
            )
            .await;
        match reply {
            Some(r) if r.status == 201 => acked.push((id, r.body["position"].as_u64().unwrap())),
            other => {
                refused = Some(other);
                break;
            }
        }
    }
    let refused = refused.expect("24 MiB filled without a refusal");
    assert!(acked.len() > 10, "only {} events fit", acked.len());
    match refused {
        Some(reply) => {
            if reply.status != 503 {
                eprintln!("server log: {:#?}", server.log.lock().unwrap());
            }
            reply.assert_error(503, "storage_unavailable");
            let again = agent
                .try_post(
                    &format!("/v1/runs/{run}/events"),
                    &json!({"type": "agent_thinking", "data": {}}),
                )
                .await;
            if let Some(again) = again {
                again.assert_error(503, "storage_unavailable");
            }
        }
        None => eprintln!(
            "the full disk stopped the server (fail-stop); its log: {:#?}",
            server.log.lock().unwrap()
        ),
    }

    // The fault clears: the disk grows, the server restarts on the same data dir.
    server.kill();
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(grown.success());
    let server = TestServer::start(data.clone(), Options::default()).expect("restart");
    let agent = server.api(&token("planner", "agent"));
    let mut stored = std::collections::HashMap::new();
    let mut after = 0;
    loop {
        let page = agent
            .get(&format!(
                "/v1/threads/{thread}/events?after_version={after}&limit=1000"
            ))
            .await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let events = page.body["events"].as_array().unwrap().clone();
        if events.is_empty() {
            break;
        }
        for e in &events {
            stored.insert(
                e["event_id"].as_str().unwrap().to_owned(),
                e["position"].as_u64().unwrap(),
            );
        }
        after = page.body["next_after_version"].as_u64().unwrap();
    }
    for (id, position) in &acked {
        assert_eq!(
            stored.get(id),
            Some(position),
            "acknowledged event {id} is missing after the disk filled"
        );
    }
    // And the server takes writes again.
    let reply = agent
        .post(
            &format!("/v1/runs/{run}/events"),
            &json!({"type": "agent_thinking", "data": {}}),
        )
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
}
