//! The checks of `verify`, shared by the offline tool and the server's online
//! check (`POST /v1/admin/verify`): every record read back through its checksum,
//! dense positions and per-stream versions, and a fresh fold from position 1
//! whose projection digests are compared with another model's at one position.

use std::collections::HashMap;

use threadline_storage::{EventLog, Position, Record, StorageError, LOG_STREAM};

use crate::{Digests, ReadModel};

/// Records read per page.
const PAGE: u64 = 1000;

/// What a pass found: problems fail it; notes are for the operator.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    /// Positions whose record could not be read or folded.
    pub unreadable: u64,
    /// The last position checked.
    pub checked: Position,
}

/// One pass over the log: checks every record it is given, in order, and folds
/// those up to `fold_until` into a fresh model (and into `stored`, from where it is).
#[derive(Debug)]
pub struct Check {
    pub findings: Findings,
    /// The rebuild from position 1; `None` once a record could not be folded.
    fresh: Option<ReadModel>,
    /// A model to compare, caught up as the pass goes; `None` when absent or unusable.
    stored: Option<ReadModel>,
    /// Set when `stored` could not fold a record after its position.
    stored_failed: bool,
    /// Records after this are checked but not folded.
    fold_until: Position,
    versions: HashMap<String, u64>,
}

impl Check {
    /// A pass that folds up to `fold_until` (`Position(u64::MAX)`: everything),
    /// bringing `stored` along.
    pub fn new(stored: Option<ReadModel>, fold_until: Position) -> Check {
        Check {
            findings: Findings::default(),
            fresh: Some(ReadModel::default()),
            stored,
            stored_failed: false,
            fold_until,
            versions: HashMap::new(),
        }
    }

    fn record(&mut self, record: &Record) {
        self.findings.checked = record.position;
        if record.stream == LOG_STREAM {
            self.findings.notes.push(format!(
                "position {}: {} by {}: {}",
                record.position,
                record.event_type,
                record.actor,
                String::from_utf8_lossy(&record.payload)
            ));
        }
        let last = self.versions.entry(record.stream.clone()).or_insert(0);
        if record.stream_version != *last + 1 {
            self.findings.problems.push(format!(
                "stream {:?}: version {} at position {}, expected {}",
                record.stream,
                record.stream_version,
                record.position,
                *last + 1
            ));
        }
        *last = (*last).max(record.stream_version);
        if record.position > self.fold_until {
            return;
        }
        let mut fold_failed = None;
        if let Some(fresh) = &mut self.fresh {
            if let Err(e) = fresh.apply(record) {
                fold_failed = Some(e.to_string());
            }
        }
        if let Some(stored) = &mut self.stored {
            if record.position > stored.position() && stored.apply(record).is_err() {
                self.stored = None;
                self.stored_failed = true;
            }
        }
        if let Some(reason) = fold_failed {
            self.bad(record.position, &format!("cannot be projected: {reason}"));
        }
    }

    fn bad(&mut self, position: Position, reason: &str) {
        self.findings.checked = position;
        self.findings.unreadable += 1;
        self.findings
            .problems
            .push(format!("bad record at position {position}: {reason}"));
        // Folds need every record in order; past a bad one they cannot be compared.
        self.fresh = None;
        self.stored = None;
    }

    /// Checks positions 1 to `head`, calling `progress(checked)` after each page.
    /// A damaged record is named and the pass goes on; only a failure to read at
    /// all (the log closed, an I/O error) is an error.
    pub fn scan(
        &mut self,
        log: &dyn EventLog,
        head: Position,
        mut progress: impl FnMut(Position),
    ) -> Result<(), StorageError> {
        let mut next = 1;
        while next <= head.0 {
            match log.read_from(Position(next), PAGE as usize) {
                Ok(page) if page.is_empty() => {
                    // read_from reports gaps as Corrupt; an empty page below the head is one too.
                    for p in next..=head.0 {
                        self.bad(Position(p), "missing below the durable head");
                    }
                    next = head.0 + 1;
                }
                Ok(page) => {
                    for record in page.iter().take_while(|r| r.position <= head) {
                        if record.position.0 != next {
                            for p in next..record.position.0 {
                                self.bad(Position(p), "missing below the durable head");
                            }
                        }
                        self.record(record);
                        next = record.position.0 + 1;
                    }
                    if page.last().is_some_and(|r| r.position > head) {
                        next = head.0 + 1;
                    }
                }
                Err(StorageError::Corrupt { .. }) => {
                    // The page holds a bad record: read its positions one at a time so every
                    // bad one is named and every good one still checked.
                    let end = (next + PAGE - 1).min(head.0);
                    for p in next..=end {
                        match log.read_at(Position(p)) {
                            Ok(Some(record)) => self.record(&record),
                            Ok(None) => self.bad(Position(p), "missing below the durable head"),
                            Err(StorageError::Corrupt { position, reason }) => {
                                self.bad(position, &reason)
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    next = end + 1;
                }
                Err(e) => return Err(e),
            }
            progress(Position(next - 1));
        }
        Ok(())
    }

    /// Ends the pass: compares the fresh fold with the stored model (named
    /// `stored_name` in a problem), when both could be folded. Returns the fresh
    /// model's digests, if it could be folded.
    pub fn finish(mut self, stored_name: &str) -> (Findings, Option<Digests>) {
        let fresh = self.fresh.take().map(|m| m.digests());
        match (&fresh, self.stored.take()) {
            (Some(a), Some(stored)) => {
                let b = stored.digests();
                compare(&mut self.findings, a, &b, stored_name);
            }
            (None, _) if self.findings.unreadable > 0 => self
                .findings
                .notes
                .push("projections not compared: the log has records that cannot be folded".into()),
            (Some(_), None) if self.stored_failed => self.findings.problems.push(
                "projections registry, delivery and acks: the checkpoint cannot fold the records after it"
                    .into(),
            ),
            _ => {}
        }
        (self.findings, fresh)
    }
}

/// Adds a problem for each projection whose digest in `other` differs from a
/// rebuild's (`fresh`), and one when they are not at the same position.
pub fn compare(findings: &mut Findings, fresh: &Digests, other: &Digests, other_name: &str) {
    if fresh.position != other.position {
        findings.problems.push(format!(
            "projections: the rebuild reached position {} but the {other_name} position {}",
            fresh.position, other.position
        ));
    }
    for name in fresh.differing(other) {
        findings.problems.push(format!(
            "projection {name}: {other_name} differs from a rebuild from the log"
        ));
    }
}
