//! The delivery ledger query (`GET /v1/audit/deliveries`, `threadline audit
//! --deliveries`): every durable ack (`cursor_advanced` record) in log order,
//! scanned from the log in bounded steps like the audit page; or, for one
//! thread, each of its events with the owner's clients that acknowledged it,
//! read from the ledger projection ([`threadline_projections::Acks`]).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use threadline_engine::{ClientId, DomainError, Event, StreamName, ThreadId, UserId};
use threadline_projections::{Projector, PAGE};
use threadline_storage::{Checkpoints, EventLog, Position, SYSTEM_STREAM_PREFIX};
use utoipa::{IntoParams, ToSchema};

use crate::error::AppError;
use crate::wire;

/// The ledger's filters.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub after: u64,
    pub limit: usize,
    pub user_id: Option<UserId>,
    pub client_id: Option<ClientId>,
    pub thread_id: Option<ThreadId>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

/// The filters as the query string spells them.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// The position to continue after (a previous page's `next_after`).
    #[serde(default)]
    pub after: u64,
    /// The page size: acks, or with `thread_id` events.
    // 1000 is `MAX_LIMIT` (an attribute takes only a literal; a test checks they agree).
    #[param(minimum = 1, maximum = 1000, default = 100)]
    pub limit: Option<usize>,
    /// The acknowledging user (with `thread_id`: must be the thread's owner).
    pub user_id: Option<String>,
    /// Only this client's acks.
    pub client_id: Option<String>,
    /// The ledger of this thread's events.
    pub thread_id: Option<String>,
    /// Acks recorded at or after this RFC 3339 time.
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// Acks recorded at or before this RFC 3339 time.
    #[param(format = DateTime)]
    pub until: Option<String>,
}

impl DeliveryParams {
    pub fn parse(self) -> Result<DeliveryQuery, AppError> {
        let time = |t: Option<String>| {
            t.map(|t| wire::parse_timestamp(&t).map_err(AppError::InvalidRequest))
                .transpose()
        };
        Ok(DeliveryQuery {
            after: self.after,
            limit: crate::http::check_limit(self.limit)?,
            user_id: self.user_id.map(|u| UserId::parse(&u)).transpose()?,
            client_id: self.client_id.map(|c| ClientId::parse(&c)).transpose()?,
            thread_id: self.thread_id.map(|t| ThreadId::parse(&t)).transpose()?,
            since_ms: time(self.since)?,
            until_ms: time(self.until)?,
        })
    }
}

/// One durable ack: `client_id` of `user_id` acknowledged every event up to `user_seq`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[schema(as = Delivery)]
pub struct DeliveryRecord {
    /// The position of the `cursor_advanced` record.
    pub position: u64,
    pub user_id: String,
    pub client_id: String,
    /// Every event of the user up to this `user_seq` is acknowledged.
    pub user_seq: u64,
    #[schema(format = DateTime)]
    pub acked_at: String,
}

/// A client's acknowledgement of one event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct EventAck {
    pub client_id: String,
    /// The position of the ack that first covered the event.
    pub position: u64,
    pub user_seq: u64,
    #[schema(format = DateTime)]
    pub acked_at: String,
}

/// One event of the thread and who has acknowledged it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct EventDeliveries {
    pub position: u64,
    pub user_seq: u64,
    pub thread_version: u64,
    pub event: String,
    #[schema(format = DateTime)]
    pub recorded_at: String,
    pub acks: Vec<EventAck>,
    /// The owner's clients (that ever acknowledged anything) that have not acknowledged it.
    pub unacked: Vec<String>,
}

/// A client of the thread's owner and how far it has acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ClientCursor {
    pub client_id: String,
    pub acked_user_seq: u64,
    pub position: u64,
    #[schema(format = DateTime)]
    pub acked_at: String,
}

/// The thread view of the ledger (present only with `thread_id`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ThreadLedger {
    pub thread_id: String,
    pub user_id: String,
    /// The owner's last `user_seq`.
    pub user_head: u64,
    pub clients: Vec<ClientCursor>,
    pub events: Vec<EventDeliveries>,
}

/// One page of the ledger.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Deliveries {
    pub deliveries: Vec<DeliveryRecord>,
    pub next_after: u64,
    /// Present only with `thread_id`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub thread: Option<ThreadLedger>,
}

const SCAN: usize = 100_000;
const BUDGET: Duration = Duration::from_millis(250);

/// One page of the ledger (blocking: run it off the runtime).
pub fn deliveries_page<L: EventLog + Checkpoints>(
    projector: &Projector<L>,
    q: &DeliveryQuery,
) -> Result<Deliveries, AppError> {
    match &q.thread_id {
        Some(thread_id) => thread_page(projector, q, thread_id),
        None => scan_page(projector, q),
    }
}

fn in_window(q: &DeliveryQuery, at_ms: u64) -> bool {
    !(q.since_ms.is_some_and(|s| at_ms < s) || q.until_ms.is_some_and(|u| at_ms > u))
}

/// Every ack after `q.after` in log order, scanned in bounded steps.
fn scan_page<L: EventLog + Checkpoints>(
    projector: &Projector<L>,
    q: &DeliveryQuery,
) -> Result<Deliveries, AppError> {
    let limit = q.limit.max(1);
    let mut deliveries = Vec::new();
    let mut next = Position(q.after);
    let mut scanned = 0;
    let head = projector.position();
    let started = Instant::now();
    'scan: while next < head
        && scanned < SCAN
        && deliveries.len() < limit
        && started.elapsed() < BUDGET
    {
        let page = projector
            .log()
            .read_from(next.next(), PAGE.min(SCAN - scanned))?;
        if page.is_empty() {
            break;
        }
        for record in &page {
            if deliveries.len() >= limit {
                break 'scan;
            }
            next = record.position;
            scanned += 1;
            if record.stream.starts_with(SYSTEM_STREAM_PREFIX)
                || record.event_type != "cursor_advanced"
                || !in_window(q, record.recorded_at_ms)
            {
                continue;
            }
            let Event::CursorAdvanced {
                user_id,
                client_id,
                user_seq,
            } = wire::event_of(record)?
            else {
                continue;
            };
            if q.user_id.as_ref().is_some_and(|u| *u != user_id)
                || q.client_id.as_ref().is_some_and(|c| *c != client_id)
            {
                continue;
            }
            deliveries.push(DeliveryRecord {
                position: record.position.0,
                user_id: user_id.to_string(),
                client_id: client_id.to_string(),
                user_seq,
                acked_at: wire::timestamp(record.recorded_at_ms),
            });
        }
    }
    Ok(Deliveries {
        deliveries,
        next_after: next.0,
        thread: None,
    })
}

/// The thread's events after position `q.after`, each with its acks.
fn thread_page<L: EventLog + Checkpoints>(
    projector: &Projector<L>,
    q: &DeliveryQuery,
    thread_id: &ThreadId,
) -> Result<Deliveries, AppError> {
    let (owner, version) = projector
        .read(|m| {
            m.registry()
                .thread(thread_id)
                .map(|t| (t.owner.clone(), t.version))
        })
        .filter(|(owner, _)| q.user_id.as_ref().is_none_or(|u| u == owner))
        .ok_or_else(|| AppError::from(DomainError::ThreadNotFound(thread_id.clone())))?;
    let stream = StreamName::thread(thread_id);
    let from = first_version_after(projector, stream.as_str(), version, q.after)?;
    let records = if from > version {
        Vec::new()
    } else {
        projector
            .log()
            .read_stream(stream.as_str(), from, q.limit.max(1))?
    };
    let next_after = records.last().map_or(q.after, |r| r.position.0);
    let wanted = |c: &ClientId| q.client_id.as_ref().is_none_or(|w| w == c);
    let ledger = projector.read(|m| {
        let acks = m.acks();
        let clients: Vec<(ClientId, threadline_projections::Ack)> = acks
            .clients(&owner)
            .filter(|(c, _)| wanted(c))
            .map(|(c, a)| (c.clone(), a))
            .collect();
        let mut events = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let seq = m.delivery().seq_of(&owner, record.position).unwrap_or(0);
            let mut event_acks = Vec::new();
            let mut unacked = Vec::new();
            for (client, _) in &clients {
                match acks.covering(&owner, client, seq) {
                    Some(ack) if in_window(q, ack.at_ms) => {
                        event_acks.push(EventAck {
                            client_id: client.to_string(),
                            position: ack.position,
                            user_seq: ack.user_seq,
                            acked_at: wire::timestamp(ack.at_ms),
                        });
                    }
                    Some(_) => {}
                    None => unacked.push(client.to_string()),
                }
            }
            events.push(EventDeliveries {
                position: record.position.0,
                user_seq: seq,
                thread_version: from + i as u64,
                event: record.event_type.clone(),
                recorded_at: wire::timestamp(record.recorded_at_ms),
                acks: event_acks,
                unacked,
            });
        }
        ThreadLedger {
            thread_id: thread_id.to_string(),
            user_id: owner.to_string(),
            user_head: m.delivery().user_head(&owner),
            clients: clients
                .iter()
                .map(|(c, a)| ClientCursor {
                    client_id: c.to_string(),
                    acked_user_seq: a.user_seq,
                    position: a.position,
                    acked_at: wire::timestamp(a.at_ms),
                })
                .collect(),
            events,
        }
    });
    Ok(Deliveries {
        deliveries: deliveries_of(&ledger),
        next_after,
        thread: Some(ledger),
    })
}

/// The distinct acks the page's events cite, in log order.
fn deliveries_of(ledger: &ThreadLedger) -> Vec<DeliveryRecord> {
    let mut out: Vec<DeliveryRecord> = ledger
        .events
        .iter()
        .flat_map(|e| {
            e.acks.iter().map(|a| DeliveryRecord {
                position: a.position,
                user_id: ledger.user_id.clone(),
                client_id: a.client_id.clone(),
                user_seq: a.user_seq,
                acked_at: a.acked_at.clone(),
            })
        })
        .collect();
    out.sort_by_key(|d| d.position);
    out.dedup();
    out
}

/// The first thread version whose event lies after `after` (a binary search over
/// the stream: positions grow with versions), or `version + 1` when none does.
fn first_version_after<L: EventLog + Checkpoints>(
    projector: &Projector<L>,
    stream: &str,
    version: u64,
    after: u64,
) -> Result<u64, AppError> {
    if after == 0 {
        return Ok(1);
    }
    let (mut lo, mut hi) = (1, version + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at = projector
            .log()
            .read_stream(stream, mid, 1)?
            .first()
            .map_or(u64::MAX, |r| r.position.0);
        if at > after {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}
