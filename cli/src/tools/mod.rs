//! The operator and auditor tools of the `threadline` binary, and what they
//! share: opening a data dir without ever creating it, and progress bars.

pub mod audit;
pub mod ledger;
pub mod maintenance;
pub mod rebuild;
pub mod tail;
pub mod token;
pub mod verify;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use threadline_storage::{
    Appended, Checkpoints, EventLog, NewEvent, PendingAppend, Position, Record, SledLog,
    SledOptions, StorageError,
};

/// Where the event log of a data directory lives.
pub fn log_dir(data: &Path) -> PathBuf {
    data.join("log")
}

/// Opens the event log of the data dir `data` for a tool. Never creates
/// anything; a dir held by a server is one clear line, ending in `held_hint`.
/// With `tolerate_damage` (verify, audit) a damaged log still opens and its
/// damaged records read as `Corrupt`; otherwise a log that lost acknowledged
/// events is refused with what was lost and how to proceed.
pub(crate) fn open_log(
    data: &Path,
    held_hint: &str,
    tolerate_damage: bool,
) -> anyhow::Result<SledLog> {
    let dir = log_dir(data);
    let options = SledOptions {
        create: false,
        tolerate_damage,
        lazy_indexes: true,
        ..SledOptions::default()
    };
    SledLog::open(&dir, options).map_err(|e| explain_open_error(data, e, held_hint))
}

/// [`open_log`] with the storage error kept, for tools that report a lost log themselves.
pub(crate) fn open_log_raw(data: &Path, tolerate_damage: bool) -> Result<SledLog, StorageError> {
    let options = SledOptions {
        create: false,
        tolerate_damage,
        lazy_indexes: true,
        ..SledOptions::default()
    };
    SledLog::open(log_dir(data), options)
}

/// One operator-facing explanation per way opening a data dir's log can fail.
pub fn explain_open_error(data: &Path, e: StorageError, held_hint: &str) -> anyhow::Error {
    let dir = log_dir(data);
    let d = data.display();
    match e {
        StorageError::NotFound(_) if !data.exists() => anyhow!("data dir {d} does not exist"),
        StorageError::NotFound(_) if !data.is_dir() => anyhow!("data dir {d} is not a directory"),
        StorageError::NotFound(_) => anyhow!(
            "{d} holds no Threadline event log (expected one in {})",
            dir.display()
        ),
        StorageError::Locked(_) => {
            anyhow!("the data dir {d} is in use by a running server{held_hint}")
        }
        StorageError::Lost(report) => anyhow!(
            "{report}.\nNothing was changed and nothing will be served from this log. To proceed:\n  \
             threadline verify --data {d}                  names every missing and damaged position\n  \
             threadline repair --data {d}                  rebuilds the log from the intact stored copies (refuses if an acknowledged position has none)\n  \
             threadline repair --data {d} --accept-loss    continues without the missing events and records the loss in the log"
        ),
        StorageError::OldLayout(_) => anyhow!(
            "{d} holds an event log in the format-1 layout of an earlier Threadline: \
             run `threadline migrate --data {d}` to rewrite it (the old log is kept beside the new one)"
        ),
        other => anyhow!("cannot open the event log in {}: {other}", dir.display()),
    }
}

/// A log whose damaged records read as placeholders in the log's own `$`
/// stream (which no projection folds), so a damaged log can still be folded
/// and audited around them. Each damaged position is reported once on stderr.
#[derive(Debug)]
pub(crate) struct Tolerant<L> {
    pub(crate) log: L,
    pub(crate) damaged: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

impl<L: EventLog> Tolerant<L> {
    pub(crate) fn new(log: L) -> Tolerant<L> {
        Tolerant {
            log,
            damaged: Default::default(),
        }
    }

    fn placeholder(&self, position: Position, reason: &str) -> Record {
        if self
            .damaged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(position.0)
        {
            eprintln!("threadline: skipping damaged record at position {position}: {reason}");
        }
        Record {
            position,
            stream: "$damaged".into(),
            stream_version: 0,
            event_id: uuid::Uuid::nil(),
            recorded_at_ms: 0,
            actor: String::new(),
            event_type: "damaged_record".into(),
            payload: Vec::new(),
        }
    }
}

impl<L: EventLog> EventLog for Tolerant<L> {
    fn append(&self, events: Vec<NewEvent>) -> PendingAppend {
        self.log.append(events)
    }
    fn head(&self) -> Position {
        self.log.head()
    }
    fn watch_head(&self) -> tokio::sync::watch::Receiver<Position> {
        self.log.watch_head()
    }
    fn read_from(&self, from: Position, limit: usize) -> Result<Vec<Record>, StorageError> {
        match self.log.read_from(from, limit) {
            Err(StorageError::Corrupt { .. }) => {
                let end = from.0.saturating_add(limit as u64).min(self.head().0 + 1);
                (from.0.max(1)..end)
                    .map(|p| match self.log.read_at(Position(p)) {
                        Ok(Some(r)) => Ok(r),
                        Ok(None) => Ok(self.placeholder(Position(p), "missing")),
                        Err(StorageError::Corrupt { position, reason }) => {
                            Ok(self.placeholder(position, &reason))
                        }
                        Err(e) => Err(e),
                    })
                    .collect()
            }
            other => other,
        }
    }
    fn read_at(&self, position: Position) -> Result<Option<Record>, StorageError> {
        match self.log.read_at(position) {
            Err(StorageError::Corrupt { position, reason }) => {
                Ok(Some(self.placeholder(position, &reason)))
            }
            other => other,
        }
    }
    fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError> {
        self.log.read_stream(stream, from, limit)
    }
    fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        self.log.stream_version(stream)
    }
    fn find_event(&self, event_id: uuid::Uuid) -> Result<Option<Appended>, StorageError> {
        self.log.find_event(event_id)
    }
}

impl<L: EventLog> Checkpoints for Tolerant<L> {
    /// A damaged log's checkpoint may hold what the damage hides: always fold from the log.
    fn load_checkpoint(&self, _name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(None)
    }
    fn store_checkpoint(&self, _name: &str, _bytes: &[u8]) -> Result<(), StorageError> {
        Ok(())
    }
}

/// Sends `request` to a running server's JSON endpoint and decodes its answer as a
/// `what`: unreachable, a non-2xx status (with the server's own message) or an
/// undecodable body are each one clear error naming the endpoint.
pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
    reach: &str,
    endpoint: &str,
    what: &str,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {reach}"))?;
    let status = response.status();
    if !status.is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("no detail");
        anyhow::bail!("{endpoint} answered {status}: {message}");
    }
    response
        .json()
        .await
        .with_context(|| format!("{endpoint} did not answer {what}"))
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
