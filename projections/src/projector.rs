//! [`Projector`]: the live read model, kept caught up with the log and
//! checkpointed; plus the offline `rebuild` used by the tools.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use threadline_storage::{Checkpoints, EventLog, Position};
use tokio::sync::{watch, Notify};

use crate::{ProjectionError, ReadModel, CHECKPOINT_NAME};

/// Records read from the log per step of a catch-up or rebuild.
const PAGE: usize = 1000;

/// The live read model over a log.
#[derive(Debug)]
pub struct Projector<L> {
    log: Arc<L>,
    model: RwLock<ReadModel>,
    projected: watch::Sender<Position>,
    /// Serialises catch-ups so two callers never fold the same records.
    catching_up: Mutex<()>,
    /// Signalled whenever a fold releases `catching_up`.
    released: Notify,
    last_checkpoint: Mutex<(Position, Instant)>,
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
        Some(bytes) => ReadModel::from_checkpoint(&bytes).map(Some),
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
    fold_until(log, &mut model, head, &mut progress)?;
    Ok(model)
}

fn fold_until(
    log: &dyn EventLog,
    model: &mut ReadModel,
    head: Position,
    progress: &mut dyn FnMut(Position, Position),
) -> Result<(), ProjectionError> {
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
    Ok(())
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
            catching_up: Mutex::new(()),
            released: Notify::new(),
            last_checkpoint: Mutex::new((start, Instant::now())),
        };
        projector.catch_up()?;
        tracing::info!(from = %start, to = %projector.position(), "projections caught up");
        Ok(projector)
    }

    pub fn log(&self) -> &Arc<L> {
        &self.log
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

    /// Folds every durable record not yet applied; returns the new position.
    /// Blocks while another thread is catching up (use [`Projector::settle`] from async code).
    pub fn catch_up(&self) -> Result<Position, ProjectionError> {
        let guard = self.catching_up.lock().unwrap_or_else(|p| p.into_inner());
        self.fold_locked(guard)
    }

    fn fold_locked(&self, guard: MutexGuard<'_, ()>) -> Result<Position, ProjectionError> {
        let result = (|| loop {
            let from = self.position().next();
            let page = self.log.read_from(from, PAGE)?;
            let Some(last) = page.last().map(|r| r.position) else {
                return Ok(self.position());
            };
            {
                let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
                for record in &page {
                    model.apply(record)?;
                }
            }
            self.projected.send_replace(last);
        })();
        drop(guard);
        // Whoever waited for the lock re-checks: it may still have to fold
        // records that became durable after this fold's last read.
        self.released.notify_waiters();
        result
    }

    /// Returns once the model has folded `target`. Never blocks a runtime
    /// thread on another fold: it folds itself when nobody else is, and
    /// otherwise waits for the folding thread to finish.
    pub async fn settle(&self, target: Position) -> Result<(), ProjectionError> {
        loop {
            if self.position() >= target {
                return Ok(());
            }
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before trying the lock, so a release in between is not missed.
            released.as_mut().enable();
            if !self.try_fold()? {
                released.await;
            }
        }
    }

    /// Folds unless another thread is folding; false when it was busy. (Sync,
    /// so no lock guard ever lives across an await.)
    fn try_fold(&self) -> Result<bool, ProjectionError> {
        let guard = match self.catching_up.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
        };
        self.fold_locked(guard)?;
        Ok(true)
    }

    /// Stores the current model as the checkpoint.
    pub fn checkpoint(&self) -> Result<Position, ProjectionError> {
        let (bytes, position) = self.read(|m| (m.to_checkpoint(), m.position()));
        self.log.store_checkpoint(CHECKPOINT_NAME, &bytes)?;
        *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (position, Instant::now());
        Ok(position)
    }

    /// Checkpoints when at least `min_events` were folded and `min_interval`
    /// passed since the last checkpoint (bounds both replay on restart and write cost).
    pub fn maybe_checkpoint(
        &self,
        min_events: u64,
        min_interval: Duration,
    ) -> Result<bool, ProjectionError> {
        let (at, when) = *self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.position().0.saturating_sub(at.0) >= min_events && when.elapsed() >= min_interval {
            self.checkpoint()?;
            return Ok(true);
        }
        Ok(false)
    }
}
