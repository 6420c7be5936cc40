//! Issue 13: `threadline tail` follows a user's socket through a server kill and
//! restart, prints every event once in order, acknowledges what it printed, and the
//! next `tail` of the same client id goes on after it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use serde_json::Value;
use threadline_tests::{
    append_thinking, binary, started_run, token, Options, Proxy, TestServer, DEADLINE, SECRET,
};

/// A running `threadline tail` whose stdout lines arrive on a channel.
struct Tail {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Tail {
    fn start(args: &[&str]) -> Tail {
        let mut child = Command::new(binary())
            .arg("tail")
            .args(args)
            .env_remove("THREADLINE_TOKEN")
            .env_remove("THREADLINE_URL")
            .env_remove("THREADLINE_JWT_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tail");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Tail { child, lines }
    }

    /// The next `n` lines, each within the deadline.
    fn lines(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|k| {
                self.lines
                    .recv_timeout(DEADLINE)
                    .unwrap_or_else(|_| panic!("line {k} of {n} did not come"))
            })
            .collect()
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("tail exit")
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seqs(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            v["user_seq"].as_u64().expect("user_seq")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_across_a_server_restart_and_resumes_after_what_it_printed() {
    let mut server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    let (_, run) = started_run(&agent, "alice").await;
    append_thinking(&agent, &run, 0, 5, 0).await; // 1..=8
    let proxy = Proxy::start(server.addr).await;
    let url = format!("http://{}", proxy.addr);
    let common = [
        "--url",
        url.as_str(),
        "--sub",
        "alice",
        "--jwt-secret",
        SECRET,
        "--client-id",
        "term",
    ];
    let tail = Tail::start(&[&common[..], &["--format", "jsonl", "--after", "0"]].concat());
    assert_eq!(seqs(&tail.lines(8)), (1..=8).collect::<Vec<_>>());

    // SIGKILL the server under it; a new one on the same data dir (another port).
    server.kill();
    server = TestServer::start(server.data.clone(), Options::default()).expect("restart");
    proxy.retarget(server.addr);
    let agent = server.api(&token("bot", "agent"));
    append_thinking(&agent, &run, 5, 5, 0).await; // 9..=13
    let more = tail.lines(5);
    assert_eq!(seqs(&more), (9..=13).collect::<Vec<_>>());
    let frame: Value = serde_json::from_str(&more[0]).unwrap();
    assert_eq!(
        (frame["type"].as_str(), frame["event"].as_str()),
        (Some("event"), Some("agent_thinking"))
    );
    assert_eq!(frame["data"]["i"], 5);
    let status = tokio::task::block_in_place(|| tail.stop());
    assert!(status.success(), "{status:?}");

    // What it printed was acknowledged before it left.
    let mut s = server
        .socket(&token("alice", "user"), "client_id=term")
        .await
        .unwrap();
    assert_eq!(s.welcome().await.unwrap()["resume_after"], 13);
    drop(s);

    // The next tail of that client id goes on after it, in the pretty format.
    let tail = Tail::start(&[&common[..], &["--format", "pretty"]].concat());
    append_thinking(&agent, &run, 10, 2, 0).await; // 14, 15
    let pretty = tail.lines(2);
    assert!(pretty[0].starts_with("#14 "), "{pretty:?}");
    assert!(pretty[1].starts_with("#15 "), "{pretty:?}");
    assert!(pretty[0].contains("agent_thinking") && pretty[0].contains(r#"{"i":10"#));
}

#[test]
fn tail_without_a_token_or_sub_says_what_to_give() {
    let out = Command::new(binary())
        .args(["tail", "--url", "http://127.0.0.1:1"])
        .env_remove("THREADLINE_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run tail");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--token") && stderr.contains("--sub"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
