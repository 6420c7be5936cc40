//! Finding 10: unknown query parameters and a plain GET on the socket path are
//! answered with JSON errors.

use serde_json::json;
use threadline_tests::{started_run, token, TestServer};

// Finding 10: unknown query parameters and a plain GET on the socket path.
#[tokio::test]
async fn f10_unknown_query_parameters_and_plain_socket_gets_are_json_errors() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (thread, run) = started_run(&agent, "alice").await;
    let auditor = server.api(&token("carol", "auditor"));
    let alice = server.api(&token("alice", "user"));
    for (api, path) in [
        (&auditor, "/v1/audit/events?usr_id=bob".to_owned()),
        (&auditor, "/v1/threads?usr_id=bob".to_owned()),
        (&alice, "/v1/threads?limit=2&offset=4".to_owned()),
        (&alice, format!("/v1/threads/{thread}?verbose=1")),
        (&alice, format!("/v1/threads/{thread}/events?after=3")),
        (&alice, "/healthz?x=1".to_owned()),
    ] {
        api.get(&path).await.assert_error(400, "invalid_request");
    }
    agent
        .post(
            &format!("/v1/runs/{run}/events?dry_run=true"),
            &json!({"type": "agent_thinking", "data": {}}),
        )
        .await
        .assert_error(400, "invalid_request");
    // Nothing was appended by those.
    assert_eq!(alice.thread_events(&thread).await.len(), 3);

    // A socket query with an unknown parameter closes with 4400.
    let mut s = server
        .socket(&token("alice", "user"), "after=0&usr_id=bob")
        .await
        .unwrap();
    assert_eq!(s.closed().await.unwrap().0, 4400);

    // A plain GET on /v1/ws is answered in JSON: 401 without a token, else 400.
    server
        .anonymous()
        .get("/v1/ws")
        .await
        .assert_error(401, "unauthorized");
    alice
        .get("/v1/ws")
        .await
        .assert_error(400, "invalid_request");
}
