//! `threadline verify`: checks every record's checksum, that positions and
//! per-stream versions are dense, and that the stored projections equal a
//! rebuild from the log, by digest. One pass over the log does all of it.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use threadline_projections::load_checkpoint;
use threadline_projections::verify::Check;
use threadline_storage::{evidence, salvage, Checkpoints, EventLog, Position, StorageError};

use threadline_api::config::DataArgs;

/// Checks the log and the projections. Exits 0 only when everything holds.
#[derive(Debug, clap::Args)]
#[command(mut_arg("data", |a| a.help(
    "Directory holding the event log and the projections (never created by this command)"
)))]
#[command(
    after_help = "Exit status: 0 when every check holds; 1 when any fails (each bad \
    position and each differing projection is named) or the data dir cannot be read. \
    A data dir held by a running server is checked online instead: \
    `POST /v1/admin/verify` with an auditor's token (docs/operations.md)."
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
    /// Whether a stored checkpoint was compared with the rebuild.
    compared: bool,
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
    let mut report = Report::default();
    if let Some(options) = args.log.nats(data, false, false)? {
        // The stream's copies are the cluster's to keep (and to repair); the
        // check reads every record through the log and compares the
        // projections this gateway stored under the data dir.
        let log = crate::log_args::connect(options)?;
        let head = log.head();
        report
            .notes
            .push(format!("JetStream log {}", log.description()));
        return check(log, data, head, report, args.quiet);
    }
    let (openable, acknowledged) = scan_copies(data, args.quiet, &mut report)?;
    if !openable {
        report.notes.push(
            "the log was not opened: sled's recovery could discard what is left; \
             `threadline repair` rebuilds it from the intact copies"
                .into(),
        );
        print!("{}", render(data, acknowledged, &report));
        return Ok(ExitCode::FAILURE);
    }
    let log = match super::open_log_raw(data, true) {
        Ok(log) => log,
        Err(StorageError::Lost(lost)) => {
            report.problems.push(lost.to_string());
            report.notes.push(
                "the log was not opened: sled's recovery would discard records; \
                 `threadline repair` rebuilds it from the intact copies"
                    .into(),
            );
            print!("{}", render(data, acknowledged, &report));
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            return Err(super::explain_open_error(
                data,
                e,
                "; stop it before verifying offline, or check it online without stopping it: \
                 `curl -X POST -H \"Authorization: Bearer $AUDITOR_TOKEN\" \
                 http://<listen>/v1/admin/verify`, then GET the same path for the result \
                 (an auditor's token: `threadline token --sub NAME --role auditor`)",
            ))
        }
    };
    check(log, data, acknowledged, report, args.quiet)
}

/// Reads every record of `log` once and compares the stored projections with a rebuild.
fn check<L: EventLog + Checkpoints>(
    log: L,
    data: &std::path::Path,
    acknowledged: Position,
    mut report: Report,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let head = log.head();
    if head < acknowledged {
        report.problems.push(format!(
            "positions {}..={acknowledged} were acknowledged but sled recovered the log only up to {head}",
            head.next()
        ));
    }
    let mut stored = None;
    match load_checkpoint(&log) {
        Ok(None) => report.notes.push(
            "no projection checkpoint is stored (a server rebuilds it from the log on start)"
                .into(),
        ),
        Ok(Some(model)) if model.position() > head => report.problems.push(format!(
            "projections registry, delivery and acks: checkpoint at position {} is ahead of the log head {head}",
            model.position()
        )),
        Ok(Some(model)) => {
            report.notes.push(format!(
                "projection checkpoint at position {} (caught up to the head {head} for the comparison)",
                model.position()
            ));
            stored = Some(model);
            report.compared = true;
        }
        Err(e) => report.problems.push(format!(
            "projections registry, delivery and acks: the checkpoint cannot be decoded: {e}"
        )),
    }

    let bar = super::position_bar(head.0, quiet, "verifying");
    let mut check = Check::new(stored, Position(u64::MAX));
    check
        .scan(&log, head, |p| bar.set_position(p.0))
        .context("reading the event log")?;
    bar.finish_and_clear();
    log.close().context("closing the event log")?;
    let (findings, _) = check.finish("stored state");
    report.problems.extend(findings.problems);
    report.notes.extend(findings.notes);
    report.unreadable = findings.unreadable;

    print!("{}", render(data, head, &report));
    Ok(if report.problems.is_empty() {
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
    if report.problems.is_empty() && report.compared {
        let _ = writeln!(
            out,
            "OK: checksums, dense positions and stream versions, and projection digests all hold"
        );
    } else if report.problems.is_empty() {
        let _ = writeln!(
            out,
            "OK: checksums, dense positions and stream versions hold (no projection checkpoint to compare)"
        );
    } else {
        let _ = writeln!(out, "FAILED: {} problem(s)", report.problems.len());
    }
    out
}
