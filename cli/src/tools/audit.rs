//! `threadline audit`: filter and print the event history as a table or as
//! JSON lines (the auditor envelopes of `GET /v1/audit/events`), read offline
//! from the data dir or through a running server, optionally following it.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use indicatif::ProgressBar;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use threadline_engine::{ClientId, RunId, ThreadId, UserId};
use threadline_projections::Projector;
use threadline_storage::{salvage, EventLog, StorageError};

use threadline_api::audit::{audit_page, AuditQuery};
use threadline_api::config::DataArgs;
use threadline_api::deliveries::{deliveries_page, Deliveries, DeliveryQuery, DeliveryRecord};
use threadline_api::wire;

/// Events asked for per page (the audit endpoint's largest page).
const PAGE: u64 = threadline_api::MAX_LIMIT as u64;
/// How often `--follow` looks for new events.
const POLL: Duration = Duration::from_millis(200);

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One aligned row per event: position, time, user, thread, run, event, actor.
    Table,
    /// One auditor envelope per line, exactly the objects of `GET /v1/audit/events`.
    Jsonl,
}

/// Prints the history, filtered. Offline it reads the data dir, which a running
/// server holds locked: then use --url and --token to read through that server.
#[derive(Debug, clap::Args)]
#[command(mut_arg("data", |a| a.help(
    "Directory holding the event log, read when --url is not given (never created by this command)"
)))]
pub struct AuditArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Print only events after this log position (0 = from the first event).
    #[arg(long, default_value_t = 0, value_name = "POSITION")]
    pub after: u64,
    /// Stop after printing N events (default: all of them; there is no upper cap).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Only events of threads owned by this user id.
    #[arg(long, value_name = "USER", value_parser = parse_user)]
    pub user: Option<UserId>,
    /// Only events of this thread id.
    #[arg(long, value_name = "THREAD", value_parser = parse_thread)]
    pub thread: Option<ThreadId>,
    /// Only events of this run id.
    #[arg(long, value_name = "RUN", value_parser = parse_run)]
    pub run: Option<RunId>,
    /// Only events of this type: thread_created, run_registered, run_expired, agent_started,
    /// agent_thinking, tool_executing, tool_completed, agent_completed or agent_error.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Only events recorded at or after this RFC 3339 time, e.g. 2026-01-31T09:00:00Z.
    #[arg(long, value_name = "TIME", value_parser = wire::parse_timestamp)]
    pub since: Option<u64>,
    /// Only events recorded at or before this RFC 3339 time.
    #[arg(long, value_name = "TIME", value_parser = wire::parse_timestamp)]
    pub until: Option<u64>,
    /// Output: a readable table, or JSON lines for export.
    #[arg(long, value_enum, default_value = "table", value_name = "FORMAT")]
    pub format: Format,
    /// After the history, keep printing new events as they are appended, until ctrl-c.
    /// Offline no server can append while audit holds the data dir, so follow a live
    /// server with --url.
    #[arg(long)]
    pub follow: bool,
    /// Read through a running server's `/v1/audit/events` at this base URL, e.g.
    /// http://127.0.0.1:7070 (plain HTTP), instead of the data dir.
    #[arg(long, env = "THREADLINE_URL", value_name = "URL")]
    pub url: Option<String>,
    /// An auditor JWT for --url; mint one with `threadline token --sub NAME --role auditor`.
    #[arg(
        long,
        env = "THREADLINE_TOKEN",
        hide_env_values = true,
        value_name = "JWT"
    )]
    pub token: Option<String>,
    /// Do not draw progress (it is also hidden when stderr is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the delivery ledger instead of the events: every durable ack (filtered by
    /// --user, --client, --since, --until); with --thread, each event of the thread and
    /// which of its owner's clients acknowledged it, and when.
    #[arg(long, conflicts_with_all = ["with_acks", "follow", "run", "event_type"])]
    pub deliveries: bool,
    /// Interleave the durable acks (cursor_advanced records) with the events, in log
    /// order, so positions read densely; acks are filtered by --user, --client and time.
    #[arg(long)]
    pub with_acks: bool,
    /// With --deliveries or --with-acks: only this client's acks.
    #[arg(long, value_name = "CLIENT", value_parser = parse_client)]
    pub client: Option<ClientId>,
}

fn parse_client(s: &str) -> Result<ClientId, String> {
    ClientId::parse(s).map_err(|e| e.to_string())
}

fn parse_user(s: &str) -> Result<UserId, String> {
    UserId::parse(s).map_err(|e| e.to_string())
}

fn parse_thread(s: &str) -> Result<ThreadId, String> {
    ThreadId::parse(s).map_err(|e| e.to_string())
}

fn parse_run(s: &str) -> Result<RunId, String> {
    RunId::parse(s).map_err(|e| e.to_string())
}

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.deliveries {
        return rt.block_on(super::ledger::run(&args));
    }
    let mut printer = Printer::new(args.format);
    let result = rt.block_on(async {
        let work = async {
            match &args.url {
                Some(url) => remote(&args, url, &mut printer).await,
                None => offline(&args, &mut printer).await,
            }
        };
        if args.follow {
            tokio::select! {
                r = work => r,
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        } else {
            work.await
        }
    });
    let result = result.and_then(|()| printer.flush(&ProgressBar::hidden()));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader went away (`| head`): that is the end of the output, not a failure.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e),
    }
}

/// How many more events may be printed in the next page (None when the limit is reached).
fn room(limit: Option<u64>, printed: u64) -> Option<u64> {
    match limit {
        None => Some(PAGE),
        Some(l) if printed >= l => None,
        Some(l) => Some((l - printed).min(PAGE)),
    }
}

const HELD_HINT: &str =
    "; read through it instead: threadline audit --url http://<its address> --token <auditor JWT>";

/// Reads the data dir's log; when it cannot be opened without losing records,
/// reads the intact stored copies directly (damaged records are skipped and named).
async fn offline(args: &AuditArgs, printer: &mut Printer) -> anyhow::Result<()> {
    let data = &args.data.data;
    match super::open_log_raw(data, true) {
        Ok(log) => offline_from(super::Tolerant::new(log), args, printer).await,
        Err(StorageError::Lost(report)) => {
            eprintln!(
                "threadline: {report}; reading the intact stored copies directly (`threadline repair` rebuilds the log)"
            );
            let scan = salvage::scan(&crate::tools::log_dir(data), true)
                .context("scanning the stored copies")?;
            let log = salvage::SalvagedLog::new(scan);
            offline_from(super::Tolerant::new(log), args, printer).await
        }
        Err(e) => Err(super::explain_open_error(data, e, HELD_HINT)),
    }
}

async fn offline_from<L: EventLog>(
    log: super::Tolerant<L>,
    args: &AuditArgs,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let data = &args.data.data;
    let spinner = super::spinner(args.quiet, "loading the projections");
    let projector = Projector::open(Arc::new(log)).with_context(|| {
        format!(
            "loading the projections of {} (`threadline rebuild` repairs them)",
            data.display()
        )
    })?;
    spinner.finish_and_clear();
    if args.follow {
        eprintln!(
            "threadline: following {} offline: no server can append while audit holds it; \
             use --url to follow a running server",
            data.display()
        );
    }
    let bar = if args.follow {
        ProgressBar::hidden()
    } else {
        let bar = super::position_bar(projector.position().0, args.quiet, "scanning");
        bar.set_position(args.after.min(projector.position().0));
        bar
    };
    let mut q = AuditQuery {
        after: args.after,
        limit: 0,
        user_id: args.user.clone(),
        thread_id: args.thread.clone(),
        run_id: args.run.clone(),
        event_type: args.event_type.clone(),
        since_ms: args.since,
        until_ms: args.until,
    };
    while let Some(room) = room(args.limit, printer.printed) {
        q.limit = room as usize;
        let page = audit_page(&projector, &q).map_err(|e| anyhow!("reading the log: {e}"))?;
        let acks = if args.with_acks {
            let mut dq = ack_filters(args);
            offline_acks(&projector, &mut dq, q.after, page.next_after)?
        } else {
            Vec::new()
        };
        let events = page
            .events
            .iter()
            .map(|e| Ok((e.frame.position, serde_json::to_string(e)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        printer.merged(events, acks)?;
        printer.flush(&bar)?;
        let progressed = page.next_after > q.after || !page.events.is_empty();
        q.after = q.after.max(page.next_after);
        bar.set_position(q.after);
        if progressed && q.after < projector.position().0 {
            continue;
        }
        if !args.follow {
            break;
        }
        // Caught up: wait for the head to move.
        while projector.position().0 <= q.after {
            tokio::time::sleep(POLL).await;
            projector.catch_up()?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// The ledger filters `--with-acks` applies to the acks it interleaves.
fn ack_filters(args: &AuditArgs) -> DeliveryQuery {
    DeliveryQuery {
        after: 0,
        limit: threadline_api::MAX_LIMIT,
        user_id: args.user.clone(),
        client_id: args.client.clone(),
        thread_id: None,
        since_ms: args.since,
        until_ms: args.until,
    }
}

/// The acks at positions in `(from, to]`, read offline.
fn offline_acks<L: EventLog + threadline_storage::Checkpoints>(
    projector: &Projector<L>,
    q: &mut DeliveryQuery,
    from: u64,
    to: u64,
) -> anyhow::Result<Vec<DeliveryRecord>> {
    let mut out = Vec::new();
    q.after = from;
    while q.after < to {
        let page = deliveries_page(projector, q).map_err(|e| anyhow!("reading the log: {e}"))?;
        out.extend(page.deliveries.into_iter().filter(|d| d.position <= to));
        if page.next_after <= q.after {
            break;
        }
        q.after = page.next_after;
    }
    Ok(out)
}

/// The acks at positions in `(from, to]`, read through `GET /v1/audit/deliveries`.
async fn remote_acks(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    args: &AuditArgs,
    from: u64,
    to: u64,
) -> anyhow::Result<Vec<DeliveryRecord>> {
    let endpoint = format!("{base}/v1/audit/deliveries");
    let mut filters: Vec<(&str, String)> = vec![("limit", threadline_api::MAX_LIMIT.to_string())];
    if let Some(u) = &args.user {
        filters.push(("user_id", u.to_string()));
    }
    if let Some(c) = &args.client {
        filters.push(("client_id", c.to_string()));
    }
    if let Some(s) = args.since {
        filters.push(("since", wire::timestamp(s)));
    }
    if let Some(u) = args.until {
        filters.push(("until", wire::timestamp(u)));
    }
    let mut out = Vec::new();
    let mut after = from;
    while after < to {
        let request = client
            .get(&endpoint)
            .bearer_auth(token)
            .query(&[("after", after)])
            .query(&filters);
        let page: Deliveries = super::get_json(request, base, &endpoint, "a ledger page").await?;
        out.extend(page.deliveries.into_iter().filter(|d| d.position <= to));
        if page.next_after <= after {
            break;
        }
        after = page.next_after;
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Positioned {
    position: u64,
}

/// One page of `GET /v1/audit/events`, its envelopes kept as the server wrote them.
#[derive(Deserialize)]
struct RemotePage {
    events: Vec<Box<RawValue>>,
    next_after: u64,
}

async fn remote(args: &AuditArgs, url: &str, printer: &mut Printer) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/');
    if !base.starts_with("http://") {
        bail!("--url must be a plain http:// URL such as http://127.0.0.1:7070, not {url:?}");
    }
    let Some(token) = &args.token else {
        bail!(
            "--url needs --token with an auditor JWT (threadline token --sub NAME --role auditor)"
        );
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let endpoint = format!("{base}/v1/audit/events");
    let mut filters: Vec<(&str, String)> = Vec::new();
    if let Some(u) = &args.user {
        filters.push(("user_id", u.to_string()));
    }
    if let Some(t) = &args.thread {
        filters.push(("thread_id", t.to_string()));
    }
    if let Some(r) = &args.run {
        filters.push(("run_id", r.to_string()));
    }
    if let Some(t) = &args.event_type {
        filters.push(("type", t.clone()));
    }
    if let Some(s) = args.since {
        filters.push(("since", wire::timestamp(s)));
    }
    if let Some(u) = args.until {
        filters.push(("until", wire::timestamp(u)));
    }
    let spinner = if args.follow {
        ProgressBar::hidden()
    } else {
        super::spinner(args.quiet, "reading the audit log")
    };
    let mut after = args.after;
    while let Some(room) = room(args.limit, printer.printed) {
        let request = client
            .get(&endpoint)
            .bearer_auth(token)
            .query(&[("after", after), ("limit", room)])
            .query(&filters);
        let page: RemotePage = super::get_json(request, base, &endpoint, "an audit page").await?;
        let acks = if args.with_acks {
            remote_acks(&client, base, token, args, after, page.next_after).await?
        } else {
            Vec::new()
        };
        let events = page
            .events
            .iter()
            .map(|e| {
                let at: Positioned = serde_json::from_str(e.get())?;
                Ok((at.position, e.get().to_owned()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        printer.merged(events, acks)?;
        printer.flush(&spinner)?;
        let progressed = page.next_after > after || !page.events.is_empty();
        after = after.max(page.next_after);
        if progressed {
            continue;
        }
        if !args.follow {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    spinner.finish_and_clear();
    Ok(())
}

/// Buffers one page of output and writes it to stdout in one go.
struct Printer {
    format: Format,
    buf: Vec<u8>,
    printed: u64,
}

impl Printer {
    fn new(format: Format) -> Printer {
        let mut buf = Vec::new();
        if format == Format::Table {
            let _ = writeln!(
                buf,
                "{:>8}  {:<24}  {:<16}  {:<36}  {:<36}  {:<15}  ACTOR",
                "POSITION", "TIME", "USER", "THREAD", "RUN", "EVENT"
            );
        }
        Printer {
            format,
            buf,
            printed: 0,
        }
    }

    /// Adds one envelope, given as its JSON text.
    fn event(&mut self, json: &str) -> anyhow::Result<()> {
        self.printed += 1;
        if self.format == Format::Jsonl {
            self.buf.extend_from_slice(json.as_bytes());
            self.buf.push(b'\n');
            return Ok(());
        }
        let v: Value = serde_json::from_str(json)?;
        let s = |key: &str| v[key].as_str().unwrap_or("-").to_owned();
        writeln!(
            self.buf,
            "{:>8}  {:<24}  {:<16}  {:<36}  {:<36}  {:<15}  {}:{}",
            v["position"].as_u64().unwrap_or(0),
            s("recorded_at"),
            s("user_id"),
            s("thread_id"),
            s("run_id"),
            s("event"),
            v["actor"]["role"].as_str().unwrap_or("-"),
            v["actor"]["sub"].as_str().unwrap_or("-"),
        )?;
        Ok(())
    }

    /// Adds a page of events and acks, in log order.
    fn merged(
        &mut self,
        events: Vec<(u64, String)>,
        acks: Vec<DeliveryRecord>,
    ) -> anyhow::Result<()> {
        let mut acks = acks.into_iter().peekable();
        for (position, json) in events {
            while let Some(ack) = acks.next_if(|a| a.position < position) {
                self.ack(&ack)?;
            }
            self.event(&json)?;
        }
        for ack in acks {
            self.ack(&ack)?;
        }
        Ok(())
    }

    /// Adds one ack: a table row, or a JSON line with `"event":"cursor_advanced"`.
    fn ack(&mut self, ack: &DeliveryRecord) -> anyhow::Result<()> {
        if self.format == Format::Jsonl {
            let mut v = serde_json::to_value(ack)?;
            v["event"] = Value::from("cursor_advanced");
            writeln!(self.buf, "{v}")?;
            return Ok(());
        }
        writeln!(
            self.buf,
            "{:>8}  {:<24}  {:<16}  {:<36}  {:<36}  {:<15}  client {} acked user_seq {}",
            ack.position,
            ack.acked_at,
            ack.user_id,
            "-",
            "-",
            "cursor_advanced",
            ack.client_id,
            ack.user_seq,
        )?;
        Ok(())
    }

    /// Writes what is buffered, with `bar` out of the way.
    fn flush(&mut self, bar: &ProgressBar) -> anyhow::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        bar.suspend(|| {
            let mut out = io::stdout().lock();
            out.write_all(&self.buf).and_then(|()| out.flush())
        })?;
        self.buf.clear();
        Ok(())
    }
}
