//! The delivery ledger: `GET /v1/audit/deliveries` lists every durable ack in log
//! order with its filters, and per thread which clients acknowledged each event;
//! `threadline audit --deliveries` and `--with-acks` print the same offline and
//! through a server; the console is served from the binary.

use serde_json::{json, Value};
use threadline_tests::{token, Api, TestServer};

/// A socket of `user` as `client` that receives everything and acknowledges up to `seq`,
/// returning once the ack is durable (the pong after it).
async fn ack(server: &TestServer, user: &str, client: &str, seq: u64) {
    let mut s = server
        .socket(&token(user, "user"), &format!("client_id={client}&after=0"))
        .await
        .unwrap();
    let (events, _) = s.until("caught_up").await.unwrap();
    assert!(events.len() as u64 >= seq, "{events:?}");
    s.send(json!({"type": "ack", "user_seq": seq}))
        .await
        .unwrap();
    s.send(json!({"type": "ping"})).await.unwrap();
    let (_, pong) = s.until("pong").await.unwrap();
    assert_eq!(pong["type"], "pong");
}

async fn run_with(agent: &Api, user: &str, thread: &str, events: usize) -> String {
    let t = agent
        .create_thread(json!({"user_id": user, "thread_id": thread}))
        .await;
    let run = agent.register_run(&t).await;
    assert_eq!(
        agent.event(&run, "agent_started", json!({})).await.status,
        201
    );
    for i in 1..events {
        let r = agent.event(&run, "agent_thinking", json!({"i": i})).await;
        assert_eq!(r.status, 201);
    }
    t
}

#[tokio::test]
async fn the_ledger_lists_acks_in_log_order_and_per_thread_event() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let auditor = server.api(&token("ada", "auditor"));
    // alice: thread_a (5 events: created, registered, 3 agent) then thread_b (4).
    let a = run_with(&agent, "alice", "thread_led_a", 3).await;
    let b = run_with(&agent, "alice", "thread_led_b", 2).await;
    run_with(&agent, "bob", "thread_led_c", 2).await;

    // Nobody acknowledged anything yet.
    let r = auditor.get("/v1/audit/deliveries").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["deliveries"], json!([]));
    let r = auditor
        .get(&format!("/v1/audit/deliveries?thread_id={a}"))
        .await;
    assert_eq!(r.body["thread"]["clients"], json!([]));
    assert_eq!(r.body["thread"]["events"].as_array().unwrap().len(), 5);

    ack(&server, "alice", "phone", 3).await;
    ack(&server, "alice", "laptop", 7).await;
    ack(&server, "alice", "phone", 6).await;
    ack(&server, "bob", "phone", 4).await;

    // Every ack, in log order; filters by user, client and time.
    let all = auditor.get("/v1/audit/deliveries").await.body;
    let rows: Vec<(String, String, u64)> = all["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["user_id"].as_str().unwrap().to_owned(),
                d["client_id"].as_str().unwrap().to_owned(),
                d["user_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("alice", "phone", 3),
        ("alice", "laptop", 7),
        ("alice", "phone", 6),
        ("bob", "phone", 4),
    ]
    .map(|(u, c, s)| (u.to_owned(), c.to_owned(), s));
    assert_eq!(rows, expected);
    let positions: Vec<u64> = all["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["position"].as_u64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let count = |q: &str| {
        let auditor = &auditor;
        let q = q.to_owned();
        async move {
            auditor.get(&format!("/v1/audit/deliveries?{q}")).await.body["deliveries"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(count("user_id=alice").await, 3);
    assert_eq!(count("client_id=phone").await, 3);
    assert_eq!(count("user_id=alice&client_id=laptop").await, 1);
    assert_eq!(count("until=2000-01-01T00:00:00Z").await, 0);
    assert_eq!(count("since=2000-01-01T00:00:00Z").await, 4);
    // Paging: one at a time, following next_after.
    let mut after = 0;
    let mut paged = Vec::new();
    loop {
        let page = auditor
            .get(&format!("/v1/audit/deliveries?limit=1&after={after}"))
            .await
            .body;
        let next = page["next_after"].as_u64().unwrap();
        paged.extend(page["deliveries"].as_array().unwrap().clone());
        if next == after {
            break;
        }
        after = next;
    }
    assert_eq!(Value::Array(paged), all["deliveries"]);

    // Per thread: thread_a holds alice's user_seq 1..=5, thread_b 6..=9.
    let ledger = auditor
        .get(&format!("/v1/audit/deliveries?thread_id={a}"))
        .await
        .body;
    let t = &ledger["thread"];
    assert_eq!(t["user_id"], "alice");
    assert_eq!(t["user_head"], 9);
    let clients: Vec<(&str, u64)> = t["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["client_id"].as_str().unwrap(),
                c["acked_user_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(clients, [("laptop", 7), ("phone", 6)]);
    for e in t["events"].as_array().unwrap() {
        let seq = e["user_seq"].as_u64().unwrap();
        let phone = e["acks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["client_id"] == "phone")
            .unwrap();
        // The first ack that covered it: user_seq 3 for 1..=3, 6 for 4 and 5.
        assert_eq!(phone["user_seq"], if seq <= 3 { 3 } else { 6 }, "{e}");
        assert_eq!(e["unacked"], json!([]));
    }
    // thread_b: seq 6..=9; phone acked up to 6, laptop up to 7.
    let ledger_b = auditor
        .get(&format!("/v1/audit/deliveries?thread_id={b}"))
        .await
        .body;
    let unacked: Vec<(u64, Value)> = ledger_b["thread"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["user_seq"].as_u64().unwrap(), e["unacked"].clone()))
        .collect();
    assert_eq!(
        unacked,
        [
            (6, json!([])),
            (7, json!(["phone"])),
            (8, json!(["laptop", "phone"])),
            (9, json!(["laptop", "phone"]))
        ]
    );
    // The deliveries of a thread page are the acks its events cite, in log order.
    let cited: Vec<u64> = ledger_b["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["user_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(cited, [7, 6]);
    // Paging a thread by position: after the second event, limit 2.
    let second = ledger_b["thread"]["events"][1]["position"]
        .as_u64()
        .unwrap();
    let page = auditor
        .get(&format!(
            "/v1/audit/deliveries?thread_id={b}&after={second}&limit=1"
        ))
        .await
        .body;
    assert_eq!(page["thread"]["events"][0]["user_seq"], 8);
    assert_eq!(page["thread"]["events"][0]["thread_version"], 3);
    assert_eq!(page["thread"]["events"].as_array().unwrap().len(), 1);
    // One client only.
    let laptop = auditor
        .get(&format!(
            "/v1/audit/deliveries?thread_id={b}&client_id=laptop"
        ))
        .await
        .body;
    assert_eq!(laptop["thread"]["clients"].as_array().unwrap().len(), 1);
    assert_eq!(laptop["thread"]["events"][1]["unacked"], json!([]));
}

#[tokio::test]
async fn the_ledger_refuses_non_auditors_and_bad_input_with_4xx() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    run_with(&agent, "alice", "thread_led_x", 1).await;
    for role in ["user", "agent"] {
        let r = server
            .api(&token("alice", role))
            .get("/v1/audit/deliveries")
            .await;
        assert_eq!(r.status, 403, "{role}: {:?}", r.body);
    }
    assert_eq!(
        server.anonymous().get("/v1/audit/deliveries").await.status,
        401
    );
    let auditor = server.api(&token("ada", "auditor"));
    for (q, status, code) in [
        ("client_id=no%20spaces", 400, "invalid_id"),
        ("user_id=", 400, "invalid_id"),
        ("thread_id=run_x", 400, "invalid_id"),
        ("limit=0", 400, "invalid_request"),
        ("limit=1001", 400, "invalid_request"),
        ("since=yesterday", 400, "invalid_request"),
        ("after=-1", 400, "invalid_request"),
        ("bogus=1", 400, "invalid_request"),
        ("thread_id=thread_missing", 404, "thread_not_found"),
        // Another owner than the thread's: as if it did not exist.
        (
            "thread_id=thread_led_x&user_id=bob",
            404,
            "thread_not_found",
        ),
    ] {
        let r = auditor.get(&format!("/v1/audit/deliveries?{q}")).await;
        assert_eq!((r.status, r.code()), (status, code), "{q}: {:?}", r.body);
    }
    // Far past the head: an empty page, not an error.
    let r = auditor
        .get(&format!("/v1/audit/deliveries?after={}", u64::MAX))
        .await;
    assert_eq!(r.status, 200);
    let r = auditor
        .get(&format!(
            "/v1/audit/deliveries?thread_id=thread_led_x&after={}",
            u64::MAX
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["thread"]["events"], json!([]));
}

#[tokio::test]
async fn the_console_is_served_from_the_binary_with_a_strict_policy() {
    let server = TestServer::spawn();
    let http = reqwest::Client::new();
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let r = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(h["x-content-type-options"], "nosniff");
        let body = r.text().await.unwrap();
        // Nothing is fetched from elsewhere: no CDN, no absolute URL to another host.
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path}"
        );
    }
    let js = http
        .get(server.url("/console/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The token is kept in sessionStorage only and sent as a bearer header.
    assert!(js.contains("sessionStorage") && !js.contains("localStorage"));
    assert!(!js.contains("access_token"));
    assert!(js.contains("Authorization: `Bearer"));
}

/// Runs the binary with `args`; its stdout when it succeeded.
fn threadline(args: &[&str]) -> String {
    let out = std::process::Command::new(threadline_tests::binary())
        .args(args)
        .env_remove("THREADLINE_URL")
        .env_remove("THREADLINE_TOKEN")
        .env_remove("THREADLINE_DATA")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run threadline");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn audit_prints_the_ledger_and_interleaves_acks_offline_and_through_a_server() {
    let mut server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    let a = run_with(&agent, "alice", "thread_cli_led", 3).await;
    ack(&server, "alice", "phone", 2).await;
    run_with(&agent, "bob", "thread_cli_led_b", 1).await;
    ack(&server, "bob", "tab", 3).await;
    ack(&server, "alice", "phone", 5).await;
    let jwt = token("ada", "auditor");
    let auditor = server.api(&jwt);
    let endpoint = auditor.get("/v1/audit/deliveries").await.body["deliveries"].clone();
    let thread = auditor
        .get(&format!("/v1/audit/deliveries?thread_id={a}"))
        .await
        .body["thread"]["events"]
        .clone();
    let url = server.url("");
    let remote = |extra: &[&str]| {
        let mut args = vec!["audit", "--url", &url, "--token", &jwt, "--format", "jsonl"];
        args.extend_from_slice(extra);
        threadline(&args)
    };
    assert_eq!(Value::Array(lines(&remote(&["--deliveries"]))), endpoint);
    assert_eq!(
        Value::Array(lines(&remote(&["--deliveries", "--thread", &a]))),
        thread
    );
    let remote_with_acks = lines(&remote(&["--with-acks"]));
    // Every position of the log, densely: thread events and acks interleaved.
    let head = server.anonymous().get("/readyz").await.body["head"]
        .as_u64()
        .unwrap();
    let positions: Vec<u64> = remote_with_acks
        .iter()
        .map(|v| v["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, (1..=head).collect::<Vec<_>>());
    let acks: Vec<&Value> = remote_with_acks
        .iter()
        .filter(|v| v["event"] == "cursor_advanced")
        .collect();
    assert_eq!(acks.len(), 3);
    assert_eq!(
        lines(&remote(&[
            "--with-acks",
            "--user",
            "alice",
            "--client",
            "phone"
        ]))
        .iter()
        .filter(|v| v["event"] == "cursor_advanced")
        .count(),
        2
    );

    // Offline, after the server stopped: the same lines.
    assert!(server.stop().success());
    let data = server.data.path().to_str().unwrap().to_owned();
    let offline = |extra: &[&str]| {
        let mut args = vec!["audit", "--data", &data, "--format", "jsonl"];
        args.extend_from_slice(extra);
        threadline(&args)
    };
    assert_eq!(Value::Array(lines(&offline(&["--deliveries"]))), endpoint);
    assert_eq!(
        Value::Array(lines(&offline(&["--deliveries", "--thread", &a]))),
        thread
    );
    assert_eq!(lines(&offline(&["--with-acks"])), remote_with_acks);
    // The tables: a header, then one row per ack / per event.
    let table = threadline(&["audit", "--data", &data, "--deliveries"]);
    assert_eq!(table.lines().count(), 1 + 3, "{table}");
    assert!(table.lines().nth(1).unwrap().contains("phone"));
    let table = threadline(&["audit", "--data", &data, "--deliveries", "--thread", &a]);
    assert!(
        table.contains("client phone acked up to user_seq 5"),
        "{table}"
    );
    let table = threadline(&["audit", "--data", &data, "--with-acks"]);
    assert!(table.contains("client tab acked user_seq 3"), "{table}");
    // verify covers the ledger: rebuilt acks equal the checkpoint's.
    let verified = threadline(&["verify", "--data", &data]);
    assert!(verified.contains("OK"), "{verified}");
}
