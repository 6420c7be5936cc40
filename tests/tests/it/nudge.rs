//! The nudge webhook (issue 19), end to end: the real binary with a short
//! `--nudge-after`, real sockets, and a real HTTP receiver on loopback written
//! here. Retried until delivered, never sent when a device acknowledged in time,
//! recorded failed after the last attempt, and sent once across restarts; each
//! outcome in the auditor's history with the system as its actor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use threadline_tests::{now_secs, started_run, token, Options, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The receiver's signing secret (Standard Webhooks form: 32 bytes of key).
const SECRET: &str = "whsec_dGhyZWFkbGluZS1ub2RnZS10ZXN0LWtleS0wMTIzNDU2Nzg=";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hook {
    head: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    json: Value,
}

/// A webhook receiver on 127.0.0.1:0: answers each request with the next status of
/// its script (the last one once the script runs out) and hands the request over.
struct Receiver {
    url: String,
    got: mpsc::UnboundedReceiver<Hook>,
    _task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(script: &[u16]) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/threadline", listener.local_addr().unwrap());
        let (tx, got) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(script.to_vec()));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (tx, script) = (tx.clone(), script.clone());
                tokio::spawn(async move {
                    let Some(hook) = read_request(&mut conn).await else {
                        return;
                    };
                    let status = {
                        let mut s = script.lock().unwrap();
                        if s.len() > 1 {
                            s.remove(0)
                        } else {
                            s[0]
                        }
                    };
                    // Handed over before the answer, so the test sees every request
                    // the server could have counted as an attempt.
                    let _ = tx.send(hook);
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Receiver {
            url,
            got,
            _task: task,
        }
    }

    /// The next request, within the deadline.
    async fn next(&mut self) -> Hook {
        tokio::time::timeout(DEADLINE, self.got.recv())
            .await
            .expect("no webhook before the deadline")
            .expect("receiver gone")
    }

    /// Requests that arrived and were not taken yet (never waits).
    fn drain(&mut self) -> Vec<Hook> {
        let mut out = Vec::new();
        while let Ok(h) = self.got.try_recv() {
            out.push(h);
        }
        out
    }
}

async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<Hook> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8(buf[..end].to_vec()).ok()?;
    let mut lines = head.lines();
    let request_line = lines.next()?.to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = buf[end + 4..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Some(Hook {
        head: request_line,
        headers,
        body,
        json,
    })
}

impl Hook {
    fn id(&self) -> &str {
        &self.headers["webhook-id"]
    }

    /// Verifies the request as a Standard Webhooks receiver does: the HMAC-SHA256 of
    /// `{webhook-id}.{webhook-timestamp}.{body}` with the secret's key, and a
    /// timestamp within five minutes of now (older ones are replays).
    fn verify(&self) {
        assert!(
            self.head.starts_with("POST /hooks/threadline "),
            "{}",
            self.head
        );
        assert_eq!(self.headers["content-type"], "application/json");
        let timestamp: u64 = self.headers["webhook-timestamp"].parse().unwrap();
        assert!(
            now_secs().abs_diff(timestamp) <= 300,
            "timestamp {timestamp}"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(SECRET.strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{}.{timestamp}.", self.id()).as_bytes());
        mac.update(&self.body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        let offered: Vec<&str> = self.headers["webhook-signature"].split(' ').collect();
        assert!(
            offered.contains(&expected.as_str()),
            "signature {offered:?} does not verify (expected {expected})"
        );
        // A body changed in transit no longer verifies.
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{}.{timestamp}.", self.id()).as_bytes());
        mac.update(&self.body[1..]);
        let tampered = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert!(!offered.contains(&tampered.as_str()));
        assert_eq!(
            self.json["nudge_id"],
            self.id(),
            "the id is in the payload too"
        );
    }
}

/// `serve` arguments for `receiver`, nudging after `after`.
fn options(receiver: &Receiver, after: &str, extra: &[&str]) -> Options {
    let mut args: Vec<String> = [
        "--nudge-url",
        &receiver.url,
        "--nudge-secret",
        SECRET,
        "--nudge-after",
        after,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if !extra.contains(&"--nudge-backoff") {
        args.extend(["--nudge-backoff".to_owned(), "100ms".to_owned()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Options {
        args,
        ..Options::default()
    }
}

/// The nudge records (`nudge_delivered` and `nudge_failed`) of `run`, polled until
/// there are `n` (then checked to stay at `n` is the caller's business).
async fn nudge_records(server: &TestServer, run: &str, n: usize) -> Vec<Value> {
    let auditor = server.api(&token("aud", "auditor"));
    threadline_tests::eventually("the nudge's outcome in the audit", || {
        let auditor = auditor.clone();
        async move {
            let mut found = auditor
                .audit_events(&format!("run_id={run}&type=nudge_delivered"))
                .await;
            found.extend(
                auditor
                    .audit_events(&format!("run_id={run}&type=nudge_failed"))
                    .await,
            );
            (found.len() >= n).then_some(found)
        }
    })
    .await
}

#[tokio::test]
async fn a_webhook_is_retried_after_two_failures_then_recorded_delivered() {
    let mut receiver = Receiver::start(&[500, 502, 200]).await;
    let server = TestServer::spawn_with(options(&receiver, "1s", &["--nudge-attempts", "5"]));
    let agent = server.api(&token("bot", "agent"));
    let (thread, run) = started_run(&agent, "alice").await;
    let done = agent.event(&run, "agent_completed", json!({})).await;
    assert_eq!(done.status, 201, "{}", done.body);

    // Three requests: one nudge (the same id and body), each signed afresh.
    let attempts: Vec<Hook> = vec![
        receiver.next().await,
        receiver.next().await,
        receiver.next().await,
    ];
    for hook in &attempts {
        hook.verify();
        assert_eq!(hook.id(), attempts[0].id());
        assert_eq!(hook.body, attempts[0].body);
    }
    let body = &attempts[0].json;
    assert_eq!(body["type"], "nudge");
    assert_eq!(body["user_id"], "alice");
    assert_eq!(body["thread_id"], thread.as_str());
    assert_eq!(body["run_id"], run.as_str());
    assert_eq!(body["subject"]["event"], "agent_completed");
    assert_eq!(body["subject"]["event_id"], done.body["event_id"]);
    assert_eq!(body["subject"]["user_seq"], done.body["user_seq"]);
    assert_eq!(body["subject"]["position"], done.body["position"]);

    // Recorded once, delivered, by the system, after three attempts.
    let records = nudge_records(&server, &run, 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["event"], "nudge_delivered");
    assert_eq!(
        record["event_id"],
        attempts[0].id(),
        "webhook-id = the record's event id"
    );
    assert_eq!(record["actor"], json!({"sub": "system", "role": "system"}));
    assert_eq!(record["user_id"], "alice");
    assert_eq!(record["thread_id"], thread.as_str());
    assert_eq!(record["data"]["attempts"], 3);
    assert_eq!(record["data"]["status"], 200);
    assert_eq!(record["data"]["error"], Value::Null);
    assert_eq!(record["data"]["subject"]["event"], "agent_completed");
    assert_eq!(record["data"]["subject"]["position"], done.body["position"]);
    // Not a thread event: no user_seq, no thread version, and the thread did not move.
    assert_eq!(
        (
            record["user_seq"].as_u64(),
            record["thread_version"].as_u64()
        ),
        (Some(0), Some(0))
    );
    let owner = server.api(&token("alice", "user"));
    let history = owner.thread_events(&thread).await;
    assert_eq!(history.last().unwrap()["event"], "agent_completed");
    assert!(history
        .iter()
        .all(|f| !f["event"].as_str().unwrap().starts_with("nudge")));
    // …and it reaches no socket of the owner.
    let mut socket = server
        .socket(&token("alice", "user"), "client_id=phone&after=0")
        .await
        .unwrap();
    let (frames, _) = socket.until("caught_up").await.unwrap();
    let events: Vec<&Value> = frames.iter().filter(|f| f["type"] == "event").collect();
    assert_eq!(events.len(), history.len(), "{frames:?}");
    assert_eq!(
        frames[0]["head"],
        json!(history.len()),
        "the queue did not grow"
    );
    assert!(
        receiver.drain().is_empty(),
        "no request after the delivered one"
    );
}

#[tokio::test]
async fn no_webhook_for_an_event_a_device_acknowledged_in_time() {
    let mut receiver = Receiver::start(&[200]).await;
    // Long enough for the ack below to land on a loaded machine.
    let server = TestServer::spawn_with(options(&receiver, "3s", &[]));
    let agent = server.api(&token("bot", "agent"));
    let mut phone = server
        .socket(&token("alice", "user"), "client_id=phone")
        .await
        .unwrap();
    phone.until("caught_up").await.unwrap();

    // Run 1 completes; the phone receives it and acknowledges it durably, in time.
    let (_t1, seen) = started_run(&agent, "alice").await;
    let done = agent.event(&seen, "agent_completed", json!({})).await;
    assert_eq!(done.status, 201);
    let frame = loop {
        let f = phone.frame().await.unwrap();
        if f["event"] == "agent_completed" {
            break f;
        }
    };
    phone
        .send(json!({"type": "ack", "user_seq": frame["user_seq"]}))
        .await
        .unwrap();
    phone.send(json!({"type": "ping"})).await.unwrap();
    phone.until("pong").await.unwrap();

    // Run 2 completes and nobody acknowledges it: its nudge is the first request, so
    // run 1's (due earlier) was never sent.
    let (_t2, unseen) = started_run(&agent, "alice").await;
    assert_eq!(
        agent.event(&unseen, "agent_error", json!({})).await.status,
        201
    );
    let hook = receiver.next().await;
    hook.verify();
    assert_eq!(hook.json["run_id"], unseen.as_str());
    assert_eq!(hook.json["subject"]["event"], "agent_error");
    let records = nudge_records(&server, &unseen, 1).await;
    assert_eq!(records[0]["event"], "nudge_delivered");
    let auditor = server.api(&token("aud", "auditor"));
    let all = auditor.audit_events("type=nudge_delivered").await;
    assert_eq!(all.len(), 1, "only run 2 was nudged: {all:?}");
    assert!(auditor.audit_events("type=nudge_failed").await.is_empty());
    assert!(receiver.drain().is_empty());
}

#[tokio::test]
async fn a_receiver_that_always_fails_is_recorded_failed_after_the_last_attempt() {
    let mut receiver = Receiver::start(&[503]).await;
    let server = TestServer::spawn_with(options(&receiver, "1s", &["--nudge-attempts", "3"]));
    let agent = server.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "alice").await;
    let ask = json!({"input_id": "deploy-1", "kind": "approval", "options": ["yes", "no"]});
    let asked = agent.event(&run, "agent_awaiting_input", ask).await;
    assert_eq!(asked.status, 201, "{}", asked.body);

    let first = receiver.next().await;
    first.verify();
    assert_eq!(first.json["subject"]["event"], "agent_awaiting_input");
    assert_eq!(first.json["subject"]["input_id"], "deploy-1");
    for _ in 0..2 {
        let again = receiver.next().await;
        again.verify();
        assert_eq!(again.id(), first.id());
    }
    let records = nudge_records(&server, &run, 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["event"], "nudge_failed");
    assert_eq!(record["event_id"], first.id());
    assert_eq!(record["actor"], json!({"sub": "system", "role": "system"}));
    assert_eq!(record["data"]["attempts"], 3);
    assert_eq!(record["data"]["status"], 503);
    assert!(
        record["data"]["error"].as_str().unwrap().contains("503"),
        "{record}"
    );
    // Recorded after the last attempt: nothing more is sent.
    assert!(receiver.drain().is_empty());
    // The run goes on; its end is a new subject with its own nudge (and its own id).
    assert_eq!(
        agent.event(&run, "agent_completed", json!({})).await.status,
        201
    );
    let next = receiver.next().await;
    assert_eq!(next.json["subject"]["event"], "agent_completed");
    assert_ne!(next.id(), first.id());
}

#[tokio::test]
async fn a_nudge_due_across_a_restart_is_sent_after_it_and_recorded_once() {
    // First life: the receiver fails and the next attempt is an hour away when the
    // server stops, so the nudge is due and unrecorded.
    let mut failing = Receiver::start(&[500]).await;
    let mut server = TestServer::spawn_with(options(
        &failing,
        "1s",
        &["--nudge-attempts", "20", "--nudge-backoff", "1h"],
    ));
    let agent = server.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "alice").await;
    assert_eq!(
        agent.event(&run, "agent_completed", json!({})).await.status,
        201
    );
    let tried = failing.next().await;
    tried.verify();
    assert!(server.stop().success());

    // Second life, with a receiver that answers: the same nudge (same id), once.
    let mut receiver = Receiver::start(&[200]).await;
    let server = TestServer::start(server.data.clone(), options(&receiver, "1s", &[])).unwrap();
    let hook = receiver.next().await;
    hook.verify();
    assert_eq!(
        hook.id(),
        tried.id(),
        "the idempotency key survives the restart"
    );
    assert_eq!(hook.body, tried.body);
    let records = nudge_records(&server, &run, 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["event"], "nudge_delivered");
    assert_eq!(records[0]["data"]["attempts"], 1);

    // Third life: the recorded nudge is not sent again. A second unacknowledged run's
    // nudge is the next request the receiver sees.
    let server = server.restart();
    let agent = server.api(&token("bot", "agent"));
    let (_t2, second) = started_run(&agent, "alice").await;
    assert_eq!(
        agent
            .event(&second, "agent_completed", json!({}))
            .await
            .status,
        201
    );
    let next = receiver.next().await;
    assert_eq!(next.json["run_id"], second.as_str(), "{:?}", next.json);
    nudge_records(&server, &second, 1).await;
    assert_eq!(nudge_records(&server, &run, 1).await.len(), 1);
    assert!(receiver.drain().is_empty());
    assert!(
        failing.drain().is_empty(),
        "the first receiver saw one attempt only"
    );

    // The offline auditor's history shows the outcomes with their actor too.
    let mut server = server;
    assert!(server.stop().success());
    let out = std::process::Command::new(threadline_tests::binary())
        .args(["audit", "--data"])
        .arg(server.data_dir())
        .args(["--type", "nudge_delivered", "--format", "jsonl"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("nudge_delivered").count(), 2, "{text}");
    for line in text.lines() {
        let envelope: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            envelope["actor"],
            json!({"sub": "system", "role": "system"})
        );
    }
}
