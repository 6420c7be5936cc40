//! Logs never carry tokens, and `/metrics` exposes the figures operators watch.

use serde_json::json;
use threadline_client::Resume;
use threadline_tests::{client_caught_up, client_events, eventually, token, Options, TestServer};

#[tokio::test]
async fn tokens_never_reach_the_log_even_at_trace_level() {
    let mut server = TestServer::spawn_with(Options {
        env: vec![("THREADLINE_LOG".into(), "trace".into())],
        ..Options::default()
    });
    let user = token("alice", "user");
    let agent_token = token("bot", "agent");
    let agent = server.api(&agent_token);
    let thread = agent.create_thread(json!({"user_id": "alice"})).await;
    agent.register_run(&thread).await;
    // A token in the query string, one in a header, one refused.
    let mut socket = server
        .socket(&user, &format!("after=0&access_token={user}"))
        .await
        .unwrap();
    socket.until("caught_up").await.unwrap();
    let bad = server.api("not.a.jwt").get("/v1/threads").await;
    assert_eq!(bad.status, 401);
    drop(socket);
    assert!(server.stop().success());
    let log = server.log.clone();
    let lines = eventually("the server's last log line", || {
        let log = log.clone();
        async move {
            let lines = log.lock().unwrap().clone();
            lines
                .iter()
                .any(|l| l.contains("log flushed and closed"))
                .then_some(lines)
        }
    })
    .await;
    assert!(
        lines.len() > 10,
        "trace logging produced almost nothing: {lines:?}"
    );
    for line in &lines {
        for secret in [user.as_str(), agent_token.as_str(), "not.a.jwt"] {
            assert!(!line.contains(secret), "a token reached the log: {line}");
        }
        assert!(
            !line.contains("access_token"),
            "a query string reached the log: {line}"
        );
    }
}

#[tokio::test]
async fn metrics_expose_appends_sockets_frames_lags_and_rejections() {
    let server = TestServer::spawn_process();
    let user = token("alice", "user");
    let agent = server.api(&token("bot", "agent"));
    let thread = agent.create_thread(json!({"user_id": "alice"})).await;
    let run = agent.register_run(&thread).await;
    let mut client = server.client(&user, |c| c.resume(Resume::After(0)));
    client_caught_up(&mut client).await.unwrap();
    assert_eq!(
        agent.event(&run, "agent_started", json!({})).await.status,
        201
    );
    client_events(&mut client, 1).await.unwrap();
    assert_eq!(client.flush().await, Ok(3));
    assert_eq!(
        agent.event(&run, "no_such_type", json!({})).await.status,
        400
    );

    let metrics = server
        .anonymous()
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    for name in [
        "threadline_appends_total",
        "threadline_append_seconds",
        "threadline_sockets_connected 1",
        "threadline_frames_sent_total",
        "threadline_replay_lag_events",
        "threadline_cursor_lag_events",
        "threadline_rejected_requests_total{code=\"invalid_event_type\"} 1",
        "threadline_log_head",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            line.starts_with("threadline_"),
            "metric not named threadline_*: {line}"
        );
    }
}
