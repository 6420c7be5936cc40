//! [`Projector`]: the live read model, kept caught up with the log and
//! checkpointed; plus the offline `rebuild` used by the tools.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use threadline_storage::{Checkpoints, EventLog, Position};
use tokio::sync::watch;

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
    last_checkpoint: Mutex<(Position, Instant)>,
}

/// The stored checkpoint, if any.
pub fn load_checkpoint(store: &dyn Checkpoints) -> Result<Option<ReadModel>, ProjectionError> {
    store
        .load_checkpoint(CHECKPOINT_NAME)?
        .map(|bytes| ReadModel::from_checkpoint(&bytes))
        .transpose()
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
    pub fn catch_up(&self) -> Result<Position, ProjectionError> {
        let _one_at_a_time = self.catching_up.lock().unwrap_or_else(|p| p.into_inner());
        loop {
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
        }
    }

    /// Returns once the model has folded `target` (catching up itself if needed).
    pub fn settle(&self, target: Position) -> Result<(), ProjectionError> {
        if self.position() < target {
            self.catch_up()?;
        }
        Ok(())
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
