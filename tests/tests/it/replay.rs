//! Issue 4, point 2: acks move a client's durable cursor and a reconnect
//! without `after` resumes exactly after it: the unseen events with
//! consecutive `user_seq`, then `caught_up`, then live ones.

use serde_json::json;
use threadline_client::AckMode;
use threadline_tests::{
    append_thinking, client_caught_up, seq, started_run, token, Socket, TestServer,
};

/// Acks `user_seq` and waits until the server has handled it (it answers a
/// later ping only after the ack's append returned).
async fn ack(socket: &mut Socket, user_seq: u64) {
    socket
        .send(json!({"type": "ack", "user_seq": user_seq}))
        .await
        .unwrap();
    socket.send(json!({"type": "ping"})).await.unwrap();
    assert_eq!(socket.frame().await.unwrap(), json!({"type": "pong"}));
}

#[tokio::test]
async fn a_reconnect_without_after_gets_exactly_the_unseen_events_then_live_ones() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let alice = token("alice", "user");
    let (_, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 10, 0).await; // user_seq 1..=13

    // First connection of client "phone": no cursor yet, so it starts after 0.
    let mut s = server.socket(&alice, "client_id=phone").await.unwrap();
    let w = s.welcome().await.unwrap();
    assert_eq!(
        (
            w["resume_after"].as_u64(),
            w["head"].as_u64(),
            w["client_id"].as_str()
        ),
        (Some(0), Some(13), Some("phone"))
    );
    let (replayed, caught_up) = s.until("caught_up").await.unwrap();
    assert_eq!(
        replayed.iter().map(seq).collect::<Vec<_>>(),
        (1..=13).collect::<Vec<_>>()
    );
    assert_eq!(seq(&caught_up), 13);
    ack(&mut s, 13).await;
    ack(&mut s, 4).await; // never moves back
    drop(s);

    append_thinking(&agent, &run, 10, 7, 0).await; // 14..=20, appended while away

    let mut s = server.socket(&alice, "client_id=phone").await.unwrap();
    let w = s.welcome().await.unwrap();
    assert_eq!(
        (w["resume_after"].as_u64(), w["head"].as_u64()),
        (Some(13), Some(20))
    );
    let (unseen, caught_up) = s.until("caught_up").await.unwrap();
    assert_eq!(
        unseen.iter().map(seq).collect::<Vec<_>>(),
        (14..=20).collect::<Vec<_>>()
    );
    assert!(unseen
        .iter()
        .all(|f| f["type"] == "event" && f["event"] == "agent_thinking"));
    let data: Vec<u64> = unseen
        .iter()
        .map(|f| f["data"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(data, (10..17).collect::<Vec<_>>());
    assert_eq!(seq(&caught_up), 20);

    let results = append_thinking(&agent, &run, 17, 3, 0).await;
    let live = s.events(3).await.unwrap();
    assert_eq!(live.iter().map(seq).collect::<Vec<_>>(), vec![21, 22, 23]);
    for (frame, result) in live.iter().zip(&results) {
        assert_eq!(frame["position"], result["position"]);
        assert_eq!(frame["thread_version"], result["thread_version"]);
    }
    // A partial ack: the next resume re-sends what was not acknowledged.
    ack(&mut s, 21).await;
    drop(s);
    let mut s = server.socket(&alice, "client_id=phone").await.unwrap();
    assert_eq!(s.welcome().await.unwrap()["resume_after"], 21);
    let (rest, caught_up) = s.until("caught_up").await.unwrap();
    assert_eq!(rest.iter().map(seq).collect::<Vec<_>>(), vec![22, 23]);
    assert_eq!(seq(&caught_up), 23);

    // Cursors are per client: "laptop" (and the default client) never acked.
    for query in ["client_id=laptop", ""] {
        let mut other = server.socket(&alice, query).await.unwrap();
        let w = other.welcome().await.unwrap();
        assert_eq!(w["resume_after"], 0, "{query:?}");
        let (all, _) = other.until("caught_up").await.unwrap();
        assert_eq!(all.len(), 23);
    }
}

#[tokio::test]
async fn acks_survive_a_restart_and_the_reconnect_resumes_after_them() {
    let server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    let alice = token("alice", "user");
    let (_, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 5, 0).await; // 1..=8
                                                  // The client acks what it handled (6 of the 8) and flush() waits until that is durable.
    let mut client = server.client(&alice, |c| c.ack_mode(AckMode::Manual));
    let (replayed, _) = client_caught_up(&mut client).await.unwrap();
    assert_eq!(replayed.len(), 8);
    client.ack(6);
    assert_eq!(client.flush().await, Ok(6));
    client.close().await;

    let server = server.restart();
    let agent = server.api(&token("bot", "agent"));
    append_thinking(&agent, &run, 5, 2, 0).await; // 9, 10
    let mut client = server.client(&alice, |c| c);
    let (unseen, caught_up) = client_caught_up(&mut client).await.unwrap();
    assert_eq!(
        unseen.iter().map(|e| e.user_seq).collect::<Vec<_>>(),
        vec![7, 8, 9, 10]
    );
    assert_eq!(caught_up, 10);
}

/// A long replay still answers the client: a ping sent right after `welcome`
/// is answered before the replay reaches `caught_up`.
#[tokio::test]
async fn a_ping_during_a_long_replay_is_answered_before_caught_up() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    for batch in 0..20 {
        append_thinking(&agent, &run, batch * 1000, 1000, 200).await;
    }
    let mut s = server
        .socket(&token("alice", "user"), "after=0")
        .await
        .unwrap();
    s.welcome().await.unwrap();
    s.send(json!({"type": "ping"})).await.unwrap();
    let mut events = 0u64;
    loop {
        let f = s.frame().await.unwrap();
        match f["type"].as_str() {
            Some("event") => {
                events += 1;
                assert_eq!(seq(&f), events, "replay out of order");
            }
            Some("pong") => break,
            other => panic!("{other:?} before the pong, after {events} events"),
        }
    }
    assert!(events < 20_003, "the pong came only after the whole replay");
    let (rest, caught_up) = s.until("caught_up").await.unwrap();
    assert_eq!(events + rest.len() as u64, 20_003);
    assert_eq!(caught_up["user_seq"], 20_003);
}
