//! The `threadline` tools end to end: `token` against `serve`, `rebuild` and
//! `verify` on a data dir filled through the API (and tampered with), `audit`
//! against the audit endpoint, and the command-line surface (`--help`, errors).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use threadline_tests::{binary, token, Api, Options, TestServer, DEADLINE};

/// What a finished tool run left behind.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// The error of a failed run: exactly one non-empty line on stderr, no panic.
    fn one_error_line(&self) -> &str {
        assert!(!self.ok(), "expected a failure: {self:?}");
        assert!(!self.stderr.contains("panicked"), "{self:?}");
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {self:?}");
        lines[0]
    }
}

/// Runs the binary with a clean `THREADLINE_*` environment.
fn tl<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Out {
    let out = command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run threadline");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn command() -> Command {
    let mut cmd = Command::new(binary());
    for var in [
        "THREADLINE_DATA",
        "THREADLINE_JWT_SECRET",
        "THREADLINE_JWT_SECRET_FILE",
        "THREADLINE_URL",
        "THREADLINE_TOKEN",
        "THREADLINE_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `signal` (e.g. `-TERM`) and waits for the exit code.
fn signal_and_wait(child: &mut Child, signal: &str) -> Option<i32> {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        assert!(std::time::Instant::now() < deadline, "no exit on {signal}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Fills a server with three threads (two users), three runs and twelve agent events,
/// all with fixed ids so two data dirs can hold the same history; `title` varies it.
async fn fill(server: &TestServer, title: &str) {
    let alice = server.api(&token("alice", "user"));
    let bob = server.api(&token("bob", "user"));
    let agent = server.api(&token("bot", "agent"));
    alice
        .create_thread(json!({"thread_id": "thread_cli_1", "title": format!("{title} one")}))
        .await;
    alice
        .create_thread(json!({"thread_id": "thread_cli_2", "title": "two", "metadata": {"k": 1}}))
        .await;
    bob.create_thread(json!({"thread_id": "thread_cli_3"}))
        .await;
    for (thread, run) in [
        ("thread_cli_1", "run_cli_1"),
        ("thread_cli_3", "run_cli_2"),
        ("thread_cli_2", "run_cli_3"),
    ] {
        let r = agent
            .post(
                &format!("/v1/threads/{thread}/runs"),
                &json!({"run_id": run, "agent_name": "tester"}),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    for (run, kind, data) in [
        ("run_cli_1", "agent_started", json!({"step": 1})),
        ("run_cli_1", "agent_thinking", json!({"text": "hmm"})),
        ("run_cli_1", "tool_executing", json!({"tool_call_id": "t1"})),
        ("run_cli_1", "tool_completed", json!({"tool_call_id": "t1"})),
        ("run_cli_1", "agent_completed", json!({})),
        ("run_cli_2", "agent_started", json!({})),
        ("run_cli_2", "agent_error", json!({"reason": "boom"})),
        ("run_cli_3", "agent_started", json!({})),
    ] {
        let r = agent.event(run, kind, data).await;
        assert_eq!(r.status, 201, "{kind}: {:?}", r.body);
    }
    let r = agent
        .post(
            "/v1/events",
            &json!({"events": [
                {"run_id": "run_cli_3", "type": "agent_thinking", "data": {"n": 1}},
                {"run_id": "run_cli_3", "type": "agent_thinking", "data": {"n": 2}},
            ]}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

/// Positions in the filled history.
const FILLED: u64 = 16;

/// Every page of `GET /v1/audit/events?<query>`.
async fn audit_endpoint(auditor: &Api, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let r = auditor
            .get(&format!("/v1/audit/events?after={after}&limit=5&{query}"))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let events = r.body["events"].as_array().unwrap().clone();
        let next = r.body["next_after"].as_u64().unwrap();
        if events.is_empty() && next == after {
            return out;
        }
        out.extend(events);
        after = next;
    }
}

/// Parses JSON lines.
fn jsonl(out: &Out) -> Vec<Value> {
    assert!(out.ok(), "{out:?}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// What the API answers about the filled history, to compare across a rebuild.
async fn api_view(server: &TestServer) -> Vec<Value> {
    let mut view = Vec::new();
    for (user, role) in [("alice", "user"), ("bob", "user"), ("carol", "auditor")] {
        view.push(server.api(&token(user, role)).get("/v1/threads").await.body);
    }
    let auditor = server.api(&token("carol", "auditor"));
    for thread in ["thread_cli_1", "thread_cli_2", "thread_cli_3"] {
        view.push(auditor.get(&format!("/v1/threads/{thread}")).await.body);
        view.push(
            auditor
                .get(&format!("/v1/threads/{thread}/events?limit=1000"))
                .await
                .body,
        );
    }
    view.push(Value::Array(audit_endpoint(&auditor, "").await));
    view
}

/// Opens a stopped data dir's sled database directly.
fn sled_db(data: &Path) -> sled::Db {
    sled::open(data.join("log")).expect("open sled")
}

/// The projections' checkpoint file of a data dir (storage/src/checkpoints.rs).
fn checkpoint_file(data: &Path) -> std::path::PathBuf {
    data.join("log")
        .join(threadline_storage::CHECKPOINT_DIR)
        .join("read-model.ckpt")
}

/// The format-2 frame holding `position` (`G` + first position → frame, see
/// storage/src/frame.rs): its key and the last position it holds.
fn frame_of(log: &sled::Tree, position: u64) -> (sled::IVec, u64) {
    let mut key = vec![b'G'];
    key.extend_from_slice(&position.to_be_bytes());
    let (key, frame) = log
        .range(&b"G"[..]..=&key[..])
        .next_back()
        .expect("a frame")
        .unwrap();
    let first = u64::from_le_bytes(frame[8..16].try_into().unwrap());
    let count = u32::from_le_bytes(frame[16..20].try_into().unwrap());
    (key, first + u64::from(count) - 1)
}

#[tokio::test]
async fn token_output_is_accepted_by_serve_with_its_generated_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // No key configured: serve generates <data>/jwt.secret.
    let mut child = command()
        .args(["serve", "--data", path(&data), "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("threadline listening on http://") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx.recv_timeout(DEADLINE).expect("server listening");
    assert!(data.join("jwt.secret").exists());

    let minted = tl(["token", "--data", path(&data), "--sub", "alice"]);
    assert!(minted.ok(), "{minted:?}");
    assert_eq!(minted.stdout.lines().count(), 1, "{minted:?}");
    let jwt = minted.stdout.trim_end_matches('\n');
    assert_eq!(jwt.split('.').count(), 3, "{jwt}");

    let alice = Api {
        base: format!("http://{addr}"),
        token: Some(jwt.to_owned()),
        http: reqwest::Client::new(),
    };
    let thread = alice.create_thread(json!({"title": "minted"})).await;
    let list = alice.get("/v1/threads").await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body["threads"][0]["thread_id"], thread.as_str());

    // A token from another secret is refused, so acceptance above is not an accident.
    let foreign = Api {
        token: Some(token("alice", "user")),
        ..alice.clone()
    };
    assert_eq!(foreign.get("/v1/threads").await.status, 401);

    let auditor = tl([
        "token",
        "--data",
        path(&data),
        "--sub",
        "carol",
        "--role",
        "auditor",
        "--ttl",
        "5m",
    ]);
    let auditor = Api {
        token: Some(auditor.stdout.trim().to_owned()),
        ..alice
    };
    assert_eq!(auditor.get("/v1/audit/events").await.status, 200);
    drop(server);
}

#[tokio::test]
async fn rebuild_then_verify_pass_and_the_api_answers_the_same() {
    let mut server = TestServer::spawn_process();
    fill(&server, "rebuilt").await;
    let before = api_view(&server).await;
    let data = server.data.path().to_owned();

    // While the server holds the data dir the offline tools refuse, in one line.
    for tool in ["rebuild", "verify", "audit"] {
        let out = tl([tool, "--data", path(&data)]);
        let line = out.one_error_line();
        assert!(
            line.contains("in use by a running server"),
            "{tool}: {line}"
        );
        if tool == "audit" {
            assert!(line.contains("--url"), "{line}");
        }
        if tool == "verify" {
            assert!(
                line.contains("POST") && line.contains("/v1/admin/verify"),
                "{line}"
            );
        }
    }

    assert!(server.stop().success());
    let rebuilt = tl(["rebuild", "--data", path(&data)]);
    assert!(rebuilt.ok(), "{rebuilt:?}");
    assert!(
        rebuilt.stdout.contains(&format!("from {FILLED} events")),
        "{rebuilt:?}"
    );
    assert!(rebuilt.stdout.contains("events/s"), "{rebuilt:?}");
    assert!(
        rebuilt
            .stdout
            .contains("registry: the replaced checkpoint matched the rebuild"),
        "{rebuilt:?}"
    );
    let verified = tl(["verify", "--data", path(&data)]);
    assert!(verified.ok(), "{verified:?}");
    assert!(verified.stdout.contains("OK"), "{verified:?}");
    assert!(
        verified
            .stdout
            .contains(&format!("positions checked: 1 to {FILLED} (0 bad)")),
        "{verified:?}"
    );

    let one = tl(["rebuild", "--data", path(&data), "--projection", "delivery"]);
    assert!(one.ok(), "{one:?}");
    assert!(
        one.stdout
            .contains("delivery: the replaced checkpoint matched"),
        "{one:?}"
    );

    let server = TestServer::start(server.data.clone(), Options::default()).unwrap();
    assert_eq!(api_view(&server).await, before);
}

#[tokio::test]
async fn verify_names_every_flipped_record_position() {
    let mut server = TestServer::spawn_process();
    fill(&server, "flipped").await;
    assert!(server.stop().success());
    let data = server.data.path().to_owned();
    // Damage the last record of the frames holding positions 3 and 7, through
    // sled (so sled's own checksums hold and only the record's catches it).
    let mut bad = Vec::new();
    {
        let db = sled_db(&data);
        let log = db.open_tree("log").unwrap();
        for position in [3, 7] {
            let (key, last) = frame_of(&log, position);
            if bad.contains(&last) {
                continue;
            }
            let mut bytes = log.get(&key).unwrap().unwrap().to_vec();
            let end = bytes.len() - 1;
            bytes[end] ^= 0x01;
            log.insert(key, bytes).unwrap();
            bad.push(last);
        }
        db.flush().unwrap();
    }

    let out = tl(["verify", "--data", path(&data)]);
    assert_eq!(out.code, Some(1), "{out:?}");
    for position in &bad {
        assert!(
            out.stdout.contains(&format!(
                "bad record at position {position}: checksum mismatch"
            )),
            "{out:?}"
        );
    }
    assert!(
        out.stdout.contains(&format!(
            "positions checked: 1 to {FILLED} ({} bad)",
            bad.len()
        )),
        "{out:?}"
    );
    assert!(out.stdout.contains("FAILED"), "{out:?}");

    // rebuild refuses the damaged log in one line, naming the position.
    let line = tl(["rebuild", "--data", path(&data)])
        .one_error_line()
        .to_owned();
    assert!(line.contains(&format!("position {}", bad[0])), "{line}");
}

#[tokio::test]
async fn verify_names_the_tampered_projection() {
    // Two data dirs with the same history except one thread's title: their registries
    // differ, their delivery queues (same users, same positions) do not.
    let mut a = TestServer::spawn_process();
    let mut b = TestServer::spawn_process();
    fill(&a, "original").await;
    fill(&b, "forged").await;
    assert!(a.stop().success());
    assert!(b.stop().success());
    let (dir_a, dir_b) = (a.data.path().to_owned(), b.data.path().to_owned());
    assert!(tl(["verify", "--data", path(&dir_a)]).ok());

    // Swap B's checkpoint, at the same head position, into A.
    let forged = std::fs::read(checkpoint_file(&dir_b)).expect("B has a checkpoint");
    assert_ne!(std::fs::read(checkpoint_file(&dir_a)).unwrap(), forged);
    std::fs::write(checkpoint_file(&dir_a), forged).unwrap();
    let out = tl(["verify", "--data", path(&dir_a)]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout
            .contains("FAIL: projection registry: stored state differs"),
        "{out:?}"
    );
    assert!(!out.stdout.contains("projection delivery"), "{out:?}");

    // rebuild repairs it.
    let rebuilt = tl(["rebuild", "--data", path(&dir_a)]);
    assert!(
        rebuilt
            .stdout
            .contains("registry: the replaced checkpoint differed from the rebuild"),
        "{rebuilt:?}"
    );
    assert!(tl(["verify", "--data", path(&dir_a)]).ok());

    // A missing checkpoint is a note, not a failure.
    std::fs::remove_file(checkpoint_file(&dir_a)).unwrap();
    let out = tl(["verify", "--data", path(&dir_a)]);
    assert!(out.ok(), "{out:?}");
    assert!(
        out.stdout.contains("note: no projection checkpoint"),
        "{out:?}"
    );
}

#[tokio::test]
async fn audit_jsonl_is_the_audit_endpoint_and_filters_select() {
    let mut server = TestServer::spawn_process();
    fill(&server, "audited").await;
    let auditor_jwt = token("carol", "auditor");
    let auditor = server.api(&auditor_jwt);
    let all = audit_endpoint(&auditor, "").await;
    assert_eq!(all.len() as u64, FILLED);
    let url = server.url("");
    let via = |extra: &[&str]| {
        let mut args = vec![
            "audit",
            "--url",
            url.as_str(),
            "--token",
            auditor_jwt.as_str(),
            "--format",
            "jsonl",
        ];
        args.extend_from_slice(extra);
        jsonl(&tl(args))
    };

    // Through the server: the same objects, and filters passed through.
    assert_eq!(via(&[]), all);
    assert_eq!(
        via(&["--user", "alice"]),
        audit_endpoint(&auditor, "user_id=alice").await
    );
    assert_eq!(via(&["--after", "4", "--limit", "3"]), all[4..7].to_vec());
    let denied = tl([
        "audit",
        "--url",
        url.as_str(),
        "--token",
        token("alice", "user").as_str(),
    ]);
    assert!(denied.one_error_line().contains("403"), "{denied:?}");

    // Offline, after the server stopped: the same objects again.
    assert!(server.stop().success());
    let data = server.data.path().to_owned();
    let offline = |extra: &[&str]| {
        let mut args = vec!["audit", "--data", path(&data), "--format", "jsonl"];
        args.extend_from_slice(extra);
        jsonl(&tl(args))
    };
    assert_eq!(offline(&[]), all);
    let subset = |key: &str, value: &str| -> Vec<Value> {
        all.iter().filter(|e| e[key] == value).cloned().collect()
    };
    let alices = offline(&["--user", "alice"]);
    assert_eq!(alices, subset("user_id", "alice"));
    assert!(!alices.is_empty() && alices.len() < all.len());
    assert_eq!(
        offline(&["--thread", "thread_cli_3"]),
        subset("thread_id", "thread_cli_3")
    );
    assert_eq!(
        offline(&["--run", "run_cli_3"]),
        subset("run_id", "run_cli_3")
    );
    let started = offline(&["--type", "agent_started"]);
    assert_eq!(started, subset("event", "agent_started"));
    assert_eq!(started.len(), 3);
    assert_eq!(
        offline(&["--user", "alice", "--type", "agent_thinking"]).len(),
        3
    );
    assert_eq!(offline(&["--limit", "2"]), all[..2].to_vec());
    assert!(offline(&["--until", "2000-01-01T00:00:00Z"]).is_empty());
    assert_eq!(offline(&["--since", "2000-01-01T00:00:00Z"]), all);

    // The table: a header and one row per event.
    let table = tl(["audit", "--data", path(&data), "--thread", "thread_cli_3"]);
    assert!(table.ok(), "{table:?}");
    let rows: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(rows.len(), 1 + 4, "{}", table.stdout);
    assert!(rows[0].contains("POSITION") && rows[0].contains("ACTOR"));
    assert!(rows[1..]
        .iter()
        .all(|r| r.contains("thread_cli_3") && r.contains("bob")));
    assert!(rows[4].contains("agent_error") && rows[4].contains("agent:bot"));
}

#[tokio::test]
async fn audit_follow_prints_new_events_until_interrupted() {
    let server = TestServer::spawn_process();
    fill(&server, "followed").await;
    let auditor_jwt = token("carol", "auditor");
    let mut child = command()
        .args(["audit", "--url", &server.url(""), "--token", &auditor_jwt])
        .args([
            "--format",
            "jsonl",
            "--follow",
            "--after",
            &FILLED.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut follower = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let agent = server.api(&token("bot", "agent"));
    let r = agent
        .event("run_cli_3", "agent_completed", json!({"done": true}))
        .await;
    assert_eq!(r.status, 201);
    let line = rx.recv_timeout(DEADLINE).expect("a followed event");
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["position"], FILLED + 1);
    assert_eq!(event["event"], "agent_completed");
    assert_eq!(event["user_id"], "alice");
    assert_eq!(signal_and_wait(&mut follower.0, "-INT"), Some(0));
}

const HELP: &[(&str, &[&str])] = &[
    (
        "serve",
        &[
            "--data",
            "--listen",
            "--run-ttl",
            "--max-connections-per-user",
            "--max-connections",
            "--header-timeout",
            "--idle-timeout",
            "--ws-send-timeout",
            "--ws-message-timeout",
            "--max-threads-per-user",
            "--max-open-tool-calls",
            "--max-tool-call-id-bytes",
            "--rate-limit",
            "--rate-burst",
            "--agent-rate-limit",
            "--jwt-secret",
            "--jwt-secret-file",
            "--jwt-public-key",
            "--jwt-alg",
            "--jwt-leeway",
        ],
    ),
    (
        "token",
        &[
            "--data",
            "--sub",
            "--role",
            "--ttl",
            "--jwt-secret",
            "--jwt-secret-file",
        ],
    ),
    ("rebuild", &["--data", "--projection", "--quiet"]),
    ("verify", &["--data", "--quiet"]),
    (
        "audit",
        &[
            "--data", "--after", "--limit", "--user", "--thread", "--run", "--type", "--since",
            "--until", "--format", "--follow", "--url", "--token", "--quiet",
        ],
    ),
];

#[test]
fn help_explains_every_option_and_bad_input_is_one_clear_line() {
    for (command, options) in HELP {
        let help = tl([command, "--help"]);
        assert!(help.ok(), "{help:?}");
        for option in *options {
            // Each option is listed with an explanation beside it or on the next line.
            let lines: Vec<&str> = help.stdout.lines().collect();
            let at = lines
                .iter()
                .position(|l| {
                    let l = l.trim_start();
                    l.starts_with(&format!("{option} "))
                        || l == *option
                        || l.contains(&format!(", {option} "))
                        || l.ends_with(&format!(", {option}"))
                })
                .unwrap_or_else(|| panic!("{command} --help lacks {option}:\n{}", help.stdout));
            let beside = lines[at]
                .split_once(option)
                .map(|(_, rest)| rest.trim_start())
                .map(|rest| match rest.strip_prefix('<') {
                    Some(value) => value.split_once('>').map_or("", |(_, r)| r),
                    None => rest,
                })
                .unwrap_or("")
                .trim();
            let below = lines.get(at + 1).map_or("", |l| l.trim());
            assert!(
                !beside.is_empty() || (!below.is_empty() && !below.starts_with('-')),
                "{command} {option} is not explained:\n{}",
                help.stdout
            );
        }
    }

    let wrong = tl(["verify", "--bogus"]);
    assert_eq!(wrong.code, Some(2), "{wrong:?}");
    assert!(
        wrong.stderr.contains("unexpected argument '--bogus'"),
        "{wrong:?}"
    );
    assert!(
        wrong.stderr.contains("Usage: threadline verify"),
        "{wrong:?}"
    );
    let bad_value = tl(["audit", "--format", "xml"]);
    assert_eq!(bad_value.code, Some(2), "{bad_value:?}");
    assert!(bad_value.stderr.contains("--format"), "{bad_value:?}");

    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    for tool in ["rebuild", "verify", "audit"] {
        let out = tl([tool, "--data", path(&missing)]);
        let line = out.one_error_line();
        assert!(line.contains("does not exist"), "{tool}: {line}");
        assert!(!missing.exists(), "{tool} created the data dir");
    }
    // A dir without a log: named, and still nothing created in it.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for tool in ["rebuild", "verify", "audit"] {
        let line = tl([tool, "--data", path(&empty)])
            .one_error_line()
            .to_owned();
        assert!(line.contains("no Threadline event log"), "{tool}: {line}");
        assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "{tool}");
    }
    // A file where the dir should be.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let line = tl(["verify", "--data", path(&file)])
        .one_error_line()
        .to_owned();
    assert!(line.contains("not a directory"), "{line}");
}
