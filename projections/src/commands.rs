//! The write side, [`CommandService`]: commands judged by `decide` against
//! the projected registry, appended with each thread's expected version, and
//! answered once the fold thread has folded them (so a caller always reads its
//! own writes). It talks to the read side only through the log and the
//! projected position: it never folds, and it never blocks a runtime thread on
//! the log (appends go to the log's writer thread; a rare read of a stored
//! event goes to `spawn_blocking`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use threadline_engine::{
    authorize, decide, Actor, Command, DomainError, Event, EventId, EventMeta, Limits, RunId,
    ThreadId,
};
use threadline_storage::{
    Appended, Checkpoints, EventLog, NewEvent, Position, Record, StorageError,
};
use uuid::Uuid;

use crate::turns::Turns;
use crate::{decode_event, encode_event, ProjectionError, Projector};

/// How often a batch is re-judged after losing a race for a thread's version
/// (to a writer in another process: inside this one, a thread's submissions take turns).
const MAX_ATTEMPTS: usize = 64;

/// One command as a client submitted it.
#[derive(Debug, Clone)]
pub struct Submission {
    pub command: Command,
    /// Idempotency key for the (first) event the command produces.
    pub event_id: Option<EventId>,
    /// `If-Match`: the version the command's thread must be at.
    pub expected_thread_version: Option<u64>,
}

impl Submission {
    pub fn new(command: Command) -> Submission {
        Submission {
            command,
            event_id: None,
            expected_thread_version: None,
        }
    }
}

/// Where a submission's event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub position: Position,
    pub event_id: Uuid,
    pub thread_id: Option<ThreadId>,
    pub run_id: Option<RunId>,
    pub thread_version: u64,
    /// The event's `user_seq` in its thread owner's queue.
    pub user_seq: Option<u64>,
    /// True when the event id was already stored and nothing was appended.
    pub duplicate: bool,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SubmitError {
    /// `decide` rejected submission `index`.
    #[error("event {index}: {error}")]
    Domain { index: usize, error: DomainError },
    /// The thread is not at the version the client expected.
    #[error("event {index}: thread is at version {current}, not {expected}")]
    VersionConflict {
        index: usize,
        expected: u64,
        current: u64,
    },
    /// Other writers kept moving the thread: every attempt lost the race.
    #[error("the thread kept changing under {attempts} attempts; retry")]
    Contended { attempts: usize },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

struct Planned {
    index: usize,
    event: Event,
    new: NewEvent,
}

/// An event already stored under a submission's `event_id`.
struct Known {
    at: Appended,
    event_id: Uuid,
    event: Event,
}

fn thread_of(registry: &threadline_engine::Registry, command: &Command) -> Option<ThreadId> {
    match command {
        Command::CreateThread { thread_id, .. } | Command::RegisterRun { thread_id, .. } => {
            Some(thread_id.clone())
        }
        Command::AcknowledgeDelivery { .. } => None,
        other => other
            .run_id()
            .and_then(|run_id| registry.run(run_id))
            .map(|r| r.thread_id.clone()),
    }
}

fn run_of(command: &Command) -> Option<&RunId> {
    command.run_id()
}

/// The write path: owns decide, append, retries and idempotency.
#[derive(Debug)]
pub struct CommandService<L> {
    log: Arc<L>,
    projector: Arc<Projector<L>>,
    limits: Limits,
    /// Shared by the clones: submissions on one thread take turns.
    turns: Arc<Turns>,
}

impl<L> Clone for CommandService<L> {
    fn clone(&self) -> Self {
        CommandService {
            log: Arc::clone(&self.log),
            projector: Arc::clone(&self.projector),
            limits: self.limits.clone(),
            turns: Arc::clone(&self.turns),
        }
    }
}

impl<L: EventLog + Checkpoints> CommandService<L> {
    /// A write path over `projector`'s log. Answers wait on the projector's
    /// fold thread ([`Projector::follow`]), which must be running.
    pub fn new(projector: Arc<Projector<L>>, limits: Limits) -> CommandService<L> {
        CommandService {
            log: Arc::clone(projector.log()),
            projector,
            limits,
            turns: Arc::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn projector(&self) -> &Arc<Projector<L>> {
        &self.projector
    }

    fn log(&self) -> &L {
        &self.log
    }

    fn read<R>(&self, f: impl FnOnce(&crate::ReadModel) -> R) -> R {
        self.projector.read(f)
    }

    /// Appends `run_expired` for every open run idle beyond the TTL at `now_ms`.
    pub async fn expire_idle_runs(&self, now_ms: u64) -> Result<usize, SubmitError> {
        let idle = self.read(|m| m.registry().expirable_runs(now_ms, self.limits.run_ttl_ms));
        let mut expired = 0;
        for run_id in idle {
            let sub = Submission::new(Command::ExpireRun { run_id });
            expired += self
                .submit(&Actor::system(), &[sub], now_ms)
                .await?
                .iter()
                .flatten()
                .count();
        }
        Ok(expired)
    }

    /// Judges and appends `submissions` as one atomic batch: all of their new
    /// events are appended, or none. Submissions whose `event_id` is already
    /// stored are answered with their original outcome (`duplicate`).
    ///
    /// The registry it judges against may trail the log by the group being
    /// folded. That is safe: every event of a thread is appended on the
    /// thread's expected version, so a decision on a stale thread loses with
    /// a conflict and is judged again; and a rejection on a stale view is
    /// judged again once the fold reaches the log's committed head (on a log
    /// shared with other gateways, what any of them appended). A caller that has
    /// had an answer, from any gateway, is never judged on a view older than it.
    ///
    /// Submissions naming the same thread take turns (see [`Turns`]): a burst on
    /// one thread is judged and appended one batch after another, not raced.
    pub async fn submit(
        &self,
        actor: &Actor,
        submissions: &[Submission],
        now_ms: u64,
    ) -> Result<Vec<Option<Outcome>>, SubmitError> {
        let threads = self.read(|m| {
            submissions
                .iter()
                .filter_map(|s| thread_of(m.registry(), &s.command))
                .collect()
        });
        let turn = self.turns.take(threads).await;
        match self.submit_in_turn(actor, submissions, now_ms).await {
            Err(SubmitError::Domain {
                index,
                error: DomainError::RunExpired(run_id),
            }) => {
                // Recorded as a submission of its own, which takes the thread's turn.
                drop(turn);
                self.record_expiry(&run_id, now_ms).await?;
                Err(SubmitError::Domain {
                    index,
                    error: DomainError::RunExpired(run_id),
                })
            }
            answered => answered,
        }
    }

    async fn submit_in_turn(
        &self,
        actor: &Actor,
        submissions: &[Submission],
        now_ms: u64,
    ) -> Result<Vec<Option<Outcome>>, SubmitError> {
        let mut judged_fresh = false;
        for _ in 0..MAX_ATTEMPTS {
            let mut known: Vec<Option<Known>> = Vec::with_capacity(submissions.len());
            for s in submissions {
                known.push(match s.event_id {
                    Some(id) => self.known(id).await?,
                    None => None,
                });
            }
            let seen = self.projector.position();
            let planned = match self.plan(actor, submissions, &known, now_ms) {
                Ok(p) => p,
                Err(e @ (SubmitError::Domain { .. } | SubmitError::VersionConflict { .. }))
                    if !judged_fresh =>
                {
                    // A rejection judged on a view the log has moved past (through this
                    // process, or another gateway) is judged again on a fresh one.
                    judged_fresh = true;
                    let head = self.projector.committed_head().await;
                    if seen >= head {
                        return Err(e);
                    }
                    self.projector.wait_for(head).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let appended = if planned.is_empty() {
                Vec::new()
            } else {
                let batch = planned.iter().map(|p| p.new.clone()).collect();
                match self.log.append(batch).await {
                    Ok(a) => a,
                    Err(StorageError::Conflict { .. }) => {
                        // Lost a race for the thread's version: judge again on fresh state.
                        self.projector.wait_for(self.log().head()).await?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if let Some(last) = appended.iter().map(|a| a.position).max() {
                self.projector.wait_for(last).await?;
            }
            return self
                .outcomes(submissions, &known, &planned, &appended)
                .await;
        }
        Err(SubmitError::Contended {
            attempts: MAX_ATTEMPTS,
        })
    }

    /// The event stored under `id`, if any.
    async fn known(&self, id: EventId) -> Result<Option<Known>, SubmitError> {
        let Some(at) = self.log().find_event(id.as_uuid())? else {
            return Ok(None);
        };
        let record = self.record(at.position).await?;
        let event = decode_event(&record.payload).map_err(|reason| ProjectionError::Decode {
            position: record.position,
            reason,
        })?;
        Ok(Some(Known {
            at,
            event_id: record.event_id,
            event,
        }))
    }

    /// The record at `position`: from memory when recent, else read off the runtime.
    async fn record(&self, position: Position) -> Result<Arc<Record>, SubmitError> {
        if let Some(mut found) = self.projector.recent(&[position]) {
            if let Some(record) = found.pop() {
                return Ok(record);
            }
        }
        let log = Arc::clone(&self.log);
        let read = tokio::task::spawn_blocking(move || log.read_at(position))
            .await
            .map_err(|_| ProjectionError::Stopped)?;
        read?.map(Arc::new).ok_or_else(|| {
            StorageError::Corrupt {
                position,
                reason: "an event id points at a missing record".into(),
            }
            .into()
        })
    }

    /// Appends `run_expired` for a run that idled out (a no-op if it is already closed).
    async fn record_expiry(&self, run_id: &RunId, now_ms: u64) -> Result<(), SubmitError> {
        let expire = Submission::new(Command::ExpireRun {
            run_id: run_id.clone(),
        });
        Box::pin(self.submit(&Actor::system(), &[expire], now_ms))
            .await
            .map(|_| ())
    }

    fn plan(
        &self,
        actor: &Actor,
        submissions: &[Submission],
        known: &[Option<Known>],
        now_ms: u64,
    ) -> Result<Vec<Planned>, SubmitError> {
        let limits = &self.limits;
        self.read(|model| {
            let registry = model.registry();
            let threads: Vec<ThreadId> = submissions
                .iter()
                .filter_map(|s| thread_of(registry, &s.command))
                .collect();
            let mut scratch = registry.subset(
                threads.iter(),
                submissions.iter().filter_map(|s| run_of(&s.command)),
                submissions.iter().filter_map(|s| match &s.command {
                    Command::CreateThread { owner, .. } => Some(owner),
                    _ => None,
                }),
            );
            let mut first_on_stream = HashSet::new();
            let mut planned = Vec::new();
            let mut ids_in_batch: HashMap<EventId, &Command> = HashMap::new();
            for (index, s) in submissions.iter().enumerate() {
                let conflict = |id: EventId| SubmitError::Domain {
                    index,
                    error: DomainError::EventIdConflict(id),
                };
                if let Some(known) = &known[index] {
                    // A repeat is answered only to a caller who may issue the command
                    // and see what it names, and only when it is the same request: the
                    // original's result must not reach anyone else.
                    authorize(&scratch, actor, &s.command)
                        .map_err(|error| SubmitError::Domain { index, error })?;
                    if !s.command.repeats(&known.event) {
                        return Err(conflict(EventId::from_uuid(known.event_id)));
                    }
                    continue;
                }
                if let Some(id) = s.event_id {
                    match ids_in_batch.get(&id) {
                        Some(first) if **first != s.command => return Err(conflict(id)),
                        _ => {
                            ids_in_batch.insert(id, &s.command);
                        }
                    }
                }
                let thread = thread_of(&scratch, &s.command);
                let decided = decide(&scratch, actor, s.command.clone(), now_ms, limits);
                // A caller who may not act (403) or see the thread (404) must learn that,
                // not the thread's version: a conflict would leak that the thread exists.
                if let Err(
                    error @ (DomainError::Forbidden(_)
                    | DomainError::ThreadNotFound(_)
                    | DomainError::RunNotFound(_)),
                ) = decided
                {
                    return Err(SubmitError::Domain { index, error });
                }
                if let (Some(expected), Some(t)) = (s.expected_thread_version, &thread) {
                    let current = scratch.thread(t).map_or(0, |t| t.version);
                    if expected != current {
                        return Err(SubmitError::VersionConflict {
                            index,
                            expected,
                            current,
                        });
                    }
                }
                let events = decided.map_err(|error| SubmitError::Domain { index, error })?;
                for (k, event) in events.into_iter().enumerate() {
                    let stream = event.stream();
                    let expected_version = match event.thread_id() {
                        Some(t) if first_on_stream.insert(stream.clone()) => {
                            Some(scratch.thread(t).map_or(0, |t| t.version))
                        }
                        _ => None,
                    };
                    let event_id = match (k, s.event_id) {
                        (0, Some(id)) => id.as_uuid(),
                        _ => Uuid::now_v7(),
                    };
                    scratch.apply(
                        &event,
                        &EventMeta {
                            position: 0,
                            recorded_at_ms: now_ms,
                        },
                    );
                    planned.push(Planned {
                        index,
                        new: NewEvent {
                            event_id,
                            stream: stream.into_string(),
                            expected_version,
                            actor: actor.to_string(),
                            event_type: event.type_name().to_owned(),
                            payload: encode_event(&event),
                        },
                        event,
                    });
                }
            }
            Ok(planned)
        })
    }

    async fn outcomes(
        &self,
        submissions: &[Submission],
        known: &[Option<Known>],
        planned: &[Planned],
        appended: &[Appended],
    ) -> Result<Vec<Option<Outcome>>, SubmitError> {
        let mut out: Vec<Option<Outcome>> = vec![None; submissions.len()];
        for (index, original) in known.iter().enumerate() {
            if let Some(k) = original {
                out[index] = Some(self.outcome(&k.event, k.event_id, &k.at, true));
            }
        }
        for (p, a) in planned.iter().zip(appended) {
            // A duplicate inside the batch (same id twice) still reports the original.
            if a.duplicate {
                // Another request stored this id between our look-up and our append:
                // answer with its result only if it is the same request.
                let id = EventId::from_uuid(p.new.event_id);
                let same = self
                    .known(id)
                    .await?
                    .is_some_and(|k| submissions[p.index].command.repeats(&k.event));
                if !same {
                    return Err(SubmitError::Domain {
                        index: p.index,
                        error: DomainError::EventIdConflict(id),
                    });
                }
            }
            out[p.index] = Some(self.outcome(&p.event, p.new.event_id, a, a.duplicate));
        }
        Ok(out)
    }

    fn outcome(&self, event: &Event, event_id: Uuid, at: &Appended, duplicate: bool) -> Outcome {
        let user_seq = self.read(|m| {
            event
                .thread_id()
                .and_then(|t| m.registry().owner_of(t))
                .and_then(|owner| m.delivery().seq_of(owner, at.position))
        });
        Outcome {
            position: at.position,
            event_id,
            thread_id: event.thread_id().cloned(),
            run_id: event.run_id().cloned(),
            thread_version: at.stream_version,
            user_seq,
            duplicate,
        }
    }
}
