//! Issue 4, point 6: every kind of bad token is 401 with `WWW-Authenticate:
//! Bearer`; a valid token whose role may not make the call is 403.

use serde_json::{json, Value};
use threadline_tests::{now_secs, sign, sign_with, token, Api, Options, Reply, TestServer};

/// `{"alg":"none","typ":"JWT"}` with the payload of `claims` and no signature.
fn alg_none(claims: &Value) -> String {
    let signed = sign(claims);
    let payload = signed.split('.').nth(1).unwrap();
    format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.")
}

#[track_caller]
fn assert_unauthorized(r: &Reply, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.body);
    r.assert_error(401, "unauthorized");
    let challenge = r
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: WWW-Authenticate is {challenge:?}"
    );
}

/// Tries a call of every kind with `api`, each of which must be 401.
async fn all_rejected(api: &Api, what: &str, thread: &str, run: &str) {
    assert_unauthorized(&api.get("/v1/threads").await, what);
    assert_unauthorized(&api.get(&format!("/v1/threads/{thread}")).await, what);
    assert_unauthorized(
        &api.get(&format!("/v1/threads/{thread}/events")).await,
        what,
    );
    assert_unauthorized(&api.get("/v1/audit/events").await, what);
    assert_unauthorized(
        &api.post("/v1/threads", &json!({"title": "sneaky"})).await,
        what,
    );
    assert_unauthorized(
        &api.post(
            &format!("/v1/threads/{thread}/runs"),
            &json!({"agent_name": "x"}),
        )
        .await,
        what,
    );
    assert_unauthorized(
        &api.event(run, "agent_thinking", json!({"sneaky": true}))
            .await,
        what,
    );
    assert_unauthorized(
        &api.post(
            "/v1/events",
            &json!({"events": [{"run_id": run, "type": "agent_thinking", "data": {}}]}),
        )
        .await,
        what,
    );
}

#[tokio::test]
async fn missing_malformed_forged_expired_and_early_tokens_are_401() {
    let server = TestServer::spawn();
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("bot", "agent"));
    let thread = alice.create_thread(json!({})).await;
    let run = agent.register_run(&thread).await;
    let r = agent.event(&run, "agent_started", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let auditor = server.api(&token("carol", "auditor"));
    let head_before = auditor.audit_events("").await.len();

    let now = now_secs();
    let good = json!({"sub": "bot", "role": "agent", "exp": now + 3600});
    let with = |extra: Value| {
        let mut c = good.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let without_exp = json!({"sub": "bot", "role": "agent"});
    let bad_tokens: Vec<(&str, String)> = vec![
        ("not a jwt", "not-a-jwt".into()),
        ("three garbage parts", "a.b.c".into()),
        ("wrong key", sign_with(&good, b"some-other-secret-entirely")),
        ("alg none", alg_none(&good)),
        (
            "alg none without the dot",
            alg_none(&good).trim_end_matches('.').into(),
        ),
        ("expired", sign(&with(json!({"exp": now - 5})))),
        ("expired a moment ago", sign(&with(json!({"exp": now - 1})))),
        ("not yet valid", sign(&with(json!({"nbf": now + 120})))),
        ("no exp", sign(&without_exp)),
        ("exp as a string", sign(&with(json!({"exp": "tomorrow"})))),
        ("no sub", sign(&json!({"role": "agent", "exp": now + 3600}))),
        ("bad sub", sign(&with(json!({"sub": "a b/c"})))),
        ("unknown role", sign(&with(json!({"role": "admin"})))),
        ("system role", sign(&with(json!({"role": "system"})))),
        ("tampered payload", {
            // Alice's valid signature over a payload that claims to be an agent.
            let real = token("alice", "user");
            let forged = sign(&good);
            let mut p: Vec<&str> = real.split('.').collect();
            p[1] = forged.split('.').nth(1).unwrap();
            p.join(".")
        }),
    ];
    for (what, t) in &bad_tokens {
        all_rejected(&server.api(t), what, &thread, &run).await;
    }

    // No header, and headers that are not `Bearer <token>`.
    all_rejected(&server.anonymous(), "no header", &thread, &run).await;
    let valid = token("bot", "agent");
    for header in [
        format!("Basic {valid}"),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        valid.clone(),
        format!("Bearer {valid} extra"),
    ] {
        let r = Api::send_built(
            server
                .anonymous()
                .builder(reqwest::Method::GET, "/v1/threads")
                .header("authorization", header.clone()),
        )
        .await;
        assert_unauthorized(&r, &header);
    }

    // Nothing any rejected call tried was appended.
    assert_eq!(auditor.audit_events("").await.len(), head_before);
    // And the same calls with the valid agent token work.
    let r = server
        .api(&valid)
        .event(&run, "agent_thinking", json!({}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test]
async fn a_token_stops_working_the_moment_it_expires() {
    let server = TestServer::spawn();
    let exp = now_secs() + 2;
    let short = sign(&json!({"sub": "alice", "exp": exp}));
    let api = server.api(&short);
    let r = api.get("/v1/threads").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = threadline_tests::eventually("the token to expire", || {
        let api = api.clone();
        async move {
            let r = api.get("/v1/threads").await;
            (r.status != 200).then_some(r)
        }
    })
    .await;
    assert_unauthorized(&r, "expired while in use");
    // Not before exp, and (leeway 0 by default) within the second after it.
    let at = now_secs();
    assert!((exp..=exp + 2).contains(&at), "rejected at {at}, exp {exp}");
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let server = TestServer::spawn_with(Options {
        args: [
            "--jwt-issuer",
            "https://id.example",
            "--jwt-audience",
            "threadline",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    });
    let exp = now_secs() + 3600;
    let ok = sign(
        &json!({"sub": "alice", "exp": exp, "iss": "https://id.example", "aud": "threadline"}),
    );
    let r = server.api(&ok).get("/v1/threads").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let in_list = sign(
        &json!({"sub": "alice", "exp": exp, "iss": "https://id.example", "aud": ["x", "threadline"]}),
    );
    assert_eq!(server.api(&in_list).get("/v1/threads").await.status, 200);

    for (what, claims) in [
        (
            "wrong issuer",
            json!({"sub": "alice", "exp": exp, "iss": "https://evil.example", "aud": "threadline"}),
        ),
        (
            "wrong audience",
            json!({"sub": "alice", "exp": exp, "iss": "https://id.example", "aud": "other"}),
        ),
        (
            "no issuer",
            json!({"sub": "alice", "exp": exp, "aud": "threadline"}),
        ),
        (
            "no audience",
            json!({"sub": "alice", "exp": exp, "iss": "https://id.example"}),
        ),
        ("neither", json!({"sub": "alice", "exp": exp})),
    ] {
        let api = server.api(&sign(&claims));
        assert_unauthorized(&api.get("/v1/threads").await, what);
        assert_unauthorized(&api.post("/v1/threads", &json!({})).await, what);
    }
}

#[tokio::test]
async fn roles_decide_who_may_write_and_who_may_audit() {
    let server = TestServer::spawn();
    let alice = server.api(&token("alice", "user"));
    let bob = server.api(&token("bob", "user"));
    let agent = server.api(&token("bot", "agent"));
    let auditor = server.api(&token("carol", "auditor"));

    let thread = alice.create_thread(json!({"title": "a"})).await;
    // A user registers runs on its own thread; an agent creates threads for users.
    let own_run = alice.register_run(&thread).await;
    let bobs_thread = agent
        .create_thread(json!({"user_id": "bob", "title": "b"}))
        .await;
    let run = agent.register_run(&bobs_thread).await;
    let r = agent.event(&run, "agent_started", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.body);

    // Users cannot append agent events, even on their own run.
    for kind in ["agent_started", "agent_thinking", "agent_completed"] {
        alice
            .event(&own_run, kind, json!({}))
            .await
            .assert_error(403, "forbidden");
    }
    bob.event(&run, "agent_thinking", json!({}))
        .await
        .assert_error(403, "forbidden");
    bob.post(
        "/v1/events",
        &json!({"events": [{"run_id": run, "type": "agent_thinking", "data": {}}]}),
    )
    .await
    .assert_error(403, "forbidden");

    // Auditors write nothing.
    auditor
        .post("/v1/threads", &json!({}))
        .await
        .assert_error(403, "forbidden");
    auditor
        .post("/v1/threads", &json!({"user_id": "alice"}))
        .await
        .assert_error(403, "forbidden");
    auditor
        .post(
            &format!("/v1/threads/{thread}/runs"),
            &json!({"agent_name": "x"}),
        )
        .await
        .assert_error(403, "forbidden");
    auditor
        .event(&run, "agent_thinking", json!({}))
        .await
        .assert_error(403, "forbidden");
    auditor
        .post(
            "/v1/events",
            &json!({"events": [{"run_id": run, "type": "agent_thinking", "data": {}}]}),
        )
        .await
        .assert_error(403, "forbidden");

    // Only auditors read the audit log.
    for (who, api) in [("user", &alice), ("agent", &agent)] {
        let r = api.get("/v1/audit/events").await;
        assert_eq!(r.status, 403, "{who}: {}", r.body);
        r.assert_error(403, "forbidden");
    }

    // The auditor sees everything: both users' events, with owner and actor.
    let all = auditor.audit_events("").await;
    let kinds: Vec<&str> = all.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "thread_created",
            "run_registered",
            "thread_created",
            "run_registered",
            "agent_started"
        ]
    );
    let positions: Vec<u64> = all
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [1, 2, 3, 4, 5], "dense global positions");
    let owners: Vec<&str> = all.iter().map(|e| e["user_id"].as_str().unwrap()).collect();
    assert_eq!(owners, ["alice", "alice", "bob", "bob", "bob"]);
    let actors: Vec<(String, String)> = all
        .iter()
        .map(|e| {
            (
                e["actor"]["sub"].as_str().unwrap().to_owned(),
                e["actor"]["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(actors[0], ("alice".into(), "user".into()));
    assert_eq!(actors[1], ("alice".into(), "user".into()));
    assert_eq!(actors[2], ("bot".into(), "agent".into()));
    assert_eq!(actors[4], ("bot".into(), "agent".into()));
    let only_bob = auditor.audit_events("user_id=bob").await;
    assert_eq!(only_bob.len(), 3);
    // And reads any thread directly.
    for t in [&thread, &bobs_thread] {
        assert_eq!(auditor.get(&format!("/v1/threads/{t}")).await.status, 200);
        assert_eq!(
            auditor.thread_events(t).await.len(),
            2 + usize::from(t == &bobs_thread)
        );
    }
    // None of the refused calls left a trace.
    assert_eq!(auditor.audit_events("").await.len(), 5);
}
