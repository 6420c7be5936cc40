//! Fuzzing the server's parser of client socket messages (stable Rust, proptest via
//! `threadline-fuzz`): arbitrary text and message-shaped JSON sent over a real socket to
//! a real in-process server. Every message is answered or ignored, never a panic, never
//! the `internal` close (1011); the socket stays usable (a `ping` after each batch is
//! answered with `pong`). `THREADLINE_FUZZ_SECS=<n>` runs it for `n` seconds.

use futures_util::SinkExt;
use proptest::prelude::*;
use serde_json::{json, Value};
use threadline_tests::{token, Next, Socket, TestServer};
use tokio_tungstenite::tungstenite::Message;

const TYPES: &[&str] = &[
    "ack", "ping", "refresh", "cancel", "input", "pong", "event", "",
];
const FIELDS: &[&str] = &[
    "user_seq", "token", "run_id", "reason", "input_id", "answer", "type",
];

fn json_value() -> impl Strategy<Value = Value> {
    threadline_fuzz::json_value(&[])
}

/// One client message: arbitrary text, binary, or a message-shaped object.
#[derive(Debug, Clone)]
enum Sent {
    Text(String),
    Binary(Vec<u8>),
    Shaped(Value),
}

fn sent() -> impl Strategy<Value = Sent> {
    let field = (
        proptest::sample::select(FIELDS),
        prop_oneof![
            2 => any::<u64>().prop_map(Value::from),
            1 => (0u64..5).prop_map(Value::from),
            1 => Just(Value::from("not.a.jwt")),
            2 => json_value(),
        ],
    );
    let shaped = (
        proptest::sample::select(TYPES),
        proptest::collection::vec(field, 0..6),
    )
        .prop_map(|(kind, fields)| {
            let mut m = json!({ "type": kind });
            for (k, v) in fields {
                m[k] = v;
            }
            m
        });
    prop_oneof![
        2 => any::<String>().prop_map(Sent::Text),
        2 => "[{}\\[\\]\":,0-9a-z_ ]{0,60}".prop_map(Sent::Text),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Sent::Binary),
        5 => shaped.prop_map(Sent::Shaped),
    ]
}

async fn live(server: &TestServer) -> Socket {
    let mut s = server
        .socket(&token("alice", "user"), "after=latest")
        .await
        .expect("upgrade");
    s.welcome().await.expect("welcome");
    s.until("caught_up").await.expect("caught_up");
    s
}

/// Sends `batch`, then a ping; reads until the pong. `Err` when the socket closed, with
/// its code and reason.
async fn exchange(s: &mut Socket, batch: &[Sent]) -> Result<(), (u16, String)> {
    for m in batch {
        let msg = match m {
            Sent::Text(t) => Message::Text(t.clone().into()),
            Sent::Binary(b) => Message::Binary(b.clone().into()),
            Sent::Shaped(v) => Message::Text(v.to_string().into()),
        };
        if s.ws.send(msg).await.is_err() {
            break;
        }
    }
    let _ = s.ws.send(Message::Text(r#"{"type":"ping"}"#.into())).await;
    loop {
        match s.next().await {
            Ok(Next::Frame(f)) if f["type"] == "pong" => return Ok(()),
            Ok(Next::Frame(f)) => {
                let kind = f["type"].as_str().unwrap_or("");
                assert!(
                    ["error", "recorded", "event", "caught_up", "refreshed"].contains(&kind),
                    "unexpected frame {f}"
                );
                if kind == "error" {
                    assert_ne!(f["code"], "internal", "{f}");
                }
            }
            Ok(Next::Closed(code, reason)) => return Err((code, reason)),
            Err(e) => return Err((0, e.to_string())),
        }
    }
}

#[test]
fn client_socket_messages_are_answered_never_a_crash() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let edge = threadline_api::config::LimitArgs {
        rate_limit: 1_000_000,
        rate_burst: 1_000_000,
        ..Default::default()
    };
    let server = rt.block_on(async { TestServer::spawn_with_limits(edge) });
    // A thread and a run of alice's, so a cancel or an input can name something real.
    let run_id = rt.block_on(async {
        let api = server.api(&token("alice", "user"));
        let thread = api.create_thread(json!({"title": "fuzz"})).await;
        server
            .api(&token("agent-1", "agent"))
            .register_run(&thread)
            .await
    });
    let socket = std::sync::Mutex::new(Some(rt.block_on(live(&server))));
    let batches = proptest::collection::vec(sent(), 1..6);
    threadline_fuzz::run_with(
        "socket_client_messages",
        proptest::test_runner::Config {
            cases: 256,
            ..Default::default()
        },
        batches,
        |mut batch| {
            // Some messages name the real run.
            for m in &mut batch {
                if let Sent::Shaped(v) = m {
                    if v.get("run_id").is_some_and(|r| r == 0) {
                        v["run_id"] = json!(run_id);
                    }
                }
            }
            let mut guard = socket.lock().unwrap();
            let mut s = match guard.take() {
                Some(s) => s,
                None => rt.block_on(live(&server)),
            };
            match rt.block_on(exchange(&mut s, &batch)) {
                Ok(()) => *guard = Some(s),
                // Only a token for another user closes the socket (1008); nothing
                // here sends one. Anything else is a finding.
                Err((code, reason)) => {
                    return Err(TestCaseError::fail(format!(
                        "the socket closed: {code} {reason}"
                    )));
                }
            }
            Ok(())
        },
    );
    // The server is still up and answers.
    rt.block_on(async {
        let mut s = live(&server).await;
        exchange(&mut s, &[]).await.expect("pong");
    });
}
