//! Finding 9: a filtered socket cannot ack a frame it withheld.

use serde_json::json;
use threadline_tests::{seq, started_run, token, TestServer};

// Finding 9: a filtered socket cannot ack what it withheld.
#[tokio::test]
async fn f9_a_filtered_socket_cannot_ack_a_frame_it_withheld() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (thread_a, run_a) = started_run(&agent, "alice").await;
    let (_, run_b) = started_run(&agent, "alice").await;
    let a = agent
        .event(&run_a, "agent_thinking", json!({"on": "a"}))
        .await;
    let b = agent
        .event(&run_b, "agent_thinking", json!({"on": "b"}))
        .await;
    let (seq_a, seq_b) = (seq(&a.body), seq(&b.body));
    assert!(seq_a < seq_b);
    let alice = token("alice", "user");

    let mut filtered = server
        .socket(
            &alice,
            &format!("after=0&client_id=phone&thread_id={thread_a}"),
        )
        .await
        .unwrap();
    filtered.welcome().await.unwrap();
    let (frames, _) = filtered.until("caught_up").await.unwrap();
    assert_eq!(frames.last().map(seq), Some(seq_a));
    // B's frames were withheld: acking one is an error, whether it came
    // before or after the frames this connection delivered.
    let first_b = (1..seq_b)
        .find(|s| !frames.iter().any(|f| seq(f) == *s))
        .expect("B's thread_created");
    for withheld in [seq_b, first_b] {
        filtered
            .send(json!({"type": "ack", "user_seq": withheld}))
            .await
            .unwrap();
        let f = filtered.frame().await.unwrap();
        assert_eq!(f["code"], "invalid_ack", "ack {withheld}: {f}");
    }
    // A's frame can be acked; ping-after-ack means it is durable.
    let first_a = seq(&frames[0]);
    filtered
        .send(json!({"type": "ack", "user_seq": first_a}))
        .await
        .unwrap();
    filtered.send(json!({"type": "ping"})).await.unwrap();
    assert_eq!(filtered.frame().await.unwrap(), json!({"type": "pong"}));
    drop(filtered);

    // The same client without a filter resumes after A's ack and gets B's event.
    let mut all = server.socket(&alice, "client_id=phone").await.unwrap();
    let welcome = all.welcome().await.unwrap();
    assert_eq!(welcome["resume_after"], first_a);
    let (replayed, _) = all.until("caught_up").await.unwrap();
    assert!(replayed.iter().any(|f| seq(f) == seq_b), "{replayed:?}");
}
