//! [`NatsLog`]: the [`EventLog`] kept in one replicated NATS JetStream stream,
//! so that several stateless gateways can serve the same log.
//!
//! Mapping (see docs/scaling.md for the why):
//! - one stream (default `THREADLINE`, R3, file storage, `deny_delete`,
//!   `deny_purge`, `allow_atomic`); a record is one message whose payload is
//!   the checksummed record envelope, on the subject `tl.s.<escaped stream name>`;
//! - the global position is the stream sequence. Every publish carries
//!   `Nats-Expected-Last-Sequence` = the position before it, so the position
//!   written inside the checksummed record is the one the server assigns, and
//!   a gateway whose view is stale loses the publish (no sequence is consumed),
//!   catches up and plans again: per-stream expected versions and the event-id
//!   index are checked on an exact view of the log, not a racy one;
//! - a multi-event append is one JetStream atomic batch (all or none);
//!   concurrent appends to one gateway are grouped into one batch (group commit);
//! - `Nats-Msg-Id` = the event id (JetStream's duplicate window) backs up the
//!   gateway's own event-id index, which lives for the life of the log;
//! - each gateway follows the stream with an ordered consumer into a local
//!   index (head, stream versions, event ids, newest records) and keeps its
//!   projection checkpoints in a local directory ([`DirCheckpoints`]).

pub mod cluster;
mod index;

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;
use threadline_storage::plan::Planner;
use threadline_storage::{
    AppendResult, Appended, Checkpoints, DirCheckpoints, EventLog, NewEvent, PendingAppend,
    Position, Record, StorageError,
};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use index::Index;

/// The most records one publish (one atomic batch) carries; JetStream allows 1000.
const MAX_GROUP_RECORDS: usize = 500;
/// How long one append may keep being planned again after losing the
/// stream's head to another gateway (or an unknown outcome) before it is
/// answered an error. A time, not a count: a gateway that keeps losing to a
/// busy one must catch up (a round trip) while the winner publishes again
/// at once, so under contention a count runs out in milliseconds.
const APPEND_BUDGET: Duration = Duration::from_secs(30);
/// How long one publish waits for the stream leader's acknowledgement before
/// its outcome is taken as unknown (caught up on and planned again, which is
/// safe: every publish is conditioned on the head). Far above a healthy
/// quorum write; well below the request timeout, so that a publish caught by
/// a leader's death is retried soon after the election rather than after it.
const PUBLISH_ACK: Duration = Duration::from_secs(2);
/// How long the writer waits for its follower to reach the server's head.
const CATCH_UP: Duration = Duration::from_secs(30);
/// How long the follower's consumer may stay silent before the stream is asked whether it moved.
const FOLLOW_IDLE: Duration = Duration::from_secs(2);
/// Reads of records not in the cache in flight at once.
const READ_CONCURRENCY: usize = 32;
/// Consecutive records not in the cache from which one ordered consumer reads
/// them (a round trip to create it, then a flow of messages) instead of one
/// request each.
const RANGE_READ_MIN: usize = 64;
/// How long a range read's consumer may stay silent before the read fails.
const RANGE_READ_IDLE: Duration = Duration::from_secs(4);

/// How to reach the cluster and which stream to use.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Server URLs (`nats://host:port`, or `tls://`); any reachable one will do.
    pub servers: Vec<String>,
    /// The JetStream stream that holds the log.
    pub stream: String,
    /// Subjects are `<prefix>.s.<escaped stream name>`.
    pub subject_prefix: String,
    /// Replicas when the stream is created (3 = survives one node).
    pub replicas: usize,
    /// Create the stream when missing (false for read-only tools).
    pub create: bool,
    /// A `.creds` file (JWT + NKey seed).
    pub credentials: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// CA certificates (PEM) to verify the servers with; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Require TLS even without a CA file (system roots).
    pub tls_required: bool,
    /// How long a publish or a read may wait for the cluster.
    pub request_timeout: Duration,
    /// Where this gateway keeps its projection checkpoints.
    pub checkpoint_dir: PathBuf,
    /// Hold `checkpoint_dir` for this process (created when missing, locked so a
    /// second server or a rebuild on it is refused); false for read-only tools,
    /// which create nothing.
    pub hold_dir: bool,
    /// How many of the newest records this gateway keeps in memory for reads
    /// (older ones are read from the stream).
    pub cache_records: usize,
}

impl NatsOptions {
    /// Options for `servers` (comma-separated `nats://host:port` URLs) with the defaults.
    pub fn new(servers: &str, checkpoint_dir: PathBuf) -> NatsOptions {
        NatsOptions {
            servers: servers
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            stream: "THREADLINE".into(),
            subject_prefix: "tl".into(),
            replicas: 3,
            create: true,
            credentials: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            request_timeout: Duration::from_secs(10),
            checkpoint_dir,
            hold_dir: true,
            cache_records: index::CACHE_RECORDS,
        }
    }
}

/// The subject of a Threadline stream: bytes outside `[A-Za-z0-9_-]` are
/// escaped as `=XX`, so every name maps to one valid single-token subject.
pub fn subject_for(prefix: &str, stream: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 3 + stream.len());
    out.push_str(prefix);
    out.push_str(".s.");
    for b in stream.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// One caller's append, waiting in the writer's queue.
struct Job {
    events: Vec<NewEvent>,
    tx: oneshot::Sender<AppendResult>,
    attempts: u32,
    /// Ids published with an unknown outcome (a lost ack): found stored
    /// later, they were appended by this call, not before it.
    maybe_ours: HashSet<Uuid>,
    /// When the cluster first failed to answer this append's catch-up.
    failing_since: Option<tokio::time::Instant>,
    /// When the append was queued.
    queued: tokio::time::Instant,
}

#[derive(Debug)]
struct Shared {
    index: Mutex<Index>,
    head_tx: watch::Sender<Position>,
    closed: AtomicBool,
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        // Index mutations are all-or-nothing per record; poison carries no half state.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one stored message and publishes the new head.
    fn apply(&self, seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        let mut index = self.index();
        if index.apply(seq, bytes)? {
            self.head_tx.send_replace(Position(index.head));
        }
        Ok(())
    }
}

/// The [`EventLog`] over a JetStream stream, plus [`DirCheckpoints`] beside it.
pub struct NatsLog {
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    writer: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    writer_done: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stream: stream::Stream,
    checkpoints: DirCheckpoints,
    description: String,
    /// The lock on the checkpoint dir, released when the log is dropped.
    _held: Option<std::fs::File>,
}

impl std::fmt::Debug for NatsLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLog")
            .field("log", &self.description)
            .field("head", &self.head())
            .finish()
    }
}

/// What the writer and the tools need of the cluster.
#[derive(Clone)]
struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
}

/// Runs `fut` on `handle` and blocks this thread for its output; safe to call
/// from a thread that runs another runtime (it never nests `block_on`).
fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, StorageError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| StorageError::Closed)
}

/// Creates `dir` when missing and locks it for this process (an exclusive
/// advisory lock on `dir/lock`, released by the OS if the process dies).
fn hold(dir: &std::path::Path) -> Result<std::fs::File, StorageError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StorageError::Io(format!("{}: {e}", dir.display())))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::Io(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StorageError::Locked(dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StorageError::Io(format!("locking {}: {e}", path.display())))
        }
    }
}

fn io(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(format!("{what}: {e}"))
}

impl NatsLog {
    /// Connects, creates or checks the stream, and folds it up to the
    /// server's current head before returning.
    pub fn connect(options: NatsOptions) -> Result<NatsLog, StorageError> {
        if options.servers.is_empty() {
            return Err(StorageError::InvalidInput(
                "no NATS server URL given".into(),
            ));
        }
        let held = if options.hold_dir {
            Some(hold(&options.checkpoint_dir)?)
        } else {
            None
        };
        let checkpoints = DirCheckpoints::new(&options.checkpoint_dir);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("threadline-nats")
            .enable_all()
            .build()
            .map_err(|e| io("starting the NATS runtime", e))?;
        let handle = runtime.handle().clone();
        let description = format!("{} on {}", options.stream, options.servers.join(","));
        let cache_records = options.cache_records;
        let cluster = run_on(&handle, open_cluster(options))??;
        let shared = Arc::new(Shared {
            index: Mutex::new(Index::with_cache(cache_records)),
            head_tx: watch::Sender::new(Position::ZERO),
            closed: AtomicBool::new(false),
        });
        let last = run_on(&handle, first_last_sequence(cluster.stream.clone()))??;
        handle.spawn(follow(Arc::clone(&shared), cluster.stream.clone()));
        let following = Arc::clone(&shared);
        run_on(&handle, async move {
            let within = CATCH_UP + Duration::from_millis(last / 2);
            wait_for_head(&following, last, within).await
        })??;
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = cluster.stream.clone();
        let writer_done = handle.spawn(writer(Arc::clone(&shared), cluster, rx));
        tracing::info!(log = %description, head = last, "following the JetStream log");
        Ok(NatsLog {
            shared,
            runtime: Mutex::new(Some(runtime)),
            handle,
            writer: Mutex::new(Some(tx)),
            writer_done: Mutex::new(Some(writer_done)),
            stream,
            checkpoints,
            description,
            _held: held,
        })
    }

    /// `STREAM on URLS`, for logs and errors.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The records at `positions`, from the cache where it has them, else from the stream leader.
    fn read_positions(&self, positions: Vec<u64>) -> Result<Vec<Record>, StorageError> {
        let mut cached = Vec::with_capacity(positions.len());
        {
            let index = self.shared.index();
            for &p in &positions {
                cached.push(index.cached(p));
            }
        }
        let missing: Vec<u64> = positions
            .iter()
            .zip(&cached)
            .filter(|(_, c)| c.is_none())
            .map(|(p, _)| *p)
            .collect();
        let mut fetched = if missing.is_empty() {
            Vec::new()
        } else {
            let stream = self.stream.clone();
            run_on(&self.handle, async move {
                futures_util::stream::iter(runs(&missing).into_iter().map(|(from, count)| {
                    let stream = stream.clone();
                    async move { read_run(&stream, from, count).await }
                }))
                .buffered(READ_CONCURRENCY)
                .try_collect::<Vec<_>>()
                .await
            })??
            .into_iter()
            .flatten()
            .collect()
        }
        .into_iter();
        positions
            .into_iter()
            .zip(cached)
            .map(|(p, c)| match c {
                Some(bytes) => Record::decode(Position(p), &bytes),
                None => {
                    let bytes = fetched.next().ok_or(StorageError::Closed)?;
                    Record::decode(Position(p), &bytes)
                }
            })
            .collect()
    }

    fn stop(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        drop(self.writer.lock().unwrap_or_else(|p| p.into_inner()).take());
        let done = self
            .writer_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(done) = done {
            let _ = run_on(&self.handle, async move {
                let _ = tokio::time::timeout(CATCH_UP, done).await;
            });
        }
        if let Some(runtime) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            // Never blocks, so it is safe from inside another runtime.
            runtime.shutdown_background();
        }
    }
}

impl Drop for NatsLog {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn open_cluster(options: NatsOptions) -> Result<Cluster, StorageError> {
    let mut connect = async_nats::ConnectOptions::new()
        .name("threadline")
        .request_timeout(Some(options.request_timeout))
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect();
    if let Some(path) = &options.credentials {
        connect = connect
            .credentials_file(path)
            .await
            .map_err(|e| io(&format!("reading {}", path.display()), e))?;
    }
    if let (Some(user), Some(password)) = (&options.user, &options.password) {
        connect = connect.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &options.token {
        connect = connect.token(token.clone());
    }
    if let Some(ca) = &options.tls_ca {
        connect = connect.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&options.tls_cert, &options.tls_key) {
        connect = connect
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if options.tls_required {
        connect = connect.require_tls(true);
    }
    let client = tokio::time::timeout(
        options.request_timeout.max(Duration::from_secs(10)),
        connect.connect(options.servers.clone()),
    )
    .await
    .map_err(|_| io("connecting to NATS", "timed out"))?
    .map_err(|e| io("connecting to NATS", e))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(options.request_timeout);
    // A cluster that has just started may have no JetStream leader yet: its
    // requests time out or find no responder for a while. Wait for it.
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    let stream = loop {
        match open_stream(&js, &options).await {
            Ok(stream) => break stream,
            Err(Opening::Transient(e)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "JetStream not ready; asking again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(Opening::Transient(e) | Opening::Failed(e)) => {
                if client.connection_state() != async_nats::connection::State::Connected {
                    return Err(io(
                        "connecting to NATS",
                        format!(
                            "no server answered at {} (is the cluster running, and are the URLs right?)",
                            options.servers.join(",")
                        ),
                    ));
                }
                return Err(e);
            }
        }
    };
    Ok(Cluster {
        client,
        js,
        stream,
        prefix: options.subject_prefix,
    })
}

/// Why the stream could not be opened.
enum Opening {
    /// JetStream did not answer (no leader yet): worth asking again.
    Transient(StorageError),
    Failed(StorageError),
}

/// Opens the log's stream, creating it when missing (and allowed).
async fn open_stream(
    js: &jetstream::Context,
    options: &NatsOptions,
) -> Result<stream::Stream, Opening> {
    let subjects = format!("{}.s.>", options.subject_prefix);
    let stream = match js.get_stream(&options.stream).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| Opening::Transient(io("reading the stream's configuration", e)))?;
            let c = &info.config;
            if !(c.deny_delete
                && c.deny_purge
                && c.allow_atomic_publish
                && c.subjects.contains(&subjects))
            {
                return Err(Opening::Failed(StorageError::InvalidInput(format!(
                    "stream {} exists but is not a Threadline log: it needs subjects [{subjects}], \
                     deny_delete, deny_purge and allow_atomic",
                    options.stream
                ))));
            }
            stream
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            if !options.create {
                return Err(Opening::Failed(StorageError::NotFound(format!(
                    "stream {} on {}",
                    options.stream,
                    options.servers.join(",")
                ))));
            }
            js.create_stream(stream::Config {
                name: options.stream.clone(),
                description: Some("Threadline event log".into()),
                subjects: vec![subjects],
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                retention: stream::RetentionPolicy::Limits,
                discard: stream::DiscardPolicy::New,
                deny_delete: true,
                deny_purge: true,
                allow_direct: false,
                allow_atomic_publish: true,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                let failed = io(
                    &format!("creating stream {}", options.stream),
                    e.to_string(),
                );
                match e.kind() {
                    jetstream::context::CreateStreamErrorKind::TimedOut
                    | jetstream::context::CreateStreamErrorKind::JetStreamUnavailable => {
                        Opening::Transient(failed)
                    }
                    jetstream::context::CreateStreamErrorKind::JetStream(j)
                        if not_ready(j.error_code()) =>
                    {
                        Opening::Transient(failed)
                    }
                    _ => Opening::Failed(failed),
                }
            })?
        }
        Err(e) => {
            let failed = io(&format!("opening stream {}", options.stream), e.to_string());
            return Err(match e.kind() {
                jetstream::context::GetStreamErrorKind::Request => Opening::Transient(failed),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if not_ready(j.error_code()) =>
                {
                    Opening::Transient(failed)
                }
                _ => Opening::Failed(failed),
            });
        }
    };
    Ok(stream)
}

/// JetStream errors of a cluster still forming (no meta leader, not assigned
/// yet, or a peer the meta leader has not yet heard from: "no suitable peers
/// for placement", seen on a cluster a second old; a cluster too small for the
/// replicas asked keeps answering it, and the open fails with it at the deadline).
fn not_ready(code: jetstream::ErrorCode) -> bool {
    [
        jetstream::ErrorCode::CLUSTER_NO_PEERS,
        jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE,
        jetstream::ErrorCode::CLUSTER_NOT_ASSIGNED,
        jetstream::ErrorCode::CLUSTER_NOT_LEADER,
        jetstream::ErrorCode::CLUSTER_NOT_ACTIVE,
    ]
    .contains(&code)
}

/// The stream's last sequence, as its leader knows it (dense: the first must be 1).
async fn last_sequence(stream: stream::Stream) -> Result<u64, StorageError> {
    let info = stream
        .get_info()
        .await
        .map_err(|e| io("reading the stream's state", e))?;
    let state = &info.state;
    if state.messages > 0 && (state.first_sequence != 1 || state.messages != state.last_sequence) {
        return Err(StorageError::Corrupt {
            position: Position(state.first_sequence),
            reason: format!(
                "the stream holds {} messages between sequences {} and {}: positions must be gap-free from 1",
                state.messages, state.first_sequence, state.last_sequence
            ),
        });
    }
    Ok(state.last_sequence)
}

/// [`last_sequence`] at open: a stream created a moment ago may have no leader
/// answering yet, so a failed request is asked again until [`CATCH_UP`] has
/// passed (a stream that is not dense fails at once).
async fn first_last_sequence(stream: stream::Stream) -> Result<u64, StorageError> {
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        match last_sequence(stream.clone()).await {
            Err(StorageError::Io(e)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "the stream's leader did not answer; asking again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            answered => return answered,
        }
    }
}

async fn wait_for_head(shared: &Shared, target: u64, within: Duration) -> Result<(), StorageError> {
    let mut rx = shared.head_tx.subscribe();
    let reached = tokio::time::timeout(within, async {
        loop {
            if let Some(reason) = &shared.index().broken {
                return Err(StorageError::Io(reason.clone()));
            }
            if rx.borrow_and_update().0 >= target {
                return Ok(());
            }
            // The follower stops on a broken stream without moving the head:
            // look again now and then rather than only on a change.
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
        }
    })
    .await;
    reached.unwrap_or_else(|_| {
        Err(StorageError::Io(format!(
            "the gateway did not reach position {target} of the JetStream log within {within:?}"
        )))
    })
}

/// Brings the index up to `target` by reading the missing records from the
/// stream leader (not waiting for the follower, whose consumer may be
/// re-creating itself after a node loss).
async fn catch_up(
    shared: &Shared,
    stream: &stream::Stream,
    target: u64,
) -> Result<(), StorageError> {
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return Err(StorageError::Closed);
        }
        let head = shared.index().head;
        if head >= target {
            return Ok(());
        }
        let end = target.min(head + READ_CONCURRENCY as u64 * 4);
        let read = futures_util::stream::iter((head + 1..=end).map(|seq| {
            let stream = stream.clone();
            async move {
                stream
                    .get_raw_message(seq)
                    .await
                    .map(|m| (seq, m.payload))
                    .map_err(|e| e.to_string())
            }
        }))
        .buffered(READ_CONCURRENCY)
        .try_collect::<Vec<_>>();
        // A read stuck on a leader that died is asked again (of the next one) soon.
        let read = tokio::time::timeout(PUBLISH_ACK * 2, read)
            .await
            .unwrap_or_else(|_| Err("no answer from the stream leader".into()));
        match read {
            Ok(messages) => {
                for (seq, payload) in messages {
                    shared.apply(seq, &payload)?;
                }
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "catching up from the stream leader; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(io(&format!("catching up to position {target}"), e)),
        }
    }
}

/// `positions` (ascending) as reads: `(first, count)` for each run of at least
/// [`RANGE_READ_MIN`] consecutive positions, `(position, 1)` for the others.
fn runs(positions: &[u64]) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < positions.len() {
        let mut j = i + 1;
        while j < positions.len() && positions[j] == positions[j - 1] + 1 {
            j += 1;
        }
        if j - i >= RANGE_READ_MIN {
            out.push((positions[i], j - i));
        } else {
            out.extend(positions[i..j].iter().map(|&p| (p, 1)));
        }
        i = j;
    }
    out
}

/// The payloads of the `count` messages from sequence `from`: one direct
/// request for a single message; for a run, one pull of `count` messages from
/// an ephemeral consumer (one replica, in memory, deleted after the read).
///
/// Not the client's ordered consumer: that one re-creates itself on a missed
/// heartbeat, and if it had delivered nothing yet, it starts again from the
/// stream's first message rather than from `from`.
async fn read_run(
    stream: &stream::Stream,
    from: u64,
    count: usize,
) -> Result<Vec<bytes::Bytes>, StorageError> {
    if count == 1 {
        return stream
            .get_raw_message(from)
            .await
            .map(|m| vec![m.payload])
            .map_err(|e| io(&format!("reading position {from}"), e));
    }
    let mut out = Vec::with_capacity(count);
    match pull_run(stream, from, count, &mut out).await {
        Ok(()) => Ok(out),
        Err(e @ StorageError::Corrupt { .. }) => Err(e),
        Err(e) => {
            // The run is an optimisation: the cluster busy (a consumer not created in
            // time, a leader moving) costs the rest of the run one request each.
            tracing::debug!(error = %e, "reading a run through a consumer failed; reading it one by one");
            let rest = from + out.len() as u64..from + count as u64;
            let singles = futures_util::stream::iter(rest.map(|seq| {
                let stream = stream.clone();
                async move {
                    stream
                        .get_raw_message(seq)
                        .await
                        .map(|m| m.payload)
                        .map_err(|e| io(&format!("reading position {seq}"), e))
                }
            }))
            .buffered(READ_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?;
            out.extend(singles);
            Ok(out)
        }
    }
}

/// Pulls the `count` messages from `from` into `out` through one ephemeral
/// consumer; on an error, `out` holds the messages read before it.
async fn pull_run(
    stream: &stream::Stream,
    from: u64,
    count: usize,
    out: &mut Vec<bytes::Bytes>,
) -> Result<(), StorageError> {
    let what = || format!("reading positions {from}..{}", from + count as u64);
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ack_policy: consumer::AckPolicy::None,
            num_replicas: 1,
            memory_storage: true,
            inactive_threshold: RANGE_READ_IDLE * 2,
            ..Default::default()
        })
        .await
        .map_err(|e| io(&what(), e))?;
    let read = async {
        let mut messages = consumer
            .batch()
            .max_messages(count)
            .expires(RANGE_READ_IDLE)
            .messages()
            .await
            .map_err(|e| io(&what(), e))?;
        while out.len() < count {
            let message = match messages.next().await {
                Some(message) => message.map_err(|e| io(&what(), e))?,
                None => return Err(io(&what(), "the stream sent too few messages in time")),
            };
            let seq = message.info().map_err(|e| io(&what(), e))?.stream_sequence;
            let expected = from + out.len() as u64;
            if seq != expected {
                return Err(StorageError::Corrupt {
                    position: Position(expected),
                    reason: format!(
                        "the stream delivered sequence {seq} where {expected} was due (was a message deleted?)"
                    ),
                });
            }
            out.push(message.payload.clone());
        }
        Ok(())
    }
    .await;
    // Gone on its own after the inactivity threshold; deleting it now spares the
    // server a consumer per read meanwhile. Nobody waits for the answer.
    let name = consumer.cached_info().name.clone();
    let stream = stream.clone();
    tokio::spawn(async move {
        let _ = stream.delete_consumer(&name).await;
    });
    read
}

/// Folds every stored message into the index, in order, for as long as the log is open.
async fn follow(shared: Arc<Shared>, stream: stream::Stream) {
    let mut backoff = Duration::from_millis(50);
    while !shared.closed.load(Ordering::SeqCst) {
        if shared.index().broken.is_some() {
            return;
        }
        let from = shared.index().head + 1;
        match follow_from(&shared, &stream, from).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                let head = shared.index().head;
                tracing::warn!(head, error = %e, "following the JetStream log failed; following again after the head");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn follow_from(shared: &Shared, stream: &stream::Stream, from: u64) -> Result<(), String> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    loop {
        let message = match tokio::time::timeout(FOLLOW_IDLE, messages.next()).await {
            Ok(Some(message)) => message.map_err(|e| e.to_string())?,
            Ok(None) => break,
            Err(_) => {
                // Quiet: fine when the stream is, not when the consumer was lost with
                // a node (an ordered consumer has one replica) and has not noticed.
                let last = last_sequence(stream.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                if last > shared.index().head {
                    return Err(format!(
                        "the consumer fell silent below the stream's last sequence {last}"
                    ));
                }
                continue;
            }
        };
        let seq = message.info().map_err(|e| e.to_string())?.stream_sequence;
        if seq < from {
            // The client re-created its consumer before delivering anything, from the
            // stream's first message (see `read_run`): start again after the head
            // rather than read the whole stream again.
            return Err(format!(
                "the consumer started again at sequence {seq}, below {from}"
            ));
        }
        if let Err(e) = shared.apply(seq, &message.payload) {
            tracing::error!(error = %e, "the JetStream log broke the log contract; this gateway stops following it");
            return Ok(());
        }
        if shared.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
    }
    Err("the ordered consumer ended".into())
}

/// The last sequence a refused publish's error names (`wrong last sequence: N`,
/// or `already stored at sequence N` for a duplicate id).
fn reported_last(reason: &str) -> Option<u64> {
    let at = ["wrong last sequence: ", "at sequence "]
        .iter()
        .find_map(|needle| reason.rfind(needle).map(|i| i + needle.len()))?;
    let digits: String = reason[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Why a publish did not land where planned.
enum Failure {
    /// The server refused it (another gateway moved the head, or a duplicate
    /// id): nothing of this publish was stored.
    Refused(String),
    /// No answer: it may or may not have been stored.
    Unknown(String),
    /// No server answers for the stream (just created and not assigned on
    /// the server this connection goes through yet, or no leader): nothing
    /// was stored; as transient as an election.
    NoStream(String),
}

#[derive(Deserialize)]
struct BatchAck {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Publishes `records` (consecutive, the first at `head + 1`) as one
/// conditional append: all of them land at exactly their positions, or none.
async fn publish(
    cluster: &Cluster,
    head: u64,
    records: &[(Record, Vec<u8>)],
) -> Result<(), Failure> {
    let headers = |record: &Record| {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", record.event_id.to_string());
        h
    };
    if let [(record, bytes)] = records {
        let mut h = headers(record);
        h.insert("Nats-Expected-Last-Sequence", head.to_string());
        let ack = cluster
            .js
            .publish_with_headers(
                subject_for(&cluster.prefix, &record.stream),
                h,
                bytes.clone().into(),
            )
            .await
            .map_err(|e| Failure::Unknown(e.to_string()))?
            .await;
        return match ack {
            Ok(ack) if ack.duplicate => Err(Failure::Refused(format!(
                "event id {} is already stored at sequence {}",
                record.event_id, ack.sequence
            ))),
            Ok(ack) if ack.sequence == record.position.0 => Ok(()),
            Ok(ack) => Err(Failure::Unknown(format!(
                "stored at {} instead of {}",
                ack.sequence, record.position
            ))),
            Err(e) => match e.kind() {
                jetstream::context::PublishErrorKind::WrongLastSequence => {
                    Err(Failure::Refused(e.to_string()))
                }
                jetstream::context::PublishErrorKind::StreamNotFound => {
                    Err(Failure::NoStream(e.to_string()))
                }
                _ => Err(Failure::Unknown(e.to_string())),
            },
        };
    }
    // An atomic batch: staged on the server and stored together at the commit.
    let batch = Uuid::new_v4().simple().to_string();
    let last = records.len();
    for (i, (record, bytes)) in records.iter().enumerate() {
        let mut h = headers(record);
        h.insert("Nats-Batch-Id", batch.as_str());
        h.insert("Nats-Batch-Sequence", (i + 1).to_string());
        if i == 0 {
            h.insert("Nats-Expected-Last-Sequence", head.to_string());
        }
        let subject = subject_for(&cluster.prefix, &record.stream);
        if i + 1 < last {
            cluster
                .client
                .publish_with_headers(subject, h, bytes.clone().into())
                .await
                .map_err(|e| Failure::Unknown(e.to_string()))?;
            continue;
        }
        h.insert("Nats-Batch-Commit", "1");
        let reply = cluster
            .client
            .request_with_headers(subject, h, bytes.clone().into())
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Failure::NoStream(e.to_string()),
                _ => Failure::Unknown(e.to_string()),
            })?;
        let ack: BatchAck = serde_json::from_slice(&reply.payload)
            .map_err(|e| Failure::Unknown(format!("unreadable batch ack: {e}")))?;
        if let Some(error) = ack.error {
            return Err(Failure::Refused(format!(
                "batch refused ({}): {}",
                error.err_code, error.description
            )));
        }
        let want = record.position.0;
        return match (ack.seq, ack.count) {
            (Some(seq), Some(count)) if seq == want && count == last as u64 => Ok(()),
            other => Err(Failure::Unknown(format!(
                "batch ack {other:?}, expected last sequence {want} and {last} messages"
            ))),
        };
    }
    Ok(())
}

/// The writer: takes queued appends, plans them together on the exact head,
/// publishes them as one conditional batch and answers each.
async fn writer(shared: Arc<Shared>, cluster: Cluster, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut queue: Vec<Job> = Vec::new();
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(job) => queue.push(job),
                None => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            queue.push(job);
        }
        queue = commit_group(&shared, &cluster, queue).await;
    }
}

/// Commits the appends of one group; returns those to plan again.
async fn commit_group(shared: &Shared, cluster: &Cluster, jobs: Vec<Job>) -> Vec<Job> {
    let mut later = Vec::new();
    let mut planned: Vec<(Job, Vec<Appended>)> = Vec::new();
    let mut records: Vec<(Record, Vec<u8>)> = Vec::new();
    let head;
    {
        let mut index = shared.index();
        head = index.head;
        if let Some(reason) = index.broken.clone() {
            for job in jobs {
                let _ = job.tx.send(Err(StorageError::Io(reason.clone())));
            }
            return later;
        }
        let mut planner = Planner::new(Position(head), index.now_ms());
        for job in jobs {
            if !planned.is_empty() && records.len() + job.events.len() > MAX_GROUP_RECORDS {
                later.push(job);
                continue;
            }
            match planner.plan(&mut *index, job.events.clone()) {
                Ok((mut results, new)) => {
                    for (result, event) in results.iter_mut().zip(&job.events) {
                        if result.duplicate && job.maybe_ours.contains(&event.event_id) {
                            result.duplicate = false;
                        }
                    }
                    records.extend(new.into_iter().map(|r| {
                        let bytes = r.encode();
                        (r, bytes)
                    }));
                    planned.push((job, results));
                }
                Err(e) => {
                    let _ = job.tx.send(Err(e));
                }
            }
        }
    }
    if records.is_empty() {
        for (job, results) in planned {
            let _ = job.tx.send(Ok(results));
        }
        return later;
    }
    let published = tokio::time::timeout(PUBLISH_ACK, publish(cluster, head, &records))
        .await
        .unwrap_or_else(|_| {
            Err(Failure::Unknown(format!(
                "no acknowledgement within {PUBLISH_ACK:?} (a stream leader lost?)"
            )))
        });
    match published {
        Ok(()) => {
            let applied = records
                .iter()
                .try_for_each(|(r, bytes)| shared.apply(r.position.0, bytes));
            for (job, results) in planned {
                let _ = job.tx.send(match &applied {
                    Ok(()) => Ok(results),
                    Err(e) => Err(e.clone()),
                });
            }
        }
        Err(failure) => {
            let (unknown, no_stream, reason) = match failure {
                Failure::Refused(r) => (false, false, r),
                Failure::Unknown(r) => (true, false, r),
                Failure::NoStream(r) => (false, true, r),
            };
            tracing::debug!(head, unknown, %reason, "publish did not land; catching up and planning again");
            // The leader checks the expectation against the proposals it has accepted,
            // which its stream info may not show yet: wait for what the refusal named.
            let last = match reported_last(&reason) {
                Some(last) => Ok(last),
                None => tokio::time::timeout(PUBLISH_ACK, last_sequence(cluster.stream.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(StorageError::Io(format!(
                            "the stream's state did not come within {PUBLISH_ACK:?} (an election?)"
                        )))
                    }),
            };
            let caught_up = match last {
                Ok(last) if last < head => {
                    // A leader that has not applied everything yet, or a cluster that lost
                    // what it acknowledged (see docs/scaling.md on corrupted replicas).
                    // Either way nothing is written over the hole: every publish is
                    // conditioned on this gateway's head, which the stream is below.
                    let reason = format!(
                        "the JetStream stream ends at {last} but positions up to {head} were acknowledged"
                    );
                    tracing::error!(%reason, "appends wait for the stream to reach the head");
                    Err(StorageError::Io(reason))
                }
                Ok(last) => catch_up(shared, &cluster.stream, last).await,
                Err(e) => Err(e),
            };
            // A stream created a moment ago may not be assigned on the server this
            // connection publishes through yet: as transient as an election.
            let waiting = match &caught_up {
                Err(e) => Some(e.clone()),
                Ok(()) if no_stream => Some(StorageError::Io(reason.clone())),
                Ok(()) => None,
            };
            let closed = shared.closed.load(Ordering::SeqCst);
            for (mut job, _) in planned {
                job.attempts += 1;
                if unknown {
                    job.maybe_ours.extend(job.events.iter().map(|e| e.event_id));
                }
                if closed {
                    // Closing: answer now rather than retry against a cluster
                    // that may be gone (the outcome of an unknown publish stays
                    // unknown to the caller, as in a crash).
                    let _ = job.tx.send(Err(StorageError::Closed));
                } else if job.queued.elapsed() >= APPEND_BUDGET {
                    let _ = job.tx.send(Err(StorageError::Io(format!(
                        "the append did not land in {} attempts over {APPEND_BUDGET:?}: {reason}",
                        job.attempts
                    ))));
                } else if let Some(e) = &waiting {
                    // The cluster cannot answer (no leader yet, an election, no quorum):
                    // keep trying for a while, then answer the error.
                    let since = *job
                        .failing_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= CATCH_UP {
                        let _ = job.tx.send(Err(e.clone()));
                    } else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        later.push(job);
                    }
                } else {
                    later.push(job);
                }
            }
        }
    }
    // Planned-again jobs go first, in their order.
    later
}

impl EventLog for NatsLog {
    fn append(&self, events: Vec<NewEvent>) -> PendingAppend {
        let (tx, pending) = PendingAppend::channel();
        if self.shared.closed.load(Ordering::SeqCst) {
            let _ = tx.send(Err(StorageError::Closed));
            return pending;
        }
        let job = Job {
            events,
            tx,
            attempts: 0,
            maybe_ours: HashSet::new(),
            failing_since: None,
            queued: tokio::time::Instant::now(),
        };
        if let Some(writer) = &*self.writer.lock().unwrap_or_else(|p| p.into_inner()) {
            // A refused send drops the job's sender, which answers Closed.
            let _ = writer.send(job);
        }
        pending
    }

    fn head(&self) -> Position {
        Position(self.shared.index().head)
    }

    fn now_ms(&self) -> u64 {
        self.shared.index().now_ms()
    }

    fn committed_head(&self) -> Result<Position, StorageError> {
        run_on(&self.handle, last_sequence(self.stream.clone()))?.map(Position)
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.shared.head_tx.subscribe()
    }

    fn read_from(&self, from: Position, limit: usize) -> Result<Vec<Record>, StorageError> {
        let head = self.shared.index().head;
        let start = from.0.max(1);
        if start > head || limit == 0 {
            return Ok(Vec::new());
        }
        let end = head.min(start.saturating_add(limit as u64) - 1);
        self.read_positions((start..=end).collect())
    }

    fn read_at(&self, position: Position) -> Result<Option<Record>, StorageError> {
        if position.0 == 0 || position.0 > self.shared.index().head {
            return Ok(None);
        }
        Ok(self.read_positions(vec![position.0])?.pop())
    }

    fn read_many(&self, positions: &[Position]) -> Result<Vec<Record>, StorageError> {
        let head = self.shared.index().head;
        if let Some(p) = positions.iter().find(|p| p.0 == 0 || p.0 > head) {
            return Err(StorageError::InvalidInput(format!(
                "position {p} is not durable"
            )));
        }
        self.read_positions(positions.iter().map(|p| p.0).collect())
    }

    fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        let positions = self
            .shared
            .index()
            .stream_positions(stream, from_version, limit);
        self.read_positions(positions.into_iter().map(|p| p.0).collect())
    }

    fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        Ok(self.shared.index().version(stream))
    }

    fn find_event(&self, event_id: Uuid) -> Result<Option<Appended>, StorageError> {
        Ok(self.shared.index().find(&event_id))
    }

    fn close(&self) -> Result<(), StorageError> {
        self.stop();
        Ok(())
    }

    fn accepting(&self) -> bool {
        !self.shared.closed.load(Ordering::SeqCst) && self.shared.index().broken.is_none()
    }
}

impl Checkpoints for NatsLog {
    fn load_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.checkpoints.load_checkpoint(name)
    }
    fn store_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.checkpoints.store_checkpoint(name, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::{runs, subject_for, RANGE_READ_MIN};

    #[test]
    fn long_runs_of_positions_are_read_as_runs_and_the_rest_one_by_one() {
        let mut positions: Vec<u64> = vec![1, 2, 3];
        positions.extend(10..10 + RANGE_READ_MIN as u64);
        positions.extend([100, 101]);
        positions.extend(200..200 + RANGE_READ_MIN as u64 * 2);
        let mut expected = vec![(1, 1), (2, 1), (3, 1), (10, RANGE_READ_MIN)];
        expected.extend([(100, 1), (101, 1), (200, RANGE_READ_MIN * 2)]);
        assert_eq!(runs(&positions), expected);
        // One short of a run.
        let short: Vec<u64> = (5..5 + RANGE_READ_MIN as u64 - 1).collect();
        assert!(runs(&short).iter().all(|&(_, n)| n == 1));
        assert_eq!(runs(&short).len(), short.len());
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn subjects_are_single_escaped_tokens() {
        assert_eq!(subject_for("tl", "thread:abc"), "tl.s.thread=3Aabc");
        assert_eq!(subject_for("tl", "a.b*>c d"), "tl.s.a=2Eb=2A=3Ec=20d");
        assert_eq!(subject_for("tl", "$log"), "tl.s.=24log");
        // Escaping is injective: `=` itself is escaped.
        assert_ne!(subject_for("tl", "=3A"), subject_for("tl", ":"));
    }

    #[test]
    fn the_refusals_last_sequence_is_read() {
        use super::reported_last;
        let e = "wrong last sequence: wrong last sequence: 22 (code 400, error code 10071)";
        assert_eq!(reported_last(e), Some(22));
        assert_eq!(
            reported_last("batch refused (10071): wrong last sequence: 7"),
            Some(7)
        );
        assert_eq!(reported_last("timed out"), None);
    }
}
