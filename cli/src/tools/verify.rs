//! `threadline verify`: checks every record's checksum, that positions and
//! per-stream versions are dense, and that the stored projections equal a
//! rebuild from the log, by digest. One pass over the log does all of it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use threadline_projections::{load_checkpoint, ReadModel};
use threadline_storage::{
    evidence, salvage, Checkpoints, EventLog, Position, Record, StorageError, LOG_STREAM,
};

use threadline_api::config::DataArgs;

/// Records read per page.
const PAGE: u64 = 1000;

/// Checks the log and the projections. Exits 0 only when everything holds.
#[derive(Debug, clap::Args)]
#[command(mut_arg("data", |a| a.help(
    "Directory holding the event log and the projections (never created by this command)"
)))]
#[command(
    after_help = "Exit status: 0 when every check holds; 1 when any fails (each bad \
    position and each differing projection is named) or the data dir cannot be read."
)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub log: crate::log_args::LogArgs,
    /// Do not draw the progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
}

/// What one pass found.
#[derive(Debug, Default)]
struct Report {
    problems: Vec<String>,
    notes: Vec<String>,
    unreadable: u64,
}

/// The folds and counters of the pass.
struct Pass {
    report: Report,
    /// The rebuild from position 1; `None` once a record could not be folded.
    fresh: Option<ReadModel>,
    /// The stored checkpoint, caught up as the pass goes; `None` when absent or unusable.
    stored: Option<ReadModel>,
    versions: HashMap<String, u64>,
}

impl Pass {
    fn record(&mut self, record: &Record) {
        if record.stream == LOG_STREAM {
            self.report.notes.push(format!(
                "position {}: {} by {}: {}",
                record.position,
                record.event_type,
                record.actor,
                String::from_utf8_lossy(&record.payload)
            ));
        }
        let last = self.versions.entry(record.stream.clone()).or_insert(0);
        if record.stream_version != *last + 1 {
            self.report.problems.push(format!(
                "stream {:?}: version {} at position {}, expected {}",
                record.stream,
                record.stream_version,
                record.position,
                *last + 1
            ));
        }
        *last = (*last).max(record.stream_version);

        let mut fold_failed = None;
        if let Some(fresh) = &mut self.fresh {
            if let Err(e) = fresh.apply(record) {
                fold_failed = Some(e.to_string());
            }
        }
        if let Some(stored) = &mut self.stored {
            if record.position > stored.position() && stored.apply(record).is_err() {
                self.stored = None;
            }
        }
        if let Some(reason) = fold_failed {
            self.bad(record.position, &format!("cannot be projected: {reason}"));
        }
    }

    fn bad(&mut self, position: Position, reason: &str) {
        self.report.unreadable += 1;
        self.report
            .problems
            .push(format!("bad record at position {position}: {reason}"));
        // Folds need every record in order; past a bad one they cannot be compared.
        self.fresh = None;
        self.stored = None;
    }
}

/// Runs the raw scan of every stored copy (before sled opens the log, so that
/// sled's recovery cannot discard what it finds) and records what it says.
/// Returns false when acknowledged positions have no intact copy left: the
/// log must then not be opened at all.
fn scan_copies(
    data: &std::path::Path,
    quiet: bool,
    report: &mut Report,
) -> anyhow::Result<(bool, Position)> {
    let dir = crate::tools::log_dir(data);
    if !dir.join("conf").exists() {
        // Let the open name what is wrong with the dir.
        super::open_log(data, "", true)?;
    }
    let spinner = super::spinner(quiet, "scanning every stored copy");
    let scan = salvage::scan(&dir, false)
        .with_context(|| format!("scanning the stored copies in {}", dir.display()))?;
    spinner.finish_and_clear();
    let acknowledged = scan.acknowledged();
    match (&scan.evidence, &scan.evidence_problem) {
        (_, Some(problem)) => report.problems.push(format!(
            "{problem}: the acknowledged head cannot be checked"
        )),
        (None, None) if !scan.generations.is_empty() => report.problems.push(format!(
            "the durable-head record {} is missing: the acknowledged head cannot be checked",
            evidence::EVIDENCE_FILE
        )),
        _ => {}
    }
    let missing = scan.missing(acknowledged);
    if !missing.is_empty() {
        report.problems.push(format!(
            "positions {} were acknowledged (durable head {acknowledged}) but no intact stored copy of them is left",
            salvage::format_ranges(&missing)
        ));
    }
    let damaged: Vec<_> = scan.damaged_upto(acknowledged).collect();
    for d in damaged.iter().take(20) {
        let what = d
            .position
            .map_or("a frame header".to_owned(), |p| format!("position {p}"));
        report.notes.push(format!(
            "damaged stored copy of {what} at {}+{}: {}",
            d.file.strip_prefix(&dir).unwrap_or(&d.file).display(),
            d.offset,
            d.reason
        ));
    }
    if damaged.len() > 20 {
        report
            .notes
            .push(format!("… and {} more damaged copies", damaged.len() - 20));
    }
    if !damaged.is_empty() {
        report.notes.push(format!(
            "the disk holds {} damaged stored copies; `threadline repair` rewrites the log from intact ones",
            damaged.len()
        ));
    }
    report.notes.push(format!(
        "scanned {:.1} MiB of stored copies",
        scan.bytes_scanned as f64 / (1024.0 * 1024.0)
    ));
    Ok((missing.is_empty(), acknowledged))
}

pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let data = &args.data.data;
    let mut pass = Pass {
        report: Report::default(),
        fresh: Some(ReadModel::default()),
        stored: None,
        versions: HashMap::new(),
    };
    if let Some(options) = args.log.nats(data, false)? {
        // The stream's copies are the cluster's to keep (and to repair); the
        // check reads every record through the log and compares the
        // projections this gateway stored under the data dir.
        let log = crate::log_args::connect(options)?;
        let head = log.head();
        pass.report
            .notes
            .push(format!("JetStream log {}", log.description()));
        return check(log, data, head, pass, args.quiet);
    }
    let (openable, acknowledged) = scan_copies(data, args.quiet, &mut pass.report)?;
    if !openable {
        pass.report.notes.push(
            "the log was not opened: sled's recovery could discard what is left; \
             `threadline repair` rebuilds it from the intact copies"
                .into(),
        );
        print!("{}", render(data, acknowledged, &pass.report));
        return Ok(ExitCode::FAILURE);
    }
    let log = match super::open_log_raw(data, true) {
        Ok(log) => log,
        Err(StorageError::Lost(report)) => {
            pass.report.problems.push(report.to_string());
            pass.report.notes.push(
                "the log was not opened: sled's recovery would discard records; \
                 `threadline repair` rebuilds it from the intact copies"
                    .into(),
            );
            print!("{}", render(data, acknowledged, &pass.report));
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            return Err(super::explain_open_error(
                data,
                e,
                "; stop it before verifying",
            ))
        }
    };
    check(log, data, acknowledged, pass, args.quiet)
}

/// Reads every record of `log` once and compares the stored projections with a rebuild.
fn check<L: EventLog + Checkpoints>(
    log: L,
    data: &std::path::Path,
    acknowledged: Position,
    mut pass: Pass,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let head = log.head();
    if head < acknowledged {
        pass.report.problems.push(format!(
            "positions {}..={acknowledged} were acknowledged but sled recovered the log only up to {head}",
            head.next()
        ));
    }
    let mut checkpoint_usable = false;
    match load_checkpoint(&log) {
        Ok(None) => pass.report.notes.push(
            "no projection checkpoint is stored (a server rebuilds it from the log on start)"
                .into(),
        ),
        Ok(Some(model)) if model.position() > head => pass.report.problems.push(format!(
            "projections registry, delivery and acks: checkpoint at position {} is ahead of the log head {head}",
            model.position()
        )),
        Ok(Some(model)) => {
            pass.report.notes.push(format!(
                "projection checkpoint at position {} (caught up to the head {head} for the comparison)",
                model.position()
            ));
            pass.stored = Some(model);
            checkpoint_usable = true;
        }
        Err(e) => pass.report.problems.push(format!(
            "projections registry, delivery and acks: the checkpoint cannot be decoded: {e}"
        )),
    }

    let bar = super::position_bar(head.0, quiet, "verifying");
    let mut next = 1;
    while next <= head.0 {
        match log.read_from(Position(next), PAGE as usize) {
            Ok(page) if page.is_empty() => {
                // read_from reports gaps as Corrupt; an empty page below the head is one too.
                for p in next..=head.0 {
                    pass.bad(Position(p), "missing below the durable head");
                }
                next = head.0 + 1;
            }
            Ok(page) => {
                for record in &page {
                    pass.record(record);
                    next = record.position.0 + 1;
                }
            }
            Err(StorageError::Corrupt { .. }) => {
                // The page holds a bad record: read its positions one at a time so every
                // bad one is named and every good one still checked.
                let end = (next + PAGE - 1).min(head.0);
                for p in next..=end {
                    match log.read_at(Position(p)) {
                        Ok(Some(record)) => pass.record(&record),
                        Ok(None) => pass.bad(Position(p), "missing below the durable head"),
                        Err(StorageError::Corrupt { position, reason }) => {
                            pass.bad(position, &reason)
                        }
                        Err(e) => {
                            return Err(e).with_context(|| format!("reading position {p}"));
                        }
                    }
                }
                next = end + 1;
            }
            Err(e) => return Err(e).with_context(|| format!("reading from position {next}")),
        }
        bar.set_position(next - 1);
    }
    bar.finish_and_clear();
    log.close().context("closing the event log")?;

    match (pass.fresh.take(), pass.stored.take()) {
        (Some(fresh), Some(stored)) => {
            let (a, b) = (fresh.digests(), stored.digests());
            if a.position != b.position {
                pass.report.problems.push(format!(
                    "projections: the rebuild reached position {} but the checkpoint {}",
                    a.position, b.position
                ));
            }
            for name in a.differing(&b) {
                pass.report.problems.push(format!(
                    "projection {name}: stored state differs from a rebuild from the log"
                ));
            }
        }
        (None, _) if pass.report.unreadable > 0 => pass
            .report
            .notes
            .push("projections not compared: the log has records that cannot be folded".into()),
        (Some(_), None) if checkpoint_usable => pass.report.problems.push(
            "projections registry, delivery and acks: the checkpoint cannot fold the records after it"
                .into(),
        ),
        _ => {}
    }

    print!("{}", render(data, head, &pass.report));
    Ok(if pass.report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn render(data: &std::path::Path, head: Position, report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "verify {}: head position {head}", data.display());
    if head == Position::ZERO {
        let _ = writeln!(out, "  the log is empty");
    } else {
        let _ = writeln!(
            out,
            "  positions checked: 1 to {head} ({} bad)",
            report.unreadable
        );
    }
    if report.unreadable > 0 {
        let _ = writeln!(
            out,
            "  note: a stream version gap right after a bad record may be that record's own"
        );
    }
    for note in &report.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    for problem in &report.problems {
        let _ = writeln!(out, "  FAIL: {problem}");
    }
    if report.problems.is_empty() {
        let _ = writeln!(
            out,
            "OK: checksums, dense positions and stream versions, and projection digests all hold"
        );
    } else {
        let _ = writeln!(out, "FAILED: {} problem(s)", report.problems.len());
    }
    out
}
