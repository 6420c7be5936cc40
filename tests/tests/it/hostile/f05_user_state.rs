//! Finding 5: per-user state is bounded: a paginated thread list, quotas, request
//! rates, capped tool calls, and metadata read from the log instead of memory.

use serde_json::json;
use threadline_tests::{started_run, token, Api, Options, Reply, TestServer};

/// The ids of a thread list page and its `next`.
fn page(r: &Reply) -> (Vec<String>, Option<String>) {
    assert_eq!(r.status, 200, "{}", r.body);
    let ids = r.body["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .map(|t| t["thread_id"].as_str().unwrap().to_owned())
        .collect();
    (ids, r.body["next"].as_str().map(str::to_owned))
}

/// Every thread of a list, following `next`, `limit` at a time.
async fn all_pages(api: &Api, query: &str, limit: usize) -> Vec<String> {
    let (mut ids, mut next) = page(&api.get(&format!("/v1/threads?limit={limit}{query}")).await);
    assert!(ids.len() <= limit);
    while let Some(after) = next {
        let (more, n) = page(
            &api.get(&format!("/v1/threads?limit={limit}&after={after}{query}"))
                .await,
        );
        assert!(!more.is_empty() && more.len() <= limit, "{more:?}");
        ids.extend(more);
        next = n;
    }
    ids
}

// Finding 5: the thread list is paginated.
#[tokio::test]
async fn f5_thread_lists_are_paginated() {
    let server = TestServer::spawn();
    let alice = server.api(&token("alice", "user"));
    let bob = server.api(&token("bob", "user"));
    let auditor = server.api(&token("carol", "auditor"));
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(alice.create_thread(json!({"title": format!("t{i}")})).await);
    }
    bob.create_thread(json!({})).await;

    let (first, next) = page(&alice.get("/v1/threads?limit=2").await);
    assert_eq!(first, created[..2]);
    assert!(next.is_some());
    assert_eq!(all_pages(&alice, "", 2).await, created);
    assert_eq!(all_pages(&alice, "", 5).await, created);
    let (everything, next) = page(&alice.get("/v1/threads").await);
    assert_eq!((everything, next), (created.clone(), None));
    assert_eq!(all_pages(&auditor, "&user_id=alice", 3).await, created);
    let mut all = all_pages(&auditor, "", 2).await;
    assert_eq!(all.len(), 6);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 6, "no thread twice");
    for bad in ["limit=0", "limit=1001", "limit=x", "after=nope", "after=-1"] {
        alice
            .get(&format!("/v1/threads?{bad}"))
            .await
            .assert_error(400, "invalid_request");
    }
}

// Finding 5: per-user quotas and request rates.
#[tokio::test]
async fn f5_per_user_quotas_and_request_rates_are_enforced() {
    let server = TestServer::spawn_with(Options::env(&[
        ("THREADLINE_MAX_THREADS_PER_USER", "3"),
        ("THREADLINE_MAX_OPEN_TOOL_CALLS", "2"),
        ("THREADLINE_MAX_TOOL_CALL_ID_BYTES", "64"),
        ("THREADLINE_RATE_LIMIT", "10"),
        ("THREADLINE_RATE_BURST", "20"),
    ]));
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("bot", "agent"));
    for _ in 0..3 {
        alice.create_thread(json!({})).await;
    }
    alice
        .post("/v1/threads", &json!({}))
        .await
        .assert_error(409, "quota_exceeded");
    agent
        .post("/v1/threads", &json!({"user_id": "alice"}))
        .await
        .assert_error(409, "quota_exceeded");

    let (_, run) = started_run(&agent, "bob").await;
    let tool = |id: &str, kind: &str| json!({"type": kind, "data": {"tool_call_id": id}});
    let events = format!("/v1/runs/{run}/events");
    agent
        .post(&events, &tool(&"i".repeat(65), "tool_executing"))
        .await
        .assert_error(413, "payload_too_large");
    for id in ["a", "b"] {
        assert_eq!(
            agent
                .post(&events, &tool(id, "tool_executing"))
                .await
                .status,
            201
        );
    }
    agent
        .post(&events, &tool("c", "tool_executing"))
        .await
        .assert_error(409, "quota_exceeded");
    assert_eq!(
        agent
            .post(&events, &tool("a", "tool_completed"))
            .await
            .status,
        201
    );
    assert_eq!(
        agent
            .post(&events, &tool("c", "tool_executing"))
            .await
            .status,
        201
    );

    // One user's flood is answered 429 with Retry-After; another user is not affected.
    let flood = server.api(&token("flood", "user"));
    let replies = futures_util::future::join_all((0..60).map(|_| flood.get("/v1/threads"))).await;
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        !limited.is_empty(),
        "60 requests at once, burst 20: none refused"
    );
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
    limited[0].assert_error(429, "rate_limited");
    let retry: u64 = limited[0].headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(alice.get("/v1/threads").await.status, 200);
}

// Finding 5: metadata is not held in memory but still served, from the log.
#[tokio::test]
async fn f5_thread_metadata_is_served_from_the_log() {
    let server = TestServer::spawn_process();
    let alice = server.api(&token("alice", "user"));
    let metadata = json!({"k": "v".repeat(16 * 1024 - 100), "n": 1});
    let thread = alice
        .create_thread(json!({"title": "big", "metadata": metadata}))
        .await;
    let r = alice.get(&format!("/v1/threads/{thread}")).await;
    assert_eq!((r.status, &r.body["metadata"]), (200, &metadata));
    let server = server.restart();
    let alice = server.api(&token("alice", "user"));
    let r = alice.get(&format!("/v1/threads/{thread}")).await;
    assert_eq!((r.status, &r.body["metadata"]), (200, &metadata));
    assert_eq!(r.body["title"], "big");
}
