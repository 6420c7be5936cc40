//! A first end-to-end pass: create, register, append, receive on a socket.

use serde_json::json;
use threadline_tests::{token, TestServer};

#[tokio::test]
async fn an_agent_event_reaches_the_owners_socket() {
    let server = TestServer::spawn();
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("bot", "agent"));
    let thread = alice.create_thread(json!({"title": "hello"})).await;
    let run = agent.register_run(&thread).await;
    let mut socket = server
        .socket(&token("alice", "user"), "after=0")
        .await
        .unwrap();
    let welcome = socket.frame().await.unwrap();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["head"], 2);
    let (replayed, caught_up) = socket.until("caught_up").await.unwrap();
    assert_eq!(replayed.len(), 2);
    assert_eq!(caught_up["user_seq"], 2);
    let r = agent.event(&run, "agent_started", json!({"step": 1})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let live = socket.events(1).await.unwrap();
    assert_eq!(live[0]["event"], "agent_started");
    assert_eq!(live[0]["user_seq"], 3);
    assert_eq!(live[0]["data"]["step"], 1);
}
