//! Finding 4: a socket that does not read is dropped after the send deadline and
//! holds its per-user slot until it is really gone.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use threadline_tests::{
    now_secs, sign, started_run, token, Options, Socket, TcpState, TestServer, DEADLINE,
};

// Finding 4: a socket that does not read is dropped, and holds its slot until it is.
#[tokio::test]
async fn f4_a_socket_that_does_not_read_is_dropped_and_keeps_its_slot_until_then() {
    let server = TestServer::spawn_with(Options {
        args: vec!["--max-connections-per-user".into(), "2".into()],
        ..Options::env(&[("THREADLINE_WS_SEND_TIMEOUT", "1s")])
    });
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "stall").await;
    let expires = now_secs() + 8;
    let short = sign(&json!({"sub": "stall", "role": "user", "exp": expires}));
    let long = token("stall", "user");

    // Two sockets stop reading, over small receive buffers.
    let mut stalled = Vec::new();
    for k in 0..2 {
        let (mut s, port) = server
            .socket_small_buffer(&short, &format!("after=latest&client_id=s{k}"))
            .await
            .expect("upgrade");
        s.welcome().await.unwrap();
        s.until("caught_up").await.unwrap();
        stalled.push((s, port));
    }
    // ~8 MB of events back up both sockets' writes.
    let pad = "x".repeat(60 * 1024);
    for b in 0..9 {
        let events: Vec<Value> = (0..15)
            .map(|i| json!({"run_id": run, "type": "agent_thinking", "data": {"i": b * 15 + i, "pad": pad}}))
            .collect();
        let r = agent.post("/v1/events", &json!({ "events": events })).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let probe = |server: &TestServer| {
        let long = long.clone();
        let url = server.ws_url("/v1/ws?after=latest&client_id=probe");
        async move {
            let mut s = Socket::open(&url, &[], &[("authorization", &format!("Bearer {long}"))])
                .await
                .expect("upgrade");
            let f = s.frame().await.expect("first frame");
            f["type"] == "welcome"
        }
    };
    // The cap holds while both stalled sockets are open: a third one is admitted only
    // if one of them was dropped in between (its send deadline may pass on a slow machine).
    let open = |server: &TestServer| {
        stalled
            .iter()
            .filter(|(_, p)| server.server_side_tcp_state(*p) == Some(TcpState::Established))
            .count()
    };
    if now_secs() + 1 < expires && open(&server) == 2 && probe(&server).await {
        assert!(open(&server) < 2, "a third socket while two are open");
    }

    // The tokens expire; the server cannot deliver its close to a peer that
    // does not read, so after the send deadline it drops the connection, and
    // only then is the slot free.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let established: Vec<u16> = stalled
            .iter()
            .map(|(_, port)| *port)
            .filter(|p| server.server_side_tcp_state(*p) == Some(TcpState::Established))
            .collect();
        if probe(&server).await {
            let still: Vec<u16> = established
                .into_iter()
                .filter(|p| server.server_side_tcp_state(*p) == Some(TcpState::Established))
                .collect();
            assert!(
                still.is_empty(),
                "a slot was given back while its connection (client port {still:?}) was still open"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled connections were never dropped: {:?}",
            stalled
                .iter()
                .map(|(_, p)| server.server_side_tcp_state(*p))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (_, port) in &stalled {
        assert_ne!(
            server.server_side_tcp_state(*port),
            Some(TcpState::Established)
        );
    }
}
