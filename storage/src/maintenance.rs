//! Operator maintenance of a log directory: `migrate` a format-1 log to
//! format 2, and `repair` a damaged log from the intact copies on disk. Both
//! write a complete new log beside the old one and then swap the directories,
//! so a crash at any point leaves one whole log in place; the old directory is
//! kept, renamed, never deleted.

use std::path::{Path, PathBuf};

use crate::salvage::{self, format_ranges};
use crate::sled_log::{read_v1, wait_unlocked, write_log};
use crate::{now_ms, EventLog, Position, Record, StorageError, LOG_STREAM, LOSS_ACCEPTED};

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub head: Position,
    /// Where the format-1 log now is.
    pub kept: PathBuf,
}

/// What `repair` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// The head of the repaired log (the loss record included).
    pub head: Position,
    /// The durable head recorded before the damage.
    pub acknowledged: Position,
    /// Positions of the old log that are not in the new one.
    pub lost: Vec<(u64, u64)>,
    /// Intact records past the first missing position that could not be kept
    /// (positions must stay dense); they remain readable in `kept`.
    pub dropped_intact: u64,
    /// Where the damaged log now is.
    pub kept: PathBuf,
}

/// Why `repair` did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepairError {
    #[error("positions {missing} have no intact copy (acknowledged head {acknowledged}); nothing was changed")]
    LossNotAccepted {
        acknowledged: Position,
        missing: String,
    },
    /// The log opens whole (every acknowledged record intact and readable): nothing was changed.
    #[error("the log is whole up to position {head}: nothing to repair")]
    NothingToRepair { head: Position },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "log".into());
    dir.with_file_name(format!("{name}.{suffix}-{}", now_ms()))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::Io(format!("{}: {e}", path.display()))
}

/// Puts `new` in place of `dir`, keeping the old one as `kept`.
fn swap(dir: &Path, new: &Path, kept: &Path) -> Result<(), StorageError> {
    std::fs::rename(dir, kept).map_err(io(dir))?;
    std::fs::rename(new, dir).map_err(io(new))?;
    if let Some(parent) = dir.parent() {
        // Make both renames durable.
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Rewrites the format-1 log in `dir` as format 2 (projection checkpoints are
/// not carried over: a server rebuilds them from the log on start).
pub fn migrate(dir: &Path) -> Result<Migrated, StorageError> {
    if !dir.join("conf").exists() {
        return Err(StorageError::NotFound(dir.display().to_string()));
    }
    wait_unlocked(dir)?;
    let new = sibling(dir, "migrating");
    let head = {
        let records = read_v1(dir)?;
        write_log(&new, records)
    };
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&new);
            return Err(e);
        }
    };
    let kept = sibling(dir, "v1");
    swap(dir, &new, &kept)?;
    Ok(Migrated { head, kept })
}

/// Rebuilds the log in `dir` from the intact record copies found on disk.
///
/// When every position up to the acknowledged head has an intact copy, the
/// new log holds all of them and nothing is lost. Otherwise, only with
/// `accept_loss`: the new log holds the records before the first missing
/// position, followed by a `log_loss_accepted` record (stream `$log`) naming
/// what was lost, by whom and when.
pub fn repair(dir: &Path, accept_loss: bool, operator: &str) -> Result<Repaired, RepairError> {
    if !dir.join("conf").exists() {
        return Err(StorageError::NotFound(dir.display().to_string()).into());
    }
    wait_unlocked(dir)?;
    // A log that opens for serving (every acknowledged record readable, sled
    // reaching the recorded head) needs no repair: leave it as it is.
    let whole = crate::SledLog::open(
        dir,
        crate::SledOptions {
            create: false,
            ..crate::SledOptions::default()
        },
    );
    if let Ok(log) = whole {
        let head = crate::EventLog::head(&log);
        log.close()?;
        return Err(RepairError::NothingToRepair { head });
    }
    let scan = salvage::scan(dir, true)?;
    let acknowledged = scan.acknowledged();
    let contiguous = scan.contiguous_head();
    let upto = acknowledged.max(contiguous);
    let missing = scan.missing(upto);
    let mut records = scan.records;
    let (keep_upto, lost, dropped_intact, loss_record) = match missing.first() {
        None => (upto.0, Vec::new(), 0, None),
        Some(_) if !accept_loss => {
            return Err(RepairError::LossNotAccepted {
                acknowledged,
                missing: format_ranges(&missing),
            })
        }
        Some(first) => {
            let first_missing = *first.start();
            let last = upto.0.max(records.keys().next_back().copied().unwrap_or(0));
            let dropped = records.range(first_missing..).count() as u64;
            let lost = vec![(first_missing, last)];
            let log_version = records
                .range(..first_missing)
                .filter(|(_, r)| r.stream == LOG_STREAM)
                .count() as u64;
            let payload = format!(
                "{{\"lost_from\":{first_missing},\"lost_to\":{last},\"acknowledged_head\":{},\"missing\":\"{}\",\"intact_records_dropped\":{dropped},\"operator\":{:?}}}",
                acknowledged,
                format_ranges(&missing),
                operator
            );
            let record = Record {
                position: Position(first_missing),
                stream: LOG_STREAM.into(),
                stream_version: log_version + 1,
                event_id: uuid::Uuid::now_v7(),
                recorded_at_ms: now_ms(),
                actor: format!("operator:{operator}"),
                event_type: LOSS_ACCEPTED.into(),
                payload: payload.into_bytes(),
            };
            (first_missing - 1, lost, dropped, Some(record))
        }
    };
    records.retain(|&p, _| p <= keep_upto);
    let new = sibling(dir, "repairing");
    let written = write_log(&new, records.into_values().chain(loss_record).map(Ok));
    let head = match written {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&new);
            return Err(e.into());
        }
    };
    let kept = sibling(dir, "damaged");
    swap(dir, &new, &kept)?;
    Ok(Repaired {
        head,
        acknowledged,
        lost,
        dropped_intact,
        kept,
    })
}
