//! The application service: what each call does, between the wire types and
//! the projector. Handlers extract, call one function here, and map the result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use threadline_engine::{
    Actor, AgentEventKind, Command, DomainError, EventId, Limits, Registry, Role, RunId, Thread,
    ThreadId, UserId,
};
use threadline_projections::{Outcome, Projector, Submission};
use threadline_storage::{now_ms, EventLog, Position, SledLog};
use tokio::sync::watch;

use crate::auth::{Authenticator, Principal};
use crate::config::LimitArgs;
use crate::error::AppError;
use crate::rate::RateLimits;
use crate::wire::{self, timestamp};

/// Largest page any list call returns.
pub const MAX_LIMIT: usize = 1000;
/// Most events one batch call may carry.
pub const MAX_BATCH: usize = 1000;

/// Shared state of a running server. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub projector: Arc<Projector<SledLog>>,
    pub auth: Authenticator,
    pub limits: Limits,
    /// The edge's limits (connections, sockets, rates).
    pub edge: Arc<LimitArgs>,
    pub rate: RateLimits,
    pub connections: Arc<Mutex<HashMap<UserId, usize>>>,
    /// Flips to true when the server begins shutting down.
    pub shutdown: watch::Receiver<bool>,
}

impl AppState {
    fn log(&self) -> &SledLog {
        self.projector.log()
    }

    async fn submit(
        &self,
        actor: &Actor,
        subs: &[Submission],
    ) -> Result<Vec<Option<Outcome>>, AppError> {
        let started = std::time::Instant::now();
        let result = self
            .projector
            .submit(actor, subs, now_ms(), &self.limits)
            .await;
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
            .ok_or_else(|| AppError::Internal("a command produced no event".into()))
    }

    /// Whether `actor` may read `thread` (a user reads only its own; existence must not leak).
    fn may_read(actor: &Actor, thread: &Thread) -> bool {
        matches!(actor.role, Role::Agent | Role::Auditor) || thread.owner == actor.user
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
            .projector
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
                Ok(self.projector.read(|m| {
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
                Ok(self.projector.read(|m| {
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

    pub fn get_thread(
        &self,
        p: &Principal,
        thread_id: &str,
    ) -> Result<wire::ThreadDetail, AppError> {
        let thread_id = ThreadId::parse(thread_id)?;
        let mut detail = self.projector.read(|m| {
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
        detail.metadata = self.metadata(&thread_id)?;
        Ok(detail)
    }

    /// A thread's metadata, read from its first record (the registry does not hold it).
    fn metadata(
        &self,
        thread_id: &ThreadId,
    ) -> Result<Option<Box<serde_json::value::RawValue>>, AppError> {
        let first = self
            .log()
            .read_stream(&format!("thread:{thread_id}"), 1, 1)?;
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
        let mut sub = agent_submission(run_id, req.kind, req.data, req.event_id, &self.limits)?;
        sub.expected_thread_version = if_match;
        let outcome = self.submit_one(&p.actor, sub).await?;
        Ok((appended(&outcome), outcome.duplicate))
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
                agent_submission(&e.run_id, e.kind, e.data, e.event_id, &self.limits)
                    .map_err(|err| err.at(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let outcomes = self.submit(&p.actor, &subs).await?;
        Ok(wire::BatchAppended {
            results: outcomes.iter().flatten().map(appended).collect(),
        })
    }

    pub fn thread_events(
        &self,
        p: &Principal,
        thread_id: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<wire::Frames, AppError> {
        let thread_id = ThreadId::parse(thread_id)?;
        let owner = self
            .projector
            .read(|m| visible(m.registry(), &p.actor, &thread_id).map(|t| t.owner.clone()))?;
        // Nothing comes after u64::MAX (and it must not wrap round to version 0).
        let records = match after_version.checked_add(1) {
            Some(from) => self.log().read_stream(
                &format!("thread:{thread_id}"),
                from,
                limit.clamp(1, MAX_LIMIT),
            )?,
            None => Vec::new(),
        };
        let mut events = Vec::with_capacity(records.len());
        for record in &records {
            let event = wire::event_of(record)?;
            let seq = self
                .projector
                .read(|m| m.delivery().seq_of(&owner, record.position))
                .unwrap_or(0);
            events.extend(wire::frame(record, &event, seq));
        }
        let next_after_version = records.last().map_or(after_version, |r| r.stream_version);
        Ok(wire::Frames {
            events,
            next_after_version,
        })
    }

    pub fn audit(&self, p: &Principal, q: &AuditQuery) -> Result<wire::Envelopes, AppError> {
        if p.actor.role != Role::Auditor {
            return Err(AppError::Forbidden(
                "only auditors read the audit log".into(),
            ));
        }
        audit_page(&self.projector, q)
    }

    /// Appends `run_expired` for every open run idle beyond the TTL.
    pub async fn expire_idle_runs(&self) -> Result<usize, AppError> {
        let idle = self.projector.read(|m| {
            m.registry()
                .expirable_runs(now_ms(), self.limits.run_ttl_ms)
        });
        let mut expired = 0;
        for run_id in idle {
            let sub = Submission::new(Command::ExpireRun { run_id });
            expired += self
                .submit(&Actor::system(), &[sub])
                .await?
                .iter()
                .flatten()
                .count();
        }
        Ok(expired)
    }
}

/// Filters of the audit log (`GET /v1/audit/events`, `threadline audit`).
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub after: u64,
    pub limit: usize,
    pub user_id: Option<UserId>,
    pub thread_id: Option<ThreadId>,
    pub run_id: Option<RunId>,
    pub event_type: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

/// How far one audit call scans past `after` looking for matches; `next_after`
/// tells the caller where to go on, so a rare filter never makes one call unbounded.
const AUDIT_SCAN: usize = 100_000;

/// One page of auditor envelopes after `q.after`, matching every filter.
pub fn audit_page<L: EventLog + threadline_storage::Checkpoints>(
    projector: &Projector<L>,
    q: &AuditQuery,
) -> Result<wire::Envelopes, AppError> {
    let limit = q.limit.max(1);
    let mut events = Vec::new();
    let mut next = Position(q.after);
    let mut scanned = 0;
    let head = projector.position();
    'scan: while next < head && scanned < AUDIT_SCAN && events.len() < limit {
        let page = projector
            .log()
            .read_from(next.next(), 1000.min(AUDIT_SCAN - scanned))?;
        if page.is_empty() {
            break;
        }
        for record in &page {
            if events.len() >= limit {
                break 'scan;
            }
            next = record.position;
            scanned += 1;
            // The log's own records (an accepted loss, a damaged placeholder) belong to no thread.
            if record
                .stream
                .starts_with(threadline_storage::SYSTEM_STREAM_PREFIX)
            {
                continue;
            }
            if q.event_type
                .as_deref()
                .is_some_and(|t| t != record.event_type)
                || q.since_ms.is_some_and(|s| record.recorded_at_ms < s)
                || q.until_ms.is_some_and(|u| record.recorded_at_ms > u)
            {
                continue;
            }
            let event = wire::event_of(record)?;
            let Some(thread_id) = event.thread_id() else {
                continue;
            };
            if q.thread_id.as_ref().is_some_and(|t| t != thread_id)
                || q.run_id.as_ref().is_some_and(|r| Some(r) != event.run_id())
            {
                continue;
            }
            let (owner, seq) = projector.read(|m| {
                let owner = m.registry().owner_of(thread_id).cloned();
                let seq = owner
                    .as_ref()
                    .and_then(|o| m.delivery().seq_of(o, record.position));
                (owner, seq)
            });
            let Some(owner) = owner else { continue };
            if q.user_id.as_ref().is_some_and(|u| *u != owner) {
                continue;
            }
            if let Some(frame) = wire::frame(record, &event, seq.unwrap_or(0)) {
                events.push(wire::Envelope {
                    frame,
                    user_id: owner.to_string(),
                    actor: wire::actor_of(record),
                });
            }
        }
    }
    Ok(wire::Envelopes {
        events,
        next_after: next.0,
    })
}

fn visible<'a>(
    registry: &'a Registry,
    actor: &Actor,
    thread_id: &ThreadId,
) -> Result<&'a Thread, AppError> {
    registry
        .thread(thread_id)
        .filter(|t| AppState::may_read(actor, t))
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

fn appended(o: &Outcome) -> wire::EventAppended {
    wire::EventAppended {
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
    let kind = AgentEventKind::parse(&kind).ok_or(AppError::InvalidEventType(kind))?;
    let event_id = event_id.map(|id| EventId::parse(&id)).transpose()?;
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
