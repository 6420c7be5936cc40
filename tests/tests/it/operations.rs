//! Running Threadline like infrastructure, against the real binary: the
//! `--config` file and its precedence, `--print-config`, JSON log lines that
//! carry each request's id (echoed in `x-request-id`), and the online verify.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use threadline_tests::{binary, eventually, token, Options, TestServer, SECRET};

/// A finished `threadline` run.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with no `THREADLINE_*` variables but `env`.
fn tl(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("THREADLINE_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    let out = cmd.output().expect("running threadline");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The `key = value  # origin` line of `--print-config`'s output.
fn setting<'a>(printed: &'a str, key: &str) -> &'a str {
    printed
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{printed}"))
}

#[test]
fn config_file_precedence_is_flag_then_env_then_file_then_default() {
    let dir = tempfile::tempdir().unwrap();
    let file_secret = "file-secret-0123456789abcdef0123456789";
    let config = write(
        dir.path(),
        "threadline.toml",
        &format!(
            "# comments are fine\n\
             max-connections = 1000\n\
             rate-limit = 2\n\
             rate_burst = 3\n\
             run-ttl = \"2h\"\n\
             jwt-secret = \"{file_secret}\"\n"
        ),
    );
    let out = tl(
        &[
            "serve",
            "--config",
            &config,
            "--print-config",
            "--max-connections",
            "5",
        ],
        &[("THREADLINE_RATE_LIMIT", "7")],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let printed = &out.stdout;
    assert_eq!(
        setting(printed, "max-connections"),
        "max-connections = 5  # flag"
    );
    assert_eq!(
        setting(printed, "rate-limit"),
        "rate-limit = 7  # env THREADLINE_RATE_LIMIT"
    );
    assert_eq!(
        setting(printed, "rate-burst"),
        format!("rate-burst = 3  # file {config}")
    );
    assert_eq!(
        setting(printed, "run-ttl"),
        format!("run-ttl = \"2h\"  # file {config}")
    );
    assert_eq!(
        setting(printed, "idle-timeout"),
        "idle-timeout = \"60s\"  # default"
    );
    assert_eq!(
        setting(printed, "jwt-secret"),
        format!("jwt-secret = \"<redacted>\"  # file {config}")
    );
    assert!(printed.contains("# jwt-public-key is unset"), "{printed}");
    assert!(!printed.contains(file_secret), "{printed}");
    // Printing does not serve.
    assert!(!out.stderr.contains("listening"), "{out:?}");

    // A secret from the environment is redacted too, and the printed configuration is
    // itself a config file `--config` takes.
    let env_secret = "env-secret-0123456789abcdef0123456789ab";
    let out = tl(
        &["serve", "--config", &config, "--print-config"],
        &[("THREADLINE_JWT_SECRET", env_secret)],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        setting(&out.stdout, "jwt-secret"),
        "jwt-secret = \"<redacted>\"  # env THREADLINE_JWT_SECRET"
    );
    assert!(!out.stdout.contains(env_secret), "{out:?}");
    let again = write(dir.path(), "printed.toml", &out.stdout);
    let out = tl(&["serve", "--config", &again, "--print-config"], &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        setting(&out.stdout, "max-connections"),
        format!("max-connections = 1000  # file {again}")
    );

    // Without a file, every value is a flag, an env var or a default.
    let out = tl(&["serve", "--print-config"], &[]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        setting(&out.stdout, "max-connections"),
        "max-connections = 16384  # default"
    );
}

#[test]
fn config_file_unknown_key_and_bad_value_name_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "listen = \"127.0.0.1:0\"\n\nmax-conections = 5\n",
            &["line 3", "unknown key `max-conections`"][..],
        ),
        (
            "rate-limit = 5\njwt-leeway = \"61s\"\n",
            &["line 2", "`jwt-leeway`", "at most 60s"][..],
        ),
        (
            "max_connections = \"many\"\n",
            &["line 1", "`max_connections`", "'many'"][..],
        ),
        (
            "max-connections = 5\nmax_connections = 6\n",
            &["sets the same option as"][..],
        ),
        ("config = \"other.toml\"\n", &["unknown key `config`"][..]),
        (
            "\nrate-limit = [1, 2]\n",
            &["line 2", "`rate-limit`", "a string, a number or a boolean"][..],
        ),
        (
            "[limits]\nrate-limit = 5\n",
            &["line 1", "unknown key `limits`"][..],
        ),
        ("rate-limit = \n", &["TOML parse error", "line 1"][..]),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let config = write(dir.path(), &format!("bad{i}.toml"), text);
        let out = tl(&["serve", "--config", &config, "--print-config"], &[]);
        assert_eq!(out.code, Some(2), "{text}: {out:?}");
        assert!(out.stdout.is_empty(), "{text}: {out:?}");
        assert!(!out.stderr.contains("panicked"), "{out:?}");
        assert!(out.stderr.contains(&config), "{text}: {out:?}");
        for e in *expected {
            assert!(out.stderr.contains(e), "{text}: expected {e:?} in {out:?}");
        }
    }
    // A missing file is named.
    let out = tl(
        &[
            "serve",
            "--config",
            "/nonexistent/threadline.toml",
            "--print-config",
        ],
        &[],
    );
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("/nonexistent/threadline.toml"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_file_only_option_takes_effect() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "threadline.toml",
        &format!("jwt-secret = \"{SECRET}\"\njwt_issuer = \"https://idp.example\"\n"),
    );
    // No key on the command line or in the environment: only the file's.
    let server = TestServer::spawn_with(Options {
        keys: Some(Vec::new()),
        args: vec!["--config".into(), config],
        ..Options::default()
    });
    let with_iss = threadline_tests::sign(&json!({
        "sub": "alice", "role": "user", "iss": "https://idp.example",
        "exp": threadline_tests::now_secs() + 300,
    }));
    assert_eq!(server.api(&with_iss).get("/v1/threads").await.status, 200);
    // The file's issuer is required, and the generated secret was never made.
    assert_eq!(
        server
            .api(&token("alice", "user"))
            .get("/v1/threads")
            .await
            .status,
        401
    );
    assert!(!server.data_dir().join("jwt.secret").exists());
}

/// The server's stderr so far, each line parsed: with JSON logs every line is one
/// JSON object.
fn json_lines(server: &TestServer) -> Vec<Value> {
    let lines = server.log.lock().unwrap().clone();
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The log line with `message` inside a span whose `request_id` is `id`.
fn line_with_id(lines: &[Value], message: &str, id: &str) -> Option<Value> {
    lines
        .iter()
        .find(|l| {
            l["message"] == message
                && l["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["request_id"] == id))
        })
        .cloned()
}

#[tokio::test]
async fn json_logs_carry_each_requests_id_and_the_header_echoes_it() {
    let server = TestServer::spawn_with(Options {
        args: vec!["--log-format".into(), "json".into()],
        // The per-request line ("handled") is at debug.
        env: vec![("THREADLINE_LOG".into(), "info,threadline_api=debug".into())],
        ..Options::default()
    });
    let alice = server.api(&token("alice", "user"));

    // A sane id is kept and echoed.
    let reply = threadline_tests::Api::send_built(
        alice
            .builder(reqwest::Method::GET, "/v1/threads")
            .header("x-request-id", "req-42.a:b"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-request-id"], "req-42.a:b");

    // None, or one too long or with odd characters: a fresh one, echoed.
    let mut generated = Vec::new();
    for sent in [None, Some("x".repeat(129)), Some("a b\"c".to_owned())] {
        let mut r = alice.builder(reqwest::Method::GET, "/v1/nope");
        if let Some(id) = &sent {
            r = r.header("x-request-id", id.as_str());
        }
        let reply = threadline_tests::Api::send_built(r).await;
        assert_eq!(reply.status, 404);
        let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 36, "{id}");
        assert_ne!(Some(&id), sent.as_ref());
        generated.push(id);
    }
    generated.dedup();
    assert_eq!(generated.len(), 3, "{generated:?}");

    // A socket's upgrade answer carries its id, and its log lines too.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = server.ws_url("/v1/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("x-request-id", "sock-7".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "sock-7");
    // Without a token the server closes it, logging that in the socket's span.
    use futures_util::StreamExt;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {}

    let handled = eventually("the request's JSON log line", || async {
        line_with_id(&json_lines(&server), "handled", "req-42.a:b")
    })
    .await;
    assert_eq!(handled["level"], "DEBUG");
    assert_eq!(handled["target"], "threadline_api::http");
    assert_eq!(handled["status"], 200);
    assert!(
        handled["timestamp"].as_str().is_some_and(|t| t.len() > 18),
        "{handled}"
    );
    let span = &handled["spans"][0];
    assert_eq!(span["name"], "request");
    assert_eq!(span["method"], "GET");
    assert_eq!(span["path"], "/v1/threads");
    assert_eq!(span["user_id"], "alice");
    for id in &generated {
        eventually("a generated id in a log line", || async {
            line_with_id(&json_lines(&server), "handled", id)
        })
        .await;
    }
    let closing = eventually("the socket's JSON log line", || async {
        line_with_id(&json_lines(&server), "closing socket", "sock-7")
    })
    .await;
    assert_eq!(closing["error"], "unauthorized", "{closing}");
    assert_eq!(closing["reason"], "missing bearer token", "{closing}");
    // Every line on stderr is one JSON object, and no event field shadows the message.
    let lines = json_lines(&server);
    let raw = server.log.lock().unwrap().clone();
    assert!(
        raw.iter().all(|l| l.matches("\"message\":").count() <= 1),
        "{raw:?}"
    );
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["target"].is_string()));
    let listening = lines
        .iter()
        .find(|l| l["message"] == "threadline listening")
        .expect("the listening line");
    assert_eq!(listening["addr"], server.addr.to_string());
}

#[tokio::test]
async fn online_verify_passes_while_writes_continue() {
    let server = TestServer::spawn_process();
    let agent = server.api(&token("bot", "agent"));
    let auditor = server.api(&token("carol", "auditor"));
    let thread = agent.create_thread(json!({"user_id": "alice"})).await;
    let run = agent.register_run(&thread).await;
    assert_eq!(
        agent.event(&run, "agent_started", json!({})).await.status,
        201
    );
    for i in 0..300 {
        let r = agent
            .event(&run, "agent_thinking", json!({"text": format!("t{i}")}))
            .await;
        assert_eq!(r.status, 201);
    }

    // Nobody but an auditor may run it or read its result.
    for who in [token("bot", "agent"), token("alice", "user")] {
        let api = server.api(&who);
        api.post("/v1/admin/verify", &json!({}))
            .await
            .assert_error(403, "forbidden");
        api.get("/v1/admin/verify")
            .await
            .assert_error(403, "forbidden");
    }
    let idle = auditor.get("/v1/admin/verify").await;
    assert_eq!((idle.status, &idle.body["state"]), (200, &json!("idle")));

    // Writes go on while it runs.
    let writing = tokio::spawn({
        let agent = agent.clone();
        let run = run.clone();
        async move {
            let mut n = 0u64;
            loop {
                let r = agent.event(&run, "agent_thinking", json!({"n": n})).await;
                assert_eq!(r.status, 201, "{:?}", r.body);
                n += 1;
            }
        }
    });
    eventually("writes under way", || async {
        let ready = server.anonymous().get("/readyz").await;
        (ready.body["head"].as_u64() > Some(310)).then_some(())
    })
    .await;
    let started = auditor.post("/v1/admin/verify", &json!({})).await;
    assert_eq!(started.status, 202, "{:?}", started.body);
    let id = started.body["id"].as_str().unwrap().to_owned();
    assert_eq!(started.body["requested_by"], "carol");
    // A second request while it runs gets that job's status; once it is done, a new job.
    let second = auditor.post("/v1/admin/verify", &json!({})).await;
    match second.status {
        200 => assert_eq!(second.body["id"], id.as_str()),
        202 => assert_ne!(second.body["id"], id.as_str()),
        other => panic!("second verify answered {other}: {:?}", second.body),
    }
    let done = eventually("the verify result", || async {
        let s = auditor.get("/v1/admin/verify").await;
        assert_eq!(s.status, 200);
        (s.body["state"] != "running").then_some(s.body)
    })
    .await;
    assert_eq!(done["state"], "passed", "{done}");
    assert_eq!(done["problems"], json!([]), "{done}");
    let at = done["digest_position"].as_u64().unwrap();
    assert!(at > 300, "{done}");
    assert!(done["checked"].as_u64() >= Some(at), "{done}");
    assert!(done["finished_at_ms"].as_u64() >= done["started_at_ms"].as_u64());
    // The log moved on past the position it compared while it ran.
    eventually("writes past the digest position", || async {
        let ready = server.anonymous().get("/readyz").await;
        (ready.body["head"].as_u64() > Some(at + 20)).then_some(())
    })
    .await;
    writing.abort();

    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "threadline_verify_running 0",
        "threadline_verify_problems 0",
        &format!("threadline_verify_checked_position {}", done["checked"]),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("threadline_verify_runs_total{result=\"passed\"}")),
        "{metrics}"
    );

    // The offline tool, refused the held data dir, points here.
    let out = tl(
        &["verify", "--data", server.data_dir().to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("in use by a running server"), "{out:?}");
    assert!(out.stderr.contains("/v1/admin/verify"), "{out:?}");
}

/// A log whose reads from position 1 (only the verify's, once the server is up) can
/// be held, and can come back with one record's stream version changed.
type Gated = threadline_storage::Intercepted<threadline_storage::MemoryLog, Gate>;

#[derive(Debug, Default)]
struct Gate {
    hold: std::sync::atomic::AtomicBool,
    tamper: std::sync::atomic::AtomicBool,
}

impl threadline_storage::Intercept<threadline_storage::MemoryLog> for Gate {
    fn read_from(
        &self,
        inner: &threadline_storage::MemoryLog,
        from: threadline_storage::Position,
        limit: usize,
    ) -> Result<Vec<threadline_storage::Record>, threadline_storage::StorageError> {
        use std::sync::atomic::Ordering;
        use threadline_storage::{EventLog, Position};
        if from == Position(1) {
            let deadline = std::time::Instant::now() + threadline_tests::DEADLINE;
            while self.hold.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let mut page = inner.read_from(from, limit)?;
        if from == Position(1) && self.tamper.load(Ordering::Acquire) {
            if let Some(r) = page.get_mut(1) {
                r.stream_version += 5;
            }
        }
        Ok(page)
    }
}

#[tokio::test]
async fn one_verify_runs_at_a_time_and_a_failure_is_reported() {
    use std::sync::atomic::Ordering;
    let log = std::sync::Arc::new(Gated::default());
    let server = TestServer::spawn_on(log.clone());
    let agent = server.api(&token("bot", "agent"));
    let auditor = server.api(&token("carol", "auditor"));
    let (_, run) = threadline_tests::started_run(&agent, "alice").await;
    for i in 0..20 {
        assert_eq!(
            agent
                .event(&run, "agent_thinking", json!({"i": i}))
                .await
                .status,
            201
        );
    }

    let head = server.anonymous().get("/readyz").await.body["head"].clone();
    log.hooks.hold.store(true, Ordering::Release);
    log.hooks.tamper.store(true, Ordering::Release);
    let first = auditor.post("/v1/admin/verify", &json!({})).await;
    assert_eq!(first.status, 202, "{:?}", first.body);
    assert_eq!(first.body["state"], "running");
    // While it runs (held on its first read), a second request starts nothing.
    let second = auditor.post("/v1/admin/verify", &json!({})).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.body["id"], first.body["id"]);
    assert_eq!(second.body["state"], "running");
    let status = auditor.get("/v1/admin/verify").await;
    assert_eq!(status.body["id"], first.body["id"]);
    assert_eq!(status.body["state"], "running");
    eventually("the digest position fixed", || async {
        let s = auditor.get("/v1/admin/verify").await;
        assert_eq!(s.body["state"], "running");
        (s.body["digest_position"] == head).then_some(())
    })
    .await;

    log.hooks.hold.store(false, Ordering::Release);
    let done = eventually("the verify result", || async {
        let s = auditor.get("/v1/admin/verify").await;
        (s.body["state"] != "running").then_some(s.body)
    })
    .await;
    assert_eq!(done["id"], first.body["id"]);
    assert_eq!(done["state"], "failed", "{done}");
    let problems: Vec<&str> = done["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("at position 2, expected")),
        "{problems:?}"
    );

    // The next job is a new one, and with the log intact it passes.
    log.hooks.tamper.store(false, Ordering::Release);
    let again = auditor.post("/v1/admin/verify", &json!({})).await;
    assert_eq!(again.status, 202);
    assert_ne!(again.body["id"], first.body["id"]);
    let done = eventually("the second verify result", || async {
        let s = auditor.get("/v1/admin/verify").await;
        (s.body["state"] != "running").then_some(s.body)
    })
    .await;
    assert_eq!(done["state"], "passed", "{done}");
}
