//! `threadline migrate` and `threadline repair`: rewrite a data dir's event
//! log in the current format, or rebuild a damaged one from the intact copies
//! of its records. Both write the new log beside the old one, swap them, and
//! keep the old one (renamed) for the operator to remove.

use std::process::ExitCode;

use anyhow::anyhow;
use threadline_storage::maintenance::{self, RepairError};
use threadline_storage::StorageError;

use crate::tools::log_dir;
use threadline_api::config::DataArgs;

/// Rewrites a format-1 event log (written by Threadline 0.1) in the current format.
#[derive(Debug, clap::Args)]
#[command(mut_arg("data", |a| a.help(
    "Directory holding the event log (never created by this command)"
)))]
#[command(
    after_help = "The new log is written beside the old one, then swapped in; the old one is kept as \
    log.v1-<time> until you remove it. Projection checkpoints are not carried over: the next \
    `serve` rebuilds them from the log. Refuses while a server holds the data dir."
)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub data: DataArgs,
}

/// Rebuilds a damaged event log from the intact stored copies of its records.
#[derive(Debug, clap::Args)]
#[command(mut_arg("data", |a| a.help(
    "Directory holding the event log (never created by this command)"
)))]
#[command(
    after_help = "A log that opens whole is left as it is. Without --accept-loss, repair changes nothing unless every acknowledged \
    position has an intact copy on disk; then the new log holds all of them and nothing is lost. \
    With --accept-loss, the new log keeps every record before the first missing position, followed \
    by a `log_loss_accepted` record (stream `$log`) naming the lost positions, the operator and the \
    time. The damaged log is kept as log.damaged-<time> either way. Refuses while a server holds \
    the data dir. Exit status: 0 when repaired, 1 otherwise."
)]
pub struct RepairArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Continue without the events that have no intact copy, recording the loss in the log.
    #[arg(long)]
    pub accept_loss: bool,
    /// Who accepts the loss (kept in the loss record).
    #[arg(long, env = "USER", default_value = "operator", value_name = "NAME")]
    pub operator: String,
}

fn explain(data: &std::path::Path, e: StorageError) -> anyhow::Error {
    super::explain_open_error(data, e, "; stop it first")
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let data = &args.data.data;
    let migrated = maintenance::migrate(&log_dir(data)).map_err(|e| explain(data, e))?;
    println!(
        "migrated {}: {} events rewritten in format 2; the format-1 log is kept in {}",
        data.display(),
        migrated.head,
        migrated.kept.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn repair(args: RepairArgs) -> anyhow::Result<ExitCode> {
    let data = &args.data.data;
    let repaired = match maintenance::repair(&log_dir(data), args.accept_loss, &args.operator) {
        Ok(r) => r,
        Err(RepairError::LossNotAccepted {
            acknowledged,
            missing,
        }) => {
            return Err(anyhow!(
                "positions {missing} of the {acknowledged} acknowledged events have no intact copy left, \
                 so the log cannot be repaired without loss; nothing was changed. \
                 `threadline repair --data {} --accept-loss` keeps everything before the first missing \
                 position and records the loss in the log",
                data.display()
            ))
        }
        Err(RepairError::NothingToRepair { head }) => {
            println!(
                "{}: the log is whole up to position {head} (every acknowledged record intact); nothing to repair, nothing changed",
                data.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(RepairError::Storage(e)) => return Err(explain(data, e)),
    };
    if repaired.lost.is_empty() {
        println!(
            "repaired {}: all {} events recovered from intact copies, nothing lost; the damaged log is kept in {}",
            data.display(),
            repaired.head,
            repaired.kept.display()
        );
    } else {
        let (from, to) = repaired.lost[0];
        println!(
            "repaired {} with loss: positions {from}..={to} are gone ({} intact records after the first \
             missing one could not be kept and stay readable in the kept copy); the loss is recorded at \
             position {}; the damaged log is kept in {}",
            data.display(),
            repaired.dropped_intact,
            repaired.head,
            repaired.kept.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
