//! Issue 4, point 9: stop the server with SIGTERM, start it on the same data
//! dir: everything acknowledged before is there, ids stay idempotent, numbering
//! goes on, and sockets resume from their durable cursors.

use std::sync::Arc;

use serde_json::{json, Value};
use threadline_client::{AckMode, Resume};
use threadline_tests::{client_caught_up, token, TestServer};
use tokio::sync::Mutex;

/// Everything a reader can see of the server's state.
async fn snapshot(server: &TestServer, threads: &[String]) -> Value {
    let alice = server.api(&token("alice", "user"));
    let bob = server.api(&token("bob", "user"));
    let auditor = server.api(&token("carol", "auditor"));
    let mut per_thread = Vec::new();
    for t in threads {
        let detail = auditor.get(&format!("/v1/threads/{t}")).await;
        assert_eq!(detail.status, 200, "{}", detail.body);
        per_thread.push(json!({
            "detail": detail.body,
            "events": auditor.thread_events(t).await,
        }));
    }
    json!({
        "alice": alice.get("/v1/threads").await.body,
        "bob": bob.get("/v1/threads").await.body,
        "all": auditor.get("/v1/threads").await.body,
        "audit": auditor.audit_events("").await,
        "threads": per_thread,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_acknowledged_survives_a_sigterm_restart() {
    let server = TestServer::spawn_process();
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("bot", "agent"));
    let a1 = alice
        .create_thread(json!({"title": "first", "metadata": {"k": [1, 2]}}))
        .await;
    let a2 = alice
        .create_thread(json!({"thread_id": "thread_session_1_ab12"}))
        .await;
    let b1 = agent
        .create_thread(json!({"user_id": "bob", "title": "bob's"}))
        .await;
    let mut runs = Vec::new();
    for t in [&a1, &a2, &b1] {
        let run = agent.register_run(t).await;
        let r = agent.event(&run, "agent_started", json!({"t": t})).await;
        assert_eq!(r.status, 201, "{}", r.body);
        runs.push(run);
    }
    let keyed = uuid::Uuid::new_v4().to_string();
    let keyed_first = agent
        .post(
            &format!("/v1/runs/{}/events", runs[0]),
            &json!({"type": "tool_executing", "data": {"tool_call_id": "c1"}, "event_id": keyed}),
        )
        .await;
    assert_eq!(keyed_first.status, 201, "{}", keyed_first.body);
    let r = agent
        .post(
            "/v1/events",
            &json!({"events": [
                {"run_id": runs[1], "type": "agent_thinking", "data": {"x": 1}},
                {"run_id": runs[1], "type": "agent_completed", "data": {}},
                {"run_id": runs[2], "type": "agent_thinking", "data": {"y": "é"}},
            ]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);

    // A client of Alice's reads her events and acknowledges the first five; its flush
    // returns once that ack is durable.
    let alice_token = token("alice", "user");
    let mut client = server.client(&alice_token, |c| {
        c.client_id("phone")
            .resume(Resume::After(0))
            .ack_mode(AckMode::Manual)
    });
    let (replayed, caught_up) = client_caught_up(&mut client).await.unwrap();
    let alice_events = replayed.len() as u64;
    assert_eq!(caught_up, alice_events);
    client.ack(5);
    assert_eq!(client.flush().await, Ok(5));
    client.close().await;

    let threads = vec![a1.clone(), a2.clone(), b1.clone()];
    let before = snapshot(&server, &threads).await;
    // The log head (audit envelopes do not show the ack, which is a log record too).
    let ready = server.anonymous().get("/readyz").await;
    let head = ready.body["head"].as_u64().expect("readyz head");
    assert_eq!(ready.body["projected"], head);

    let mut server = server;
    let status = server.stop();
    assert!(status.success(), "SIGTERM did not exit cleanly: {status:?}");
    let server = TestServer::start(server.data.clone(), Default::default()).expect("restart");

    // Everything reads back the same.
    let after = snapshot(&server, &threads).await;
    assert_eq!(after, before);

    // The idempotency key is remembered.
    let agent = server.api(&token("bot", "agent"));
    let again = agent
        .post(
            &format!("/v1/runs/{}/events", runs[0]),
            &json!({"type": "tool_executing", "data": {"tool_call_id": "c1"}, "event_id": keyed}),
        )
        .await;
    assert_eq!((again.status, &again.body), (200, &keyed_first.body));
    // Run states too: the completed run stays closed, the open one goes on.
    agent
        .event(&runs[1], "agent_thinking", json!({}))
        .await
        .assert_error(409, "run_closed");
    let r = agent
        .event(&runs[0], "tool_completed", json!({"tool_call_id": "c1"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Numbering goes on where it stopped: global position, user_seq, thread version.
    assert_eq!(r.body["position"], head + 1);
    assert_eq!(r.body["user_seq"], alice_events + 1);
    let a1_events = before["threads"][0]["events"].as_array().unwrap().len() as u64;
    assert_eq!(r.body["thread_version"], a1_events + 1);

    // The client resumes after its durable cursor: exactly the unseen events.
    let mut client = server.client(&alice_token, |c| c.client_id("phone"));
    let (unseen, caught_up) = client_caught_up(&mut client).await.unwrap();
    let seqs: Vec<u64> = unseen.iter().map(|e| e.user_seq).collect();
    assert_eq!(seqs, (6..=alice_events + 1).collect::<Vec<_>>());
    assert_eq!(caught_up, alice_events + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_acknowledged_while_sigterm_arrives_are_kept() {
    let mut server = TestServer::spawn_process();
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("bot", "agent"));
    let thread = alice.create_thread(json!({})).await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let run = agent.register_run(&thread).await;
        assert_eq!(
            agent.event(&run, "agent_started", json!({})).await.status,
            201
        );
        runs.push(run);
    }

    // Four writers append as fast as they can; each remembers what was acknowledged.
    let acked: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let mut writers = Vec::new();
    for run in runs.clone() {
        let (agent, acked) = (agent.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let id = uuid::Uuid::new_v4().to_string();
                let body = json!({"type": "agent_thinking", "data": {"i": i}, "event_id": id});
                match agent
                    .try_post(&format!("/v1/runs/{run}/events"), &body)
                    .await
                {
                    Some(r) if r.status == 201 => acked.lock().await.push((id, r.body)),
                    // Refused or cut off by the shutdown: not acknowledged, nothing to check.
                    _ => return,
                }
            }
        }));
    }
    threadline_tests::eventually("some appends to land", || {
        let acked = acked.clone();
        async move { (acked.lock().await.len() >= 40).then_some(()) }
    })
    .await;
    let status = tokio::task::block_in_place(|| server.stop());
    assert!(status.success(), "SIGTERM did not exit cleanly: {status:?}");
    for w in writers {
        w.await.unwrap();
    }
    let server = TestServer::start(server.data.clone(), Default::default()).expect("restart");

    let alice = server.api(&token("alice", "user"));
    let frames = alice.thread_events(&thread).await;
    let acked = acked.lock().await;
    assert!(acked.len() >= 40);
    let stored: std::collections::HashMap<&str, &Value> = frames
        .iter()
        .map(|f| (f["event_id"].as_str().unwrap(), f))
        .collect();
    for (id, reply) in acked.iter() {
        let frame = stored
            .get(id.as_str())
            .unwrap_or_else(|| panic!("acknowledged event {id} lost: {reply}"));
        assert_eq!(frame["position"], reply["position"]);
        assert_eq!(frame["thread_version"], reply["thread_version"]);
        assert_eq!(frame["user_seq"], reply["user_seq"]);
    }
    // And the thread is dense: nothing half-written.
    let versions: Vec<u64> = frames
        .iter()
        .map(|f| f["thread_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=frames.len() as u64).collect::<Vec<_>>());
}
