//! Finding 7: integer edges neither wrap nor panic.

use serde_json::json;
use threadline_tests::{sign, started_run, token, TestServer};

use super::live_socket;

// Finding 7: integer edges neither wrap nor panic.
#[tokio::test]
async fn f7_huge_numbers_neither_wrap_nor_panic() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (thread, run) = started_run(&agent, "alice").await;
    let alice = server.api(&token("alice", "user"));

    // A token whose exp is far away (or at the edge where ms would wrap) keeps its socket.
    for exp in [u64::MAX, u64::MAX / 1000 + 1, 1 << 53] {
        let jwt = sign(&json!({"sub": "alice", "role": "user", "exp": exp}));
        let mut s = server.socket(&jwt, "after=latest").await.expect("upgrade");
        s.welcome().await.unwrap();
        s.until("caught_up").await.unwrap();
        s.send(json!({"type": "ping"})).await.unwrap();
        assert_eq!(
            s.frame().await.unwrap(),
            json!({"type": "pong"}),
            "exp {exp}"
        );
    }

    // Versions and positions at u64::MAX return nothing, not everything.
    for after in [u64::MAX, u64::MAX - 1] {
        let r = alice
            .get(&format!(
                "/v1/threads/{thread}/events?after_version={after}"
            ))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["events"], json!([]), "after_version={after}");
        assert_eq!(r.body["next_after_version"], after);
    }
    let auditor = server.api(&token("carol", "auditor"));
    let r = auditor
        .get(&format!("/v1/audit/events?after={}", u64::MAX))
        .await;
    assert_eq!((r.status, &r.body["events"]), (200, &json!([])));
    for bad in [
        format!("/v1/threads/{thread}/events?after_version=18446744073709551616"),
        format!("/v1/threads/{thread}/events?limit=18446744073709551615"),
        "/v1/audit/events?after=-1".to_owned(),
    ] {
        let client = if bad.contains("audit") {
            &auditor
        } else {
            &alice
        };
        client.get(&bad).await.assert_error(400, "invalid_request");
    }
    let r = agent
        .post_if_match(
            &format!("/v1/runs/{run}/events"),
            &json!({"type": "agent_thinking", "data": {}}),
            u64::MAX,
        )
        .await;
    r.assert_error(409, "version_conflict");

    // On the socket: resuming after u64::MAX is a bad query, acking it an error frame.
    let mut s = server
        .socket(&token("alice", "user"), &format!("after={}", u64::MAX))
        .await
        .unwrap();
    assert_eq!(s.closed().await.unwrap().0, 4400);
    let mut s = live_socket(&server, "alice").await;
    s.send(json!({"type": "ack", "user_seq": u64::MAX}))
        .await
        .unwrap();
    assert_eq!(s.frame().await.unwrap()["code"], "invalid_ack");
}
