//! Finding 3: connection limits: a global cap answered 503, header and idle
//! deadlines, and the open-file limit raised at start.

use std::time::{Duration, Instant};

use threadline_tests::{token, Options, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::live_socket;

/// Reads until the server closes the connection; panics after `within`.
async fn server_closes(s: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("{what}: still open after {within:?}"),
        }
    }
}

/// Reads one whole `/healthz` answer off a raw connection.
async fn read_health(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"status\":\"ok\"") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Soft and hard `Max open files` of a process.
fn nofile(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_owned(), f[4].to_owned())
}

const HEALTH: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

// Finding 3: connection-level limits.
#[tokio::test]
async fn f3_connections_are_capped_and_silent_or_idle_ones_are_dropped() {
    let server = TestServer::spawn_with(Options {
        sh: Some("ulimit -Sn 512".into()),
        ..Options::env(&[
            ("THREADLINE_HEADER_TIMEOUT", "1s"),
            ("THREADLINE_IDLE_TIMEOUT", "4s"),
            ("THREADLINE_MAX_CONNECTIONS", "8"),
        ])
    });
    let (soft, hard) = nofile(server.pid());
    assert_eq!(
        soft, hard,
        "the open-file limit is raised to the hard limit"
    );

    // The cap: 8 connections (sockets here, which no deadline ends) and the
    // 9th is answered 503 `overloaded` at once, in JSON.
    let mut sockets = Vec::new();
    for i in 0..8 {
        sockets.push(live_socket(&server, &format!("user{i}")).await);
    }
    let upgrade = server.socket(&token("user9", "user"), "after=latest").await;
    let refused = upgrade
        .expect_err("a 9th connection is refused")
        .to_string();
    assert!(refused.contains("503"), "{refused}");
    let r = server.anonymous().get("/healthz").await;
    r.assert_error(503, "overloaded");
    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    drop(sockets);
    let health = server.anonymous();
    threadline_tests::eventually("healthz after the sockets left", || {
        let health = health.clone();
        async move { (health.get("/healthz").await.status == 200).then_some(()) }
    })
    .await;
    drop(health);

    // An unfinished request head, a silent connection, and a kept-alive one left idle.
    let mut head = TcpStream::connect(server.addr).await.unwrap();
    head.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(HEALTH).await.unwrap();
    read_health(&mut kept).await;
    let answered = Instant::now();
    let within = Duration::from_secs(10);
    let (a, _) = tokio::join!(
        server_closes(&mut head, within, "an unfinished head"),
        server_closes(&mut silent, within, "a silent connection"),
    );
    assert!(
        a.is_empty() || String::from_utf8_lossy(&a).contains("408"),
        "{:?}",
        String::from_utf8_lossy(&a)
    );
    // Idle longer than the header deadline, within the idle one: still served.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(answered.elapsed())).await;
    kept.write_all(HEALTH).await.unwrap();
    read_health(&mut kept).await;
    server_closes(&mut kept, within, "an idle kept-alive connection").await;

    // A body that stops arriving is answered 408 in JSON, then the connection ends.
    let mut body = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/threads HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ti",
        token("alice", "user")
    );
    body.write_all(head.as_bytes()).await.unwrap();
    let answer = server_closes(&mut body, within, "a stalled body").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"),
        "{answer}"
    );
    assert_eq!(server.anonymous().get("/healthz").await.status, 200);
}
