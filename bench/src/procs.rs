//! The processes under test: `threadline serve` (release build, over sled or as a
//! gateway over JetStream), `redis-server` and a 3-node `nats-server` cluster, all on
//! loopback over temp dirs, stopped on drop. Their pids are also kept in
//! [`CHILDREN`] so the watchdog can end them before exiting.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Pids of every child still running (for the watchdog).
pub static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn track(pid: u32) {
    CHILDREN.lock().unwrap().push(pid);
}

fn untrack(pid: u32) {
    CHILDREN.lock().unwrap().retain(|p| *p != pid);
}

/// Ends every tracked child (SIGKILL); used only when the watchdog fires.
pub fn kill_all_children() {
    for pid in CHILDREN.lock().unwrap().drain(..) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Resident memory of `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// `(allocated, apparent)` bytes of every file under `dir`.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return total;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            let (a, b) = disk_usage(&e.path());
            total.0 += a;
            total.1 += b;
        } else {
            total.0 += meta.blocks() * 512;
            total.1 += meta.len();
        }
    }
    total
}

fn terminate(child: &mut Child, within: Duration) -> Result<()> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            untrack(child.id());
            if !status.success() {
                eprintln!("note: pid {} exited with {status}", child.id());
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            untrack(child.id());
            bail!(
                "pid {} did not stop on SIGTERM within {within:?}",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `threadline serve`.
#[derive(Debug)]
pub struct Threadline {
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Threadline {
    /// `threadline serve` over its own sled log in `data`.
    pub fn start(bin: &Path, data: &Path, secret: &str) -> Result<Threadline> {
        Threadline::start_with(bin, data, secret, &[])
    }

    /// `threadline serve` with `extra` arguments (e.g. `--log nats://…`): a gateway.
    pub fn start_with(
        bin: &Path,
        data: &Path,
        secret: &str,
        extra: &[String],
    ) -> Result<Threadline> {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--jwt-secret", secret])
            // Per-user socket cap above what any scenario opens per user.
            .args(["--max-connections-per-user", "64"])
            .args(extra)
            // The log is what the arguments say, whatever the caller's environment holds.
            .env_remove("THREADLINE_EVENT_LOG")
            .env_remove("THREADLINE_NATS_STREAM")
            .env_remove("THREADLINE_NATS_SUBJECT_PREFIX")
            .env("THREADLINE_LOG", "warn,threadline_api::server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        track(child.id());
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("threadline listening on http://").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                } else if !line.contains(" INFO ") {
                    eprintln!("[threadline] {line}");
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().context("listen address")?,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                untrack(child.id());
                match e {
                    std::sync::mpsc::RecvTimeoutError::Timeout => {
                        bail!("threadline did not start within 60 s")
                    }
                    std::sync::mpsc::RecvTimeoutError::Disconnected => {
                        bail!("threadline exited before it listened (its stderr is above)")
                    }
                }
            }
        };
        eprintln!("threadline serve: pid {} on {addr}", child.id());
        Ok(Threadline {
            addr,
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGTERM and wait: the server closes sockets and flushes the log last.
    pub fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut c) => terminate(&mut c, Duration::from_secs(60)),
            None => Ok(()),
        }
    }
}

impl Drop for Threadline {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c, Duration::from_secs(30));
        }
    }
}

/// A running `redis-server` with the same durability as Threadline: AOF on,
/// `appendfsync always` (a reply means the write is fsynced), no RDB snapshots.
#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub fn start(bin: &Path, dir: &Path, max_clients: usize) -> Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut redis = Redis {
            port,
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            child: None,
        };
        redis.spawn(max_clients)?;
        Ok(redis)
    }

    fn spawn(&mut self, max_clients: usize) -> Result<()> {
        let child = Command::new(&self.bin)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--maxclients", &max_clients.to_string()])
            .args(["--daemonize", "no", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        track(child.id());
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits until the server answers PING with PONG (not `-LOADING`); returns the wait.
    pub async fn ready(&self, within: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            if let Ok(mut c) = crate::resp::Conn::connect(self.port).await {
                if let Ok(crate::resp::Reply::Simple(s)) = c.call(&[b"PING"]).await {
                    if s == "PONG" {
                        return Ok(started.elapsed());
                    }
                }
            }
            if started.elapsed() > within {
                bail!("redis-server not ready within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut c) => terminate(&mut c, Duration::from_secs(60)),
            None => Ok(()),
        }
    }

    /// Stops and starts again on the same dir (the AOF is replayed on start).
    pub fn restart(&mut self, max_clients: usize) -> Result<()> {
        self.stop()?;
        self.spawn(max_clients)
    }

    /// `redis-server --version`.
    pub fn version(bin: &Path) -> String {
        Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout).to_string();
                s.split_whitespace()
                    .find_map(|w| w.strip_prefix("v="))
                    .unwrap_or("?")
                    .to_owned()
            })
            .unwrap_or_else(|_| "?".into())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c, Duration::from_secs(30));
        }
    }
}

/// The `nats-server` binary: `given`, else `$NATS_SERVER_BIN`, else `nats-server` on `PATH`.
pub fn nats_server_binary(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = given {
        return path.is_file().then(|| path.to_owned());
    }
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

/// A 3-node JetStream cluster of `nats-server` processes on 127.0.0.1, each node
/// fsyncing before it acknowledges (`jetstream.sync_interval: always`): the
/// configuration of `scripts/nats-cluster.sh` and `storage-nats/src/cluster.rs`.
/// Every node is stopped on drop (and by the watchdog, through [`CHILDREN`]).
#[derive(Debug)]
pub struct NatsCluster {
    clients: Vec<u16>,
    https: Vec<u16>,
    children: Vec<Child>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One node's configuration: the same code and template as the tests' cluster.
#[path = "../../storage-nats/src/cluster/node_config.rs"]
mod nats_node_config;
use nats_node_config::{http_get, node_config as nats_node_config};

/// Whether the node on monitoring `port` is healthy (JetStream current) and knows a
/// JetStream meta leader (`/jsz`): streams can be created.
fn nats_ready(port: u16) -> bool {
    if http_get(port, "/healthz").is_none_or(|(status, _)| status != 200) {
        return false;
    }
    let Some((200, body)) = http_get(port, "/jsz") else {
        return false;
    };
    let Ok(jsz) = serde_json::from_str::<serde_json::Value>(&body) else {
        return false;
    };
    jsz["meta_cluster"]["leader"]
        .as_str()
        .is_some_and(|l| !l.is_empty())
}

impl NatsCluster {
    /// Starts three nodes with configs, logs and stores under `dir` and waits until
    /// each answers `/healthz` with 200 (JetStream current).
    pub fn start(bin: &Path, dir: &Path) -> Result<NatsCluster> {
        std::fs::create_dir_all(dir)?;
        let ports = (0..9).map(|_| free_port()).collect::<Result<Vec<u16>>>()?;
        let (clients, routes, https) = (&ports[0..3], &ports[3..6], &ports[6..9]);
        let mut cluster = NatsCluster {
            clients: clients.to_vec(),
            https: https.to_vec(),
            children: Vec::new(),
        };
        for i in 0..3 {
            let name = format!("n{}", i + 1);
            let store = dir.join(&name);
            std::fs::create_dir_all(&store)?;
            let config = dir.join(format!("{name}.conf"));
            std::fs::write(
                &config,
                nats_node_config(&name, clients[i], routes[i], https[i], routes, &store),
            )?;
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let child = Command::new(bin)
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawning {}", bin.display()))?;
            track(child.id());
            cluster.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (i, port) in cluster.https.iter().enumerate() {
            while !nats_ready(*port) {
                if Instant::now() > deadline {
                    bail!(
                        "nats-server n{} not healthy with a JetStream meta leader within 60 s; see {}",
                        i + 1,
                        dir.join(format!("n{}.log", i + 1)).display()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        eprintln!(
            "nats-server cluster: pids {:?} on {}",
            cluster.children.iter().map(Child::id).collect::<Vec<_>>(),
            cluster.urls()
        );
        Ok(cluster)
    }

    /// Every node's client URL, comma-separated (what `threadline serve --log` takes).
    pub fn urls(&self) -> String {
        self.clients
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `nats-server --version` (e.g. `v2.15.1`).
    pub fn version(bin: &Path) -> String {
        Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout).to_string();
                s.split_whitespace().last().unwrap_or("?").to_owned()
            })
            .unwrap_or_else(|_| "?".into())
    }

    /// SIGTERM to every node, then waits for each.
    pub fn stop(&mut self) -> Result<()> {
        let mut result = Ok(());
        for mut c in self.children.drain(..) {
            if let Err(e) = terminate(&mut c, Duration::from_secs(30)) {
                result = Err(e);
            }
        }
        result
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
