//! Issue 4, point 7: malformed JSON, wrong types, missing fields, unknown event
//! types, oversized data and bodies, bad ids in paths and queries: each gets
//! the contract's 4xx code as JSON, never a 5xx, and nothing is appended.

use reqwest::Method;
use serde_json::{json, Value};
use threadline_tests::{token, Api, TestServer};

struct World {
    server: TestServer,
    alice: Api,
    agent: Api,
    auditor: Api,
    thread: String,
    run: String,
}

async fn world() -> World {
    let server = TestServer::spawn();
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("bot", "agent"));
    let auditor = server.api(&token("carol", "auditor"));
    let thread = alice.create_thread(json!({"title": "t"})).await;
    let run = agent.register_run(&thread).await;
    let r = agent.event(&run, "agent_started", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    World {
        server,
        alice,
        agent,
        auditor,
        thread,
        run,
    }
}

impl World {
    /// The log length, to show a rejected call appended nothing.
    async fn head(&self) -> usize {
        self.auditor.audit_events("").await.len()
    }
}

#[tokio::test]
async fn bodies_that_are_not_the_right_json_are_invalid_request() {
    let w = world().await;
    let head = w.head().await;
    let runs = format!("/v1/threads/{}/runs", w.thread);
    let events = format!("/v1/runs/{}/events", w.run);
    let raw: &[(&str, &Api, &str)] = &[
        ("/v1/threads", &w.alice, "{"),
        ("/v1/threads", &w.alice, ""),
        ("/v1/threads", &w.alice, "not json"),
        ("/v1/threads", &w.alice, "[]"),
        ("/v1/threads", &w.alice, "\"a string\""),
        ("/v1/threads", &w.alice, "{\"title\": \"x\"} trailing"),
        (&runs, &w.agent, "{\"agent_name\": "),
        (
            &events,
            &w.agent,
            "{\"type\": \"agent_thinking\", \"data\": {}",
        ),
        ("/v1/events", &w.agent, "{\"events\": [}"),
    ];
    for (path, api, body) in raw {
        api.post_raw(path, body.to_string())
            .await
            .assert_error(400, "invalid_request");
    }
    // Nesting deeper than any parser should recurse.
    let deep = format!(
        "{{\"type\":\"agent_thinking\",\"data\":{{\"x\":{}{}}}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    w.agent
        .post_raw(&events, deep)
        .await
        .assert_error(400, "invalid_request");

    let typed: Vec<(&str, &Api, Value)> = vec![
        // Wrong types.
        ("/v1/threads", &w.alice, json!({"title": 5})),
        ("/v1/threads", &w.alice, json!({"thread_id": 7})),
        ("/v1/threads", &w.alice, json!({"metadata": "m"})),
        (&runs, &w.agent, json!({"agent_name": 5})),
        (&runs, &w.agent, json!({"agent_name": "a", "run_id": true})),
        (&events, &w.agent, json!({"type": 3, "data": {}})),
        (
            &events,
            &w.agent,
            json!({"type": "agent_thinking", "data": {}, "event_id": 9}),
        ),
        ("/v1/events", &w.agent, json!({"events": {}})),
        (
            "/v1/events",
            &w.agent,
            json!({"events": [{"run_id": 1, "type": "agent_thinking", "data": {}}]}),
        ),
        // Missing fields.
        (&runs, &w.agent, json!({})),
        (&events, &w.agent, json!({"data": {}})),
        (&events, &w.agent, json!({"type": "agent_thinking"})),
        ("/v1/events", &w.agent, json!({})),
        (
            "/v1/events",
            &w.agent,
            json!({"events": [{"type": "agent_thinking", "data": {}}]}),
        ),
        // Data that is not an object.
        (
            &events,
            &w.agent,
            json!({"type": "agent_thinking", "data": "text"}),
        ),
        (
            &events,
            &w.agent,
            json!({"type": "agent_thinking", "data": [1, 2]}),
        ),
        (
            &events,
            &w.agent,
            json!({"type": "agent_thinking", "data": 5}),
        ),
        (
            &events,
            &w.agent,
            json!({"type": "agent_thinking", "data": null}),
        ),
        (
            "/v1/events",
            &w.agent,
            json!({"events": [{"run_id": w.run, "type": "agent_thinking", "data": []}]}),
        ),
        // A batch of nothing, or of more than 1000.
        ("/v1/events", &w.agent, json!({"events": []})),
    ];
    for (path, api, body) in &typed {
        let r = api.post(path, body).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.body);
        r.assert_error(400, "invalid_request");
    }
    let over: Vec<Value> = (0..1001)
        .map(|_| json!({"run_id": w.run, "type": "agent_thinking", "data": {}}))
        .collect();
    w.agent
        .post("/v1/events", &json!({ "events": over }))
        .await
        .assert_error(400, "invalid_request");
    // A malformed If-Match is a bad request, not a conflict.
    let r = Api::send_built(
        w.agent
            .builder(Method::POST, &events)
            .header("if-match", "yesterday")
            .json(&json!({"type": "agent_thinking", "data": {}})),
    )
    .await;
    r.assert_error(400, "invalid_request");

    assert_eq!(w.head().await, head, "a rejected call appended something");
}

#[tokio::test]
async fn unknown_event_types_are_invalid_event_type() {
    let w = world().await;
    let head = w.head().await;
    let events = format!("/v1/runs/{}/events", w.run);
    // Server-side event types cannot be appended by clients either.
    for kind in [
        "agent_dancing",
        "",
        "AGENT_STARTED",
        "thread_created",
        "run_registered",
        "run_expired",
        "cursor_advanced",
    ] {
        let r = w
            .agent
            .post(&events, &json!({"type": kind, "data": {}}))
            .await;
        assert_eq!(r.status, 400, "{kind:?}: {}", r.body);
        r.assert_error(400, "invalid_event_type");
    }
    // In a batch, the failing index is named and nothing is appended.
    let r = w
        .agent
        .post(
            "/v1/events",
            &json!({"events": [
                {"run_id": w.run, "type": "agent_thinking", "data": {}},
                {"run_id": w.run, "type": "agent_thinking", "data": {}},
                {"run_id": w.run, "type": "agent_dreaming", "data": {}},
            ]}),
        )
        .await;
    r.assert_error(400, "invalid_event_type");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("event 2"),
        "{}",
        r.body
    );
    assert_eq!(w.head().await, head);
}

/// POSTs a JSON event whose data blob is `size` bytes, chunked with no
/// Content-Length, over a raw connection; returns the status and body text.
async fn chunked_post(server: &TestServer, api: &Api, path: &str, size: usize) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        server.addr,
        api.token.as_deref().unwrap()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut chunks = vec![b"{\"type\":\"agent_thinking\",\"data\":{\"blob\":\"".to_vec()];
    chunks.extend(std::iter::repeat_n(
        vec![b'z'; 64 * 1024],
        size / (64 * 1024) + 1,
    ));
    chunks.push(b"\"}}".to_vec());
    for c in chunks {
        let mut frame = format!("{:x}\r\n", c.len()).into_bytes();
        frame.extend(c);
        frame.extend(b"\r\n");
        // The server may answer and stop reading before the end: that is fine.
        if tcp.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(threadline_tests::DEADLINE, tcp.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[tokio::test]
async fn oversized_data_and_bodies_are_payload_too_large() {
    let w = world().await;
    let head = w.head().await;
    let events = format!("/v1/runs/{}/events", w.run);
    let blob = |n: usize| json!({"blob": "x".repeat(n)});

    // Just under 64 KiB of data is fine; over is 413.
    let r = w
        .agent
        .post(
            &events,
            &json!({"type": "agent_thinking", "data": blob(60 * 1024)}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = w
        .agent
        .post(
            &events,
            &json!({"type": "agent_thinking", "data": blob(65 * 1024)}),
        )
        .await;
    r.assert_error(413, "payload_too_large");
    let r = w
        .agent
        .post(
            "/v1/events",
            &json!({"events": [
                {"run_id": w.run, "type": "agent_thinking", "data": {}},
                {"run_id": w.run, "type": "agent_thinking", "data": blob(65 * 1024)},
            ]}),
        )
        .await;
    r.assert_error(413, "payload_too_large");

    // Bodies over 1 MiB, on every write route.
    let huge = "y".repeat(1024 * 1024 + 10);
    for (path, api, body) in [
        (
            events.clone(),
            &w.agent,
            json!({"type": "agent_thinking", "data": {"blob": huge}}),
        ),
        ("/v1/threads".to_owned(), &w.alice, json!({"title": huge})),
        (
            format!("/v1/threads/{}/runs", w.thread),
            &w.agent,
            json!({"agent_name": huge}),
        ),
        (
            "/v1/events".to_owned(),
            &w.agent,
            json!({"events": (0..20)
                .map(|_| json!({"run_id": w.run, "type": "agent_thinking", "data": blob(60 * 1024)}))
                .collect::<Vec<_>>()}),
        ),
    ] {
        let r = api.post(&path, &body).await;
        assert_eq!(r.status, 413, "{path}: {}", r.body);
        r.assert_error(413, "payload_too_large");
    }
    // Without a Content-Length (chunked), the limit still holds.
    let (status, body) = chunked_post(&w.server, &w.agent, &events, 1024 * 1024 + 100).await;
    assert_eq!(status, 413, "{body}");
    let body: Value = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(body["error"]["code"], "payload_too_large");

    // Too long a title or metadata is 413 as well (limits of the thread).
    w.alice
        .post("/v1/threads", &json!({"title": "t".repeat(600)}))
        .await
        .assert_error(413, "payload_too_large");

    assert_eq!(
        w.head().await,
        head + 1,
        "only the 60 KiB event was appended"
    );
}

#[tokio::test]
async fn bad_ids_in_bodies_paths_and_queries_are_invalid_id() {
    let w = world().await;
    let head = w.head().await;
    let long = format!("thread_{}", "a".repeat(130));
    let bad_thread_ids = [
        "run_abc".to_owned(),
        "thread_".to_owned(),
        "thread__x".to_owned(),
        "thread_a-b".to_owned(),
        "thread_é".to_owned(),
        "hello".to_owned(),
        " thread_x".to_owned(),
        "".to_owned(),
        "123e4567-e89b-12d3-a456-42661417400".to_owned(),
        long.clone(),
    ];
    for id in &bad_thread_ids {
        let r = w
            .alice
            .post("/v1/threads", &json!({ "thread_id": id }))
            .await;
        assert_eq!(r.status, 400, "thread_id {id:?}: {}", r.body);
        r.assert_error(400, "invalid_id");
    }
    for id in ["thread_abc", "not a run", "run_", "run_x!"] {
        let r = w
            .agent
            .post(
                &format!("/v1/threads/{}/runs", w.thread),
                &json!({"agent_name": "a", "run_id": id}),
            )
            .await;
        r.assert_error(400, "invalid_id");
    }
    for id in ["alice bob", "", "a/b", "ü"] {
        let r = w.agent.post("/v1/threads", &json!({"user_id": id})).await;
        assert_eq!(r.status, 400, "user_id {id:?}: {}", r.body);
        r.assert_error(400, "invalid_id");
    }
    for id in ["nope", "run_abc", "123"] {
        let r = w
            .agent
            .post(
                &format!("/v1/runs/{}/events", w.run),
                &json!({"type": "agent_thinking", "data": {}, "event_id": id}),
            )
            .await;
        r.assert_error(400, "invalid_id");
    }
    let r = w
        .agent
        .post(
            "/v1/events",
            &json!({"events": [
                {"run_id": w.run, "type": "agent_thinking", "data": {}},
                {"run_id": "thread_x", "type": "agent_thinking", "data": {}},
            ]}),
        )
        .await;
    r.assert_error(400, "invalid_id");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("event 1"),
        "{}",
        r.body
    );

    // Paths: percent-encoded junk, other kinds, over-long, invalid UTF-8.
    let long_path = format!("thread_{}", "b".repeat(200));
    let bad_in_path = [
        "run_abc",
        "%20",
        "thread_%C3%A9",
        "thread_x%20y",
        long_path.as_str(),
        "%FF%FE",
        "thread_%00",
    ];
    for id in bad_in_path {
        for (method, path, api) in [
            (Method::GET, format!("/v1/threads/{id}"), &w.alice),
            (Method::GET, format!("/v1/threads/{id}/events"), &w.alice),
            (Method::POST, format!("/v1/threads/{id}/runs"), &w.agent),
        ] {
            let r =
                Api::send_built(api.builder(method, &path).json(&json!({"agent_name": "a"}))).await;
            assert_eq!(r.status, 400, "{path}: {} {:?}", r.body, r.headers);
            r.assert_error(400, "invalid_id");
        }
    }
    for id in ["thread_abc", "x", "%FF", "run_%20"] {
        let r = w
            .agent
            .post(
                &format!("/v1/runs/{id}/events"),
                &json!({"type": "agent_thinking", "data": {}}),
            )
            .await;
        assert_eq!(r.status, 400, "run {id}: {}", r.body);
        r.assert_error(400, "invalid_id");
    }

    // Queries.
    for q in [
        "thread_id=run_abc",
        "run_id=thread_abc",
        "run_id=xyz",
        "user_id=a%20b",
        "user_id=",
    ] {
        let r = w.auditor.get(&format!("/v1/audit/events?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        r.assert_error(400, "invalid_id");
    }
    w.auditor
        .get("/v1/threads?user_id=not%20valid")
        .await
        .assert_error(400, "invalid_id");

    assert_eq!(w.head().await, head);
}

#[tokio::test]
async fn bad_query_values_are_invalid_request() {
    let w = world().await;
    let events = format!("/v1/threads/{}/events", w.thread);
    for q in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=abc",
        "limit=99999999999999999999999",
        "after_version=-1",
        "after_version=x",
    ] {
        let r = w.alice.get(&format!("{events}?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        r.assert_error(400, "invalid_request");
    }
    for q in [
        "limit=0",
        "limit=1001",
        "after=x",
        "after=-3",
        "since=yesterday",
        "until=2026-13-45T00:00:00Z",
    ] {
        let r = w.auditor.get(&format!("/v1/audit/events?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        r.assert_error(400, "invalid_request");
    }
    // The edges of the range are fine.
    for q in ["limit=1", "limit=1000", "after_version=999999"] {
        let r = w.alice.get(&format!("{events}?{q}")).await;
        assert_eq!(r.status, 200, "{q}: {}", r.body);
    }
    let r = w.alice.get(&format!("{events}?limit=1")).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["next_after_version"], 1);
    let r = w
        .auditor
        .get("/v1/audit/events?limit=1000&since=2020-01-01T00:00:00Z")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_and_the_server_survives() {
    let w = world().await;
    w.alice
        .get("/v1/nothing")
        .await
        .assert_error(404, "not_found");
    let r = Api::send_built(w.alice.builder(Method::DELETE, "/v1/threads")).await;
    r.assert_error(405, "method_not_allowed");
    let r = Api::send_built(
        w.alice
            .builder(Method::PUT, &format!("/v1/threads/{}", w.thread)),
    )
    .await;
    assert!((400..500).contains(&r.status), "{}", r.status);
    // After all of the above the server still answers.
    let r = w.server.anonymous().get("/healthz").await;
    assert_eq!(r.status, 200);
    let r = w.agent.event(&w.run, "agent_thinking", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.body);
}
