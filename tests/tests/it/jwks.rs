//! Issue 17, JWKS and SIGHUP: the real binary verifying tokens against a local identity
//! provider's key set (RSA, Ed25519 and P-256 keys): rotation, an unknown `kid`, the
//! provider down, a key removed under an open socket, algorithm confusion, a failed
//! start, and SIGHUP reloading the keys without dropping sockets.

use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use threadline_tests::jwks::{Provider, TestKey, EC, ED, RSA_A, RSA_B};
use threadline_tests::{eventually, now_secs, sign_with, Options, Socket, TestServer};

/// The real binary verifying with `provider`'s key set, plus `extra` options.
fn jwks_server(provider: &Provider, extra: &[&str]) -> TestServer {
    let mut keys = vec!["--jwks-url".to_owned(), provider.url()];
    keys.extend(extra.iter().map(|s| (*s).to_owned()));
    TestServer::spawn_with(Options {
        keys: Some(keys),
        ..Options::default()
    })
}

/// The status of an authenticated read with `token`.
async fn status(server: &TestServer, token: &str) -> u16 {
    server.api(token).get("/v1/threads").await.status
}

/// The value of one series of `/metrics`, e.g. `threadline_jwks_keys` or
/// `threadline_jwks_fetches_total{trigger="start"}`.
async fn metric(server: &TestServer, series: &str) -> Option<f64> {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn logged(server: &TestServer, needle: &str) -> bool {
    server
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(needle))
}

/// Waits for a log line containing `needle` (the server writes it after what a test saw).
async fn wait_logged(server: &TestServer, needle: &str) {
    eventually(&format!("a log line with {needle:?}"), || async {
        logged(server, needle).then_some(())
    })
    .await;
}

async fn open_socket(server: &TestServer, token: &str) -> Socket {
    let mut s = server.socket(token, "after=0").await.expect("socket");
    s.welcome().await.expect("welcome");
    s.until("caught_up").await.expect("caught_up");
    s
}

/// The socket is open and answering.
async fn answers(s: &mut Socket) {
    s.send(json!({"type": "ping"})).await.expect("ping");
    assert_eq!(s.frame().await.expect("pong"), json!({"type": "pong"}));
}

async fn closed_with_4001(s: &mut Socket, what: &str) {
    let (code, error) = s.closed().await.expect("close");
    assert_eq!(code, 4001, "{what}");
    let error = error.expect("an error frame before the close");
    assert_eq!(error["code"], "token_expired", "{what}: {error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or("")
            .contains("no longer trusted"),
        "{what}: {error}"
    );
}

fn hangup(server: &TestServer) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_a_new_kid_verifies_at_once_and_a_removed_one_stops_within_the_interval() {
    let provider = Provider::start(vec![RSA_A.jwk()]).await;
    let server = jwks_server(
        &provider,
        &[
            "--jwks-refresh-interval",
            "1s",
            "--jwks-min-refresh-interval",
            "1h",
        ],
    );
    let old = RSA_A.token("alice", "user");
    assert_eq!(status(&server, &old).await, 200);
    assert_eq!(metric(&server, "threadline_jwks_keys").await, Some(1.0));

    // The provider starts signing with a new key and publishes it beside the old one:
    // its first token is accepted at once (an unknown kid fetches the set), not after
    // the next scheduled refresh.
    provider.publish(vec![RSA_A.jwk(), ED.jwk()]);
    let new = ED.token("alice", "user");
    assert_eq!(status(&server, &new).await, 200);
    assert_eq!(status(&server, &old).await, 200);

    // Then it retires the old key: within the refresh interval (1 s, plus a fetch),
    // tokens of the old key are refused and the new key's still pass.
    provider.publish(vec![ED.jwk()]);
    let removed = Instant::now();
    eventually("the removed key to stop verifying", || async {
        (status(&server, &old).await == 401).then_some(())
    })
    .await;
    let took = removed.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(status(&server, &new).await, 200);
    assert_eq!(metric(&server, "threadline_jwks_keys").await, Some(1.0));
    wait_logged(&server, "key set in force").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_fetches_the_set_once_then_is_rate_limited() {
    let provider = Provider::start(vec![EC.jwk()]).await;
    let server = jwks_server(
        &provider,
        &[
            "--jwks-refresh-interval",
            "1h",
            "--jwks-min-refresh-interval",
            "1h",
        ],
    );
    assert_eq!(provider.fetches(), 1, "the start fetches the set once");
    assert_eq!(status(&server, &EC.token("alice", "user")).await, 200);
    assert_eq!(provider.fetches(), 1, "a known kid fetches nothing");

    // A kid the set lacks: one fetch, then still refused.
    let stranger = RSA_B.token("alice", "user");
    let r = server.api(&stranger).get("/v1/threads").await;
    r.assert_error(401, "unauthorized");
    assert_eq!(provider.fetches(), 2);
    // More unknown kids within --jwks-min-refresh-interval fetch nothing more, even once
    // the provider has the key: a flood of made-up kids cannot hammer the provider.
    provider.publish(vec![EC.jwk(), RSA_B.jwk()]);
    for token in [&stranger, &ED.token("bob", "user"), &stranger] {
        assert_eq!(status(&server, token).await, 401);
    }
    let mut made_up = Header::new(Algorithm::RS256);
    made_up.kid = Some("no-such-kid".into());
    let forged = jsonwebtoken::encode(
        &made_up,
        &json!({"sub": "alice", "exp": now_secs() + 60}),
        &EncodingKey::from_rsa_pem(RSA_A.private_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(status(&server, &forged).await, 401);
    assert_eq!(provider.fetches(), 2);
    assert_eq!(
        metric(
            &server,
            "threadline_jwks_fetches_total{trigger=\"unknown_kid\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(&server, "threadline_jwks_fetches_total{trigger=\"start\"}").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_provider_down_the_cached_keys_keep_working_and_the_metrics_say_so() {
    let provider = Provider::start(vec![RSA_A.jwk(), EC.jwk()]).await;
    let server = jwks_server(
        &provider,
        &[
            "--jwks-refresh-interval",
            "300ms",
            "--jwks-min-refresh-interval",
            "1h",
        ],
    );
    let (rsa, ec) = (RSA_A.token("alice", "user"), EC.token("bob", "user"));
    assert_eq!(status(&server, &rsa).await, 200);
    let mut socket = open_socket(&server, &ec).await;
    assert_eq!(
        metric(&server, "threadline_jwks_refresh_failures_total").await,
        Some(0.0)
    );

    // Unreachable: connections refused.
    provider.go_down();
    eventually("two failed refreshes", || async {
        (metric(&server, "threadline_jwks_refresh_failures_total").await? >= 2.0).then_some(())
    })
    .await;
    let last_success = metric(&server, "threadline_jwks_last_success_timestamp_seconds")
        .await
        .expect("last success");
    assert!(last_success > 0.0);
    assert_eq!(status(&server, &rsa).await, 200);
    assert_eq!(status(&server, &ec).await, 200);
    answers(&mut socket).await;
    // An unknown kid meanwhile is refused at once: its fetch fails, and it is not a 500.
    assert_eq!(status(&server, &ED.token("carol", "user")).await, 401);
    assert_eq!(metric(&server, "threadline_jwks_keys").await, Some(2.0));
    wait_logged(
        &server,
        "fetching the key set failed; the cached keys stay in force",
    )
    .await;

    // Reachable but broken (503 with an HTML page), then a set with no usable key:
    // both are failures too, and the cached keys stay.
    provider.come_back().await;
    provider.fail();
    let failures = metric(&server, "threadline_jwks_refresh_failures_total")
        .await
        .unwrap();
    eventually("a failed refresh on a 503", || async {
        (metric(&server, "threadline_jwks_refresh_failures_total").await? > failures).then_some(())
    })
    .await;
    provider.publish_raw(json!({"keys": [{"kid": "hs", "kty": "oct", "k": "c2VjcmV0"}]}));
    let failures = metric(&server, "threadline_jwks_refresh_failures_total")
        .await
        .unwrap();
    eventually("a failed refresh on a set without usable keys", || async {
        (metric(&server, "threadline_jwks_refresh_failures_total").await? > failures).then_some(())
    })
    .await;
    assert_eq!(status(&server, &rsa).await, 200);
    wait_logged(&server, "the provider answered 503").await;
    wait_logged(&server, "no usable key in the set").await;
    assert_eq!(
        metric(&server, "threadline_jwks_last_success_timestamp_seconds").await,
        Some(last_success)
    );

    // Back for real: the next refresh succeeds, and its set is the one in force.
    provider.publish(vec![EC.jwk()]);
    eventually("a successful refresh", || async {
        (metric(&server, "threadline_jwks_last_success_timestamp_seconds").await? > last_success)
            .then_some(())
    })
    .await;
    eventually("the dropped RSA key to stop verifying", || async {
        (status(&server, &rsa).await == 401).then_some(())
    })
    .await;
    answers(&mut socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_whose_key_is_removed_is_closed_with_4001_and_the_others_stay() {
    let provider = Provider::start(vec![RSA_A.jwk(), ED.jwk()]).await;
    let server = jwks_server(
        &provider,
        &[
            "--jwks-refresh-interval",
            "500ms",
            "--jwks-min-refresh-interval",
            "1h",
        ],
    );
    let mut on_rsa = open_socket(&server, &RSA_A.token("alice", "user")).await;
    let mut on_ed = open_socket(&server, &ED.token("bob", "user")).await;
    // This one moves onto the Ed25519 key with a `refresh` before the RSA key goes.
    let mut moved = open_socket(&server, &RSA_A.token("carol", "user")).await;
    moved
        .send(json!({"type": "refresh", "token": ED.token("carol", "user")}))
        .await
        .unwrap();
    assert_eq!(moved.frame().await.unwrap()["type"], "refreshed");

    provider.publish(vec![ED.jwk()]);
    let removed = Instant::now();
    closed_with_4001(&mut on_rsa, "the socket on the removed key").await;
    let took = removed.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "closed {took:?} after the key left the set"
    );
    answers(&mut on_ed).await;
    answers(&mut moved).await;
    // Its token is refused everywhere now.
    assert_eq!(status(&server, &RSA_A.token("alice", "user")).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn algorithm_confusion_and_unusable_keys_are_refused() {
    // Keycloak-like: signing keys beside an encryption key; plus an HMAC key that must
    // never be taken from a key set.
    let hmac_secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA";
    let provider = Provider::start(vec![
        RSA_A.jwk(),
        ED.jwk(),
        EC.jwk(),
        json!({"kid": "enc-1", "kty": "RSA", "alg": "RSA-OAEP", "use": "enc",
               "n": RSA_B.jwk()["n"], "e": "AQAB"}),
        json!({"kid": "hs", "kty": "oct", "alg": "HS256", "k": hmac_secret}),
    ])
    .await;
    let server = jwks_server(&provider, &["--jwks-min-refresh-interval", "1h"]);
    assert_eq!(metric(&server, "threadline_jwks_keys").await, Some(3.0));
    wait_logged(&server, "ignoring a key of the set: kid \"enc-1\"").await;
    wait_logged(&server, "ignoring a key of the set: kid \"hs\"").await;
    for key in [RSA_A, ED, EC] {
        assert_eq!(
            status(&server, &key.token("alice", "user")).await,
            200,
            "{}",
            key.kid
        );
    }
    let claims = json!({"sub": "mallory", "role": "auditor", "exp": now_secs() + 60});
    let hs256 = |secret: &[u8], kid: &str| {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(secret)).unwrap()
    };
    let rsa_jwk = RSA_A.jwk().to_string();
    let refused: Vec<(&str, String)> = vec![
        // The classic: HS256 keyed with the RSA public key, naming the RSA key.
        (
            "HS256 with the RSA public key PEM",
            hs256(RSA_A.public_pem.as_bytes(), "rsa-a"),
        ),
        ("HS256 with the RSA JWK", hs256(rsa_jwk.as_bytes(), "rsa-a")),
        (
            "HS256 with the published oct key",
            hs256(b"secret-secret-secret-secret-secret", "hs"),
        ),
        // Genuine signatures by the right private key, under another algorithm.
        (
            "RS384 by the RS256 key",
            RSA_A.sign_as(Algorithm::RS384, Some("rsa-a"), &claims),
        ),
        (
            "PS256 by the RS256 key",
            RSA_A.sign_as(Algorithm::PS256, Some("rsa-a"), &claims),
        ),
        // A key's token presented under another key's kid.
        (
            "ES256 naming the Ed25519 key",
            EC.sign_as(Algorithm::ES256, Some("ed-1"), &claims),
        ),
        (
            "EdDSA naming the P-256 key",
            ED.sign_as(Algorithm::EdDSA, Some("ec-1"), &claims),
        ),
        (
            "RS256 naming the encryption key",
            RSA_B.sign_as(Algorithm::RS256, Some("enc-1"), &claims),
        ),
        ("no kid", RSA_A.sign_as(Algorithm::RS256, None, &claims)),
        ("alg none", {
            let payload = RSA_A.sign(&claims).split('.').nth(1).unwrap().to_owned();
            // {"alg":"none","kid":"rsa-a"}
            format!("eyJhbGciOiJub25lIiwia2lkIjoicnNhLWEifQ.{payload}.")
        }),
    ];
    for (what, token) in &refused {
        let r = server.api(token).get("/v1/audit/events").await;
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        r.assert_error(401, "unauthorized");
    }
    // Sockets refuse them the same way.
    let s = server.socket(&refused[0].1, "after=0").await;
    match s {
        Ok(mut s) => {
            let (code, _) = s.closed().await.unwrap();
            assert_eq!(code, 1008);
        }
        Err(e) => assert!(e.to_string().contains("401"), "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_against_key_set_tokens() {
    // Auth0-like: RS256 keys, an issuer URL with a trailing slash, an API audience.
    let provider = Provider::start(vec![RSA_A.jwk_without_alg(), EC.jwk()]).await;
    let iss = "https://tenant.example.test/";
    let server = jwks_server(
        &provider,
        &[
            "--jwt-issuer",
            iss,
            "--jwt-audience",
            "https://threadline.example.test/api",
        ],
    );
    let base = json!({"sub": "alice", "exp": now_secs() + 60});
    let with = |extra: Value| {
        let mut c = base.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    // `aud` as a list, as Auth0 sends it.
    let good = with(json!({"sub": "alice", "iss": iss,
        "aud": ["https://threadline.example.test/api", "https://tenant.example.test/userinfo"]}));
    assert_eq!(status(&server, &RSA_A.sign(&good)).await, 200);
    assert_eq!(status(&server, &EC.sign(&good)).await, 200);
    for bad in [
        with(
            json!({"sub": "alice", "iss": "https://evil.example.test/", "aud": "https://threadline.example.test/api"}),
        ),
        with(json!({"sub": "alice", "iss": iss, "aud": "https://other.example.test/"})),
        with(json!({"sub": "alice", "aud": "https://threadline.example.test/api"})),
        with(json!({"sub": "alice", "iss": iss})),
    ] {
        assert_eq!(status(&server, &RSA_A.sign(&bad)).await, 401, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_without_a_usable_key_set_fails_with_the_reason() {
    let provider = Provider::start(vec![]).await;
    let data = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let options = Options {
        keys: Some(vec!["--jwks-url".into(), provider.url()]),
        ..Options::default()
    };
    // Reachable, but no key.
    let err = TestServer::start(data.clone(), options.clone()).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("cannot start: the key set at --jwks-url"),
        "{text}"
    );
    assert!(text.contains("no usable key"), "{text}");
    // Unreachable.
    provider.go_down();
    let err = TestServer::start(data.clone(), options).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("cannot start: the key set at --jwks-url"),
        "{text}"
    );
    // Plain http to anything but loopback is refused before any fetch.
    let err = TestServer::start(
        data,
        Options {
            keys: Some(vec![
                "--jwks-url".into(),
                "http://idp.example.test/jwks".into(),
            ]),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("https"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_fetches_the_key_set_again_without_dropping_sockets() {
    let provider = Provider::start(vec![RSA_A.jwk(), EC.jwk()]).await;
    let server = jwks_server(
        &provider,
        &[
            "--jwks-refresh-interval",
            "1h",
            "--jwks-min-refresh-interval",
            "1h",
        ],
    );
    let mut on_rsa = open_socket(&server, &RSA_A.token("alice", "user")).await;
    let mut on_ec = open_socket(&server, &EC.token("bob", "user")).await;
    provider.publish(vec![EC.jwk(), ED.jwk()]);
    hangup(&server);
    eventually("the reload", || async {
        (metric(&server, "threadline_key_reloads_total{result=\"ok\"}").await? >= 1.0).then_some(())
    })
    .await;
    assert_eq!(provider.fetches(), 2, "the start and the reload");
    // Only the reload could have dropped the RSA key (the schedule is an hour away).
    closed_with_4001(&mut on_rsa, "the socket on the key the reload dropped").await;
    answers(&mut on_ec).await;
    assert_eq!(status(&server, &ED.token("carol", "user")).await, 200);
    assert_eq!(provider.fetches(), 2, "the new key came with the reload");
    assert_eq!(status(&server, &RSA_A.token("alice", "user")).await, 401);
    wait_logged(&server, "SIGHUP: key configuration reloaded").await;

    // A reload while the provider is down keeps the keys and the sockets.
    provider.go_down();
    hangup(&server);
    eventually("the failed reload", || async {
        (metric(&server, "threadline_key_reloads_total{result=\"error\"}").await? >= 1.0)
            .then_some(())
    })
    .await;
    answers(&mut on_ec).await;
    assert_eq!(status(&server, &EC.token("bob", "user")).await, 200);
    wait_logged(&server, "reloading the key configuration failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_a_static_secret_file_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwt.key");
    let first = "first-secret-0123456789abcdef-0123456789";
    let second = "second-secret-0123456789abcdef-012345678";
    std::fs::write(&file, format!("{first}\n")).unwrap();
    let server = TestServer::spawn_with(Options {
        keys: Some(vec!["--jwt-secret-file".into(), file.display().to_string()]),
        ..Options::default()
    });
    let token = |secret: &str, sub: &str| {
        sign_with(
            &json!({"sub": sub, "role": "user", "exp": now_secs() + 3600}),
            secret.as_bytes(),
        )
    };
    let reloads = |result: &'static str| {
        let server = &server;
        async move {
            metric(
                server,
                &format!("threadline_key_reloads_total{{result=\"{result}\"}}"),
            )
            .await
            .unwrap_or(0.0)
        }
    };
    let mut on_first = open_socket(&server, &token(first, "alice")).await;

    // The same secret again: nothing changes, the socket stays.
    hangup(&server);
    eventually("the first reload", || async {
        (reloads("ok").await >= 1.0).then_some(())
    })
    .await;
    answers(&mut on_first).await;

    // A new secret: its tokens pass, the old one's are refused, and the socket opened
    // with the old one is closed with 4001.
    std::fs::write(&file, format!("{second}\n")).unwrap();
    hangup(&server);
    closed_with_4001(&mut on_first, "the socket on the replaced secret").await;
    assert_eq!(status(&server, &token(second, "alice")).await, 200);
    assert_eq!(status(&server, &token(first, "alice")).await, 401);
    eventually("the second reload counted", || async {
        (reloads("ok").await >= 2.0).then_some(())
    })
    .await;

    // A broken file: the reload fails, the secret in force stays, so do its sockets.
    let mut on_second = open_socket(&server, &token(second, "bob")).await;
    std::fs::write(&file, "short\n").unwrap();
    hangup(&server);
    eventually("the failed reload", || async {
        (reloads("error").await >= 1.0).then_some(())
    })
    .await;
    wait_logged(&server, "at least 32 bytes").await;
    answers(&mut on_second).await;
    assert_eq!(status(&server, &token(second, "bob")).await, 200);
}

/// Unused-key guard: every fixture key verifies its own tokens (catches a broken fixture
/// before it shows up as a confusing failure above).
#[test]
fn fixture_keys_sign_and_verify() {
    for key in [RSA_A, RSA_B, ED, EC] {
        let TestKey { kid, .. } = key;
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.jwk()).unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let token = key.token("alice", "user");
        let mut v = jsonwebtoken::Validation::new(key.alg);
        v.validate_aud = false;
        jsonwebtoken::decode::<Value>(&token, &decoding, &v)
            .unwrap_or_else(|e| panic!("{kid}: {e}"));
    }
}
