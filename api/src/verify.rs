//! The online check (`POST /v1/admin/verify`, auditors only): the checks of the
//! offline `threadline verify` run against the live log while it keeps taking
//! writes, one job at a time, on a blocking thread, with progress in
//! `/metrics` (`threadline_verify_*`) and the result at `GET /v1/admin/verify`.
//!
//! The digests are compared at one consistent position P without stopping the
//! fold: the live model is copied under the projector's read lock (as a
//! checkpoint is), which fixes P as the copy's position; a fresh model is folded
//! from position 1 to P and its digests compared with the copy's, and with the
//! stored checkpoint caught up to P. Checksums, dense positions and stream
//! versions are checked up to the log's head when the job started.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use threadline_projections::verify::{compare, Check, Findings};
use threadline_projections::{load_checkpoint, Projector, ReadModel};
use utoipa::ToSchema;

use crate::app::Log;

/// Where a verify job is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerifyState {
    /// No job has run since the server started.
    Idle,
    /// A job is checking the log.
    Running,
    /// The last job found nothing wrong.
    Passed,
    /// The last job found problems (listed in `problems`).
    Failed,
}

/// A verify job's status and, once done, its result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct VerifyStatus {
    pub state: VerifyState,
    /// The job's id (absent when idle).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Who asked for it (the auditor's `sub`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// Unix time in milliseconds the job started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// Unix time in milliseconds the job finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// The position P at which the projections' digests are compared.
    pub digest_position: u64,
    /// The last position checked: the job checks records 1 to `head`.
    pub checked: u64,
    /// The log's head when the job started.
    pub head: u64,
    /// Positions whose record could not be read or folded.
    pub unreadable: u64,
    /// What failed; empty when the job passed.
    pub problems: Vec<String>,
    /// What the operator should know (records of the log's own `$` stream, what was not compared).
    pub notes: Vec<String>,
}

impl VerifyStatus {
    fn idle() -> VerifyStatus {
        VerifyStatus {
            state: VerifyState::Idle,
            id: None,
            requested_by: None,
            started_at_ms: None,
            finished_at_ms: None,
            digest_position: 0,
            checked: 0,
            head: 0,
            unreadable: 0,
            problems: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// The one job slot: the last job's status, shared with the thread running it.
#[derive(Debug, Clone)]
pub(crate) struct Verifier {
    status: Arc<Mutex<VerifyStatus>>,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            status: Arc::new(Mutex::new(VerifyStatus::idle())),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Verifier {
    pub(crate) fn status(&self) -> VerifyStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts a job unless one is running. Returns whether it started one, and the
    /// status (of the new job, or of the one already running).
    pub(crate) fn start<L: Log>(
        &self,
        projector: Arc<Projector<L>>,
        requested_by: &str,
    ) -> (bool, VerifyStatus) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if status.state == VerifyState::Running {
            return (false, status.clone());
        }
        *status = VerifyStatus {
            state: VerifyState::Running,
            id: Some(uuid::Uuid::now_v7().to_string()),
            requested_by: Some(requested_by.to_owned()),
            started_at_ms: Some(now_ms()),
            ..VerifyStatus::idle()
        };
        let started = status.clone();
        drop(status);
        metrics::gauge!("threadline_verify_running").set(1.0);
        metrics::gauge!("threadline_verify_checked_position").set(0.0);
        tracing::info!(
            id = started.id.as_deref(),
            requested_by,
            "online verify started"
        );
        let shared = Arc::clone(&self.status);
        let job = move || {
            let (findings, at, head) = run(&projector, &shared);
            let mut status = shared.lock().unwrap_or_else(|p| p.into_inner());
            status.state = if findings.problems.is_empty() {
                VerifyState::Passed
            } else {
                VerifyState::Failed
            };
            status.finished_at_ms = Some(now_ms());
            status.digest_position = at;
            status.head = head;
            status.checked = findings.checked.0;
            status.unreadable = findings.unreadable;
            status.problems = findings.problems;
            status.notes = findings.notes;
            let result = if status.state == VerifyState::Passed {
                "passed"
            } else {
                "failed"
            };
            metrics::gauge!("threadline_verify_running").set(0.0);
            metrics::gauge!("threadline_verify_problems").set(status.problems.len() as f64);
            metrics::counter!("threadline_verify_runs_total", "result" => result).increment(1);
            if status.problems.is_empty() {
                tracing::info!(
                    id = status.id.as_deref(),
                    checked = status.checked,
                    digest_position = at,
                    "online verify passed"
                );
            } else {
                tracing::warn!(id = status.id.as_deref(), problems = ?status.problems, "online verify failed");
            }
        };
        tokio::task::spawn_blocking(job);
        (true, started)
    }
}

/// The job: returns what it found, the digest position P and the head checked to.
fn run<L: Log>(projector: &Projector<L>, status: &Mutex<VerifyStatus>) -> (Findings, u64, u64) {
    let log = projector.log();
    let mut early = Findings::default();
    // The checkpoint first, then the live copy: the checkpointer only ever stores a
    // copy of the live model, so the checkpoint is at or before the copy's position.
    let stored = match load_checkpoint(&**log) {
        Ok(Some(model)) => Some(model),
        Ok(None) => {
            early.notes.push(
                "no projection checkpoint is stored yet: only the live state was compared".into(),
            );
            None
        }
        Err(e) => {
            early.problems.push(format!(
                "projections registry, delivery and acks: the checkpoint cannot be read: {e}"
            ));
            None
        }
    };
    let live = projector.read(ReadModel::clone);
    let at = live.position();
    let stored = stored.filter(|m| {
        let usable = m.position() <= at;
        if !usable {
            early.notes.push(format!(
                "the stored checkpoint ({}) is past the live copy ({at}): not compared",
                m.position()
            ));
        }
        usable
    });
    if let Some(fault) = projector.fault() {
        early
            .problems
            .push(format!("the live projections have stopped: {fault}"));
    }
    let head = log.head().max(at);
    {
        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
        s.digest_position = at.0;
        s.head = head.0;
    }
    metrics::gauge!("threadline_verify_target_position").set(head.0 as f64);
    metrics::gauge!("threadline_verify_digest_position").set(at.0 as f64);
    let mut check = Check::new(stored, at);
    let scanned = check.scan(&**log, head, |checked| {
        status.lock().unwrap_or_else(|p| p.into_inner()).checked = checked.0;
        metrics::gauge!("threadline_verify_checked_position").set(checked.0 as f64);
    });
    let (mut findings, fresh) =
        check.finish("stored checkpoint (caught up to the digest position)");
    if let Err(e) = scanned {
        findings.problems.push(format!(
            "reading the log stopped after position {}: {e}",
            findings.checked
        ));
    }
    if let Some(fresh) = fresh {
        compare(&mut findings, &fresh, &live.digests(), "live state");
    }
    findings.problems.splice(0..0, early.problems);
    findings.notes.splice(0..0, early.notes);
    findings.notes.push(
        "the raw scan of the stored copies (sled's files) runs only offline, in `threadline verify`"
            .into(),
    );
    (findings, at.0, head.0)
}
