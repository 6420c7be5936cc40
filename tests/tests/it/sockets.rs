//! The socket's contract beyond replay: token presentation, close codes,
//! query rules, the thread filter, ping/ack, several sockets per user and the
//! connection limit, graceful shutdown and isolation between users.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use threadline_tests::{
    append_thinking, now_secs, seq, sign, sign_with, started_run, token, Options, Socket,
    TestServer,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Connects with `query` and no credentials besides `headers`/`protocols`.
async fn open(
    server: &TestServer,
    query: &str,
    protocols: &[&str],
    headers: &[(&str, &str)],
) -> Socket {
    Socket::open(
        &server.ws_url(&format!("/v1/ws?{query}")),
        protocols,
        headers,
    )
    .await
    .expect("upgrade")
}

/// Asserts the socket sends an `error` frame and then closes with `code`.
async fn assert_closed(s: &mut Socket, code: u16, what: &str) {
    let (got, error) = s.closed().await.expect("close");
    assert_eq!(got, code, "{what}: close code");
    let error = error.unwrap_or_else(|| panic!("{what}: no error frame before the close"));
    assert!(
        error["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{what}: {error}"
    );
    assert!(error["message"].is_string(), "{what}: {error}");
}

#[tokio::test]
async fn the_three_ways_to_present_a_token_all_work() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    started_run(&agent, "alice").await;
    let jwt = token("alice", "user");

    let header = format!("Bearer {jwt}");
    let mut by_header = open(&server, "after=0", &[], &[("authorization", &header)]).await;
    let bearer = format!("bearer.{jwt}");
    let mut by_protocol = open(&server, "after=0", &["threadline.v1", &bearer], &[]).await;
    let mut by_protocol_first = open(&server, "after=0", &[&bearer, "threadline.v1"], &[]).await;
    let mut by_query = open(&server, &format!("after=0&access_token={jwt}"), &[], &[]).await;

    assert_eq!(by_protocol.protocol.as_deref(), Some("threadline.v1"));
    assert_eq!(by_protocol_first.protocol.as_deref(), Some("threadline.v1"));
    for s in [
        &mut by_header,
        &mut by_protocol,
        &mut by_protocol_first,
        &mut by_query,
    ] {
        assert!(
            !s.protocol.as_deref().unwrap_or("").contains(&jwt),
            "token echoed"
        );
        let w = s.welcome().await.unwrap();
        assert_eq!(w["user_id"], "alice");
        assert_eq!(w["protocol"], 1);
        let (events, caught_up) = s.until("caught_up").await.unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(seq(&caught_up), 3);
    }
}

/// What a rejected connection sends: name, headers, subprotocols, extra query.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<String>, String);

#[tokio::test]
async fn a_missing_or_invalid_token_gets_an_error_frame_then_1008() {
    let server = TestServer::spawn();
    let expired = sign(&json!({"sub": "alice", "exp": now_secs() - 10}));
    let wrong_key = sign_with(
        &json!({"sub": "alice", "exp": now_secs() + 600}),
        b"another-secret-entirely-0123456789",
    );
    let future = sign(&json!({"sub": "alice", "exp": now_secs() + 600, "nbf": now_secs() + 300}));
    let cases: Vec<Case> = vec![
        ("missing", vec![], vec![], String::new()),
        (
            "malformed header",
            vec![("authorization", "Bearer not.a.jwt".into())],
            vec![],
            String::new(),
        ),
        (
            "wrong key",
            vec![("authorization", format!("Bearer {wrong_key}"))],
            vec![],
            String::new(),
        ),
        (
            "expired",
            vec![("authorization", format!("Bearer {expired}"))],
            vec![],
            String::new(),
        ),
        (
            "not yet valid",
            vec![("authorization", format!("Bearer {future}"))],
            vec![],
            String::new(),
        ),
        (
            "bad subprotocol token",
            vec![],
            vec!["threadline.v1".into(), "bearer.garbage".into()],
            String::new(),
        ),
        (
            "bad query token",
            vec![],
            vec![],
            "&access_token=garbage".into(),
        ),
    ];
    for (what, headers, protocols, extra) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let protocols: Vec<&str> = protocols.iter().map(String::as_str).collect();
        let mut s = open(&server, &format!("after=0{extra}"), &protocols, &headers).await;
        assert_closed(&mut s, 1008, what).await;
    }
}

#[tokio::test]
async fn a_token_that_expires_while_open_closes_the_socket_with_4001() {
    let server = TestServer::spawn();
    let exp = now_secs() + 2;
    let jwt = sign(&json!({"sub": "alice", "role": "user", "exp": exp}));
    let mut s = server.socket(&jwt, "after=0").await.unwrap();
    s.welcome().await.unwrap();
    s.until("caught_up").await.unwrap();
    // Still open before exp.
    s.send(json!({"type": "ping"})).await.unwrap();
    assert_eq!(s.frame().await.unwrap(), json!({"type": "pong"}));
    let (code, error) = s.closed().await.unwrap();
    let at = now_ms() as i64 - (exp * 1000) as i64;
    assert_eq!(code, 4001);
    assert_eq!(error.expect("error frame")["code"], "token_expired");
    assert!((-50..=1500).contains(&at), "closed {at} ms after exp");
}

#[tokio::test]
async fn bad_queries_close_with_4400() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    started_run(&agent, "alice").await; // head 3
    let jwt = token("alice", "user");
    let long = "c".repeat(65);
    for query in [
        "after=4".to_owned(),
        "after=1000000".to_owned(),
        "after=-1".to_owned(),
        "after=soon".to_owned(),
        "client_id=has%20space".to_owned(),
        "client_id=slash/es".to_owned(),
        format!("client_id={long}"),
        "client_id=".to_owned(),
        "thread_id=run_abc".to_owned(),
    ] {
        let mut s = server.socket(&jwt, &query).await.unwrap();
        assert_closed(&mut s, 4400, &query).await;
    }
    // The boundary itself is fine.
    let mut s = server
        .socket(&jwt, "after=3&client_id=a.B_9-z")
        .await
        .unwrap();
    let w = s.welcome().await.unwrap();
    assert_eq!(
        (w["resume_after"].as_u64(), w["head"].as_u64()),
        (Some(3), Some(3))
    );
}

#[tokio::test]
async fn after_latest_skips_history_and_gets_live_events() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 20, 0).await; // head 23
    let mut s = server
        .socket(&token("alice", "user"), "after=latest")
        .await
        .unwrap();
    let w = s.welcome().await.unwrap();
    assert_eq!(
        (w["resume_after"].as_u64(), w["head"].as_u64()),
        (Some(23), Some(23))
    );
    let (history, caught_up) = s.until("caught_up").await.unwrap();
    assert!(history.is_empty(), "{history:?}");
    assert_eq!(seq(&caught_up), 23);
    append_thinking(&agent, &run, 20, 2, 0).await;
    let live = s.events(2).await.unwrap();
    assert_eq!(live.iter().map(seq).collect::<Vec<_>>(), vec![24, 25]);
    assert_eq!(live[0]["data"]["i"], 20);
}

#[tokio::test]
async fn a_thread_filter_keeps_user_seq_with_gaps_and_dense_thread_version() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (a, run_a) = started_run(&agent, "alice").await; // 1..=3
    let (_, run_b) = started_run(&agent, "alice").await; // 4..=6
    for i in 0..5 {
        append_thinking(&agent, &run_a, i, 1, 0).await;
        append_thinking(&agent, &run_b, i, 2, 0).await;
    }
    let mut s = server
        .socket(&token("alice", "user"), &format!("after=0&thread_id={a}"))
        .await
        .unwrap();
    s.welcome().await.unwrap();
    let (frames, caught_up) = s.until("caught_up").await.unwrap();
    assert!(
        frames.iter().all(|f| f["thread_id"] == a.as_str()),
        "{frames:?}"
    );
    let seqs: Vec<u64> = frames.iter().map(seq).collect();
    // thread A: 1, 2, 3, then every third of the interleaved appends.
    assert_eq!(seqs, vec![1, 2, 3, 7, 10, 13, 16, 19]);
    let versions: Vec<u64> = frames
        .iter()
        .map(|f| f["thread_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    assert_eq!(seq(&caught_up), 21, "caught up with the user's head");

    // Live: B's events are filtered out, A's arrive with their own user_seq.
    append_thinking(&agent, &run_b, 10, 3, 0).await; // 22..=24
    let r = append_thinking(&agent, &run_a, 10, 1, 0).await; // 25
    let live = s.events(1).await.unwrap();
    assert_eq!(seq(&live[0]), 25);
    assert_eq!(live[0]["user_seq"], r[0]["user_seq"]);
    assert_eq!(live[0]["thread_version"], 9);
}

#[tokio::test]
async fn ping_gets_pong_and_an_ack_beyond_what_was_delivered_is_an_error() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    started_run(&agent, "alice").await; // head 3
    let mut s = server
        .socket(&token("alice", "user"), "after=1&client_id=t")
        .await
        .unwrap();
    s.welcome().await.unwrap();
    s.until("caught_up").await.unwrap();
    s.send(json!({"type": "ping"})).await.unwrap();
    assert_eq!(s.frame().await.unwrap(), json!({"type": "pong"}));
    s.send(json!({"type": "ack", "user_seq": 4})).await.unwrap();
    let e = s.frame().await.unwrap();
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["code"].as_str().is_some_and(|c| !c.is_empty()), "{e}");
    s.send(json!({"type": "nonsense"})).await.unwrap();
    assert_eq!(s.frame().await.unwrap()["type"], "error");
    // The socket stays usable, and the bad ack moved no cursor.
    s.send(json!({"type": "ack", "user_seq": 3})).await.unwrap();
    s.send(json!({"type": "ping"})).await.unwrap();
    assert_eq!(s.frame().await.unwrap(), json!({"type": "pong"}));
    drop(s);
    let mut s = server
        .socket(&token("alice", "user"), "client_id=t")
        .await
        .unwrap();
    assert_eq!(s.welcome().await.unwrap()["resume_after"], 3);
}

#[tokio::test]
async fn every_socket_of_a_user_gets_every_event_and_the_limit_answers_4029() {
    let server = TestServer::spawn_with(Options {
        args: vec!["--max-connections-per-user".into(), "3".into()],
        ..Options::default()
    });
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    let alice = token("alice", "user");
    let mut sockets = Vec::new();
    for k in 0..3 {
        let mut s = server
            .socket(&alice, &format!("after=0&client_id=d{k}"))
            .await
            .unwrap();
        s.welcome().await.unwrap();
        s.until("caught_up").await.unwrap();
        sockets.push(s);
    }
    let mut fourth = server.socket(&alice, "after=0").await.unwrap();
    assert_closed(&mut fourth, 4029, "fourth socket").await;
    // The limit is per user: bob still connects.
    let mut bob = server.socket(&token("bob", "user"), "").await.unwrap();
    bob.welcome().await.unwrap();

    append_thinking(&agent, &run, 0, 100, 0).await;
    for s in &mut sockets {
        let frames = s.events(100).await.unwrap();
        assert_eq!(
            frames.iter().map(seq).collect::<Vec<_>>(),
            (4..=103).collect::<Vec<_>>()
        );
    }
    // A closed socket gives its slot back.
    let mut gone = sockets.pop().unwrap();
    gone.ws.close(None).await.unwrap();
    drop(gone);
    let mut again = threadline_tests::eventually("a free slot", || async {
        let mut s = server.socket(&alice, "after=latest").await.ok()?;
        match s.frame().await.ok()? {
            w if w["type"] == "welcome" => Some(s),
            _ => None,
        }
    })
    .await;
    assert_eq!(again.frame().await.unwrap()["type"], "caught_up");
}

#[tokio::test]
async fn graceful_shutdown_closes_open_sockets_with_1001() {
    let mut server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    started_run(&agent, "alice").await;
    let mut sockets = Vec::new();
    for q in ["after=0", "after=latest"] {
        let mut s = server.socket(&token("alice", "user"), q).await.unwrap();
        s.welcome().await.unwrap();
        s.until("caught_up").await.unwrap();
        sockets.push(s);
    }
    let stopping = Instant::now();
    let status = tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    for mut s in sockets {
        let (code, error) = s.closed().await.unwrap();
        assert_eq!(code, 1001);
        assert!(error.is_some(), "an error frame precedes the close");
    }
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bobs_socket_never_gets_alices_events() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (alice_thread, alice_run) = started_run(&agent, "alice").await;
    let (bob_thread, bob_run) = started_run(&agent, "bob").await;
    let mut alice = server
        .socket(&token("alice", "user"), "after=0")
        .await
        .unwrap();
    let mut bob = server
        .socket(&token("bob", "user"), "after=0")
        .await
        .unwrap();
    // Bob may not open Alice's thread as a filter either: it is simply not his.
    let mut peek = server
        .socket(
            &token("bob", "user"),
            &format!("after=0&thread_id={alice_thread}"),
        )
        .await
        .unwrap();
    peek.welcome().await.unwrap();
    let (seen, _) = peek.until("caught_up").await.unwrap();
    assert!(seen.is_empty(), "{seen:?}");

    let tasks: Vec<_> = [(alice_run, 0u64), (bob_run, 0u64)]
        .into_iter()
        .map(|(run, first)| {
            let agent = agent.clone();
            tokio::spawn(async move {
                for b in 0..20 {
                    append_thinking(&agent, &run, first + b * 10, 10, 0).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    for (s, thread, who) in [
        (&mut alice, &alice_thread, "alice"),
        (&mut bob, &bob_thread, "bob"),
    ] {
        assert_eq!(s.welcome().await.unwrap()["user_id"], who);
        let frames = s.events(203).await.unwrap();
        assert!(
            frames.iter().all(|f| f["thread_id"] == thread.as_str()),
            "{who} got another's event"
        );
        assert_eq!(
            frames.iter().map(seq).collect::<Vec<_>>(),
            (1..=203).collect::<Vec<_>>()
        );
        s.send(json!({"type": "ping"})).await.unwrap();
        assert_eq!(
            s.frame().await.unwrap(),
            json!({"type": "pong"}),
            "{who}: nothing more"
        );
    }
    peek.send(json!({"type": "ping"})).await.unwrap();
    assert_eq!(
        peek.frame().await.unwrap(),
        json!({"type": "pong"}),
        "the filter leaked"
    );
}
