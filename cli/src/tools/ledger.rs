//! `threadline audit --deliveries`: the delivery ledger, offline from the data dir
//! (the same query as `GET /v1/audit/deliveries`, over the same fold) or through a
//! running server with `--url`. Without `--thread`, one row per durable ack; with it,
//! one row per event of the thread and, per client of its owner, the ack that covered it.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use threadline_api::deliveries::{deliveries_page, Deliveries, DeliveryQuery};
use threadline_api::wire;
use threadline_projections::Projector;

use super::audit::{AuditArgs, Format};

pub async fn run(args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let mut q = DeliveryQuery {
        after: args.after,
        limit: threadline_api::MAX_LIMIT,
        user_id: args.user.clone(),
        client_id: args.client.clone(),
        thread_id: args.thread.clone(),
        since_ms: args.since,
        until_ms: args.until,
    };
    let mut out = Out {
        format: args.format,
        printed: 0,
        limit: args.limit,
        header: false,
    };
    match &args.url {
        Some(url) => {
            let remote = Remote::new(url, args.token.as_deref())?;
            loop {
                let page = remote.page(&q).await?;
                if !out.page(&page)? || page.next_after <= q.after {
                    break;
                }
                q.after = page.next_after;
            }
        }
        None => {
            let data = &args.data.data;
            let log = super::open_log_raw(data, true).map_err(|e| {
                super::explain_open_error(
                    data,
                    e,
                    "; read through it instead: threadline audit --deliveries --url http://<its address> --token <auditor JWT>",
                )
            })?;
            let projector = Projector::open(Arc::new(super::Tolerant::new(log)))
                .with_context(|| format!("loading the projections of {}", data.display()))?;
            loop {
                let page = deliveries_page(&projector, &q)
                    .map_err(|e| anyhow!("reading the ledger: {e}"))?;
                if !out.page(&page)? || page.next_after <= q.after {
                    break;
                }
                q.after = page.next_after;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct Remote {
    client: reqwest::Client,
    endpoint: String,
    token: String,
}

impl Remote {
    fn new(url: &str, token: Option<&str>) -> anyhow::Result<Remote> {
        let base = url.trim_end_matches('/');
        if !base.starts_with("http://") {
            bail!("--url must be a plain http:// URL such as http://127.0.0.1:7070, not {url:?}");
        }
        let Some(token) = token else {
            bail!("--url needs --token with an auditor JWT (threadline token --sub NAME --role auditor)");
        };
        Ok(Remote {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            endpoint: format!("{base}/v1/audit/deliveries"),
            token: token.to_owned(),
        })
    }

    async fn page(&self, q: &DeliveryQuery) -> anyhow::Result<Deliveries> {
        let mut query: Vec<(&str, String)> = vec![
            ("after", q.after.to_string()),
            ("limit", q.limit.to_string()),
        ];
        if let Some(u) = &q.user_id {
            query.push(("user_id", u.to_string()));
        }
        if let Some(c) = &q.client_id {
            query.push(("client_id", c.to_string()));
        }
        if let Some(t) = &q.thread_id {
            query.push(("thread_id", t.to_string()));
        }
        if let Some(s) = q.since_ms {
            query.push(("since", wire::timestamp(s)));
        }
        if let Some(u) = q.until_ms {
            query.push(("until", wire::timestamp(u)));
        }
        let request = self
            .client
            .get(&self.endpoint)
            .bearer_auth(&self.token)
            .query(&query);
        super::get_json(request, &self.endpoint, &self.endpoint, "a ledger page").await
    }
}

struct Out {
    format: Format,
    printed: u64,
    limit: Option<u64>,
    header: bool,
}

impl Out {
    /// Prints one page; false once `--limit` rows are printed.
    fn page(&mut self, page: &Deliveries) -> anyhow::Result<bool> {
        let mut buf = Vec::new();
        let table = self.format == Format::Table;
        match &page.thread {
            None => {
                if table && !self.header {
                    writeln!(
                        buf,
                        "{:>8}  {:<24}  {:<16}  {:<24}  USER_SEQ",
                        "POSITION", "ACKED AT", "USER", "CLIENT"
                    )?;
                }
                for d in &page.deliveries {
                    if self.limit.is_some_and(|l| self.printed >= l) {
                        break;
                    }
                    self.printed += 1;
                    if table {
                        writeln!(
                            buf,
                            "{:>8}  {:<24}  {:<16}  {:<24}  {}",
                            d.position, d.acked_at, d.user_id, d.client_id, d.user_seq
                        )?;
                    } else {
                        writeln!(buf, "{}", serde_json::to_string(d)?)?;
                    }
                }
            }
            Some(t) => {
                if table && !self.header {
                    writeln!(
                        buf,
                        "thread {} of {} (user head {})",
                        t.thread_id, t.user_id, t.user_head
                    )?;
                    for c in &t.clients {
                        writeln!(
                            buf,
                            "client {} acked up to user_seq {} at {} (position {})",
                            c.client_id, c.acked_user_seq, c.acked_at, c.position
                        )?;
                    }
                    if t.clients.is_empty() {
                        writeln!(buf, "no client of {} has acknowledged anything", t.user_id)?;
                    }
                    writeln!(
                        buf,
                        "{:>8}  {:>8}  {:<15}  {:<24}  ACKS",
                        "POSITION", "USER_SEQ", "EVENT", "RECORDED"
                    )?;
                }
                for e in &t.events {
                    if self.limit.is_some_and(|l| self.printed >= l) {
                        break;
                    }
                    self.printed += 1;
                    if table {
                        let mut acks: Vec<String> = e
                            .acks
                            .iter()
                            .map(|a| format!("{} at {} (@{})", a.client_id, a.acked_at, a.position))
                            .collect();
                        acks.extend(e.unacked.iter().map(|c| format!("{c}: not acknowledged")));
                        writeln!(
                            buf,
                            "{:>8}  {:>8}  {:<15}  {:<24}  {}",
                            e.position,
                            e.user_seq,
                            e.event,
                            e.recorded_at,
                            acks.join("; ")
                        )?;
                    } else {
                        writeln!(buf, "{}", serde_json::to_string(e)?)?;
                    }
                }
            }
        }
        self.header = true;
        let mut stdout = io::stdout().lock();
        match stdout.write_all(&buf).and_then(|()| stdout.flush()) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(false),
            r => r?,
        }
        Ok(self.limit.is_none_or(|l| self.printed < l))
    }
}
