//! Issue 13, server side: `refresh` on an open socket (same `sub` and role → a new
//! expiry; a bad token → `invalid_token` and the old expiry stands; another `sub` →
//! 1008), and a `pong` only once every earlier ack is durable (SIGKILL right after it).
//! Real server, real sockets, real JWTs; these send frames by hand on purpose.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use threadline_tests::{
    append_thinking, now_secs, seq, sign, sign_with, started_run, token, Options, Socket,
    TestServer,
};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn user_token(sub: &str, exp: u64) -> String {
    sign(&json!({"sub": sub, "role": "user", "exp": exp}))
}

/// Opens alice's socket with `jwt` and reads through `caught_up`.
async fn open(server: &TestServer, jwt: &str) -> Socket {
    let mut s = server.socket(jwt, "after=0").await.unwrap();
    s.welcome().await.unwrap();
    s.until("caught_up").await.unwrap();
    s
}

/// Sends `refresh` with `token` and returns the answer.
async fn refresh(s: &mut Socket, token: Value) -> Value {
    s.send(json!({"type": "refresh", "token": token}))
        .await
        .unwrap();
    s.frame().await.unwrap()
}

/// Asserts the socket closes with 4001 about when `exp` (unix s) passes.
async fn assert_expires_at(s: &mut Socket, exp: u64, what: &str) {
    let (code, error) = s.closed().await.unwrap();
    let late = now_ms() - (exp * 1000) as i64;
    assert_eq!(code, 4001, "{what}: close code");
    assert_eq!(
        error.expect("error frame")["code"],
        "token_expired",
        "{what}"
    );
    assert!(
        (-50..=1500).contains(&late),
        "{what}: closed {late} ms after exp"
    );
}

/// The socket still answers: a ping gets its pong.
async fn assert_open(s: &mut Socket, what: &str) {
    s.send(json!({"type": "ping"})).await.unwrap();
    assert_eq!(s.frame().await.unwrap(), json!({"type": "pong"}), "{what}");
}

#[tokio::test]
async fn a_refresh_with_the_same_sub_and_role_moves_the_expiry() {
    let server = TestServer::spawn();
    let old_exp = now_secs() + 2;
    let mut s = open(&server, &user_token("alice", old_exp)).await;
    let new_exp = now_secs() + 4;
    let answer = refresh(&mut s, json!(user_token("alice", new_exp))).await;
    assert_eq!(answer, json!({"type": "refreshed", "exp": new_exp}));
    // Past the old expiry the socket is still open ...
    tokio::time::sleep_until(deadline_after(old_exp, 1200)).await;
    assert_open(&mut s, "after the old exp").await;
    // ... and it closes at the new one.
    assert_expires_at(&mut s, new_exp, "new exp").await;
}

/// The instant `ms` milliseconds after the unix time `secs`.
fn deadline_after(secs: u64, ms: u64) -> tokio::time::Instant {
    let wait = (secs * 1000 + ms) as i64 - now_ms();
    tokio::time::Instant::now() + Duration::from_millis(wait.max(0) as u64)
}

#[tokio::test]
async fn a_refresh_may_also_shorten_the_expiry() {
    let server = TestServer::spawn();
    let mut s = open(&server, &user_token("alice", now_secs() + 3600)).await;
    let exp = now_secs() + 2;
    let answer = refresh(&mut s, json!(user_token("alice", exp))).await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    assert_expires_at(&mut s, exp, "shortened").await;
}

#[tokio::test]
async fn a_bad_refresh_token_is_an_error_frame_and_the_old_expiry_stands() {
    // The real binary: its log is checked for tokens.
    let server = TestServer::spawn_process();
    let exp = now_secs() + 3;
    let mut s = open(&server, &user_token("alice", exp)).await;
    let later = now_secs() + 3600;
    let cases: Vec<(&str, Value)> = vec![
        ("garbage", json!("not.a.jwt")),
        ("empty", json!("")),
        ("missing", Value::Null),
        ("oversized", json!("a".repeat(20_000))),
        (
            "wrong key",
            json!(sign_with(
                &json!({"sub": "alice", "exp": later}),
                b"another-secret-entirely-0123456789"
            )),
        ),
        (
            "expired",
            json!(user_token("alice", now_secs().saturating_sub(5))),
        ),
        (
            "not yet valid",
            json!(sign(
                &json!({"sub": "alice", "exp": later, "nbf": now_secs() + 600})
            )),
        ),
        ("no exp", json!(sign(&json!({"sub": "alice"})))),
        (
            "another role",
            json!(sign(
                &json!({"sub": "alice", "role": "auditor", "exp": later})
            )),
        ),
        (
            "bad role",
            json!(sign(&json!({"sub": "alice", "role": "root", "exp": later}))),
        ),
        (
            "bad sub",
            json!(sign(&json!({"sub": "alice smith", "exp": later}))),
        ),
    ];
    for (what, t) in cases {
        let answer = refresh(&mut s, t).await;
        assert_eq!(answer["type"], "error", "{what}: {answer}");
        assert_eq!(answer["code"], "invalid_token", "{what}: {answer}");
        assert!(answer["message"].is_string(), "{what}: {answer}");
    }
    // A token of the wrong JSON type is not a refresh at all.
    let answer = refresh(&mut s, json!(12)).await;
    assert_eq!(
        (answer["type"].as_str(), answer["code"].as_str()),
        (Some("error"), Some("invalid_message"))
    );
    assert_open(&mut s, "after the bad refreshes").await;
    assert_expires_at(&mut s, exp, "old exp").await;
    // No token reached the log.
    let log = server.log.lock().unwrap().join("\n");
    assert!(!log.contains("eyJ"), "a token reached the log");
}

#[tokio::test]
async fn a_refresh_for_another_sub_closes_with_1008() {
    let server = TestServer::spawn();
    let mut s = open(&server, &token("alice", "user")).await;
    s.send(json!({"type": "refresh", "token": token("bob", "user")}))
        .await
        .unwrap();
    let (code, error) = s.closed().await.unwrap();
    assert_eq!(code, 1008);
    let error = error.expect("an error frame before the close");
    assert_eq!(error["code"], "token_subject_changed", "{error}");
    // The slot was given back: bob and alice can still connect.
    let mut again = server.socket(&token("alice", "user"), "").await.unwrap();
    again.welcome().await.unwrap();
}

#[tokio::test]
async fn refreshes_interleave_with_a_replay_and_acks_without_a_gap() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 1000, 100).await; // 1..=1003
    let mut s = server
        .socket(&user_token("alice", now_secs() + 60), "after=0&client_id=r")
        .await
        .unwrap();
    s.welcome().await.unwrap();
    // Refreshes sent while the replay streams are answered in between its frames.
    let mut exps = Vec::new();
    for k in 0..50 {
        let exp = now_secs() + 120 + k;
        exps.push(exp);
        s.send(json!({"type": "refresh", "token": user_token("alice", exp)}))
            .await
            .unwrap();
    }
    let mut last = 0;
    let mut refreshed = Vec::new();
    while refreshed.len() < exps.len() || last < 1003 {
        let f = s.frame().await.unwrap();
        match f["type"].as_str() {
            Some("event") => {
                assert_eq!(seq(&f), last + 1, "a gap or duplicate around a refresh");
                last += 1;
                if last % 100 == 0 {
                    s.send(json!({"type": "ack", "user_seq": last}))
                        .await
                        .unwrap();
                }
            }
            Some("refreshed") => refreshed.push(f["exp"].as_u64().unwrap()),
            Some("caught_up") => assert_eq!(seq(&f), 1003),
            _ => panic!("unexpected {f}"),
        }
    }
    assert_eq!(refreshed, exps, "answered in order, one each");
    assert_open(&mut s, "after the refreshes").await;
}

/// The pong after an ack is the client's proof that its cursor is durable: a SIGKILL
/// right after the pong loses none of the acks sent before the ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pong_comes_only_after_every_earlier_ack_is_durable() {
    let mut server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 300, 0).await; // 1..=303
    let alice = token("alice", "user");
    for round in 1..=3u64 {
        let mut s = server.socket(&alice, "client_id=durable").await.unwrap();
        let w = s.welcome().await.unwrap();
        assert_eq!(w["resume_after"], (round - 1) * 100, "round {round}");
        let events = s.events(100).await.unwrap();
        // Every ack pipelined, then one ping: no waiting in between.
        for f in &events {
            s.send(json!({"type": "ack", "user_seq": seq(f)}))
                .await
                .unwrap();
        }
        s.send(json!({"type": "ping"})).await.unwrap();
        loop {
            let f = s.frame().await.unwrap();
            if f["type"] == "pong" {
                break;
            }
            assert!(
                matches!(f["type"].as_str(), Some("event" | "caught_up")),
                "{f}"
            );
        }
        // No shutdown code runs: only what was durable survives.
        server.kill();
        server = TestServer::start(server.data.clone(), Options::default()).expect("restart");
    }
    let mut s = server.socket(&alice, "client_id=durable").await.unwrap();
    assert_eq!(s.welcome().await.unwrap()["resume_after"], 300);
}
