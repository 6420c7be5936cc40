//! Finding 2: client WebSocket messages are capped at 64 KiB and an unfinished
//! one is not held past its deadline.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::json;
use threadline_tests::{Next, Options, TestServer};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use super::live_socket;

// Finding 2: client messages are capped and an unfinished one is not held.
#[tokio::test]
async fn f2_oversized_or_unfinished_client_messages_close_the_socket() {
    let server = TestServer::spawn_with(Options::env(&[("THREADLINE_WS_MESSAGE_TIMEOUT", "1s")]));

    // Exactly 64 KiB is a message like any other.
    let mut s = live_socket(&server, "alice").await;
    let mut ping = json!({"type": "ping", "pad": ""}).to_string();
    let pad = 64 * 1024 - ping.len();
    ping = json!({"type": "ping", "pad": "x".repeat(pad)}).to_string();
    assert_eq!(ping.len(), 64 * 1024);
    s.ws.send(Message::Text(ping.into())).await.unwrap();
    assert_eq!(s.frame().await.unwrap(), json!({"type": "pong"}));

    // One byte more closes with 1009, after an error frame.
    let big = "x".repeat(64 * 1024 + 1);
    let _ = s.ws.send(Message::Text(big.into())).await;
    let (code, error) = s.closed().await.expect("close");
    assert_eq!(code, 1009, "{error:?}");
    assert_eq!(error.expect("error frame")["code"], "message_too_big");

    // So does a message of small frames that adds up to more.
    let mut s = live_socket(&server, "alice").await;
    for k in 0..3 {
        let frame = Frame::message(vec![b'x'; 30 * 1024], first_or_continue(k), false);
        if s.ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    assert_eq!(s.closed().await.expect("close").0, 1009);

    // A message left unfinished is dropped after the message deadline.
    let mut s = live_socket(&server, "alice").await;
    let started = Instant::now();
    let frame = Frame::message(vec![b'x'; 1024], OpCode::Data(Data::Text), false);
    s.ws.send(Message::Frame(frame)).await.unwrap();
    match s.next().await.expect("the server ends the socket") {
        Next::Closed(code, _) => assert!(code == 1008 || code == 1006, "closed with {code}"),
        Next::Frame(f) => {
            assert_eq!(f["code"], "message_timeout", "{f}");
            assert_eq!(s.closed().await.expect("close").0, 1008);
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // The server is fine.
    live_socket(&server, "alice").await;
}

fn first_or_continue(k: usize) -> OpCode {
    if k == 0 {
        OpCode::Data(Data::Text)
    } else {
        OpCode::Data(Data::Continue)
    }
}
