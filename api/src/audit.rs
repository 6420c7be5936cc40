//! The audit query: one page of auditor envelopes, filtered, scanned from the
//! log in bounded steps. Served by `GET /v1/audit/events` (off the runtime)
//! and run offline by `threadline audit`.

use std::time::{Duration, Instant};

use serde::Deserialize;
use threadline_engine::{Event, RunId, ThreadId, UserId};
use threadline_projections::{Projector, PAGE};
use threadline_storage::{Checkpoints, EventLog, Position, SYSTEM_STREAM_PREFIX};
use utoipa::IntoParams;

use crate::error::AppError;
use crate::wire;

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

/// How far one audit call scans past `after` looking for matches, in records
/// and in time; `next_after` tells the caller where to go on, so a rare filter
/// never makes one call unbounded.
const AUDIT_SCAN: usize = 100_000;
const AUDIT_BUDGET: Duration = Duration::from_millis(250);

/// One page of auditor envelopes after `q.after`, matching every filter.
pub fn audit_page<L: EventLog + Checkpoints>(
    projector: &Projector<L>,
    q: &AuditQuery,
) -> Result<wire::Envelopes, AppError> {
    let limit = q.limit.max(1);
    let mut events = Vec::new();
    let mut next = Position(q.after);
    let mut scanned = 0;
    let head = projector.position();
    let started = Instant::now();
    'scan: while next < head
        && scanned < AUDIT_SCAN
        && events.len() < limit
        && started.elapsed() < AUDIT_BUDGET
    {
        let page = projector
            .log()
            .read_from(next.next(), PAGE.min(AUDIT_SCAN - scanned))?;
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
            if record.stream.starts_with(SYSTEM_STREAM_PREFIX) {
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
            // A nudge's outcome is listed under its subject's thread, run and owner.
            if let Event::NudgeRecorded(nudge) = &event {
                if q.thread_id.as_ref().is_some_and(|t| *t != nudge.thread_id)
                    || q.run_id.as_ref().is_some_and(|r| *r != nudge.run_id)
                    || q.user_id.as_ref().is_some_and(|u| *u != nudge.user_id)
                {
                    continue;
                }
                events.push(wire::Envelope {
                    frame: wire::nudge_frame(record, &event, nudge),
                    user_id: nudge.user_id.to_string(),
                    actor: wire::actor_of(record),
                });
                continue;
            }
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

/// The audit filters as the query string (and `threadline audit --url`) spells them.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// The position to continue after (a previous page's `next_after`).
    #[serde(default)]
    pub after: u64,
    /// The page size.
    // 1000 is `MAX_LIMIT` (an attribute takes only a literal; a test checks they agree).
    #[param(minimum = 1, maximum = 1000, default = 100)]
    pub limit: Option<usize>,
    /// The threads' owner.
    pub user_id: Option<String>,
    pub thread_id: Option<String>,
    pub run_id: Option<String>,
    /// The event type (`event` of the envelope).
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Recorded at or after this RFC 3339 time.
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// Recorded at or before this RFC 3339 time.
    #[param(format = DateTime)]
    pub until: Option<String>,
}

impl AuditParams {
    /// The validated query (bad ids, times or limits are the client's mistake).
    pub fn parse(self) -> Result<AuditQuery, AppError> {
        let time = |t: Option<String>| {
            t.map(|t| wire::parse_timestamp(&t).map_err(AppError::InvalidRequest))
                .transpose()
        };
        Ok(AuditQuery {
            after: self.after,
            limit: crate::http::check_limit(self.limit)?,
            user_id: self.user_id.map(|u| UserId::parse(&u)).transpose()?,
            thread_id: self.thread_id.map(|t| ThreadId::parse(&t)).transpose()?,
            run_id: self.run_id.map(|r| RunId::parse(&r)).transpose()?,
            event_type: self.event_type,
            since_ms: time(self.since)?,
            until_ms: time(self.until)?,
        })
    }
}
