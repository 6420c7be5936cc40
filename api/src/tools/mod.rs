//! The operator and auditor tools of the `threadline` binary, and what they
//! share: opening a data dir without ever creating it, and progress bars.

pub mod audit;
pub mod rebuild;
pub mod token;
pub mod verify;

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use threadline_storage::{SledLog, SledOptions, StorageError};

/// Opens the event log of the data dir `data` for a tool. Never creates
/// anything; a dir held by a server is one clear line, ending in `held_hint`.
pub(crate) fn open_log(data: &Path, held_hint: &str) -> anyhow::Result<SledLog> {
    let dir = crate::server::log_dir(data);
    let options = SledOptions {
        create: false,
        ..SledOptions::default()
    };
    SledLog::open(&dir, options).map_err(|e| match e {
        StorageError::NotFound(_) if !data.exists() => {
            anyhow!("data dir {} does not exist", data.display())
        }
        StorageError::NotFound(_) if !data.is_dir() => {
            anyhow!("data dir {} is not a directory", data.display())
        }
        StorageError::NotFound(_) => anyhow!(
            "{} holds no Threadline event log (expected one in {})",
            data.display(),
            dir.display()
        ),
        StorageError::Locked(_) => anyhow!(
            "the data dir {} is in use by a running server{held_hint}",
            data.display()
        ),
        other => anyhow!("cannot open the event log in {}: {other}", dir.display()),
    })
}

/// Whether progress may be drawn: never with `--quiet` or when stderr is not a terminal.
fn progress_visible(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// A bar over log positions `0..=len` on stderr (hidden when it must not show).
pub(crate) fn position_bar(len: u64, quiet: bool, message: &'static str) -> ProgressBar {
    if !progress_visible(quiet) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {human_pos}/{human_len} events ({rate}, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} events/s", state.per_sec());
            },
        )
        .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

/// A spinner on stderr for a step of unknown length (hidden when it must not show).
pub(crate) fn spinner(quiet: bool, message: &'static str) -> ProgressBar {
    if !progress_visible(quiet) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Events per second, for reports.
pub(crate) fn rate(events: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        events as f64 / secs
    } else {
        0.0
    }
}
