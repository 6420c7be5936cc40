//! Issue 18: streamed messages over real sockets. Deltas are durable before they
//! are acknowledged, frames keep a dense `user_seq` (a merged frame covers
//! `from_user_seq..=user_seq`), a reconnect or a server SIGKILL in the middle of a
//! message loses and repeats nothing, a late joiner gets the text so far and then
//! the tail, and a replay of completed messages arrives one frame per message.

use std::collections::HashMap;

use serde_json::{json, Value};
use threadline_tests::{started_run, token, Api, Options, Reply, Socket, TestServer};

/// Appends `texts` as deltas `first..` of `message` in one `POST /v1/events`.
async fn deltas(agent: &Api, run: &str, message: &str, first: u64, texts: &[String]) -> Reply {
    let events: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(k, t)| {
            json!({"run_id": run, "type": "message_delta",
                   "data": {"message_id": message, "seq": first + k as u64, "text": t}})
        })
        .collect();
    agent.post("/v1/events", &json!({ "events": events })).await
}

async fn message_event(agent: &Api, run: &str, kind: &str, message: &str) -> Reply {
    agent
        .post(
            &format!("/v1/runs/{run}/events"),
            &json!({"type": kind, "data": {"message_id": message}}),
        )
        .await
}

fn words(from: usize, n: usize) -> Vec<String> {
    (from..from + n).map(|i| format!("w{i} ")).collect()
}

/// A client's view: the sequence rule for merged frames, and the texts.
#[derive(Default, Debug)]
struct Reader {
    last: u64,
    frames: usize,
    message_frames: usize,
    texts: HashMap<String, String>,
    seqs: HashMap<String, u64>,
    completed: HashMap<String, bool>,
}

impl Reader {
    fn after(last: u64) -> Reader {
        Reader {
            last,
            ..Reader::default()
        }
    }

    /// Takes one event frame: it must start right after the last `user_seq` taken,
    /// and a message's deltas must go on from its last `seq`, never repeat one.
    fn take(&mut self, f: &Value) {
        let to = f["user_seq"].as_u64().expect("user_seq");
        let from = f["from_user_seq"].as_u64().unwrap_or(to);
        assert_eq!(from, self.last + 1, "gap or repeat at {f}");
        assert!(to >= from, "{f}");
        self.last = to;
        self.frames += 1;
        let event = f["event"].as_str().unwrap_or_default();
        if !event.starts_with("message_") {
            return;
        }
        self.message_frames += 1;
        let id = f["data"]["message_id"]
            .as_str()
            .expect("message_id")
            .to_owned();
        let seq = self.seqs.entry(id.clone()).or_default();
        if let Some(text) = f["data"]["text"].as_str() {
            let first = f["data"]["from_seq"]
                .as_u64()
                .or(f["data"]["seq"].as_u64())
                .unwrap();
            assert!(
                first == 0 || first == *seq + 1,
                "deltas out of order at {f} (had {seq})"
            );
            *seq = f["data"]["seq"].as_u64().unwrap();
            self.texts.entry(id.clone()).or_default().push_str(text);
        }
        if event == "message_completed" {
            let bytes = f["data"]["bytes"].as_u64().unwrap();
            assert_eq!(
                self.texts.get(&id).map_or(0, |t| t.len() as u64),
                bytes,
                "completed with another length: {f}"
            );
            self.completed.insert(id, true);
        }
    }

    /// Reads event frames until `done(self)` holds (or the deadline fails the test).
    async fn read_until(&mut self, socket: &mut Socket, done: impl Fn(&Reader) -> bool) {
        while !done(self) {
            let f = socket.frame().await.expect("frame");
            match f["type"].as_str() {
                Some("event") => self.take(&f),
                Some("caught_up") | Some("pong") => {}
                _ => panic!("unexpected frame {f}"),
            }
        }
    }

    fn text(&self, id: &str) -> &str {
        self.texts.get(id).map_or("", String::as_str)
    }
}

async fn merged_socket(server: &TestServer, user: &str, query: &str) -> (Socket, Value) {
    let mut socket = server
        .socket(&token(user, "user"), &format!("merge=1&{query}"))
        .await
        .expect("socket");
    let welcome = socket.welcome().await.expect("welcome");
    assert_eq!(welcome["merge"], true);
    (socket, welcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_in_the_middle_of_a_message_loses_and_repeats_nothing() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "ann").await;
    let msg = "msg_answer_1";
    assert_eq!(
        message_event(&agent, &run, "message_started", msg)
            .await
            .status,
        201
    );
    let all = words(0, 120);
    let r = deltas(&agent, &run, msg, 1, &all[..40]).await;
    assert_eq!(r.status, 201, "{}", r.body);

    let (mut socket, _) = merged_socket(&server, "ann", "after=0").await;
    let mut reader = Reader::default();
    reader
        .read_until(&mut socket, |r| r.seqs.get(msg) == Some(&40))
        .await;
    // More deltas land while the client is away; it resumes after the last frame it had.
    drop(socket);
    for (k, chunk) in all[40..].chunks(20).enumerate() {
        let r = deltas(&agent, &run, msg, 41 + 20 * k as u64, chunk).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    assert_eq!(
        message_event(&agent, &run, "message_completed", msg)
            .await
            .status,
        201
    );
    let (mut socket, welcome) =
        merged_socket(&server, "ann", &format!("after={}", reader.last)).await;
    assert_eq!(welcome["resume_after"], reader.last);
    reader
        .read_until(&mut socket, |r| r.completed.contains_key(msg))
        .await;
    assert_eq!(reader.text(msg), all.concat());
    // Compacted: the 80 deltas and the completion after the resume point came as one frame.
    assert_eq!(reader.message_frames, 2, "{reader:?}");

    // A client without merge still gets every delta as its own frame, user_seq dense.
    let mut plain = server
        .socket(&token("ann", "user"), "after=0")
        .await
        .unwrap();
    let (frames, caught_up) = plain.until("caught_up").await.unwrap();
    let frames: Vec<_> = frames
        .into_iter()
        .filter(|f| f["type"] == "event")
        .collect();
    assert_eq!(frames.len() as u64, caught_up["user_seq"].as_u64().unwrap());
    let mut plain_reader = Reader::default();
    frames.iter().for_each(|f| plain_reader.take(f));
    assert_eq!(plain_reader.text(msg), all.concat());
    assert_eq!(plain_reader.message_frames, 122);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_of_deltas_is_idempotent_and_order_is_enforced() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "ann").await;
    let msg = "0b5c6a2e-3f3c-4c41-9d57-5d1c4d7a9a10";
    assert_eq!(
        message_event(&agent, &run, "message_started", msg)
            .await
            .status,
        201
    );
    // A retried message_started answers the original (its id is derived).
    let again = message_event(&agent, &run, "message_started", msg).await;
    assert_eq!(again.status, 200, "{}", again.body);
    let batch = words(0, 10);
    let first = deltas(&agent, &run, msg, 1, &batch).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let retry = deltas(&agent, &run, msg, 1, &batch).await;
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert_eq!(
        first.body["results"], retry.body["results"],
        "a retry appends nothing"
    );
    // The same seq with another text is a conflict, a skipped seq a gap.
    deltas(&agent, &run, msg, 10, &["other".to_owned()])
        .await
        .assert_error(409, "event_id_conflict");
    let gap = deltas(&agent, &run, msg, 12, &["x".to_owned()]).await;
    gap.assert_error(409, "sequence_gap");
    // A retry overlapping new deltas stores only the new ones.
    let overlap = deltas(&agent, &run, msg, 9, &words(8, 4)).await;
    assert_eq!(overlap.status, 201, "{}", overlap.body);
    let results = overlap.body["results"].as_array().unwrap();
    assert_eq!(results[0], first.body["results"][8]);
    assert_eq!(results[1], first.body["results"][9]);
    assert!(results[2]["position"].as_u64() > results[1]["position"].as_u64());

    // Client mistakes are 4xx with their codes.
    deltas(&agent, &run, "msg_none", 1, &["x".to_owned()])
        .await
        .assert_error(404, "message_not_found");
    message_event(&agent, &run, "message_started", "not a message id")
        .await
        .assert_error(400, "invalid_id");
    let with_id = agent
        .post(
            &format!("/v1/runs/{run}/events"),
            &json!({"type": "message_started", "data": {"message_id": "msg_b"}, "event_id": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
    with_id.assert_error(400, "invalid_request");
    let bad_seq = agent
        .post(
            &format!("/v1/runs/{run}/events"),
            &json!({"type": "message_delta", "data": {"message_id": msg, "seq": "1", "text": "x"}}),
        )
        .await;
    bad_seq.assert_error(400, "invalid_request");
    let user = server.api(&token("ann", "user"));
    user.post(
        &format!("/v1/runs/{run}/events"),
        &json!({"type": "message_started", "data": {"message_id": "msg_c"}}),
    )
    .await
    .assert_error(403, "forbidden");

    // The run's terminal event completes the open message; nothing more is taken.
    let done = agent
        .post(
            &format!("/v1/runs/{run}/events"),
            &json!({"type": "agent_completed", "data": {}}),
        )
        .await;
    assert_eq!(done.status, 201, "{}", done.body);
    deltas(&agent, &run, msg, 13, &["late".to_owned()])
        .await
        .assert_error(409, "run_closed");
    let (mut socket, welcome) = merged_socket(&server, "ann", "after=0").await;
    assert_eq!(welcome["open_runs"], json!([]));
    let mut reader = Reader::default();
    reader
        .read_until(&mut socket, |r| r.frames > 0 && r.last == 3 + 1 + 12 + 1)
        .await;
    assert_eq!(reader.text(msg), words(0, 12).concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_per_message_and_per_run_are_clear_errors() {
    let server = TestServer::spawn_with(Options {
        args: [
            "--max-message-bytes",
            "100",
            "--max-run-message-bytes",
            "150",
            "--max-message-deltas-per-sec",
            "1000",
            "--max-run-deltas-per-sec",
            "20",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    });
    let agent = server.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "ann").await;
    assert_eq!(
        message_event(&agent, &run, "message_started", "msg_a")
            .await
            .status,
        201
    );
    assert_eq!(
        message_event(&agent, &run, "message_started", "msg_b")
            .await
            .status,
        201
    );
    deltas(&agent, &run, "msg_a", 1, &["x".repeat(101)])
        .await
        .assert_error(413, "payload_too_large");
    assert_eq!(
        deltas(&agent, &run, "msg_a", 1, &["x".repeat(100)])
            .await
            .status,
        201
    );
    let over_run = deltas(&agent, &run, "msg_b", 1, &["y".repeat(51)]).await;
    over_run.assert_error(413, "payload_too_large");
    assert!(over_run.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("run"));
    // 21 deltas in one second of one run: the batch is refused whole, with Retry-After.
    let many: Vec<String> = (0..21).map(|_| String::new()).collect();
    let limited = deltas(&agent, &run, "msg_b", 1, &many).await;
    limited.assert_error(429, "rate_limited");
    let retry_after = limited
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok());
    assert!(
        retry_after
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|s| s >= 1),
        "{limited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_the_text_so_far_then_the_live_tail() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (thread, run) = started_run(&agent, "ann").await;
    // History before the message, which the joiner does not need.
    threadline_tests::append_thinking(&agent, &run, 0, 30, 10).await;
    let msg = "msg_live";
    let started = message_event(&agent, &run, "message_started", msg).await;
    assert_eq!(started.status, 201);
    let all = words(0, 180);
    for (k, chunk) in all[..100].chunks(25).enumerate() {
        assert_eq!(
            deltas(&agent, &run, msg, 1 + 25 * k as u64, chunk)
                .await
                .status,
            201
        );
    }
    let (mut socket, welcome) = merged_socket(&server, "ann", "after=open").await;
    let open = &welcome["open_runs"];
    assert_eq!(open.as_array().unwrap().len(), 1, "{welcome}");
    assert_eq!(open[0]["run_id"], run.as_str());
    assert_eq!(open[0]["thread_id"], thread.as_str());
    assert_eq!(open[0]["messages"][0]["message_id"], msg);
    assert_eq!(open[0]["messages"][0]["seq"], 100);
    let from = open[0]["messages"][0]["from_user_seq"].as_u64().unwrap();
    assert_eq!(from, started.body["user_seq"].as_u64().unwrap());
    assert_eq!(welcome["resume_after"], from - 1);
    let mut reader = Reader::after(from - 1);
    let (frames, caught_up) = socket.until("caught_up").await.unwrap();
    frames.iter().for_each(|f| reader.take(f));
    assert_eq!(reader.text(msg), all[..100].concat());
    assert_eq!(reader.message_frames, 1, "the text so far is one frame");
    assert_eq!(caught_up["user_seq"], reader.last);
    // The live tail, merged within the rollup window, after it.
    for (k, chunk) in all[100..].chunks(10).enumerate() {
        assert_eq!(
            deltas(&agent, &run, msg, 101 + 10 * k as u64, chunk)
                .await
                .status,
            201
        );
    }
    assert_eq!(
        message_event(&agent, &run, "message_completed", msg)
            .await
            .status,
        201
    );
    reader
        .read_until(&mut socket, |r| r.completed.contains_key(msg))
        .await;
    assert_eq!(reader.text(msg), all.concat());
    assert!(
        reader.message_frames <= 22,
        "{} frames",
        reader.message_frames
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_1000_completed_messages_arrives_compacted() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let mut expected = Vec::new();
    for r in 0..20 {
        let (_thread, run) = started_run(&agent, "ann").await;
        let mut events = Vec::new();
        for m in 0..50 {
            let id = format!("msg_{r}_{m}");
            let texts = words(m * 10, 5);
            events.push(
                json!({"run_id": run, "type": "message_started", "data": {"message_id": id}}),
            );
            for (k, t) in texts.iter().enumerate() {
                events.push(json!({"run_id": run, "type": "message_delta",
                    "data": {"message_id": id, "seq": k + 1, "text": t}}));
            }
            events.push(
                json!({"run_id": run, "type": "message_completed", "data": {"message_id": id}}),
            );
            expected.push((id, texts.concat()));
        }
        let reply = agent.post("/v1/events", &json!({ "events": events })).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    let (mut socket, welcome) = merged_socket(&server, "ann", "after=0").await;
    let head = welcome["head"].as_u64().unwrap();
    assert_eq!(head, 20 * (3 + 50 * 7));
    let mut reader = Reader::default();
    let (frames, caught_up) = socket.until("caught_up").await.unwrap();
    frames.iter().for_each(|f| reader.take(f));
    assert_eq!(caught_up["user_seq"], head);
    assert_eq!(reader.last, head);
    assert_eq!(
        reader.message_frames, 1000,
        "one frame per completed message"
    );
    assert_eq!(reader.frames, 1000 + 20 * 3);
    for (id, text) in &expected {
        assert_eq!(reader.text(id), text);
        assert!(reader.completed.contains_key(id));
    }
    // Acking a merged frame's user_seq acks the events it covers.
    socket
        .send(json!({"type": "ack", "user_seq": head}))
        .await
        .unwrap();
    socket.send(json!({"type": "ping"})).await.unwrap();
    let (_, _pong) = socket.until("pong").await.unwrap();
    let mut resumed = server
        .socket(&token("ann", "user"), "merge=1")
        .await
        .unwrap();
    let welcome = resumed.welcome().await.unwrap();
    assert_eq!(welcome["resume_after"], head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_every_acknowledged_delta_is_there_and_the_agent_goes_on() {
    let mut server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "ann").await;
    let msg = "msg_crash";
    assert_eq!(
        message_event(&agent, &run, "message_started", msg)
            .await
            .status,
        201
    );
    let all = words(0, 420);
    // A writer keeps appending; the kill lands while it is in flight.
    let writer_agent = agent.clone();
    let writer_run = run.clone();
    let writer_all = all[..400].to_vec();
    let writer = tokio::spawn(async move {
        let mut acked = 0usize;
        for (k, chunk) in writer_all.chunks(5).enumerate() {
            match writer_agent
                .try_post(
                    "/v1/events",
                    &json!({"events": chunk.iter().enumerate().map(|(i, t)| json!({"run_id": writer_run, "type": "message_delta",
                        "data": {"message_id": msg, "seq": 1 + 5 * k + i, "text": t}})).collect::<Vec<_>>()}),
                )
                .await
            {
                Some(r) if r.status == 201 => acked = 5 * (k + 1),
                _ => break,
            }
        }
        acked
    });
    // Kill once some deltas are durable (the writer is mid-stream).
    let user = server.api(&token("ann", "user"));
    threadline_tests::eventually("deltas to land", || {
        let user = &user;
        async move {
            let t = user.get("/v1/threads").await;
            (t.body["threads"][0]["version"].as_u64().unwrap_or(0) > 40).then_some(())
        }
    })
    .await;
    server.kill();
    let acked = writer.await.unwrap();
    assert!(acked >= 35, "acked {acked}");
    let server = TestServer::start(server.data.clone(), Options::default()).unwrap();
    let agent = server.api(&token("bot", "agent"));
    let (mut socket, welcome) = merged_socket(&server, "ann", "after=open").await;
    let stored = welcome["open_runs"][0]["messages"][0]["seq"]
        .as_u64()
        .unwrap() as usize;
    assert!(stored >= acked, "stored {stored} < acknowledged {acked}");
    let from = welcome["open_runs"][0]["messages"][0]["from_user_seq"]
        .as_u64()
        .unwrap();
    let mut reader = Reader::after(from - 1);
    let (frames, _) = socket.until("caught_up").await.unwrap();
    frames.iter().for_each(|f| reader.take(f));
    assert_eq!(reader.text(msg), all[..stored].concat());
    // The agent goes on where the log is: a retry of its last batch is answered, new seqs append.
    let retry_from = stored.saturating_sub(4).max(1);
    let r = deltas(
        &agent,
        &run,
        msg,
        retry_from as u64,
        &all[retry_from - 1..stored + 10],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        message_event(&agent, &run, "message_completed", msg)
            .await
            .status,
        201
    );
    reader
        .read_until(&mut socket, |r| r.completed.contains_key(msg))
        .await;
    assert_eq!(reader.text(msg), all[..stored + 10].concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_accumulates_messages_across_merged_frames_and_a_cut() {
    use futures_util::StreamExt;
    use threadline_client::{Client, Config, TokenSource, Update};
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_thread, run) = started_run(&agent, "ann").await;
    let msg = "msg_client";
    assert_eq!(
        message_event(&agent, &run, "message_started", msg)
            .await
            .status,
        201
    );
    let all = words(0, 90);
    assert_eq!(deltas(&agent, &run, msg, 1, &all[..30]).await.status, 201);
    let proxy = threadline_tests::Proxy::start(server.addr).await;
    let mut client = Client::connect(Config::new(
        proxy.ws_url(),
        TokenSource::fixed(token("ann", "user")),
    ));
    let (events, _) = threadline_tests::client_caught_up(&mut client)
        .await
        .unwrap();
    let text = events
        .iter()
        .rev()
        .find_map(|e| e.message.as_ref())
        .unwrap();
    assert_eq!(text.text, all[..30].concat());
    assert!(!text.partial && !text.complete);
    // The connection is cut mid-message; the client resumes and accumulates on.
    proxy.cut();
    for (k, chunk) in all[30..].chunks(20).enumerate() {
        assert_eq!(
            deltas(&agent, &run, msg, 31 + 20 * k as u64, chunk)
                .await
                .status,
            201
        );
    }
    assert_eq!(
        message_event(&agent, &run, "message_completed", msg)
            .await
            .status,
        201
    );
    let mut deltas_seen = String::new();
    loop {
        let update = tokio::time::timeout(std::time::Duration::from_secs(10), client.next())
            .await
            .expect("an update before the deadline")
            .expect("the client goes on");
        match update {
            Update::Event(e) => {
                if let Some(m) = e.message {
                    deltas_seen.push_str(&m.delta);
                    if m.complete {
                        assert_eq!(m.text, all.concat());
                        break;
                    }
                }
            }
            Update::Error(e) => assert!(!e.is_fatal(), "{e}"),
            _ => {}
        }
    }
    assert_eq!(deltas_seen, all[30..].concat(), "each delta once");
}

/// One delta can never make a frame over the contract's 64 KiB: its text, as a
/// frame carries it (escaped JSON), is capped at 32 KiB, and a longer one is 413.
#[tokio::test]
async fn a_delta_too_large_for_a_frame_is_refused() {
    let server = TestServer::spawn();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    let url = format!("/v1/runs/{run}/events");
    let started = agent
        .post(
            &url,
            &json!({"type": "message_started", "data": {"message_id": "msg_big_1"}}),
        )
        .await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    // 20 000 quote characters: 20 KB raw, 40 KB escaped.
    let quotes = "\"".repeat(20_000);
    let reply = agent
        .post(&url, &json!({"type": "message_delta", "data": {"message_id": "msg_big_1", "seq": 1, "text": quotes}}))
        .await;
    reply.assert_error(413, "payload_too_large");
    let fits = "a".repeat(30_000);
    let reply = agent
        .post(&url, &json!({"type": "message_delta", "data": {"message_id": "msg_big_1", "seq": 1, "text": fits}}))
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
}
