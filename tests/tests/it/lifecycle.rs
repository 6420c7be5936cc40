//! Issue 4, point 8: the run lifecycle, idempotent `event_id`, `If-Match`
//! conflicts, all-or-none batches and run expiry, over HTTP.

use serde_json::{json, Value};
use threadline_tests::{eventually, token, Api, Options, TestServer};

async fn setup(server: &TestServer) -> (Api, Api, String) {
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("bot", "agent"));
    let thread = alice.create_thread(json!({"title": "life"})).await;
    (alice, agent, thread)
}

async fn run_of(alice: &Api, thread: &str, run: &str) -> Value {
    let r = alice.get(&format!("/v1/threads/{thread}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["run_id"] == run)
        .cloned()
        .unwrap_or_else(|| panic!("run {run} not in {}", r.body))
}

#[tokio::test]
async fn a_run_goes_from_registered_through_started_to_one_terminal_event() {
    let server = TestServer::spawn();
    let (alice, agent, thread) = setup(&server).await;
    let run = agent.register_run(&thread).await;
    assert_eq!(run_of(&alice, &thread, &run).await["status"], "registered");

    let steps: &[(&str, Value, u16, &str)] = &[
        ("agent_thinking", json!({}), 422, "invalid_lifecycle"),
        ("agent_completed", json!({}), 422, "invalid_lifecycle"),
        ("agent_started", json!({}), 201, ""),
        ("agent_started", json!({}), 422, "invalid_lifecycle"),
        ("agent_thinking", json!({"text": "hm"}), 201, ""),
        ("tool_executing", json!({"tool_call_id": "c1"}), 201, ""),
        (
            "tool_executing",
            json!({"tool_call_id": "c1"}),
            422,
            "invalid_lifecycle",
        ),
        (
            "tool_completed",
            json!({"tool_call_id": "c2"}),
            422,
            "invalid_lifecycle",
        ),
        (
            "tool_completed",
            json!({"tool_call_id": 5}),
            400,
            "invalid_request",
        ),
        ("tool_completed", json!({"tool_call_id": "c1"}), 201, ""),
        (
            "tool_completed",
            json!({"tool_call_id": "c1"}),
            422,
            "invalid_lifecycle",
        ),
        ("tool_executing", json!({}), 201, ""),
        ("tool_completed", json!({}), 201, ""),
        ("agent_completed", json!({"answer": 42}), 201, ""),
        ("agent_thinking", json!({}), 409, "run_closed"),
        ("agent_error", json!({}), 409, "run_closed"),
        ("agent_completed", json!({}), 409, "run_closed"),
    ];
    let mut version = 2; // thread_created, run_registered
    let mut last_position = 2;
    for (i, (kind, data, status, code)) in steps.iter().enumerate() {
        let r = agent.event(&run, kind, data.clone()).await;
        if *status == 201 {
            assert_eq!(r.status, 201, "step {i} {kind}: {}", r.body);
            version += 1;
            assert_eq!(r.body["thread_version"], version, "step {i}");
            assert_eq!(r.body["user_seq"], version, "step {i}: alice's only thread");
            assert_eq!(r.body["thread_id"], json!(thread));
            assert_eq!(r.body["run_id"], json!(run));
            let position = r.body["position"].as_u64().unwrap();
            assert!(position > last_position, "step {i}");
            last_position = position;
        } else {
            r.assert_error(*status, code);
        }
    }
    let summary = run_of(&alice, &thread, &run).await;
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["last_event"], "agent_completed");

    // Only the accepted events are in the thread, in order, with dense versions.
    let frames = alice.thread_events(&thread).await;
    let kinds: Vec<&str> = frames
        .iter()
        .map(|f| f["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "thread_created",
            "run_registered",
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "tool_executing",
            "tool_completed",
            "agent_completed"
        ]
    );
    let versions: Vec<u64> = frames
        .iter()
        .map(|f| f["thread_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=9).collect::<Vec<_>>());
    assert_eq!(frames[8]["data"], json!({"answer": 42}));

    // agent_error is terminal too, and the run shows as failed.
    let other = agent.register_run(&thread).await;
    assert_eq!(
        agent.event(&other, "agent_started", json!({})).await.status,
        201
    );
    assert_eq!(
        agent
            .event(&other, "agent_error", json!({"why": "x"}))
            .await
            .status,
        201
    );
    agent
        .event(&other, "agent_thinking", json!({}))
        .await
        .assert_error(409, "run_closed");
    assert_eq!(run_of(&alice, &thread, &other).await["status"], "failed");

    // Unknown runs, and run ids that are taken.
    agent
        .event(
            &uuid::Uuid::new_v4().to_string(),
            "agent_started",
            json!({}),
        )
        .await
        .assert_error(404, "run_not_found");
    agent
        .post(
            &format!("/v1/threads/{thread}/runs"),
            &json!({"agent_name": "again", "run_id": run}),
        )
        .await
        .assert_error(409, "run_exists");
    alice
        .post("/v1/threads", &json!({"thread_id": thread}))
        .await
        .assert_error(409, "thread_exists");
}

#[tokio::test]
async fn a_repeated_event_id_returns_the_original_result_and_appends_nothing() {
    let server = TestServer::spawn();
    let (alice, agent, thread) = setup(&server).await;
    let run = agent.register_run(&thread).await;
    let path = format!("/v1/runs/{run}/events");
    let started = uuid::Uuid::new_v4().to_string();
    let body = json!({"type": "agent_started", "data": {"n": 1}, "event_id": started});

    let first = agent.post(&path, &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.body["event_id"], json!(started));
    let before = alice.thread_events(&thread).await;
    assert_eq!(before.len(), 3);
    assert_eq!(before[2]["event_id"], json!(started));

    // The same call again: 200, the original, nothing new. With other data the id is
    // in conflict (409), and the original is not revealed (issue 11).
    let r = agent.post(&path, &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, first.body);
    let other = json!({"type": "agent_started", "data": {"n": 2}, "event_id": started});
    agent
        .post(&path, &other)
        .await
        .assert_error(409, "event_id_conflict");
    assert_eq!(alice.thread_events(&thread).await, before);

    // A terminal event repeated after the run closed is still the original, not run_closed.
    let done = uuid::Uuid::new_v4().to_string();
    let body = json!({"type": "agent_completed", "data": {}, "event_id": done});
    let first = agent.post(&path, &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let r = agent.post(&path, &body).await;
    assert_eq!((r.status, &r.body), (200, &first.body));
    let after = alice.thread_events(&thread).await;
    assert_eq!(after.len(), 4);

    // In a batch, a known id answers the original while the rest is appended.
    let run2 = agent.register_run(&thread).await;
    let fresh = uuid::Uuid::new_v4().to_string();
    let batch = json!({"events": [
        {"run_id": run, "type": "agent_completed", "data": {}, "event_id": done},
        {"run_id": run2, "type": "agent_started", "data": {}, "event_id": fresh},
    ]});
    let r = agent.post("/v1/events", &batch).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["results"][0], first.body);
    assert_eq!(r.body["results"][1]["event_id"], json!(fresh));
    assert_eq!(alice.thread_events(&thread).await.len(), 6);
    // The whole batch repeated appends nothing.
    let again = agent.post("/v1/events", &batch).await;
    assert!(again.status == 200 || again.status == 201, "{}", again.body);
    assert_eq!(again.body["results"], r.body["results"]);
    assert_eq!(alice.thread_events(&thread).await.len(), 6);
}

#[tokio::test]
async fn if_match_rejects_a_stale_thread_version_and_accepts_the_current_one() {
    let server = TestServer::spawn();
    let (alice, agent, thread) = setup(&server).await;
    let runs = format!("/v1/threads/{thread}/runs");

    // The thread is at version 1 (thread_created).
    for stale in [0, 2, 7] {
        agent
            .post_if_match(&runs, &json!({"agent_name": "a"}), stale)
            .await
            .assert_error(409, "version_conflict");
    }
    let r = agent
        .post_if_match(&runs, &json!({"agent_name": "a"}), 1)
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["thread_version"], 2);
    let run = r.body["run_id"].as_str().unwrap().to_owned();
    // A user registering on its own thread obeys If-Match too.
    alice
        .post_if_match(&runs, &json!({"agent_name": "b"}), 1)
        .await
        .assert_error(409, "version_conflict");

    let events = format!("/v1/runs/{run}/events");
    let started = json!({"type": "agent_started", "data": {}});
    agent
        .post_if_match(&events, &started, 1)
        .await
        .assert_error(409, "version_conflict");
    let r = agent.post_if_match(&events, &started, 2).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["thread_version"], 3);
    // Quoted like an ETag works as well.
    let r = Api::send_built(
        agent
            .builder(reqwest::Method::POST, &events)
            .header("if-match", "\"3\"")
            .json(&json!({"type": "agent_thinking", "data": {}})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["thread_version"], 4);
    // Two writers racing with the same version: exactly one wins.
    let body = json!({"type": "agent_thinking", "data": {}});
    let (a, b) = tokio::join!(
        agent.post_if_match(&events, &body, 4),
        agent.post_if_match(&events, &body, 4)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409], "{} / {}", a.body, b.body);
    let frames = alice.thread_events(&thread).await;
    assert_eq!(frames.len(), 5);
    assert_eq!(frames.last().unwrap()["thread_version"], 5);
}

async fn count(alice: &Api, a: &str, b: &str) -> usize {
    alice.thread_events(a).await.len() + alice.thread_events(b).await.len()
}

#[tokio::test]
async fn a_batch_is_all_or_none_and_names_the_failing_index() {
    let server = TestServer::spawn();
    let (alice, agent, thread) = setup(&server).await;
    let other = alice.create_thread(json!({"title": "other"})).await;
    let r1 = agent.register_run(&thread).await;
    let r2 = agent.register_run(&other).await;

    let before = count(&alice, &thread, &other).await;

    let ev = |run: &str, kind: &str| json!({"run_id": run, "type": kind, "data": {}});
    for (events, status, code, index) in [
        // Started twice (index 3); thinking before started (2); unknown run (1); after the end (2).
        (
            vec![
                ev(&r1, "agent_started"),
                ev(&r2, "agent_started"),
                ev(&r2, "agent_thinking"),
                ev(&r2, "agent_started"),
            ],
            422,
            "invalid_lifecycle",
            3,
        ),
        (
            vec![
                ev(&r1, "agent_started"),
                ev(&r1, "agent_thinking"),
                ev(&r2, "agent_thinking"),
            ],
            422,
            "invalid_lifecycle",
            2,
        ),
        (
            vec![
                ev(&r1, "agent_started"),
                ev(&uuid::Uuid::new_v4().to_string(), "agent_started"),
            ],
            404,
            "run_not_found",
            1,
        ),
        (
            vec![
                ev(&r1, "agent_started"),
                ev(&r1, "agent_completed"),
                ev(&r1, "agent_thinking"),
            ],
            409,
            "run_closed",
            2,
        ),
    ] {
        let r = agent.post("/v1/events", &json!({ "events": events })).await;
        r.assert_error(status, code);
        assert_eq!(r.body["error"]["index"], index, "{}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("event {index}")),
            "{}",
            r.body
        );
        assert_eq!(
            count(&alice, &thread, &other).await,
            before,
            "a failed batch appended something"
        );
    }

    // A good batch across two threads: every result, in order, each thread dense.
    let r = agent
        .post(
            "/v1/events",
            &json!({"events": [
                ev(&r1, "agent_started"),
                ev(&r2, "agent_started"),
                ev(&r1, "agent_thinking"),
                ev(&r1, "agent_completed"),
            ]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    let positions: Vec<u64> = results
        .iter()
        .map(|x| x["position"].as_u64().unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[1] == w[0] + 1),
        "{positions:?}"
    );
    let versions: Vec<(Value, u64)> = results
        .iter()
        .map(|x| {
            (
                x["thread_id"].clone(),
                x["thread_version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            (json!(thread), 3),
            (json!(other), 3),
            (json!(thread), 4),
            (json!(thread), 5)
        ]
    );
    assert_eq!(count(&alice, &thread, &other).await, before + 4);
    assert_eq!(run_of(&alice, &thread, &r1).await["status"], "completed");
}

#[tokio::test]
async fn idle_runs_expire_with_a_run_expired_event() {
    let server = TestServer::spawn_with(Options {
        args: vec!["--run-ttl".into(), "1s".into()],
        ..Options::default()
    });
    let (alice, agent, thread) = setup(&server).await;
    let idle = agent.register_run(&thread).await;
    // Started right after registering: well inside the 1 s TTL.
    let started = agent.register_run(&thread).await;
    let r = agent.event(&started, "agent_started", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.body);

    // Polling a never-started run with an event it may not take (422) appends
    // nothing, so it does not keep the run alive; expiry turns it into 409.
    let r = eventually("the idle run to expire", || {
        let agent = agent.clone();
        let idle = idle.clone();
        async move {
            let r = agent.event(&idle, "agent_thinking", json!({})).await;
            match r.status {
                422 => None,
                _ => Some(r),
            }
        }
    })
    .await;
    r.assert_error(409, "run_expired");
    // The started run expires too (no one touches it).
    eventually("the started run to expire", || {
        let alice = alice.clone();
        let (thread, started) = (thread.clone(), started.clone());
        async move { (run_of(&alice, &thread, &started).await["status"] == "expired").then_some(()) }
    })
    .await;
    for (run, kind) in [
        (&started, "agent_thinking"),
        (&started, "agent_completed"),
        (&idle, "agent_started"),
    ] {
        agent
            .event(run, kind, json!({}))
            .await
            .assert_error(409, "run_expired");
    }
    assert_eq!(run_of(&alice, &thread, &idle).await["status"], "expired");

    // Each run has exactly one run_expired frame in the thread, after its other events.
    let frames = alice.thread_events(&thread).await;
    for run in [&started, &idle] {
        let expired: Vec<&Value> = frames
            .iter()
            .filter(|f| f["event"] == "run_expired" && f["run_id"] == json!(run))
            .collect();
        assert_eq!(expired.len(), 1, "{frames:?}");
        assert_eq!(expired[0]["type"], "event");
        assert!(expired[0]["user_seq"].as_u64().unwrap() > 0);
        assert_eq!(expired[0]["data"], json!({}));
    }
    let versions: Vec<u64> = frames
        .iter()
        .map(|f| f["thread_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=frames.len() as u64).collect::<Vec<_>>());
    assert_eq!(frames.len(), 6, "{frames:?}");

    // The thread itself lives on: a new run can be registered and used.
    let fresh = agent.register_run(&thread).await;
    let r = agent.event(&fresh, "agent_started", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.body);
}
