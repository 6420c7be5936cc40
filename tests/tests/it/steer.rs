//! The way back from user to agent (issue 19), end to end over real sockets:
//! cancel mid-stream, an approval answered from a second device, a duplicate
//! answer refused, presence across a disconnect, and the audit trail of each.

use std::time::Duration;

use serde_json::{json, Value};
use threadline_tests::{started_run, token, Socket, TestServer};

/// Reads frames until an `event` frame whose `event` is `name`.
async fn until_event(socket: &mut Socket, name: &str) -> Value {
    loop {
        let f = socket.frame().await.expect("frame");
        if f["type"] == "event" && f["event"] == name {
            return f;
        }
    }
}

/// The audit envelope of the run's only `name` event.
async fn audited(server: &TestServer, run: &str, name: &str) -> Value {
    let auditor = server.api(&token("aud", "auditor"));
    let events = auditor
        .audit_events(&format!("run_id={run}&type={name}"))
        .await;
    assert_eq!(events.len(), 1, "{name} in the audit: {events:?}");
    events[0].clone()
}

#[tokio::test]
async fn cancel_mid_stream_reaches_the_agent_and_the_run_ends_with_its_terminal_event() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let alice = server.api(&token("alice", "user"));
    let (_thread, run) = started_run(&agent, "alice").await;
    let mut phone = server
        .socket(&token("alice", "user"), "client_id=phone")
        .await
        .unwrap();
    phone.until("caught_up").await.unwrap();

    // The agent streams; nothing asked of it yet.
    let r = agent.event(&run, "agent_thinking", json!({"i": 1})).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["cancel_requested"], json!(false));
    assert_eq!(r.body["signals"], json!(0));
    until_event(&mut phone, "agent_thinking").await;

    // The agent waits for news on the long poll while the user presses stop on the socket.
    let waiting = {
        let agent = server.api(&token("bot", "agent"));
        let run = run.clone();
        tokio::spawn(async move {
            agent
                .get(&format!("/v1/runs/{run}/signals?after=0&wait_ms=20000"))
                .await
        })
    };
    phone
        .send(json!({"type": "cancel", "run_id": run, "reason": "stop"}))
        .await
        .unwrap();
    let (_, recorded) = phone.until("recorded").await.unwrap();
    assert_eq!(recorded["event"], "run_cancel_requested");
    assert_eq!(recorded["by"], "alice");
    assert_eq!(recorded["repeat"], json!(false));
    let frame = until_event(&mut phone, "run_cancel_requested").await;
    assert_eq!(frame["data"]["requested_by"], "alice");
    assert_eq!(frame["data"]["reason"], "stop");
    assert_eq!(frame["position"], recorded["position"]);

    let polled = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the long poll answered promptly")
        .unwrap();
    assert_eq!(polled.status, 200, "{}", polled.body);
    assert_eq!(polled.body["cancel_requested"], json!(true));
    assert_eq!(polled.body["cancel"]["requested_by"], "alice");
    assert_eq!(polled.body["signals"], json!(1));

    // Asking again over HTTP answers the first request.
    let again = alice
        .post(&format!("/v1/runs/{run}/cancel"), &json!({}))
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["position"], recorded["position"]);

    // Every append response of the run now tells the agent; it ends the run.
    let r = agent.event(&run, "agent_thinking", json!({"i": 2})).await;
    assert_eq!(r.body["cancel_requested"], json!(true));
    let r = agent
        .event(&run, "agent_completed", json!({"cancelled": true}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    until_event(&mut phone, "agent_completed").await;

    // A finished run cannot be cancelled (even again): 409, never a new event.
    let late = alice.post_raw(&format!("/v1/runs/{run}/cancel"), "").await;
    assert_eq!((late.status, late.code()), (409, "run_closed"));
    let (_t, other) = started_run(&agent, "alice").await;
    agent.event(&other, "agent_error", json!({})).await;
    let closed = alice
        .post_raw(&format!("/v1/runs/{other}/cancel"), "")
        .await;
    assert_eq!((closed.status, closed.code()), (409, "run_closed"));

    // Isolation and roles.
    let bob = server.api(&token("bob", "user"));
    let r = bob
        .post(&format!("/v1/runs/{other}/cancel"), &json!({}))
        .await;
    assert_eq!((r.status, r.code()), (404, "run_not_found"));
    let r = agent
        .post(&format!("/v1/runs/{run}/cancel"), &json!({}))
        .await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = alice
        .post(&format!("/v1/runs/{run}/cancel"), &json!({"why": 1}))
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
    let r = alice
        .post_raw("/v1/runs/not a run/cancel".replace(' ', "%20").as_str(), "")
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_id"));

    let envelope = audited(&server, &run, "run_cancel_requested").await;
    assert_eq!(envelope["actor"], json!({"sub": "alice", "role": "user"}));
    assert_eq!(envelope["user_id"], "alice");
}

#[tokio::test]
async fn an_approval_is_answered_from_a_second_device_and_a_changed_answer_is_refused() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let alice = server.api(&token("alice", "user"));
    let (_thread, run) = started_run(&agent, "alice").await;
    let mut laptop = server
        .socket(&token("alice", "user"), "client_id=laptop")
        .await
        .unwrap();
    let mut phone = server
        .socket(&token("alice", "user"), "client_id=phone")
        .await
        .unwrap();
    laptop.until("caught_up").await.unwrap();
    phone.until("caught_up").await.unwrap();

    let ask = json!({"input_id": "deploy-1", "kind": "approval",
        "prompt": "Deploy to production?", "options": ["approve", "deny"]});
    let r = agent.event(&run, "agent_awaiting_input", ask.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    for device in [&mut laptop, &mut phone] {
        let f = until_event(device, "agent_awaiting_input").await;
        assert_eq!(f["data"], ask);
    }
    // The same input id twice is a lifecycle error.
    let r = agent.event(&run, "agent_awaiting_input", ask.clone()).await;
    assert_eq!((r.status, r.code()), (422, "invalid_lifecycle"));
    let r = agent
        .event(&run, "agent_awaiting_input", json!({"kind": "approval"}))
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));

    let waiting = {
        let agent = server.api(&token("bot", "agent"));
        let run = run.clone();
        tokio::spawn(async move {
            agent
                .get(&format!("/v1/runs/{run}/signals?after=0&wait_ms=20000"))
                .await
        })
    };
    // Not one of the options: refused, nothing recorded.
    phone
        .send(json!({"type": "input", "run_id": run, "input_id": "deploy-1", "answer": "maybe"}))
        .await
        .unwrap();
    let (_, err) = phone.until("error").await.unwrap();
    assert_eq!(err["code"], "invalid_request");
    phone
        .send(json!({"type": "input", "run_id": run, "input_id": "deploy-1", "answer": "approve"}))
        .await
        .unwrap();
    let (_, recorded) = phone.until("recorded").await.unwrap();
    assert_eq!(recorded["event"], "user_input_provided");
    for device in [&mut laptop, &mut phone] {
        let f = until_event(device, "user_input_provided").await;
        assert_eq!(
            f["data"],
            json!({"input_id": "deploy-1", "answer": "approve", "answered_by": "alice"})
        );
    }
    let polled = waiting.await.unwrap();
    assert_eq!(polled.status, 200);
    assert_eq!(polled.body["inputs"][0]["answer"]["answer"], "approve");
    assert_eq!(polled.body["signals"], json!(1));

    // The agent also finds the answer on its next append.
    let r = agent.event(&run, "agent_thinking", json!({})).await;
    assert_eq!(r.body["answers"][0]["input_id"], "deploy-1");
    assert_eq!(r.body["answers"][0]["answer"], "approve");

    // The same answer again (from the laptop, over HTTP): the original, nothing appended.
    let path = format!("/v1/runs/{run}/input");
    let again = alice
        .post(&path, &json!({"input_id": "deploy-1", "answer": "approve"}))
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["position"], recorded["position"]);
    assert_eq!(again.body["event_id"], recorded["event_id"]);
    // A different answer: refused.
    let changed = alice
        .post(&path, &json!({"input_id": "deploy-1", "answer": "deny"}))
        .await;
    assert_eq!(
        (changed.status, changed.code()),
        (409, "input_already_answered")
    );
    // Only the owner answers; unknown inputs are not found.
    let bob = server.api(&token("bob", "user"));
    let r = bob
        .post(&path, &json!({"input_id": "deploy-1", "answer": "deny"}))
        .await;
    assert_eq!((r.status, r.code()), (404, "run_not_found"));
    let r = agent
        .post(&path, &json!({"input_id": "deploy-1", "answer": "deny"}))
        .await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = alice
        .post(&path, &json!({"input_id": "nope", "answer": "x"}))
        .await;
    assert_eq!((r.status, r.code()), (404, "input_not_found"));
    let r = alice.post(&path, &json!({"input_id": "deploy-1"})).await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));

    let history = alice
        .thread_events(recorded["thread_id"].as_str().unwrap())
        .await;
    let answers = history
        .iter()
        .filter(|f| f["event"] == "user_input_provided")
        .count();
    assert_eq!(answers, 1, "one answer recorded");
    let envelope = audited(&server, &run, "user_input_provided").await;
    assert_eq!(envelope["actor"], json!({"sub": "alice", "role": "user"}));
    let envelope = audited(&server, &run, "agent_awaiting_input").await;
    assert_eq!(envelope["actor"], json!({"sub": "bot", "role": "agent"}));
}

#[tokio::test]
async fn presence_follows_the_users_sockets_without_flapping_on_a_quick_reconnect() {
    let grace = Duration::from_millis(600);
    let server = TestServer::spawn_with_limits(threadline_api::config::LimitArgs {
        presence_grace: grace,
        ..Default::default()
    });
    let agent = server.api(&token("bot", "agent"));
    let presence = |api: threadline_tests::Api| async move {
        let r = api.get("/v1/users/alice/presence").await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    };
    let p = presence(server.api(&token("bot", "agent"))).await;
    assert_eq!(
        (p["online"].clone(), p["devices"].clone()),
        (json!(false), json!(0))
    );
    assert!(p.get("last_seen").is_none());

    let mut phone = server.socket(&token("alice", "user"), "").await.unwrap();
    phone.until("caught_up").await.unwrap();
    let p = presence(server.api(&token("alice", "user"))).await;
    assert_eq!(
        (p["online"].clone(), p["devices"].clone()),
        (json!(true), json!(1))
    );
    assert!(p["last_seen"].is_string());

    // A dropped connection that comes back within the grace never shows offline.
    drop(phone);
    let mut observed_offline = false;
    for _ in 0..5 {
        let p = presence(server.api(&token("bot", "agent"))).await;
        observed_offline |= p["online"] == json!(false);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut phone = server.socket(&token("alice", "user"), "").await.unwrap();
    phone.until("caught_up").await.unwrap();
    assert!(!observed_offline, "presence flapped on a quick reconnect");

    // Offline once the grace has passed with no device.
    phone.ws.close(None).await.unwrap();
    let p = threadline_tests::eventually("alice offline", || async {
        let p = presence(server.api(&token("bot", "agent"))).await;
        (p["online"] == json!(false)).then_some(p)
    })
    .await;
    assert_eq!(p["devices"], json!(0));
    assert!(
        p["last_seen"].is_string(),
        "offline keeps when she was last seen"
    );

    // Back online.
    let mut again = server.socket(&token("alice", "user"), "").await.unwrap();
    again.until("caught_up").await.unwrap();
    let p = presence(server.api(&token("bot", "agent"))).await;
    assert_eq!(p["online"], json!(true));

    // A user reads only its own presence.
    let r = server
        .api(&token("bob", "user"))
        .get("/v1/users/alice/presence")
        .await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    let r = agent.get("/v1/users/a%20b/presence").await;
    assert_eq!((r.status, r.code()), (400, "invalid_id"));
    let _ = agent;
}

#[tokio::test]
async fn the_online_users_gauge_follows_presence() {
    let server = TestServer::spawn_process();
    let metric = |server: &TestServer| {
        let url = server.url("/metrics");
        async move {
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            text.lines()
                .find(|l| l.starts_with("threadline_users_online "))
                .map(str::to_owned)
        }
    };
    let mut socket = server.socket(&token("alice", "user"), "").await.unwrap();
    socket.until("caught_up").await.unwrap();
    assert_eq!(
        metric(&server).await.as_deref(),
        Some("threadline_users_online 1")
    );
    let mut second = server.socket(&token("alice", "user"), "").await.unwrap();
    second.until("caught_up").await.unwrap();
    assert_eq!(
        metric(&server).await.as_deref(),
        Some("threadline_users_online 1"),
        "a user counts once, whatever its devices"
    );
}
