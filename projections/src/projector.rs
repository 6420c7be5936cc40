//! [`Projector`]: the live read model, kept caught up with the log by one fold
//! thread and checkpointed; plus the offline `rebuild` used by the tools.
//!
//! Only the fold writes the model. Everyone else reads it (in memory, under a
//! short read lock) or waits on [`Projector::wait_for`] for a position to be
//! folded; nobody folds inline on a request's behalf.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use threadline_engine::UserId;
use threadline_storage::{Checkpoints, EventLog, Position, Record};
use tokio::sync::watch;

use crate::{ProjectionError, ReadModel, CHECKPOINT_NAME};

/// Records read from the log per step of a catch-up or rebuild (and the most
/// one page of any list call returns).
pub const PAGE: usize = 1000;

/// The newest records kept in memory after folding, so live sockets and
/// responses are served without reading the log: at most this many…
const RECENT_RECORDS: usize = 65_536;
/// …and at most this many payload bytes.
const RECENT_BYTES: usize = 64 * 1024 * 1024;

/// When the fold thread checkpoints: after this many new events, at most this often.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub min_events: u64,
    pub min_interval: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            min_events: 10_000,
            min_interval: Duration::from_secs(5),
        }
    }
}

/// The live read model over a log.
#[derive(Debug)]
pub struct Projector<L> {
    log: Arc<L>,
    model: RwLock<ReadModel>,
    projected: watch::Sender<Position>,
    /// Set when the fold failed: waiters stop waiting and report it.
    fault: Mutex<Option<ProjectionError>>,
    /// Serialises folds so two threads never fold the same records.
    folding: Mutex<()>,
    recent: RwLock<Recent>,
    /// Per-user wake-ups: a socket waits on its own user's queue, so a fold
    /// wakes only the sockets it has news for (never every socket).
    users: Mutex<UserWatches>,
    last_checkpoint: Mutex<(Position, Instant)>,
}

/// The users someone waits on, each with the user's queue head.
#[derive(Debug, Default)]
struct UserWatches {
    senders: HashMap<UserId, watch::Sender<u64>>,
    /// Drop senders nobody listens to once the map reaches this size.
    sweep_at: usize,
}

/// The newest folded records, by position (dense, so a lookup is an index).
#[derive(Debug, Default)]
struct Recent {
    records: VecDeque<Arc<Record>>,
    bytes: usize,
}

impl Recent {
    fn push(&mut self, record: Arc<Record>) {
        self.bytes += record.payload.len();
        self.records.push_back(record);
        while self.records.len() > RECENT_RECORDS || self.bytes > RECENT_BYTES {
            match self.records.pop_front() {
                Some(r) => self.bytes -= r.payload.len(),
                None => break,
            }
        }
    }

    fn get(&self, position: Position) -> Option<&Arc<Record>> {
        let first = self.records.front()?.position;
        let index = usize::try_from(position.0.checked_sub(first.0)?).ok()?;
        self.records.get(index)
    }
}

/// The stored checkpoint, if any.
/// One an older build wrote counts as none: the model is rebuilt from the log.
pub fn load_checkpoint(store: &dyn Checkpoints) -> Result<Option<ReadModel>, ProjectionError> {
    match store.load_checkpoint(CHECKPOINT_NAME)? {
        Some(bytes) if ReadModel::is_older_checkpoint(&bytes) => {
            tracing::warn!(
                "the projections checkpoint is an older format; rebuilding from the log"
            );
            Ok(None)
        }
        // Checkpoints are advisory: a damaged one (its checksum fails) costs a rebuild.
        Some(bytes) => match ReadModel::from_checkpoint(&bytes) {
            Ok(model) => Ok(Some(model)),
            Err(e) => {
                tracing::warn!(error = %e, "the projections checkpoint is unreadable; rebuilding from the log");
                Ok(None)
            }
        },
        None => Ok(None),
    }
}

/// Replaces the stored checkpoint with `model` (one atomic, durable write).
pub fn store_checkpoint(store: &dyn Checkpoints, model: &ReadModel) -> Result<(), ProjectionError> {
    Ok(store.store_checkpoint(CHECKPOINT_NAME, &model.to_checkpoint())?)
}

/// Folds the whole log from position 1 into a fresh model, calling
/// `progress(done, head)` after each page.
pub fn rebuild(
    log: &dyn EventLog,
    mut progress: impl FnMut(Position, Position),
) -> Result<ReadModel, ProjectionError> {
    let mut model = ReadModel::default();
    let head = log.head();
    while model.position() < head {
        let page = log.read_from(model.position().next(), PAGE)?;
        if page.is_empty() {
            break;
        }
        for record in &page {
            model.apply(record)?;
        }
        progress(model.position(), head);
    }
    Ok(model)
}

impl<L: EventLog + Checkpoints> Projector<L> {
    /// Starts from the stored checkpoint (or empty) and catches up with the log.
    pub fn open(log: Arc<L>) -> Result<Projector<L>, ProjectionError> {
        let model = load_checkpoint(&*log)?.unwrap_or_default();
        if model.position() > log.head() {
            return Err(ProjectionError::Checkpoint(format!(
                "checkpoint at {} is ahead of the log head {}",
                model.position(),
                log.head()
            )));
        }
        let start = model.position();
        let projector = Projector {
            log,
            projected: watch::Sender::new(start),
            model: RwLock::new(model),
            fault: Mutex::new(None),
            folding: Mutex::new(()),
            recent: RwLock::new(Recent::default()),
            users: Mutex::new(UserWatches::default()),
            last_checkpoint: Mutex::new((start, Instant::now())),
        };
        projector.catch_up()?;
        tracing::info!(from = %start, to = %projector.position(), "projections caught up");
        Ok(projector)
    }

    pub fn log(&self) -> &Arc<L> {
        &self.log
    }

    /// The log's committed head ([`EventLog::committed_head`]: on a log shared with
    /// other gateways, what any of them appended, which this fold may trail), read
    /// off the runtime. A log that cannot say it (no quorum) is taken at what this
    /// process has read.
    pub async fn committed_head(&self) -> Position {
        let log = Arc::clone(&self.log);
        match tokio::task::spawn_blocking(move || log.committed_head()).await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the log's committed head is unknown; going by this gateway's view");
                self.log.head()
            }
            Err(_) => self.log.head(),
        }
    }

    /// The last position folded into the model.
    pub fn position(&self) -> Position {
        *self.projected.borrow()
    }

    /// A receiver that sees the projected position move.
    pub fn watch(&self) -> watch::Receiver<Position> {
        self.projected.subscribe()
    }

    /// Runs `f` on a consistent view of the model.
    pub fn read<R>(&self, f: impl FnOnce(&ReadModel) -> R) -> R {
        f(&self.model.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// A receiver that sees `user`'s queue head (last `user_seq`) move.
    pub fn watch_user(&self, user: &UserId) -> watch::Receiver<u64> {
        let head = self.read(|m| m.delivery().user_head(user));
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = match users.senders.get(user) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(head);
                users.senders.insert(user.clone(), sender);
                receiver
            }
        };
        if users.senders.len() >= users.sweep_at {
            users.senders.retain(|_, s| s.receiver_count() > 0);
            users.sweep_at = (users.senders.len() * 2).max(1024);
        }
        receiver
    }

    /// The records at `positions` if every one is still held in memory.
    pub fn recent(&self, positions: &[Position]) -> Option<Vec<Arc<Record>>> {
        let recent = self.recent.read().unwrap_or_else(|p| p.into_inner());
        positions.iter().map(|p| recent.get(*p).cloned()).collect()
    }

    /// Folds every durable record not yet applied; returns the new position.
    /// Blocks (on the log, and on a fold already running): never call it from async code.
    pub fn catch_up(&self) -> Result<Position, ProjectionError> {
        let _folding = self.folding.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.fold();
        if let Err(e) = &result {
            *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
            // Wake every waiter, so it sees the fault instead of waiting forever.
            self.projected.send_modify(|_| {});
            let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            for sender in users.senders.values() {
                sender.send_modify(|_| {});
            }
        }
        result
    }

    /// The fold has failed: nothing more will be projected.
    pub fn fault(&self) -> Option<ProjectionError> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn fold(&self) -> Result<Position, ProjectionError> {
        loop {
            let from = self.position().next();
            let page = self.log.read_from(from, PAGE)?;
            let Some(last) = page.last().map(|r| r.position) else {
                return Ok(self.position());
            };
            let mut touched = HashSet::new();
            let heads: Vec<(UserId, u64)> = {
                let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
                for record in &page {
                    touched.extend(model.apply(record)?);
                }
                touched
                    .into_iter()
                    .map(|u| {
                        let head = model.delivery().user_head(&u);
                        (u, head)
                    })
                    .collect()
            };
            {
                let mut recent = self.recent.write().unwrap_or_else(|p| p.into_inner());
                for record in page {
                    recent.push(Arc::new(record));
                }
            }
            self.projected.send_replace(last);
            let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            for (user, head) in heads {
                if let Some(sender) = users.senders.get(&user) {
                    sender.send_replace(head);
                }
            }
        }
    }

    /// Returns once the model has folded `target` (or the fold has failed).
    pub async fn wait_for(&self, target: Position) -> Result<(), ProjectionError> {
        let mut projected = self.projected.subscribe();
        loop {
            if *projected.borrow_and_update() >= target {
                return Ok(());
            }
            if let Some(e) = self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return Err(e);
            }
            if projected.changed().await.is_err() {
                return Err(ProjectionError::Stopped);
            }
        }
    }

    /// Stores the current model as the checkpoint.
    pub fn checkpoint(&self) -> Result<Position, ProjectionError> {
        let copy = self.read(ReadModel::clone);
        self.store(&copy)
    }

    /// Whether the policy says a checkpoint is due (bounds both replay on restart and write cost).
    fn checkpoint_due(&self, policy: CheckpointPolicy) -> bool {
        let (at, when) = *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.position().0.saturating_sub(at.0) >= policy.min_events
            && when.elapsed() >= policy.min_interval
    }

    /// Encodes and stores `model` as the checkpoint.
    fn store(&self, model: &ReadModel) -> Result<Position, ProjectionError> {
        self.log
            .store_checkpoint(CHECKPOINT_NAME, &model.to_checkpoint())?;
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (model.position(), Instant::now());
        Ok(model.position())
    }
}

impl<L: EventLog + Checkpoints> Projector<L> {
    /// Starts the fold thread: it folds each durable group as the log's head
    /// moves, publishes the projected position, and checkpoints by `policy`,
    /// until the returned [`Follower`] is stopped or dropped.
    ///
    /// Checkpoints are written by a second thread from a copy of the model taken
    /// between folds, so encoding and storing one never holds up delivery.
    pub fn follow(self: &Arc<Self>, policy: CheckpointPolicy) -> std::io::Result<Follower> {
        let (snapshots, pending) = std::sync::mpsc::sync_channel::<ReadModel>(1);
        let writer = Arc::clone(self);
        let checkpointer = std::thread::Builder::new()
            .name("threadline-ckpt".into())
            .spawn(move || {
                for model in pending {
                    if let Err(e) = writer.store(&model) {
                        tracing::error!(error = %e, "projection checkpoint failed");
                    }
                }
            })?;
        let projector = Arc::clone(self);
        let mut head = projector.log.watch_head();
        let (stop, mut stopped) = watch::channel(false);
        let fold = std::thread::Builder::new()
            .name("threadline-fold".into())
            .spawn(move || loop {
                // Seen before folding, so a head that moves during the fold wakes the wait below.
                head.borrow_and_update();
                let started = Instant::now();
                let folded = projector.catch_up();
                metrics::histogram!("threadline_fold_seconds")
                    .record(started.elapsed().as_secs_f64());
                if let Err(e) = folded {
                    tracing::error!(error = %e, "projection fold failed; requests waiting on it fail");
                    return;
                }
                if projector.checkpoint_due(policy) {
                    // A copy is a memcpy of the queues; the encoding happens elsewhere.
                    // While the last copy is still being stored, this one waits a fold.
                    let copy = projector.read(ReadModel::clone);
                    match snapshots.try_send(copy) {
                        Ok(()) => {
                            // Counted from now, so a slow store is not offered a copy per fold.
                            *projector
                                .last_checkpoint
                                .lock()
                                .unwrap_or_else(|p| p.into_inner()) =
                                (projector.position(), Instant::now());
                        }
                        Err(std::sync::mpsc::TrySendError::Full(_)) => {}
                        Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
                    }
                }
                metrics_gauges(&*projector.log, projector.position());
                if !wait_changed(&mut head, &mut stopped) {
                    return;
                }
            })?;
        Ok(Follower {
            stop,
            threads: vec![fold, checkpointer],
        })
    }
}

/// The running fold thread; stopping (or dropping) it ends the thread after
/// its current fold.
#[derive(Debug)]
pub struct Follower {
    stop: watch::Sender<bool>,
    /// The fold thread, then the checkpoint thread (which ends when the fold
    /// thread drops its sender).
    threads: Vec<JoinHandle<()>>,
}

impl Follower {
    /// Ends the fold thread and waits for it (blocking: call it off the runtime).
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.stop.send_replace(true);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.end();
    }
}

fn metrics_gauges(log: &dyn EventLog, projected: Position) {
    metrics::gauge!("threadline_log_head").set(log.head().0 as f64);
    metrics::gauge!("threadline_projected_position").set(projected.0 as f64);
}

/// Blocks until the head moves (true) or `stop` is raised or gone (false).
fn wait_changed(head: &mut watch::Receiver<Position>, stop: &mut watch::Receiver<bool>) -> bool {
    let waiter = async {
        tokio::select! {
            changed = head.changed() => changed.is_ok(),
            changed = stop.changed() => changed.is_ok() && !*stop.borrow(),
        }
    };
    block_on(waiter) && !*stop.borrow()
}

/// Runs a future to completion on this (non-runtime) thread.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
