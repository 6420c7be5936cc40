//! The end-to-end harness: [`TestServer`] runs the server on an ephemeral
//! loopback port, either in this process over a `MemoryLog` (`spawn`: fast,
//! for the many tests of the contract) or as the real `threadline` binary over
//! a real sled data dir (`spawn_process`: for restarts, kills, the tools and
//! anything the process owns); [`Api`] and [`Socket`] are real HTTP and
//! WebSocket clients carrying real JWTs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The HS256 secret every test server is started with.
pub const SECRET: &str = "threadline-test-secret-0123456789abcdef";

/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The `threadline` binary: `THREADLINE_BIN`, or this workspace's build of it,
/// brought up to date once per test run (a no-op under `cargo test --workspace`,
/// which built it; it keeps `cargo test -p threadline-tests` from testing a stale one).
pub fn binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Ok(p) = std::env::var("THREADLINE_BIN") {
        return p.into();
    }
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/it-<hash> → target/<profile>/threadline
            let exe = std::env::current_exe().expect("current exe");
            let dir = exe.parent().and_then(Path::parent).expect("target dir");
            let mut build = Command::new(env!("CARGO"));
            build.args(["build", "-q", "-p", "threadline-cli", "--bin", "threadline"]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status().expect("cargo build");
            assert!(status.success(), "building threadline failed");
            dir.join("threadline")
        })
        .clone()
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs `claims` with HS256 and [`SECRET`].
pub fn sign(claims: &Value) -> String {
    sign_with(claims, SECRET.as_bytes())
}

pub fn sign_with(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

/// A valid token for `sub` with `role`, valid for an hour.
pub fn token(sub: &str, role: &str) -> String {
    sign(&json!({"sub": sub, "role": role, "exp": now_secs() + 3600}))
}

/// Options for [`TestServer::start`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Extra `serve` arguments, e.g. `["--run-ttl", "1s"]`.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Key arguments replacing the default `--jwt-secret SECRET` (e.g. none, to
    /// configure the key through the environment).
    pub keys: Option<Vec<String>>,
    /// Shell commands run before the server is exec'd in the same process,
    /// e.g. `umask 022; ulimit -Sn 512`.
    pub sh: Option<String>,
    /// Serve `<temp dir>/<data_subdir>` (created by the server) instead of the temp dir itself.
    pub data_subdir: Option<String>,
}

impl Options {
    /// Options with these environment variables.
    pub fn env(vars: &[(&str, &str)]) -> Options {
        Options {
            env: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Options::default()
        }
    }
}

/// A running server: in this process, or a `threadline serve` process killed on drop.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub data: Arc<tempfile::TempDir>,
    data_dir: PathBuf,
    backend: Backend,
    pub log: Arc<Mutex<Vec<String>>>,
    options: Options,
}

#[derive(Debug)]
enum Backend {
    Process(Child),
    /// `serve` on this test's runtime; stopped on drop.
    InProcess {
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        served: Option<tokio::task::JoinHandle<Result<(), threadline_api::ServeError>>>,
    },
}

impl TestServer {
    /// Starts a server in this process, over a `MemoryLog`, with the defaults
    /// of `threadline serve` and the test secret. Needs a tokio runtime.
    pub fn spawn() -> TestServer {
        Self::spawn_on(Arc::new(threadline_storage::MemoryLog::new()))
    }

    /// Starts a server in this process over `log` (any log: a fault-injecting
    /// wrapper, a `SledLog` in a temp dir…). Needs a tokio runtime.
    pub fn spawn_on<L: threadline_api::Log>(log: Arc<L>) -> TestServer {
        Self::spawn_limited(log, threadline_api::config::LimitArgs::default())
    }

    /// Starts a server in this process over a `MemoryLog` with the edge limits `edge`.
    pub fn spawn_with_limits(edge: threadline_api::config::LimitArgs) -> TestServer {
        Self::spawn_limited(Arc::new(threadline_storage::MemoryLog::new()), edge)
    }

    fn spawn_limited<L: threadline_api::Log>(
        log: Arc<L>,
        edge: threadline_api::config::LimitArgs,
    ) -> TestServer {
        let projector = Arc::new(threadline_projections::Projector::open(log).expect("projector"));
        let auth = threadline_api::auth::Authenticator::hs256(SECRET.as_bytes(), None, None, 0);
        let state = threadline_api::AppState::new(
            projector,
            auth,
            threadline_engine::Limits::default(),
            edge,
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(threadline_api::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        let data = Arc::new(tempfile::tempdir().expect("tempdir"));
        TestServer {
            addr,
            data_dir: data.path().to_owned(),
            data,
            backend: Backend::InProcess {
                stop: Some(stop),
                served: Some(served),
            },
            log: Arc::default(),
            options: Options::default(),
        }
    }

    /// Shuts an in-process server down as a signal would (sockets closed, the
    /// log checkpointed and closed) and returns how `serve` ended.
    pub async fn shut_down(mut self) -> Result<(), threadline_api::ServeError> {
        let Backend::InProcess { stop, served } = &mut self.backend else {
            panic!("shut_down is for in-process servers; stop a process with stop()")
        };
        if let Some(stop) = stop.take() {
            let _ = stop.send(());
        }
        match served.take() {
            Some(served) => served.await.expect("serve task"),
            None => Ok(()),
        }
    }

    /// Starts the real binary on a fresh data dir.
    pub fn spawn_process() -> TestServer {
        Self::spawn_with(Options::default())
    }

    pub fn spawn_with(options: Options) -> TestServer {
        let data = Arc::new(tempfile::tempdir().expect("tempdir"));
        Self::start(data, options).expect("server start")
    }

    fn child(&mut self) -> &mut Child {
        match &mut self.backend {
            Backend::Process(child) => child,
            Backend::InProcess { .. } => {
                panic!("this test needs the real process: start it with TestServer::spawn_process")
            }
        }
    }

    /// Starts a server on `data`, waiting until it listens.
    pub fn start(data: Arc<tempfile::TempDir>, options: Options) -> Result<TestServer> {
        let mut cmd = match &options.sh {
            Some(sh) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{sh}; exec \"$0\" \"$@\""))
                    .arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let data_dir = match &options.data_subdir {
            Some(sub) => data.path().join(sub),
            None => data.path().to_owned(),
        };
        let default_keys = vec!["--jwt-secret".to_owned(), SECRET.to_owned()];
        cmd.arg("serve")
            .arg("--data")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(options.keys.as_ref().unwrap_or(&default_keys))
            .args(&options.args)
            .env("THREADLINE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawning threadline")?;
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("threadline listening on http://") {
                    let addr = addr
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(addr);
                } else if line.starts_with('{') {
                    // `--log-format json`: the address is in the listening line's fields.
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["message"] == "threadline listening" {
                            let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                        }
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(DEADLINE) {
            Ok(a) => a.parse().context("listen address")?,
            Err(_) => {
                let _ = child.kill();
                bail!("server did not start: {:?}", log.lock().unwrap());
            }
        };
        Ok(TestServer {
            addr,
            data,
            data_dir,
            backend: Backend::Process(child),
            log,
            options,
        })
    }

    /// The data dir the server was started on.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn pid(&self) -> u32 {
        match &self.backend {
            Backend::Process(child) => child.id(),
            Backend::InProcess { .. } => std::process::id(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    pub fn api(&self, token: &str) -> Api {
        Api {
            base: format!("http://{}", self.addr),
            token: Some(token.to_owned()),
            http: reqwest::Client::new(),
        }
    }

    pub fn anonymous(&self) -> Api {
        Api {
            base: format!("http://{}", self.addr),
            token: None,
            http: reqwest::Client::new(),
        }
    }

    /// Opens `/v1/ws?<query>` with the token in the `Authorization` header.
    pub async fn socket(&self, token: &str, query: &str) -> Result<Socket> {
        let mut req = self
            .ws_url(&format!("/v1/ws?{query}"))
            .into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        Socket::connect(req).await
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let child = self.child();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops this server and starts another on the same data dir.
    pub fn restart(mut self) -> TestServer {
        self.stop();
        TestServer::start(self.data.clone(), self.options.clone()).expect("restart")
    }

    /// Resident memory of the server process, in bytes (Linux `/proc`).
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }
}

/// Resident memory of process `pid`, in bytes (Linux `/proc`; 0 when unreadable).
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        match &mut self.backend {
            Backend::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Backend::InProcess { stop, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
            }
        }
    }
}

/// An HTTP client bound to one server and one token.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    pub token: Option<String>,
    pub http: reqwest::Client,
}

/// A response: status and JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    /// The `error.code` of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Api {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(r: reqwest::RequestBuilder) -> Reply {
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        Self::send(self.req(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        Self::send(self.req(reqwest::Method::POST, path).json(body)).await
    }

    pub async fn post_if_match(&self, path: &str, body: &Value, version: u64) -> Reply {
        Self::send(
            self.req(reqwest::Method::POST, path)
                .header("if-match", version.to_string())
                .json(body),
        )
        .await
    }

    /// Posts raw bytes (for malformed bodies).
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        Self::send(
            self.req(reqwest::Method::POST, path)
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    /// Creates a thread; panics unless 201. Returns the thread id.
    pub async fn create_thread(&self, body: Value) -> String {
        let r = self.post("/v1/threads", &body).await;
        assert_eq!(r.status, 201, "create thread: {:?}", r.body);
        r.body["thread_id"].as_str().unwrap().to_owned()
    }

    /// Registers a run; panics unless 201. Returns the run id.
    pub async fn register_run(&self, thread_id: &str) -> String {
        let r = self
            .post(
                &format!("/v1/threads/{thread_id}/runs"),
                &json!({"agent_name": "tester"}),
            )
            .await;
        assert_eq!(r.status, 201, "register run: {:?}", r.body);
        r.body["run_id"].as_str().unwrap().to_owned()
    }

    /// Appends an agent event; returns the reply.
    pub async fn event(&self, run_id: &str, kind: &str, data: Value) -> Reply {
        self.post(
            &format!("/v1/runs/{run_id}/events"),
            &json!({"type": kind, "data": data}),
        )
        .await
    }
}

/// A WebSocket client speaking the Threadline protocol.
#[derive(Debug)]
pub struct Socket {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub protocol: Option<String>,
}

/// What a socket yielded next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Frame(Value),
    /// The server closed with this code and reason.
    Closed(u16, String),
}

impl Socket {
    pub async fn connect(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Socket> {
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        let protocol = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Socket { ws, protocol })
    }

    /// The next JSON frame or the close, within [`DEADLINE`].
    pub async fn next(&mut self) -> Result<Next> {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .context("no frame before the deadline")?;
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(Next::Frame(serde_json::from_str(&t)?)),
                Some(Ok(Message::Close(frame))) => {
                    return Ok(match frame {
                        Some(f) => Next::Closed(f.code.into(), f.reason.to_string()),
                        None => Next::Closed(1005, String::new()),
                    })
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("socket error: {e}"),
                None => return Ok(Next::Closed(1006, String::new())),
            }
        }
    }

    /// The next JSON frame; fails on close.
    pub async fn frame(&mut self) -> Result<Value> {
        match self.next().await? {
            Next::Frame(v) => Ok(v),
            Next::Closed(code, reason) => bail!("closed with {code} {reason}"),
        }
    }

    /// Reads frames until one of type `kind`, returning the event frames seen before it and it.
    pub async fn until(&mut self, kind: &str) -> Result<(Vec<Value>, Value)> {
        let mut events = Vec::new();
        loop {
            let f = self.frame().await?;
            if f["type"] == kind {
                return Ok((events, f));
            }
            events.push(f);
        }
    }

    /// Reads `n` event frames (skipping nothing else but `caught_up`).
    pub async fn events(&mut self, n: usize) -> Result<Vec<Value>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let f = self.frame().await?;
            match f["type"].as_str() {
                Some("event") => out.push(f),
                Some("caught_up") => {}
                _ => bail!("unexpected frame {f}"),
            }
        }
        Ok(out)
    }

    /// Reads frames until the close and returns its code (and the error frame before it, if any).
    pub async fn closed(&mut self) -> Result<(u16, Option<Value>)> {
        let mut error = None;
        loop {
            match self.next().await? {
                Next::Frame(f) if f["type"] == "error" => error = Some(f),
                Next::Frame(_) => {}
                Next::Closed(code, _) => return Ok((code, error)),
            }
        }
    }

    pub async fn send(&mut self, value: Value) -> Result<()> {
        self.ws
            .send(Message::Text(value.to_string().into()))
            .await?;
        Ok(())
    }
}

/// Polls `f` until it returns `Some`, failing after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Has the agent behind `agent` create a thread for `user`, register a run on
/// it and start the run; returns `(thread_id, run_id)`. Three events of `user`.
pub async fn started_run(agent: &Api, user: &str) -> (String, String) {
    let thread = agent.create_thread(json!({"user_id": user})).await;
    let run = agent.register_run(&thread).await;
    let r = agent.event(&run, "agent_started", json!({})).await;
    assert_eq!(r.status, 201, "agent_started: {:?}", r.body);
    (thread, run)
}

/// Appends `n` (1..=1000) `agent_thinking` events to a started run in one
/// `POST /v1/events`, each `data` = `{"i": first + k, "pad": <pad bytes>}`;
/// panics unless 201. Returns the results (`user_seq`, `thread_version`, …).
pub async fn append_thinking(
    agent: &Api,
    run: &str,
    first: u64,
    n: usize,
    pad: usize,
) -> Vec<Value> {
    let filler = "x".repeat(pad);
    let events: Vec<Value> = (0..n as u64)
        .map(|k| json!({"run_id": run, "type": "agent_thinking", "data": {"i": first + k, "pad": filler}}))
        .collect();
    let r = agent.post("/v1/events", &json!({ "events": events })).await;
    assert_eq!(r.status, 201, "batch append: {:?}", r.body);
    let results = r.body["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), n, "batch results");
    results
}

/// The `user_seq` of a frame (panics when it has none).
pub fn seq(frame: &Value) -> u64 {
    frame["user_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("frame without user_seq: {frame}"))
}

impl Socket {
    /// Opens `url` offering `protocols` (comma-joined in `Sec-WebSocket-Protocol`)
    /// and sending `headers`; no token is added.
    pub async fn open(url: &str, protocols: &[&str], headers: &[(&str, &str)]) -> Result<Socket> {
        let mut req = url.into_client_request()?;
        if !protocols.is_empty() {
            req.headers_mut()
                .insert("sec-websocket-protocol", protocols.join(", ").parse()?);
        }
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())?,
                v.parse()?,
            );
        }
        Socket::connect(req).await
    }

    /// Reads the `welcome` frame (failing on anything else); returns it.
    pub async fn welcome(&mut self) -> Result<Value> {
        let f = self.frame().await?;
        if f["type"] != "welcome" {
            bail!("expected welcome, got {f}");
        }
        Ok(f)
    }
}

impl Reply {
    /// Asserts this is the contract's error `{"error":{"code","message"}}` with `status` and `code`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.code()),
            (status, code),
            "expected {status} {code}, got {} {}",
            self.status,
            self.body
        );
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {}",
            self.body
        );
        let json = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        assert!(json, "error is not served as JSON: {:?}", self.headers);
    }
}

impl Api {
    /// A request carrying this client's token, for calls the helpers do not cover.
    pub fn builder(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.req(method, path)
    }

    /// Sends a hand-built request; panics when the server cannot be reached.
    pub async fn send_built(r: reqwest::RequestBuilder) -> Reply {
        Self::send(r).await
    }

    /// Like [`Api::post`], but `None` when the request got no HTTP answer
    /// (e.g. the server is shutting down).
    pub async fn try_post(&self, path: &str, body: &Value) -> Option<Reply> {
        let resp = self
            .req(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .ok()?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.ok()?;
        Some(Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            headers,
        })
    }

    /// Every event frame of a thread, following `next_after_version`; panics unless 200.
    pub async fn thread_events(&self, thread_id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let r = self
                .get(&format!(
                    "/v1/threads/{thread_id}/events?after_version={after}&limit=1000"
                ))
                .await;
            assert_eq!(r.status, 200, "thread events: {}", r.body);
            let page = r.body["events"].as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                return out;
            }
            after = r.body["next_after_version"]
                .as_u64()
                .expect("next_after_version");
            out.extend(page);
        }
    }

    /// Every auditor envelope, following `next_after`; panics unless 200.
    pub async fn audit_events(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let r = self
                .get(&format!(
                    "/v1/audit/events?after={after}&limit=1000&{query}"
                ))
                .await;
            assert_eq!(r.status, 200, "audit events: {}", r.body);
            let page = r.body["events"].as_array().cloned().unwrap_or_default();
            let next = r.body["next_after"].as_u64().expect("next_after");
            out.extend(page);
            if next == after {
                return out;
            }
            after = next;
        }
    }
}

impl TestServer {
    /// Opens `/v1/ws?<query>` like [`TestServer::socket`], over a TCP socket whose
    /// receive buffer is as small as the kernel allows, so a client that stops
    /// reading backs up the server's writes quickly. Returns the socket and its local port.
    pub async fn socket_small_buffer(&self, token: &str, query: &str) -> Result<(Socket, u16)> {
        let tcp = tokio::net::TcpSocket::new_v4()?;
        tcp.set_recv_buffer_size(4096)?;
        let stream = tcp.connect(self.addr).await?;
        let port = stream.local_addr()?.port();
        let mut req = self
            .ws_url(&format!("/v1/ws?{query}"))
            .into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let (ws, resp) =
            tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)).await?;
        let protocol = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((Socket { ws, protocol }, port))
    }

    /// The kernel's TCP state of the server's end of the connection from
    /// local port `client_port` (Linux `/proc/net/tcp`; `None` once it is gone).
    pub fn server_side_tcp_state(&self, client_port: u16) -> Option<TcpState> {
        tcp_state(self.addr.port(), client_port)
    }
}

/// A TCP state from `/proc/net/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    /// Any other state (closing, time-wait, …): the process no longer holds it open.
    Other(u8),
}

/// The state of the socket whose local port is `local` and remote port `remote`.
pub fn tcp_state(local: u16, remote: u16) -> Option<TcpState> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || port(f[1])? != local || port(f[2])? != remote {
            return None;
        }
        match u8::from_str_radix(f[3], 16).ok()? {
            1 => Some(TcpState::Established),
            other => Some(TcpState::Other(other)),
        }
    })
}

/// A TCP proxy in front of a server that a test can cut, stall or point elsewhere:
/// the faults a client must survive, without touching the server.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    inner: Arc<ProxyInner>,
}

#[derive(Debug)]
struct ProxyInner {
    target: Mutex<SocketAddr>,
    mode: Mutex<ProxyMode>,
    /// Bumped by [`Proxy::cut`]: every connection opened before ends.
    generation: tokio::sync::watch::Sender<u64>,
    accepted: std::sync::atomic::AtomicU64,
    /// Connections numbered below this swallow everything (see [`Proxy::freeze`]).
    frozen_below: tokio::sync::watch::Sender<u64>,
}

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward both ways.
    Pass,
    /// Accept and close at once (as a server that is down would refuse).
    Refuse,
    /// Accept, forward nothing and close nothing: a connection gone silent.
    Stall,
}

impl Proxy {
    /// Listens on an ephemeral loopback port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let inner = Arc::new(ProxyInner {
            target: Mutex::new(target),
            mode: Mutex::new(ProxyMode::Pass),
            generation: tokio::sync::watch::Sender::new(0),
            accepted: std::sync::atomic::AtomicU64::new(0),
            frozen_below: tokio::sync::watch::Sender::new(0),
        });
        let shared = inner.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = shared
                    .accepted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let frozen = shared.frozen_below.subscribe();
                let mode = *shared.mode.lock().unwrap();
                let target = *shared.target.lock().unwrap();
                let mut cut = shared.generation.subscribe();
                tokio::spawn(async move {
                    match mode {
                        ProxyMode::Refuse => {}
                        ProxyMode::Stall => {
                            let _held = client;
                            let _ = cut.changed().await;
                        }
                        ProxyMode::Pass => {
                            let Ok(server) = TcpStream::connect(target).await else {
                                return;
                            };
                            let (client_r, client_w) = client.into_split();
                            let (server_r, server_w) = server.into_split();
                            tokio::select! {
                                _ = pump(client_r, server_w, number, frozen.clone()) => {}
                                _ = pump(server_r, client_w, number, frozen) => {}
                                _ = cut.changed() => {}
                            }
                        }
                    }
                });
            }
        });
        Proxy { addr, inner }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Ends every connection open now (both sides see the TCP connection drop).
    pub fn cut(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Every connection open now goes silent: what either side sends is swallowed and
    /// nothing is closed, as on a link that died without a word.
    pub fn freeze(&self) {
        let accepted = self.accepted();
        self.inner.frozen_below.send_modify(|f| *f = accepted);
    }

    /// How later connections are treated (open ones keep theirs until [`Proxy::cut`]).
    pub fn set_mode(&self, mode: ProxyMode) {
        *self.inner.mode.lock().unwrap() = mode;
    }

    /// Where later connections go (after a server restarted on another port).
    pub fn retarget(&self, target: SocketAddr) {
        *self.inner.target.lock().unwrap() = target;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.inner
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Copies one direction of a proxied connection until either side ends it; once the
/// connection is frozen, what arrives is read and dropped.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: u64,
    frozen: tokio::sync::watch::Receiver<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if number < *frozen.borrow() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// What a [`Relay`] does to the event frames of the first connection it relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Drops the n-th event frame (1-based).
    Drop(usize),
    /// Sends the n-th event frame twice.
    Repeat(usize),
    /// Swaps the n-th event frame with the one after it.
    Swap(usize),
}

/// A WebSocket relay in front of a server that tampers with the event frames of its
/// first connection, as a faulty intermediary would; later connections pass untouched.
#[derive(Debug, Clone)]
pub struct Relay {
    pub addr: SocketAddr,
}

impl Relay {
    pub async fn start(target: SocketAddr, tamper: Tamper) -> Relay {
        use tokio_tungstenite::tungstenite::handshake::server::{
            Request as ServerRequest, Response as ServerResponse,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((tcp, _)) = listener.accept().await {
                let tamper = std::mem::take(&mut first).then_some(tamper);
                tokio::spawn(async move {
                    let mut upstream_req = None;
                    // The handshake callback's error type is tungstenite's, not ours.
                    #[allow(clippy::result_large_err)]
                    let callback = |req: &ServerRequest, mut resp: ServerResponse| {
                        upstream_req = Some((
                            req.uri().to_string(),
                            req.headers().get("authorization").cloned(),
                        ));
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", "threadline.v1".parse().unwrap());
                        Ok(resp)
                    };
                    let Ok(mut downstream) =
                        tokio_tungstenite::accept_hdr_async(tcp, callback).await
                    else {
                        return;
                    };
                    let Some((path, auth)) = upstream_req else {
                        return;
                    };
                    let Ok(mut req) = format!("ws://{target}{path}").into_client_request() else {
                        return;
                    };
                    if let Some(auth) = auth {
                        req.headers_mut().insert("authorization", auth);
                    }
                    let Ok((mut upstream, _)) = tokio_tungstenite::connect_async(req).await else {
                        return;
                    };
                    let mut events = 0usize;
                    let mut held: Option<Message> = None;
                    loop {
                        tokio::select! {
                            m = upstream.next() => {
                                let Some(Ok(m)) = m else { break };
                                let is_event = m.to_text().is_ok_and(|t| t.starts_with("{\"type\":\"event\""));
                                if is_event {
                                    events += 1;
                                }
                                let mut out = vec![m.clone()];
                                match tamper {
                                    Some(Tamper::Drop(n)) if is_event && events == n => out.clear(),
                                    Some(Tamper::Repeat(n)) if is_event && events == n => out.push(m),
                                    Some(Tamper::Swap(n)) if is_event && events == n => {
                                        held = Some(m);
                                        out.clear();
                                    }
                                    Some(Tamper::Swap(n)) if is_event && events == n + 1 => {
                                        out.extend(held.take());
                                    }
                                    _ => {}
                                }
                                for m in out {
                                    if downstream.send(m).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            m = downstream.next() => {
                                let Some(Ok(m)) = m else { break };
                                if upstream.send(m).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Relay { addr }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl TestServer {
    /// A `threadline-client` on this server for `token` (client id `test`, quick
    /// reconnects), as `configure` adjusts it: how tests read the ordinary replay/live path.
    pub fn client(
        &self,
        token: &str,
        configure: impl FnOnce(threadline_client::Config) -> threadline_client::Config,
    ) -> threadline_client::Client {
        let config = threadline_client::Config::new(
            format!("ws://{}", self.addr),
            threadline_client::TokenSource::fixed(token),
        )
        .client_id("test")
        .backoff(threadline_client::Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            factor: 2.0,
        });
        threadline_client::Client::connect(configure(config))
    }
}

/// The next update of `client` within [`DEADLINE`]; an error update fails (the ordinary
/// path has none).
async fn next_update(client: &mut threadline_client::Client) -> Result<threadline_client::Update> {
    use threadline_client::Update;
    match tokio::time::timeout(DEADLINE, client.next()).await {
        Err(_) => bail!("no update before the deadline"),
        Ok(None) => bail!("the client stopped"),
        Ok(Some(Update::Error(e))) => bail!("client error: {e}"),
        Ok(Some(u)) => Ok(u),
    }
}

/// Reads `client` until `n` more events arrived; returns them (each in order, checked
/// by the client).
pub async fn client_events(
    client: &mut threadline_client::Client,
    n: usize,
) -> Result<Vec<threadline_client::Event>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        if let threadline_client::Update::Event(e) = next_update(client).await? {
            out.push(e);
        }
    }
    Ok(out)
}

/// Reads `client` until its next `caught_up`; returns the events before it and its `user_seq`.
pub async fn client_caught_up(
    client: &mut threadline_client::Client,
) -> Result<(Vec<threadline_client::Event>, u64)> {
    let mut out = Vec::new();
    loop {
        match next_update(client).await? {
            threadline_client::Update::Event(e) => out.push(e),
            threadline_client::Update::CaughtUp { user_seq } => return Ok((out, user_seq)),
            _ => {}
        }
    }
}
