//! The processes under test: `threadline serve` (release build) and
//! `redis-server`, both on loopback over a temp dir, stopped on drop. Their pids
//! are also kept in [`CHILDREN`] so the watchdog can end them before exiting.

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
    pub fn start(bin: &Path, data: &Path, secret: &str) -> Result<Threadline> {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--jwt-secret", secret])
            // Per-user socket cap above what any scenario opens per user.
            .args(["--max-connections-per-user", "64"])
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
            Err(_) => {
                let _ = child.kill();
                bail!("threadline did not start within 60 s");
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
