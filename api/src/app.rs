//! The application service: what each call does, between the wire types and
//! the write path ([`CommandService`]) and read model ([`Projector`]).
//! Handlers extract, call one function here, and map the result.
//!
//! Nothing here blocks a runtime thread on the log: reads are served from the
//! projections and the projector's recent records (memory), and what must
//! touch the log (a thread's metadata or history, audit scans, an old page of a
//! socket's replay) runs on `spawn_blocking`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use threadline_engine::{
    Actor, AgentEventKind, Command, DomainError, EventId, Limits, Registry, Role, Run, RunId,
    StreamName, Thread, ThreadId, UserId, INPUT_REQUESTED,
};
use threadline_projections::{CommandService, Outcome, Projector, Submission, PAGE};
use threadline_storage::{now_ms, Checkpoints, EventLog, Position, Record};
use tokio::sync::watch;

use crate::audit::{audit_page, AuditQuery};
use crate::auth::{Authenticator, Principal};
use crate::config::LimitArgs;
use crate::deliveries::{deliveries_page, DeliveryQuery};
use crate::error::AppError;
use crate::presence::Presence;
use crate::rate::RateLimits;
use crate::wire::{self, timestamp};

/// Largest page any list call returns.
pub const MAX_LIMIT: usize = PAGE;
/// Most events one batch call may carry.
pub const MAX_BATCH: usize = 1000;

/// What the app needs of a log: the event log and its checkpoint store.
pub trait Log: EventLog + Checkpoints {}
impl<T: EventLog + Checkpoints> Log for T {}

/// Shared state of a running server, over any log. Cheap to clone.
#[derive(Debug)]
pub struct AppState<L> {
    inner: Arc<Inner<L>>,
}

impl<L> Clone for AppState<L> {
    fn clone(&self) -> Self {
        AppState {
            inner: Arc::clone(&self.inner),
        }
    }
}

#[derive(Debug)]
struct Inner<L> {
    projector: Arc<Projector<L>>,
    commands: CommandService<L>,
    gate: Gate,
    /// The edge's limits (connections, sockets, rates).
    edge: LimitArgs,
    connections: Mutex<HashMap<UserId, usize>>,
    presence: Presence,
    /// The nudge webhook, when configured (`serve` starts its worker).
    nudge: std::sync::OnceLock<Arc<crate::nudge::NudgeConfig>>,
    /// Raised when the server begins shutting down.
    shutdown: watch::Sender<bool>,
    /// The online verify job's slot.
    verifier: crate::verify::Verifier,
}

/// What the request extractors need of the state, whatever its log: who the
/// caller is, whether it is within its rate, and how long a body may take.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    pub(crate) auth: Authenticator,
    pub(crate) rate: RateLimits,
    pub(crate) header_timeout: std::time::Duration,
}

impl<L> axum::extract::FromRef<AppState<L>> for Gate {
    fn from_ref(state: &AppState<L>) -> Gate {
        state.inner.gate.clone()
    }
}

impl<L> AppState<L> {
    /// Live socket counts per user (no bound on the log: a slot frees itself on drop).
    pub(crate) fn connections_any(&self) -> &Mutex<HashMap<UserId, usize>> {
        &self.inner.connections
    }

    /// Which users have a connected device (kept by the socket slots).
    pub(crate) fn devices_any(&self) -> &Presence {
        &self.inner.presence
    }
}

impl<L: Log> AppState<L> {
    /// The state of a server over `projector`'s log. Its fold thread is started
    /// by `serve` (or by whoever drives the router, with [`Projector::follow`]).
    pub fn new(
        projector: Arc<Projector<L>>,
        auth: Authenticator,
        limits: Limits,
        edge: LimitArgs,
    ) -> AppState<L> {
        AppState {
            inner: Arc::new(Inner {
                commands: CommandService::new(Arc::clone(&projector), limits),
                projector,
                gate: Gate {
                    auth,
                    rate: RateLimits::new(edge.rate_limit, edge.rate_burst, edge.agent_rate_limit),
                    header_timeout: edge.header_timeout,
                },
                presence: Presence::new(edge.presence_grace),
                edge,
                connections: Mutex::default(),
                nudge: std::sync::OnceLock::new(),
                shutdown: watch::Sender::new(false),
                verifier: crate::verify::Verifier::default(),
            }),
        }
    }

    pub fn projector(&self) -> &Arc<Projector<L>> {
        &self.inner.projector
    }

    /// Turns the nudge webhook on (before `serve`; a second call changes nothing).
    pub fn with_nudges(self, config: crate::nudge::NudgeConfig) -> AppState<L> {
        let _ = self.inner.nudge.set(Arc::new(config));
        self
    }

    pub(crate) fn nudges(&self) -> Option<&Arc<crate::nudge::NudgeConfig>> {
        self.inner.nudge.get()
    }

    pub(crate) fn auth(&self) -> &Authenticator {
        &self.inner.gate.auth
    }

    pub(crate) fn limits(&self) -> &Limits {
        self.inner.commands.limits()
    }

    pub(crate) fn edge(&self) -> &LimitArgs {
        &self.inner.edge
    }

    pub(crate) fn rate(&self) -> &RateLimits {
        &self.inner.gate.rate
    }

    pub(crate) fn connections(&self) -> &Mutex<HashMap<UserId, usize>> {
        &self.inner.connections
    }

    pub(crate) fn devices(&self) -> &Presence {
        &self.inner.presence
    }

    /// A receiver that flips to true when the server begins shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Tells every socket and background task that the server is stopping.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Runs `f` on a blocking thread (for work that reads the log).
    pub(crate) async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Projector<L>) -> Result<R, AppError> + Send + 'static,
    ) -> Result<R, AppError> {
        let projector = Arc::clone(&self.inner.projector);
        tokio::task::spawn_blocking(move || f(&projector))
            .await
            .map_err(|_| AppError::Internal("a blocking read was cancelled"))?
    }

    /// The records at `positions`, from memory when they are recent, else from the log
    /// (off the runtime; records sharing a stored frame are read together).
    pub(crate) async fn records(
        &self,
        positions: Vec<Position>,
    ) -> Result<Vec<Arc<Record>>, AppError> {
        if let Some(records) = self.inner.projector.recent(&positions) {
            return Ok(records);
        }
        self.blocking(move |p| {
            let records = p.log().read_many(&positions)?;
            Ok(records.into_iter().map(Arc::new).collect())
        })
        .await
    }

    pub(crate) async fn submit(
        &self,
        actor: &Actor,
        subs: &[Submission],
    ) -> Result<Vec<Option<Outcome>>, AppError> {
        let started = std::time::Instant::now();
        let result = self.inner.commands.submit(actor, subs, now_ms()).await;
        metrics::histogram!("threadline_append_seconds").record(started.elapsed().as_secs_f64());
        let outcomes = result?;
        metrics::counter!("threadline_appends_total")
            .increment(outcomes.iter().flatten().filter(|o| !o.duplicate).count() as u64);
        Ok(outcomes)
    }
    async fn submit_one(&self, actor: &Actor, sub: Submission) -> Result<Outcome, AppError> {
        self.submit(actor, &[sub])
            .await
            .map_err(AppError::without_index)?
            .pop()
            .flatten()
            .ok_or(AppError::Internal("a command produced no event"))
    }

    pub async fn create_thread(
        &self,
        p: &Principal,
        req: wire::CreateThread,
    ) -> Result<wire::ThreadCreated, AppError> {
        let thread_id = match req.thread_id {
            Some(id) => ThreadId::parse(&id)?,
            None => ThreadId::generate(),
        };
        let owner = match (p.actor.role, req.user_id) {
            (Role::Agent, Some(u)) => UserId::parse(&u)?,
            (Role::Agent, None) => {
                return Err(AppError::InvalidRequest(
                    "an agent must name the thread's user_id".into(),
                ))
            }
            (_, Some(u)) if u != p.actor.user.as_str() => {
                return Err(AppError::Forbidden(
                    "only agents may create threads for another user".into(),
                ))
            }
            _ => p.actor.user.clone(),
        };
        let metadata = req
            .metadata
            .map(|m| serde_json::Value::Object(m).to_string());
        let command = Command::CreateThread {
            thread_id: thread_id.clone(),
            owner: owner.clone(),
            title: req.title,
            metadata,
        };
        let outcome = self.submit_one(&p.actor, Submission::new(command)).await?;
        let created_at = self
            .projector()
            .read(|m| m.registry().thread(&thread_id).map(|t| t.created_at_ms));
        Ok(wire::ThreadCreated {
            thread_id: thread_id.to_string(),
            user_id: owner.to_string(),
            position: outcome.position.0,
            created_at: timestamp(created_at.unwrap_or_else(now_ms)),
        })
    }

    /// One page of threads: a user's own (or, for auditors and agents, one user's) in
    /// creation order, or every thread in id order. `after` is a `next` of a previous page.
    pub fn list_threads(
        &self,
        p: &Principal,
        user: Option<String>,
        limit: usize,
        after: Option<String>,
    ) -> Result<wire::ThreadList, AppError> {
        let user = match (p.actor.role, user) {
            (Role::Auditor | Role::Agent, Some(u)) => Some(UserId::parse(&u)?),
            (Role::Auditor | Role::Agent, None) => None,
            (_, Some(u)) if u != p.actor.user.as_str() => {
                return Err(AppError::Forbidden(
                    "only auditors may list another user's threads".into(),
                ))
            }
            _ => Some(p.actor.user.clone()),
        };
        let bad_cursor = || {
            AppError::InvalidRequest(
                "after must be the `next` of a previous page of this list".into(),
            )
        };
        match &user {
            // A user's list only grows at its end: the count of threads already
            // listed is a stable cursor.
            Some(u) => {
                let skip = after
                    .map(|a| a.parse::<usize>().map_err(|_| bad_cursor()))
                    .transpose()?
                    .unwrap_or(0);
                Ok(self.projector().read(|m| {
                    let registry = m.registry();
                    let page = registry.threads_of_page(u, skip, limit);
                    let listed = skip.saturating_add(page.len());
                    let more = (listed as u64) < registry.thread_count(u);
                    wire::ThreadList {
                        threads: page.into_iter().map(summary).collect(),
                        next: more.then(|| listed.to_string()),
                    }
                }))
            }
            // Every thread, in id order: the last id listed is the cursor.
            None => {
                let after = after
                    .map(|a| ThreadId::parse(&a).map_err(|_| bad_cursor()))
                    .transpose()?;
                Ok(self.projector().read(|m| {
                    let mut page = m.registry().threads_after(after.as_ref(), limit + 1);
                    let more = page.len() > limit;
                    page.truncate(limit);
                    wire::ThreadList {
                        next: more
                            .then(|| page.last().map(|t| t.thread_id.to_string()))
                            .flatten(),
                        threads: page.into_iter().map(summary).collect(),
                    }
                }))
            }
        }
    }

    pub async fn get_thread(
        &self,
        p: &Principal,
        thread_id: &str,
    ) -> Result<wire::ThreadDetail, AppError> {
        let thread_id = ThreadId::parse(thread_id)?;
        let mut detail = self.projector().read(|m| {
            let registry = m.registry();
            let thread = visible(registry, &p.actor, &thread_id)?;
            let runs = thread
                .runs
                .iter()
                .filter_map(|r| registry.run(r))
                .map(|r| wire::RunSummary {
                    run_id: r.run_id.to_string(),
                    agent_name: r.agent_name.clone(),
                    status: r.status.as_str().to_owned(),
                    registered_at: timestamp(r.registered_at_ms),
                    last_event: r.last_event.clone(),
                })
                .collect();
            Ok::<_, AppError>(wire::ThreadDetail {
                summary: summary(thread),
                metadata: None,
                runs,
            })
        })?;
        detail.metadata = self.metadata(&thread_id).await?;
        Ok(detail)
    }

    /// A thread's metadata, read from its first record (the registry does not hold it).
    async fn metadata(
        &self,
        thread_id: &ThreadId,
    ) -> Result<Option<Box<serde_json::value::RawValue>>, AppError> {
        let stream = StreamName::thread(thread_id);
        let first = self
            .blocking(move |p| Ok(p.log().read_stream(stream.as_str(), 1, 1)?))
            .await?;
        let Some(record) = first.first() else {
            return Ok(None);
        };
        Ok(match wire::event_of(record)? {
            threadline_engine::Event::ThreadCreated {
                metadata: Some(m), ..
            } => serde_json::value::RawValue::from_string(m).ok(),
            _ => None,
        })
    }

    pub async fn register_run(
        &self,
        p: &Principal,
        thread_id: &str,
        req: wire::RegisterRun,
        if_match: Option<u64>,
    ) -> Result<wire::RunRegistered, AppError> {
        let thread_id = ThreadId::parse(thread_id)?;
        let run_id = match req.run_id {
            Some(id) => RunId::parse(&id)?,
            None => RunId::generate(),
        };
        let command = Command::RegisterRun {
            thread_id: thread_id.clone(),
            run_id: run_id.clone(),
            agent_name: req.agent_name,
        };
        let sub = Submission {
            expected_thread_version: if_match,
            ..Submission::new(command)
        };
        let outcome = self.submit_one(&p.actor, sub).await?;
        Ok(wire::RunRegistered {
            run_id: run_id.to_string(),
            thread_id: thread_id.to_string(),
            position: outcome.position.0,
            thread_version: outcome.thread_version,
        })
    }

    /// Appends one agent event; the flag is true when it was a repeat of a stored `event_id`.
    pub async fn append_event(
        &self,
        p: &Principal,
        run_id: &str,
        req: wire::AgentEvent,
        if_match: Option<u64>,
    ) -> Result<(wire::EventAppended, bool), AppError> {
        let mut sub = agent_submission(run_id, req.kind, req.data, req.event_id, self.limits())?;
        sub.expected_thread_version = if_match;
        let outcome = self.submit_one(&p.actor, sub).await?;
        let appended = self.projector().read(|m| appended(m.registry(), &outcome));
        Ok((appended, outcome.duplicate))
    }

    pub async fn append_batch(
        &self,
        p: &Principal,
        req: wire::Batch,
    ) -> Result<wire::BatchAppended, AppError> {
        if req.events.is_empty() || req.events.len() > MAX_BATCH {
            return Err(AppError::InvalidRequest(format!(
                "a batch carries 1 to {MAX_BATCH} events"
            )));
        }
        let subs = req
            .events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                agent_submission(&e.run_id, e.kind, e.data, e.event_id, self.limits())
                    .map_err(|err| err.at(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let outcomes = self.submit(&p.actor, &subs).await?;
        Ok(self.projector().read(|m| wire::BatchAppended {
            results: outcomes
                .iter()
                .flatten()
                .map(|o| appended(m.registry(), o))
                .collect(),
        }))
    }

    pub async fn thread_events(
        &self,
        p: &Principal,
        thread_id: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<wire::Frames, AppError> {
        let thread_id = ThreadId::parse(thread_id)?;
        let owner = self
            .projector()
            .read(|m| visible(m.registry(), &p.actor, &thread_id).map(|t| t.owner.clone()))?;
        // Nothing comes after u64::MAX (and it must not wrap round to version 0).
        let Some(from) = after_version.checked_add(1) else {
            return Ok(wire::Frames {
                events: Vec::new(),
                next_after_version: after_version,
            });
        };
        let stream = StreamName::thread(&thread_id);
        let limit = limit.clamp(1, MAX_LIMIT);
        let records = self
            .blocking(move |p| Ok(p.log().read_stream(stream.as_str(), from, limit)?))
            .await?;
        let seqs: Vec<u64> = self.projector().read(|m| {
            records
                .iter()
                .map(|r| m.delivery().seq_of(&owner, r.position).unwrap_or(0))
                .collect()
        });
        let mut events = Vec::with_capacity(records.len());
        for (record, seq) in records.iter().zip(seqs) {
            let event = wire::event_of(record)?;
            events.extend(wire::frame(record, &event, seq));
        }
        let next_after_version = records.last().map_or(after_version, |r| r.stream_version);
        Ok(wire::Frames {
            events,
            next_after_version,
        })
    }

    /// One page of the audit log, scanned off the runtime and bounded in records and time.
    pub async fn audit(&self, p: &Principal, q: AuditQuery) -> Result<wire::Envelopes, AppError> {
        if p.actor.role != Role::Auditor {
            return Err(AppError::Forbidden(
                "only auditors read the audit log".into(),
            ));
        }
        self.blocking(move |projector| audit_page(projector, &q))
            .await
    }

    /// Starts the online verify (auditors only) unless one is running; returns
    /// whether it started one, and that job's status.
    pub fn start_verify(
        &self,
        p: &Principal,
    ) -> Result<(bool, crate::verify::VerifyStatus), AppError> {
        if p.actor.role != Role::Auditor {
            return Err(AppError::Forbidden("only auditors run verify".into()));
        }
        Ok(self
            .inner
            .verifier
            .start(Arc::clone(&self.inner.projector), p.actor.user.as_str()))
    }

    /// The running or last online verify job (auditors only).
    pub fn verify_status(&self, p: &Principal) -> Result<crate::verify::VerifyStatus, AppError> {
        if p.actor.role != Role::Auditor {
            return Err(AppError::Forbidden(
                "only auditors read verify's result".into(),
            ));
        }
        Ok(self.inner.verifier.status())
    }

    /// One page of the delivery ledger (auditors only).
    pub async fn deliveries(
        &self,
        p: &Principal,
        q: DeliveryQuery,
    ) -> Result<crate::deliveries::Deliveries, AppError> {
        if p.actor.role != Role::Auditor {
            return Err(AppError::Forbidden(
                "only auditors read the delivery ledger".into(),
            ));
        }
        self.blocking(move |projector| deliveries_page(projector, &q))
            .await
    }

    /// `run_cancel_requested`: the thread's owner asks the agent to stop the run.
    /// A second request is answered with the first (the flag is true then).
    pub async fn cancel_run(
        &self,
        p: &Principal,
        run_id: &str,
        req: wire::CancelRun,
    ) -> Result<(wire::SteerRecorded, bool), AppError> {
        let run_id = RunId::parse(run_id)?;
        let command = Command::RequestCancel {
            run_id: run_id.clone(),
            reason: req.reason,
        };
        let recorded = self.steer(p, command).await?;
        let original = self.projector().read(|m| {
            m.registry()
                .run(&run_id)
                .and_then(|r| r.cancel.as_ref())
                .map(|c| Position(c.position))
        });
        self.steer_answer(recorded, original, &run_id).await
    }

    /// `user_input_provided`: the thread's owner answers an `agent_awaiting_input`.
    /// The same answer again is answered with the original (the flag is true then).
    pub async fn provide_input(
        &self,
        p: &Principal,
        run_id: &str,
        req: wire::ProvideInput,
    ) -> Result<(wire::SteerRecorded, bool), AppError> {
        let run_id = RunId::parse(run_id)?;
        let command = Command::ProvideInput {
            run_id: run_id.clone(),
            input_id: req.input_id.clone(),
            answer: req.answer,
        };
        let recorded = self.steer(p, command).await?;
        let original = self.projector().read(|m| {
            m.registry()
                .run(&run_id)
                .and_then(|r| r.inputs.get(&req.input_id))
                .and_then(|i| i.answer.as_ref())
                .map(|a| Position(a.position))
        });
        self.steer_answer(recorded, original, &run_id).await
    }

    /// Submits a steering command: `Some` where its event landed, `None` when it
    /// repeated one already recorded (the command then produced no event).
    async fn steer(&self, p: &Principal, command: Command) -> Result<Option<Position>, AppError> {
        let outcome = self
            .submit(&p.actor, &[Submission::new(command)])
            .await
            .map_err(AppError::without_index)?
            .pop()
            .flatten();
        Ok(outcome.map(|o| o.position))
    }

    /// The answer of a steering call, read from the recorded event (or the original).
    async fn steer_answer(
        &self,
        recorded: Option<Position>,
        original: Option<Position>,
        run_id: &RunId,
    ) -> Result<(wire::SteerRecorded, bool), AppError> {
        let repeat = recorded.is_none();
        let position = recorded
            .or(original)
            .ok_or(AppError::Internal("a steering command left no event"))?;
        let record = self
            .records(vec![position])
            .await?
            .pop()
            .ok_or(AppError::Internal("a steering event is not readable"))?;
        let event = wire::event_of(&record)?;
        let (thread_id, by) = match &event {
            threadline_engine::Event::RunCancelRequested {
                thread_id,
                requested_by,
                ..
            } => (thread_id, requested_by),
            threadline_engine::Event::InputProvided {
                thread_id,
                answered_by,
                ..
            } => (thread_id, answered_by),
            _ => {
                return Err(AppError::Internal(
                    "a steering position holds another event",
                ))
            }
        };
        let user_seq = self
            .projector()
            .read(|m| m.delivery().seq_of(by, position).unwrap_or(0));
        Ok((
            wire::SteerRecorded {
                run_id: run_id.to_string(),
                thread_id: thread_id.to_string(),
                event: event.type_name().to_owned(),
                position: position.0,
                user_seq,
                thread_version: record.stream_version,
                event_id: record.event_id.to_string(),
                by: by.to_string(),
                recorded_at: timestamp(record.recorded_at_ms),
            },
            repeat,
        ))
    }

    /// What the run's owner asked of it. With `after`, waits up to `wait` for the
    /// run's signal count to pass it (a long poll for agents awaiting input).
    pub async fn run_signals(
        &self,
        p: &Principal,
        run_id: &str,
        after: Option<u64>,
        wait: std::time::Duration,
    ) -> Result<wire::RunSignals, AppError> {
        let run_id = RunId::parse(run_id)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut folded = self.projector().watch();
        let mut shutdown = self.shutdown_signal();
        loop {
            folded.borrow_and_update();
            let signals = self
                .projector()
                .read(|m| visible_run(m.registry(), &p.actor, &run_id).map(signals_of))?;
            let news = after.is_none_or(|a| signals.signals > a);
            if news || !threadline_engine::RunStatus::is_open(&status_of(&signals)) {
                return Ok(signals);
            }
            tokio::select! {
                changed = folded.changed() => if changed.is_err() { return Ok(signals) },
                _ = tokio::time::sleep_until(deadline) => return Ok(signals),
                _ = shutdown.changed() => return Ok(signals),
            }
        }
    }

    /// Whether `user` has a connected device: the user itself, agents and auditors may ask.
    pub fn presence(&self, p: &Principal, user_id: &str) -> Result<wire::Presence, AppError> {
        let user = UserId::parse(user_id)?;
        if p.actor.role == Role::User && p.actor.user != user {
            return Err(AppError::Forbidden(
                "a user may read only its own presence".into(),
            ));
        }
        let seen = self.inner.presence.get(&user);
        Ok(wire::Presence {
            user_id: user.to_string(),
            online: seen.online,
            devices: seen.devices,
            last_seen: seen.last_seen_ms.map(timestamp),
        })
    }

    /// Appends `run_expired` for every open run idle beyond the TTL.
    pub async fn expire_idle_runs(&self) -> Result<usize, AppError> {
        Ok(self.inner.commands.expire_idle_runs(now_ms()).await?)
    }
}

/// Whether `actor` may read `thread` (a user reads only its own; existence must not leak).
fn may_read(actor: &Actor, thread: &Thread) -> bool {
    matches!(actor.role, Role::Agent | Role::Auditor) || thread.owner == actor.user
}

fn visible<'a>(
    registry: &'a Registry,
    actor: &Actor,
    thread_id: &ThreadId,
) -> Result<&'a Thread, AppError> {
    registry
        .thread(thread_id)
        .filter(|t| may_read(actor, t))
        .ok_or_else(|| DomainError::ThreadNotFound(thread_id.clone()).into())
}

fn summary(t: &Thread) -> wire::ThreadSummary {
    wire::ThreadSummary {
        thread_id: t.thread_id.to_string(),
        user_id: t.owner.to_string(),
        title: t.title.clone(),
        created_at: timestamp(t.created_at_ms),
        run_count: t.runs.len(),
        last_position: t.last_position,
        version: t.version,
    }
}

/// Where an agent's event landed, with what the run's owner asked of it so far:
/// every append response is also the agent's news of a cancel or an answer.
fn appended(registry: &Registry, o: &Outcome) -> wire::EventAppended {
    let run = o.run_id.as_ref().and_then(|r| registry.run(r));
    wire::EventAppended {
        cancel_requested: run.is_some_and(|r| r.cancel.is_some()),
        signals: run.map_or(0, |r| r.signals),
        answers: run.map(answers_of).unwrap_or_default(),
        position: o.position.0,
        user_seq: o.user_seq.unwrap_or(0),
        thread_id: o
            .thread_id
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_default(),
        run_id: o.run_id.as_ref().map(|r| r.to_string()).unwrap_or_default(),
        thread_version: o.thread_version,
        event_id: o.event_id.to_string(),
    }
}

fn agent_submission(
    run_id: &str,
    kind: String,
    data: serde_json::Map<String, serde_json::Value>,
    event_id: Option<String>,
    limits: &Limits,
) -> Result<Submission, AppError> {
    let run_id = RunId::parse(run_id)?;
    if let Some(sub) = crate::stream::message_submission(&run_id, &kind, &data, &event_id)? {
        return Ok(sub);
    }
    let event_id = event_id.map(|id| EventId::parse(&id)).transpose()?;
    if kind == INPUT_REQUESTED {
        let command = await_input(run_id, data, limits)?;
        return Ok(Submission {
            event_id,
            ..Submission::new(command)
        });
    }
    let kind = AgentEventKind::parse(&kind).ok_or(AppError::InvalidEventType(kind))?;
    let tool_call_id = match data.get("tool_call_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(AppError::InvalidRequest(
                "data.tool_call_id must be a string".into(),
            ))
        }
    };
    let data = serde_json::Value::Object(data).to_string();
    if data.len() > limits.max_data_bytes {
        return Err(DomainError::TooLarge {
            what: "data",
            limit: limits.max_data_bytes,
        }
        .into());
    }
    let command = Command::RecordAgentEvent {
        run_id,
        kind,
        data,
        tool_call_id,
    };
    Ok(Submission {
        event_id,
        ..Submission::new(command)
    })
}

/// `agent_awaiting_input`: `data.input_id` (a string) names the input; an approval
/// (`data.kind` = `"approval"`) lists its choices in `data.options` (strings).
fn await_input(
    run_id: RunId,
    data: serde_json::Map<String, serde_json::Value>,
    limits: &Limits,
) -> Result<Command, AppError> {
    let bad = |m: &str| AppError::InvalidRequest(format!("agent_awaiting_input: {m}"));
    let input_id = match data.get("input_id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => return Err(bad("data.input_id must be a string")),
    };
    let options = match data.get("options") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("data.options must be an array of strings"))?,
        Some(_) => return Err(bad("data.options must be an array of strings")),
    };
    match data.get("kind").and_then(|k| k.as_str()) {
        None | Some("question") => {}
        Some("approval") if !options.is_empty() => {}
        Some("approval") => return Err(bad("an approval lists its choices in data.options")),
        Some(other) => {
            return Err(bad(&format!(
                "data.kind must be \"question\" or \"approval\", not {other:?}"
            )))
        }
    }
    let data = serde_json::Value::Object(data).to_string();
    if data.len() > limits.max_data_bytes {
        return Err(DomainError::TooLarge {
            what: "data",
            limit: limits.max_data_bytes,
        }
        .into());
    }
    Ok(Command::AwaitInput {
        run_id,
        input_id,
        options,
        data,
    })
}

fn answer_of(input_id: &str, a: &threadline_engine::Answer) -> wire::InputAnswer {
    wire::InputAnswer {
        input_id: input_id.to_owned(),
        answer: a.answer.clone(),
        answered_by: a.by.to_string(),
        answered_at: timestamp(a.at_ms),
    }
}

/// Every answered input of `run`, in `input_id` order.
fn answers_of(run: &Run) -> Vec<wire::InputAnswer> {
    run.inputs
        .iter()
        .filter_map(|(id, input)| input.answer.as_ref().map(|a| answer_of(id, a)))
        .collect()
}

fn signals_of(run: &Run) -> wire::RunSignals {
    wire::RunSignals {
        run_id: run.run_id.to_string(),
        thread_id: run.thread_id.to_string(),
        status: run.status.as_str().to_owned(),
        signals: run.signals,
        cancel_requested: run.cancel.is_some(),
        cancel: run.cancel.as_ref().map(|c| wire::CancelInfo {
            requested_by: c.by.to_string(),
            requested_at: timestamp(c.at_ms),
            reason: c.reason.clone(),
        }),
        inputs: run
            .inputs
            .iter()
            .map(|(id, input)| wire::InputState {
                input_id: id.clone(),
                options: input.options.clone(),
                requested_at: timestamp(input.requested_at_ms),
                answer: input.answer.as_ref().map(|a| answer_of(id, a)),
            })
            .collect(),
    }
}

/// The run as `actor` may see it: agents and auditors see every run, a user only
/// the runs of its own threads (anyone else's answers exactly like a missing one).
fn visible_run<'a>(
    registry: &'a Registry,
    actor: &Actor,
    run_id: &RunId,
) -> Result<&'a Run, AppError> {
    registry
        .run(run_id)
        .filter(|r| {
            registry
                .thread(&r.thread_id)
                .is_some_and(|t| may_read(actor, t))
        })
        .ok_or_else(|| DomainError::RunNotFound(run_id.clone()).into())
}

fn status_of(signals: &wire::RunSignals) -> threadline_engine::RunStatus {
    threadline_engine::RunStatus::ALL
        .into_iter()
        .find(|s| s.as_str() == signals.status)
        .unwrap_or(threadline_engine::RunStatus::Running)
}
