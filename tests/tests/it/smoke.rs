//! A first end-to-end pass: create, register, append, receive with the client.

use serde_json::json;
use threadline_client::{Payload, Resume};
use threadline_tests::{client_caught_up, client_events, token, TestServer};

#[tokio::test]
async fn an_agent_event_reaches_the_owners_socket() {
    let server = TestServer::spawn();
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("bot", "agent"));
    let thread = alice.create_thread(json!({"title": "hello"})).await;
    let run = agent.register_run(&thread).await;
    let mut client = server.client(&token("alice", "user"), |c| c.resume(Resume::After(0)));
    let (replayed, caught_up) = client_caught_up(&mut client).await.unwrap();
    assert_eq!(replayed.len(), 2);
    assert_eq!(caught_up, 2);
    assert_eq!(
        replayed[0].payload,
        Payload::ThreadCreated {
            title: Some("hello".into()),
            metadata: None
        }
    );
    let r = agent.event(&run, "agent_started", json!({"step": 1})).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let live = client_events(&mut client, 1).await.unwrap();
    assert_eq!(live[0].user_seq, 3);
    let Payload::AgentStarted(data) = &live[0].payload else {
        panic!("{:?}", live[0])
    };
    assert_eq!(data["step"], 1);
}
