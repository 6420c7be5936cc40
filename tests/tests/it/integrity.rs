//! The log's promise end to end: a data dir filled through the API, damaged
//! on disk as an operator's disk would damage it (a flipped byte in sled's
//! file), is never served shortened. `serve` refuses, naming what is at stake;
//! `verify` fails naming the damaged position; `audit` still reads every
//! intact record; `repair` recovers it (or, with `--accept-loss`, records the
//! loss in the log), and the server then answers what it answered before.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::{json, Value};
use threadline_tests::{binary, token, Options, TestServer, DEADLINE};

/// Agent events after `thread_created`, `run_registered` and `agent_started`.
const THINKING: u64 = 250;
/// `agent_thinking` number `i` (from 1) lands at position `3 + i`.
const HEAD: u64 = 3 + THINKING;

fn marker(i: u64) -> String {
    format!("integrity-marker-{i:06}")
}

fn tl(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary())
        .args(args)
        .env_remove("THREADLINE_DATA")
        .env_remove("THREADLINE_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run threadline");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Fills a server the way the operator did, one request per event.
async fn fill(server: &TestServer) {
    let alice = server.api(&token("alice", "user"));
    let agent = server.api(&token("planner", "agent"));
    alice
        .create_thread(json!({"thread_id": "thread_integrity"}))
        .await;
    let r = agent
        .post(
            "/v1/threads/thread_integrity/runs",
            &json!({"run_id": "run_integrity", "agent_name": "planner"}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = agent
        .event("run_integrity", "agent_started", json!({}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    for i in 1..=THINKING {
        let r = agent
            .event(
                "run_integrity",
                "agent_thinking",
                json!({"marker": marker(i), "pad": "x".repeat(64)}),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(r.body["position"], 3 + i);
    }
}

/// Every event of the thread as the API serves it.
async fn history(server: &TestServer) -> Vec<Value> {
    let alice = server.api(&token("alice", "user"));
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let r = alice
            .get(&format!(
                "/v1/threads/thread_integrity/events?after_version={after}&limit=1000"
            ))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let events = r.body["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return out;
        }
        after = r.body["next_after_version"].as_u64().unwrap();
        out.extend(events);
    }
}

/// Offsets in `log/db` of every stored copy of `needle`.
fn copies(data: &Path, needle: &str) -> Vec<usize> {
    let bytes = std::fs::read(data.join("log").join("db")).unwrap();
    bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle.as_bytes())
        .map(|(i, _)| i)
        .collect()
}

fn flip(data: &Path, offset: usize) {
    let path = data.join("log").join("db");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
}

/// `serve` on the damaged dir: must exit non-zero by itself, saying why.
fn serve_refuses(data: &Path) -> String {
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("THREADLINE_JWT_SECRET", threadline_tests::SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started on a damaged log instead of refusing");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("threadline repair"),
        "says how to proceed: {stderr}"
    );
    stderr
}

fn audit_count(data: &Path) -> usize {
    let (code, stdout, stderr) = tl(&[
        "audit",
        "--format",
        "jsonl",
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    stdout
        .lines()
        .filter(|l| l.contains("integrity-marker-"))
        .count()
}

#[tokio::test]
async fn a_flipped_byte_in_sleds_file_is_refused_named_and_repaired_without_loss() {
    let mut server = TestServer::spawn_process();
    fill(&server).await;
    let before = history(&server).await;
    assert_eq!(before.len() as u64, HEAD);
    assert!(server.stop().success());
    let data = server.data.path().to_owned();

    // The case: one byte of one stored copy of event 50 (position 53).
    let found = copies(&data, &marker(50));
    assert!(!found.is_empty(), "the event is stored in log/db");
    flip(&data, found[0] + 5);

    // serve refuses: never the shortened history sled's recovery would give.
    let said = serve_refuses(&data);
    assert!(
        said.contains(&format!("{HEAD} were acknowledged")),
        "{said}"
    );

    // verify fails and names the damaged position.
    let (code, stdout, _) = tl(&["verify", "--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("position 53"), "{stdout}");
    assert!(stdout.contains("FAILED"), "{stdout}");

    // audit still reads every intact record.
    assert_eq!(audit_count(&data), THINKING as usize);

    // repair recovers every acknowledged event from the intact copies.
    let (code, stdout, stderr) = tl(&["repair", "--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("nothing lost"), "{stdout}");
    let (code, stdout, _) = tl(&["verify", "--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}");

    // A whole log is left as it is.
    let dirs = || std::fs::read_dir(&data).unwrap().count();
    let before_again = dirs();
    let (code, stdout, stderr) = tl(&["repair", "--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("nothing to repair"), "{stdout}");
    assert_eq!(dirs(), before_again, "nothing was written beside the log");

    let server = TestServer::start(Arc::clone(&server.data), Options::default()).unwrap();
    assert_eq!(history(&server).await, before);
}

#[tokio::test]
async fn a_record_with_no_intact_copy_is_named_and_its_loss_is_only_accepted_explicitly() {
    let mut server = TestServer::spawn_process();
    fill(&server).await;
    let before = history(&server).await;
    assert!(server.stop().success());
    let data = server.data.path().to_owned();

    // Every stored copy of event 200 (position 203) damaged.
    let found = copies(&data, &marker(200));
    assert!(!found.is_empty());
    for offset in &found {
        flip(&data, offset + 5);
    }

    let said = serve_refuses(&data);
    assert!(said.contains("203"), "names the lost position: {said}");
    let (code, stdout, _) = tl(&["verify", "--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("203"), "{stdout}");
    // Every other record stays readable.
    assert_eq!(audit_count(&data), THINKING as usize - 1);

    // Without --accept-loss, repair changes nothing.
    let (code, _, stderr) = tl(&["repair", "--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("203") && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    serve_refuses(&data);

    let (code, stdout, stderr) = tl(&[
        "repair",
        "--data",
        data.to_str().unwrap(),
        "--accept-loss",
        "--operator",
        "ops-on-call",
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("203..="), "{stdout}");
    let (code, stdout, _) = tl(&["verify", "--data", data.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("log_loss_accepted by operator:ops-on-call"),
        "the loss is an event of the log: {stdout}"
    );

    // The server serves everything before the loss, exactly as before, and takes new events.
    let server = TestServer::start(Arc::clone(&server.data), Options::default()).unwrap();
    let after = history(&server).await;
    assert_eq!(after[..], before[..202]);
    let agent = server.api(&token("planner", "agent"));
    let r = agent
        .event(
            "run_integrity",
            "agent_thinking",
            json!({"after": "repair"}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        r.body["position"], 204,
        "positions stay dense after the loss record"
    );
}
