//! Each scenario twice: Threadline, then Redis Streams doing the same work on
//! the same machine in the same run. Every loop stops by itself: at its time
//! limit, at its count bound, or at a hard deadline.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::future::BoxFuture;
use futures_util::{stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::time::timeout;

use crate::resp::{self, Conn};
use crate::tl::{self, Http};
use threadline_client::{Resume, Update};

/// Most requests one loop may send, whatever its time limit.
const MAX_REQUESTS_PER_TASK: u64 = 5_000_000;

pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn merge(hists: impl IntoIterator<Item = Histogram<u64>>) -> Histogram<u64> {
    let mut all = hist();
    for h in hists {
        all.add(&h).expect("same bounds");
    }
    all
}

/// Latency figures of a run, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lat {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl From<&Histogram<u64>> for Lat {
    fn from(h: &Histogram<u64>) -> Lat {
        let ms = |us: u64| us as f64 / 1000.0;
        Lat {
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// Throughput and latency of an ingest loop.
#[derive(Debug, Clone)]
pub struct Ingest {
    pub rate: f64,
    pub lat: Lat,
    pub events: u64,
    pub secs: f64,
    pub hist: Histogram<u64>,
    /// Requests sent again after a `503` ([`Http::post_retrying`]).
    pub retried: u64,
}

fn ingest(events: u64, elapsed: Duration, h: Histogram<u64>) -> Ingest {
    Ingest {
        rate: events as f64 / elapsed.as_secs_f64(),
        lat: (&h).into(),
        events,
        secs: elapsed.as_secs_f64(),
        hist: h,
        retried: 0,
    }
}

/// What [`tl::RETRIED_503`] says now.
fn retried_so_far() -> u64 {
    tl::RETRIED_503.load(Ordering::Relaxed)
}

impl Ingest {
    /// Two loops of the same set-up as one: events over the summed time, latencies merged.
    pub fn combine(&self, other: &Ingest) -> Ingest {
        let hist = merge([self.hist.clone(), other.hist.clone()]);
        let (events, secs) = (self.events + other.events, self.secs + other.secs);
        Ingest {
            rate: events as f64 / secs,
            lat: (&hist).into(),
            events,
            secs,
            hist,
            retried: self.retried + other.retried,
        }
    }
}

// ---------------------------------------------------------------- 1, 2: ingest

/// One task per `(token, run)`, each posting `batch` events per request
/// (`batch == 1`: `POST /v1/runs/{run}/events`; else `POST /v1/events`) for `secs`.
pub async fn tl_ingest(
    http: &Http,
    agents: &[(String, String)],
    batch: usize,
    payload: usize,
    secs: f64,
) -> Result<Ingest> {
    tl_ingest_over(&[(http.clone(), agents.to_vec())], batch, payload, secs).await
}

/// [`tl_ingest`] with the agents spread over several servers (gateways of one log):
/// each `(server, agents)` pair's agents post to that server, all at once.
pub async fn tl_ingest_over(
    targets: &[(Http, Vec<(String, String)>)],
    batch: usize,
    payload: usize,
    secs: f64,
) -> Result<Ingest> {
    let retried_before = retried_so_far();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let pairs = targets
        .iter()
        .flat_map(|(http, agents)| agents.iter().map(move |a| (http.clone(), a.clone())));
    let tasks = pairs.map(|(http, (token, run))| {
        tokio::spawn(async move {
            let mut h = hist();
            let mut sent = 0u64;
            while Instant::now() < until && sent < MAX_REQUESTS_PER_TASK {
                let t = tl::now_us();
                let (path, body, want) = if batch == 1 {
                    (
                        format!("/v1/runs/{run}/events"),
                        tl::single_body(&tl::payload(payload, t)),
                        201,
                    )
                } else {
                    let events = (0..batch).map(|_| (run.as_str(), tl::payload(payload, t)));
                    ("/v1/events".to_owned(), tl::batch_body(events), 201)
                };
                let before = Instant::now();
                http.post_retrying(&token, &path, body, want).await?;
                h.saturating_record(before.elapsed().as_micros() as u64);
                sent += 1;
            }
            anyhow::Ok((sent * batch as u64, h))
        })
    });
    let results = futures_util::future::join_all(tasks).await;
    let elapsed = started.elapsed();
    let mut events = 0;
    let mut hists = Vec::new();
    for r in results {
        let (n, h) = r??;
        events += n;
        hists.push(h);
    }
    let mut r = ingest(events, elapsed, merge(hists));
    r.retried = retried_so_far() - retried_before;
    Ok(r)
}

/// `clients` connections, each `XADD`ing `batch` entries per round trip
/// (pipelined) to its own stream for `secs`.
pub async fn redis_ingest(
    port: u16,
    clients: usize,
    batch: usize,
    payload: usize,
    secs: f64,
) -> Result<Ingest> {
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let tasks = (0..clients).map(|i| {
        tokio::spawn(async move {
            let mut conn = Conn::connect(port).await?;
            let key = format!("ingest:{batch}:{i}");
            let mut h = hist();
            let mut sent = 0u64;
            let mut buf = Vec::new();
            while Instant::now() < until && sent < MAX_REQUESTS_PER_TASK {
                let t = tl::now_us();
                buf.clear();
                for _ in 0..batch {
                    let data = tl::payload(payload, t);
                    resp::encode(
                        &mut buf,
                        &[b"XADD", key.as_bytes(), b"*", b"d", data.as_bytes()],
                    );
                }
                let before = Instant::now();
                conn.send_raw(&buf).await?;
                conn.read_ok(batch).await?;
                h.saturating_record(before.elapsed().as_micros() as u64);
                sent += 1;
            }
            anyhow::Ok((sent * batch as u64, h))
        })
    });
    let results = futures_util::future::join_all(tasks).await;
    let elapsed = started.elapsed();
    let mut events = 0;
    let mut hists = Vec::new();
    for r in results {
        let (n, h) = r??;
        events += n;
        hists.push(h);
    }
    Ok(ingest(events, elapsed, merge(hists)))
}

// ---------------------------------------------------- 3: append → socket latency

/// Outcome of the append→delivery run.
#[derive(Debug, Clone)]
pub struct Fanout {
    pub achieved_rate: f64,
    pub appended: u64,
    pub received: u64,
    /// `user_seq`s a socket was given a second time (Threadline only; 0 for Redis).
    pub duplicated: u64,
    /// `user_seq`s skipped over in a socket's stream (Threadline only; 0 for Redis).
    pub gaps: u64,
    pub lat: Lat,
    /// Seconds spent appending.
    pub secs: f64,
    pub hist: Histogram<u64>,
    /// Append requests sent again after a `503` ([`Http::post_retrying`]).
    pub retried: u64,
}

impl Fanout {
    /// Two runs of the same set-up as one: counts summed, latencies merged.
    pub fn combine(&self, other: &Fanout) -> Fanout {
        let hist = merge([self.hist.clone(), other.hist.clone()]);
        let (appended, secs) = (self.appended + other.appended, self.secs + other.secs);
        Fanout {
            achieved_rate: appended as f64 / secs,
            appended,
            received: self.received + other.received,
            duplicated: self.duplicated + other.duplicated,
            gaps: self.gaps + other.gaps,
            lat: (&hist).into(),
            secs,
            hist,
            retried: self.retried + other.retried,
        }
    }
}

/// How [`paced`] appends: `appenders` tasks sending `rate` events/s in all, in
/// requests of `batch`, to `users` round-robin, for `secs`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub users: usize,
    pub appenders: usize,
    pub batch: usize,
    pub rate: f64,
    pub secs: f64,
}

/// Paces `appenders` tasks so that together they send `rate` events/s in
/// requests of `batch`, for `secs`; each request goes to the next `batch`
/// users round-robin. `send(first_user, t_us)` performs one request and
/// returns once it is acknowledged. Returns the acknowledged count per user
/// and the time spent appending.
pub async fn paced<F, Fut>(p: Pace, acked: Arc<Vec<AtomicU64>>, send: F) -> Result<Duration>
where
    F: Fn(usize, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let Pace {
        users,
        appenders,
        batch,
        rate,
        secs,
    } = p;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let interval = Duration::from_secs_f64(appenders as f64 * batch as f64 / rate);
    let next_user = Arc::new(AtomicUsize::new(0));
    let tasks = (0..appenders).map(|k| {
        let send = send.clone();
        let acked = acked.clone();
        let next_user = next_user.clone();
        tokio::spawn(async move {
            // Stagger the appenders over one interval.
            let mut next = started + interval.mul_f64(k as f64 / appenders as f64);
            let mut sent = 0u64;
            loop {
                let now = Instant::now();
                if now >= until || sent >= MAX_REQUESTS_PER_TASK {
                    break;
                }
                if next > now {
                    tokio::time::sleep_until(next.into()).await;
                }
                // Behind schedule: send at once, but build no backlog to burst through.
                next = next.max(Instant::now() - interval) + interval;
                let first = next_user.fetch_add(batch, Ordering::Relaxed);
                send(k, first, tl::now_us()).await?;
                for j in 0..batch {
                    acked[(first + j) % users].fetch_add(1, Ordering::Relaxed);
                }
                sent += 1;
            }
            anyhow::Ok(())
        })
    });
    for r in futures_util::future::join_all(tasks).await {
        r??;
    }
    Ok(started.elapsed())
}

/// Whether reader `i` may stop: appending is over and it got all that was
/// acknowledged for it, or the hard deadline passed.
fn reader_done(i: usize, got: u64, acked: &[AtomicU64], done: &AtomicBool, hard: Instant) -> bool {
    (done.load(Ordering::Acquire) && got >= acked[i].load(Ordering::Relaxed))
        || Instant::now() > hard
}

fn record(h: &mut Histogram<u64>, got: &mut u64, sent_at: Option<u64>) {
    if let Some(t) = sent_at {
        h.saturating_record(tl::now_us().saturating_sub(t));
        *got += 1;
    }
}

pub struct FanoutArgs {
    /// Names this run's users and keys, so runs on one server never share them.
    pub tag: String,
    pub users: usize,
    pub appenders: usize,
    pub batch: usize,
    pub rate: f64,
    pub secs: f64,
    pub payload: usize,
}

impl FanoutArgs {
    pub fn pace(&self) -> Pace {
        Pace {
            users: self.users,
            appenders: self.appenders,
            batch: self.batch,
            rate: self.rate,
            secs: self.secs,
        }
    }
}

pub async fn tl_fanout(
    server: &crate::procs::Threadline,
    http: &Http,
    secret: &str,
    a: &FanoutArgs,
) -> Result<Fanout> {
    tl_fanout_across(server.addr, http, secret, a).await
}

/// Sockets check their stream: every frame must continue the user's `user_seq`
/// right after the last one (a merged frame covers `from_user_seq..=user_seq`).
#[derive(Default)]
struct Density {
    duplicated: AtomicU64,
    gaps: AtomicU64,
}

impl Density {
    fn frame(&self, last: &mut u64, e: &threadline_client::Event) {
        let from = e.from_user_seq.unwrap_or(e.user_seq);
        if from <= *last {
            self.duplicated
                .fetch_add((*last).min(e.user_seq) - from + 1, Ordering::Relaxed);
        } else if from > *last + 1 {
            self.gaps.fetch_add(from - *last - 1, Ordering::Relaxed);
        }
        *last = (*last).max(e.user_seq);
    }

    /// `caught_up` at `head` after the events up to `last`: a head past them skipped some.
    fn caught_up(&self, last: &mut u64, head: u64) {
        if head > *last {
            self.gaps.fetch_add(head - *last, Ordering::Relaxed);
        }
        *last = (*last).max(head);
    }
}

/// [`tl_fanout`] with the users' sockets on `sockets_on` and the appends (and the
/// runs' setup) through `http`, which may be another gateway of the same log: the
/// cross-gateway path. Every socket checks that its `user_seq`s stay dense.
pub async fn tl_fanout_across(
    sockets_on: std::net::SocketAddr,
    http: &Http,
    secret: &str,
    a: &FanoutArgs,
) -> Result<Fanout> {
    let agent = tl::token(secret, "live-agent", "agent");
    let users: Vec<String> = (0..a.users)
        .map(|i| format!("live-{}-user-{i}", a.tag))
        .collect();
    let runs = Arc::new(http.started_runs(&agent, &users).await?);
    let addr = sockets_on;
    let density = Arc::new(Density::default());
    let sockets = stream::iter(users.iter().cloned())
        .map(|u| async move {
            let mut ws = tl::connect(addr, &tl::token(secret, &u, "user"), Resume::Latest);
            let (head, early) = tl::caught_up_seq(&mut ws).await?;
            anyhow::Ok((ws, head, early))
        })
        .buffered(100)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..a.users).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let hard = Instant::now() + Duration::from_secs_f64(a.secs + 60.0);
    let readers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (mut ws, head, early))| {
            let (acked, done, density) = (acked.clone(), done.clone(), density.clone());
            tokio::spawn(async move {
                let (mut h, mut got) = (hist(), 0u64);
                // The stream starts after `caught_up`, or at the first event read before it;
                // those events must lead densely up to it.
                let mut last = early
                    .first()
                    .map_or(head, |e| e.from_user_seq.unwrap_or(e.user_seq) - 1);
                for e in &early {
                    density.frame(&mut last, e);
                    record(&mut h, &mut got, tl::event_t(e));
                }
                density.caught_up(&mut last, head);
                while !reader_done(i, got, &acked, &done, hard) {
                    match timeout(Duration::from_millis(200), ws.next()).await {
                        Err(_) => {}
                        Ok(Some(Update::Event(e))) => {
                            density.frame(&mut last, &e);
                            record(&mut h, &mut got, tl::event_t(&e));
                        }
                        Ok(Some(Update::Error(e))) => bail!("socket: {e}"),
                        Ok(Some(_)) => {}
                        Ok(None) => bail!("socket ended"),
                    }
                }
                anyhow::Ok((got, h))
            })
        })
        .collect();
    let (spent, retried) = tl_paced(
        http,
        secret,
        "live-agent",
        runs,
        a.pace(),
        a.payload,
        &acked,
    )
    .await?;
    done.store(true, Ordering::Release);
    let mut f = fanout_result(spent, &acked, readers).await?;
    f.retried = retried;
    f.duplicated = density.duplicated.load(Ordering::Relaxed);
    f.gaps = density.gaps.load(Ordering::Relaxed);
    Ok(f)
}

/// [`paced`] appends to Threadline by agents `{prefix}-{k}`, to `runs` (one per user),
/// with `payload` bytes of data; counts what was acknowledged per user in `acked`.
pub async fn tl_paced(
    http: &Http,
    secret: &str,
    prefix: &str,
    runs: Arc<Vec<String>>,
    p: Pace,
    payload: usize,
    acked: &Arc<Vec<AtomicU64>>,
) -> Result<(Duration, u64)> {
    let retried_before = retried_so_far();
    let agents: Arc<Vec<String>> = Arc::new(
        (0..p.appenders)
            .map(|k| tl::token(secret, &format!("{prefix}-{k}"), "agent"))
            .collect(),
    );
    let send = tl_sender(http.clone(), runs, agents, p.users, p.batch, payload);
    let spent = paced(p, acked.clone(), send).await?;
    Ok((spent, retried_so_far() - retried_before))
}

/// The append of [`paced`] for Threadline: appender `k` sends `batch` events to the runs
/// of the users from `first` round-robin (`POST /v1/runs/{run}/events` for one, else
/// `POST /v1/events`), each carrying its send time `t`.
fn tl_sender(
    http: Http,
    runs: Arc<Vec<String>>,
    agents: Arc<Vec<String>>,
    n: usize,
    batch: usize,
    payload: usize,
) -> impl Fn(usize, usize, u64) -> BoxFuture<'static, Result<()>> + Clone + Send + 'static {
    move |k: usize, first: usize, t: u64| {
        let (http, runs, agents) = (http.clone(), runs.clone(), agents.clone());
        Box::pin(async move {
            if batch == 1 {
                let run = &runs[first % n];
                let body = tl::single_body(&tl::payload(payload, t));
                http.post_retrying(&agents[k], &format!("/v1/runs/{run}/events"), body, 201)
                    .await?;
            } else {
                let events =
                    (0..batch).map(|j| (runs[(first + j) % n].as_str(), tl::payload(payload, t)));
                http.post_retrying(&agents[k], "/v1/events", tl::batch_body(events), 201)
                    .await?;
            }
            Ok(())
        })
    }
}

/// A socket reader's task: events received and their latencies.
type Reader = tokio::task::JoinHandle<Result<(u64, Histogram<u64>)>>;

async fn fanout_result(
    spent: Duration,
    acked: &[AtomicU64],
    readers: Vec<Reader>,
) -> Result<Fanout> {
    let appended: u64 = acked.iter().map(|x| x.load(Ordering::Relaxed)).sum();
    let mut received = 0;
    let mut hists = Vec::new();
    for r in futures_util::future::join_all(readers).await {
        let (n, h) = r??;
        received += n;
        hists.push(h);
    }
    let hist = merge(hists);
    Ok(Fanout {
        achieved_rate: appended as f64 / spent.as_secs_f64(),
        appended,
        received,
        duplicated: 0,
        gaps: 0,
        lat: (&hist).into(),
        secs: spent.as_secs_f64(),
        hist,
        retried: 0,
    })
}

pub async fn redis_fanout(port: u16, a: &FanoutArgs) -> Result<Fanout> {
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..a.users).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let hard = Instant::now() + Duration::from_secs_f64(a.secs + 60.0);
    let mut readers = Vec::new();
    for i in 0..a.users {
        let mut conn = Conn::connect(port).await?;
        let (acked, done) = (acked.clone(), done.clone());
        let key = format!("live:{}:{i}", a.tag);
        readers.push(tokio::spawn(async move {
            let mut last = b"0-0".to_vec();
            let (mut h, mut got) = (hist(), 0u64);
            while !reader_done(i, got, &acked, &done, hard) {
                let reply = conn
                    .call(&[
                        b"XREAD",
                        b"COUNT",
                        b"1000",
                        b"BLOCK",
                        b"200",
                        b"STREAMS",
                        key.as_bytes(),
                        &last,
                    ])
                    .await?;
                let entries = resp::entries(&reply, true);
                for (_, v) in &entries {
                    record(
                        &mut h,
                        &mut got,
                        std::str::from_utf8(v).ok().and_then(tl::embedded_t),
                    );
                }
                if let Some((id, _)) = entries.last() {
                    last = id.clone();
                }
            }
            anyhow::Ok((got, h))
        }));
    }
    let mut conns = Vec::new();
    for _ in 0..a.appenders {
        conns.push(Arc::new(tokio::sync::Mutex::new(
            Conn::connect(port).await?,
        )));
    }
    let conns = Arc::new(conns);
    let (n, batch, payload, tag) = (a.users, a.batch, a.payload, a.tag.clone());
    let send = move |k: usize, first: usize, t: u64| {
        let (conns, tag) = (conns.clone(), tag.clone());
        async move {
            let mut conn = conns[k].lock().await;
            let mut buf = Vec::new();
            for j in 0..batch {
                let key = format!("live:{tag}:{}", (first + j) % n);
                let data = tl::payload(payload, t);
                resp::encode(
                    &mut buf,
                    &[b"XADD", key.as_bytes(), b"*", b"d", data.as_bytes()],
                );
            }
            conn.send_raw(&buf).await?;
            conn.read_ok(batch).await
        }
    };
    let spent = paced(a.pace(), acked.clone(), send).await?;
    done.store(true, Ordering::Release);
    fanout_result(spent, &acked, readers).await
}

// ------------------------------------------------------- 4: fill and storm

/// A bulk fill: how many events and how fast.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    pub events: u64,
    pub logical_bytes: u64,
    pub rate: f64,
}

pub struct FillArgs {
    pub storm_users: usize,
    pub per_user: usize,
    pub total: usize,
    pub payload: usize,
    pub chunk: usize,
}

/// Gives each storm user a started run with `per_user` events, then fills the
/// log up to `total` events with a filler user; batches of `chunk`, 8 in flight.
pub async fn tl_fill(http: &Http, secret: &str, a: &FillArgs) -> Result<(Fill, Vec<String>)> {
    let agent = tl::token(secret, "fill-agent", "agent");
    let started = Instant::now();
    let users: Vec<String> = (0..a.storm_users)
        .map(|i| format!("storm-user-{i}"))
        .collect();
    let runs = http.started_runs(&agent, &users).await?;
    let fillers: Vec<String> = (0..8).map(|i| format!("filler-user-{i}")).collect();
    let filler_runs = http.started_runs(&agent, &fillers).await?;
    let setup = 3 * (users.len() + fillers.len());
    let storm_events = a.storm_users * a.per_user;
    let rest = a.total.saturating_sub(setup + storm_events);
    // (run, count) jobs: storm users first, then the filler runs round-robin.
    let mut jobs = Vec::new();
    for run in &runs {
        let mut left = a.per_user;
        while left > 0 {
            let n = left.min(a.chunk);
            jobs.push((run.clone(), n));
            left -= n;
        }
    }
    let mut left = rest;
    let mut k = 0;
    while left > 0 {
        let n = left.min(a.chunk);
        jobs.push((filler_runs[k % filler_runs.len()].clone(), n));
        left -= n;
        k += 1;
    }
    let payload = a.payload;
    let results = stream::iter(jobs)
        .map(|(run, n)| {
            let agent = agent.clone();
            async move {
                let t = tl::now_us();
                let body = tl::batch_body((0..n).map(|_| (run.as_str(), tl::payload(payload, t))));
                http.post(&agent, "/v1/events", body, 201).await?;
                anyhow::Ok(n)
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let mut appended = 0u64;
    for r in results {
        appended += r? as u64;
    }
    let events = setup as u64 + appended;
    let logical =
        appended * a.payload as u64 + (users.len() + fillers.len()) as u64 * tl::SETUP_DATA_BYTES;
    Ok((
        Fill {
            events,
            logical_bytes: logical,
            rate: events as f64 / started.elapsed().as_secs_f64(),
        },
        users,
    ))
}

/// The same entries in Redis: one stream per storm user with `per_user`
/// entries, a filler stream for the rest; pipelines of `chunk`, 8 connections.
pub async fn redis_fill(port: u16, a: &FillArgs) -> Result<Fill> {
    let started = Instant::now();
    let storm = a.storm_users * a.per_user;
    let total = storm + a.total.saturating_sub(storm);
    let jobs: Vec<(String, usize)> = {
        let mut jobs = Vec::new();
        for i in 0..a.storm_users {
            let mut left = a.per_user;
            while left > 0 {
                let n = left.min(a.chunk);
                jobs.push((format!("storm:{i}"), n));
                left -= n;
            }
        }
        let mut left = total - storm;
        while left > 0 {
            let n = left.min(a.chunk);
            jobs.push(("filler".to_owned(), n));
            left -= n;
        }
        jobs
    };
    let jobs = Arc::new(std::sync::Mutex::new(jobs.into_iter()));
    let payload = a.payload;
    let tasks = (0..8).map(|_| {
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let mut conn = Conn::connect(port).await?;
            let mut done = 0u64;
            loop {
                let job = jobs.lock().unwrap().next();
                let Some((key, n)) = job else { break };
                let t = tl::now_us();
                let mut buf = Vec::new();
                for _ in 0..n {
                    let data = tl::payload(payload, t);
                    resp::encode(
                        &mut buf,
                        &[b"XADD", key.as_bytes(), b"*", b"d", data.as_bytes()],
                    );
                }
                conn.send_raw(&buf).await?;
                conn.read_ok(n).await?;
                done += n as u64;
            }
            anyhow::Ok(done)
        })
    });
    let mut events = 0;
    for r in futures_util::future::join_all(tasks).await {
        events += r??;
    }
    Ok(Fill {
        events,
        logical_bytes: events * a.payload as u64,
        rate: events as f64 / started.elapsed().as_secs_f64(),
    })
}

/// Outcome of a reconnect storm.
#[derive(Debug, Clone, Copy)]
pub struct Storm {
    pub all_caught_up: Duration,
    pub delivered: u64,
    pub rate: f64,
    pub per_client: Lat,
}

fn storm_result(started: Instant, results: Vec<Result<(u64, Duration)>>) -> Result<Storm> {
    let elapsed = started.elapsed();
    let mut h = hist();
    let mut delivered = 0;
    for r in results {
        let (n, d) = r?;
        delivered += n;
        h.saturating_record(d.as_micros() as u64);
    }
    Ok(Storm {
        all_caught_up: elapsed,
        delivered,
        rate: delivered as f64 / elapsed.as_secs_f64(),
        per_client: (&h).into(),
    })
}

/// Every storm user reconnects at once, resuming after its 3 setup events.
pub async fn tl_storm(
    server: &crate::procs::Threadline,
    secret: &str,
    users: &[String],
    per_user: usize,
) -> Result<Storm> {
    let addr = server.addr;
    let tokens: Vec<String> = users.iter().map(|u| tl::token(secret, u, "user")).collect();
    let started = Instant::now();
    let tasks: Vec<_> = tokens
        .into_iter()
        .map(|t| {
            tokio::spawn(async move {
                let mut ws = tl::connect(addr, &t, Resume::After(3));
                let n = tl::wait_caught_up(&mut ws).await?;
                let at = started.elapsed();
                ws.close().await;
                anyhow::Ok((n, at))
            })
        })
        .collect();
    let results: Vec<Result<(u64, Duration)>> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.context("storm task").and_then(|r| r))
        .collect();
    let storm = storm_result(started, results)?;
    if storm.delivered != (users.len() * per_user) as u64 {
        eprintln!(
            "WARNING: storm delivered {} events, expected {}",
            storm.delivered,
            users.len() * per_user
        );
    }
    Ok(storm)
}

/// Every storm stream is read from the start at once, 1000 entries per `XRANGE`.
pub async fn redis_storm(port: u16, clients: usize, per_user: usize) -> Result<Storm> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(async move {
                let mut conn = Conn::connect(port).await?;
                let key = format!("storm:{i}");
                let mut from = b"-".to_vec();
                let mut n = 0u64;
                for _ in 0..1_000_000 {
                    let reply = conn
                        .call(&[b"XRANGE", key.as_bytes(), &from, b"+", b"COUNT", b"1000"])
                        .await?;
                    let entries = resp::entries(&reply, false);
                    let Some((last, _)) = entries.last() else {
                        break;
                    };
                    n += entries.len() as u64;
                    from = [b"(".as_slice(), last].concat();
                    if n >= per_user as u64 {
                        break;
                    }
                }
                anyhow::Ok((n, started.elapsed()))
            })
        })
        .collect();
    let results: Vec<Result<(u64, Duration)>> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.context("storm task").and_then(|r| r))
        .collect();
    storm_result(started, results)
}

// ------------------------------------------------------------ 5: idle sockets

/// Opens `k` idle sockets (distinct users, each past `caught_up`), returns
/// `(rss before, rss after)` of `pid`, then closes them.
pub async fn tl_idle(
    server: &crate::procs::Threadline,
    secret: &str,
    k: usize,
) -> Result<(u64, u64)> {
    let pid = server.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = crate::procs::rss_bytes(pid);
    let addr = server.addr;
    let sockets = stream::iter(0..k)
        .map(|i| async move {
            let token = tl::token(secret, &format!("idle-user-{i}"), "user");
            let mut ws = tl::connect(addr, &token, Resume::Latest);
            tl::wait_caught_up(&mut ws).await?;
            anyhow::Ok(ws)
        })
        .buffer_unordered(128)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = crate::procs::rss_bytes(pid);
    eprintln!("  {} sockets open; closing", sockets.len());
    drop(sockets);
    Ok((before, after))
}

/// Opens `k` idle connections to redis (each answered one PING).
pub async fn redis_idle(redis: &crate::procs::Redis, k: usize) -> Result<(u64, u64)> {
    let pid = redis.pid();
    let before = crate::procs::rss_bytes(pid);
    let port = redis.port;
    let conns = stream::iter(0..k)
        .map(|_| async move {
            let mut c = Conn::connect(port).await?;
            c.call(&[b"PING"]).await?;
            anyhow::Ok(c)
        })
        .buffer_unordered(128)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = crate::procs::rss_bytes(pid);
    drop(conns);
    Ok((before, after))
}

// ------------------------------------------------------- 8: token streams

pub struct StreamArgs {
    pub tag: String,
    pub streams: usize,
    pub deltas_per_sec: f64,
    pub secs: f64,
    /// Sockets ask for merged frames (rolled up live by the server's window).
    pub merge: bool,
}

pub struct Streamed {
    pub deltas: u64,
    pub received: u64,
    pub frames: u64,
    pub secs: f64,
    pub lat: Lat,
}

/// A delta's text: its send time, so a merged frame's latencies are all readable.
fn delta_text(t_us: u64) -> String {
    format!("{t_us};")
}

fn record_deltas(h: &mut Histogram<u64>, got: &mut u64, text: &str) {
    let now = tl::now_us();
    for t in text.split(';').filter_map(|t| t.parse::<u64>().ok()) {
        h.saturating_record(now.saturating_sub(t));
        *got += 1;
    }
}

/// `streams` agents each stream one message at `deltas_per_sec` (single-delta
/// appends) to a user whose socket reads it; latency from each delta's send to
/// the frame that carries it.
pub async fn tl_streams(
    server: &crate::procs::Threadline,
    http: &Http,
    secret: &str,
    a: &StreamArgs,
) -> Result<Streamed> {
    let agent = tl::token(secret, "stream-agent", "agent");
    let users: Vec<String> = (0..a.streams)
        .map(|i| format!("stream-{}-user-{i}", a.tag))
        .collect();
    let runs = http.started_runs(&agent, &users).await?;
    let addr = server.addr;
    let mut readers = Vec::new();
    let done = Arc::new(AtomicBool::new(false));
    for u in &users {
        let mut client =
            tl::connect_merging(addr, &tl::token(secret, u, "user"), Resume::Latest, a.merge);
        tl::wait_caught_up(&mut client).await?;
        let (done, hard) = (
            done.clone(),
            Instant::now() + Duration::from_secs_f64(a.secs + 60.0),
        );
        let per_stream = (a.deltas_per_sec * a.secs).ceil() as u64;
        readers.push(tokio::spawn(async move {
            let (mut h, mut got, mut frames) = (hist(), 0u64, 0u64);
            while !(done.load(Ordering::Acquire) && got >= per_stream) && Instant::now() < hard {
                match timeout(Duration::from_millis(200), client.next()).await {
                    Err(_) => {}
                    Ok(Some(Update::Event(e))) => {
                        frames += 1;
                        if let Some(m) = &e.message {
                            record_deltas(&mut h, &mut got, &m.delta);
                        }
                    }
                    Ok(Some(Update::Error(e))) => bail!("socket: {e}"),
                    Ok(Some(_)) => {}
                    Ok(None) => bail!("socket ended"),
                }
            }
            anyhow::Ok((got, frames, h))
        }));
    }
    let started = Instant::now();
    let writers: Vec<_> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let (http, run, tag) = (http.clone(), run.clone(), a.tag.clone());
            let agent = tl::token(secret, &format!("stream-agent-{i}"), "agent");
            let (rate, secs) = (a.deltas_per_sec, a.secs);
            tokio::spawn(async move {
                let path = format!("/v1/runs/{run}/events");
                let message = format!("msg_bench_{tag}_{i}");
                let start = serde_json::json!({"type": "message_started", "data": {"message_id": message}});
                http.post(&agent, &path, start.to_string(), 201).await?;
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                let n = (rate * secs).ceil() as u64;
                for seq in 1..=n {
                    tick.tick().await;
                    let body = serde_json::json!({"type": "message_delta",
                        "data": {"message_id": message, "seq": seq, "text": delta_text(tl::now_us())}});
                    http.post(&agent, &path, body.to_string(), 201).await?;
                }
                let end = serde_json::json!({"type": "message_completed", "data": {"message_id": message}});
                http.post(&agent, &path, end.to_string(), 201).await?;
                anyhow::Ok(n)
            })
        })
        .collect();
    streamed(writers, readers, started, &done).await
}

/// The same with Redis Streams: one `XADD` per delta, one `XREAD BLOCK` reader per stream.
pub async fn redis_streams(port: u16, a: &StreamArgs) -> Result<Streamed> {
    let done = Arc::new(AtomicBool::new(false));
    let per_stream = (a.deltas_per_sec * a.secs).ceil() as u64;
    let mut readers = Vec::new();
    for i in 0..a.streams {
        let mut conn = Conn::connect(port).await?;
        let key = format!("tokens:{}:{i}", a.tag);
        let (done, hard) = (
            done.clone(),
            Instant::now() + Duration::from_secs_f64(a.secs + 60.0),
        );
        readers.push(tokio::spawn(async move {
            let mut last = b"0-0".to_vec();
            let (mut h, mut got, mut frames) = (hist(), 0u64, 0u64);
            while !(done.load(Ordering::Acquire) && got >= per_stream) && Instant::now() < hard {
                let reply = conn
                    .call(&[
                        b"XREAD",
                        b"COUNT",
                        b"1000",
                        b"BLOCK",
                        b"200",
                        b"STREAMS",
                        key.as_bytes(),
                        &last,
                    ])
                    .await?;
                let entries = resp::entries(&reply, true);
                for (_, v) in &entries {
                    frames += 1;
                    record_deltas(&mut h, &mut got, std::str::from_utf8(v).unwrap_or(""));
                }
                if let Some((id, _)) = entries.last() {
                    last = id.clone();
                }
            }
            anyhow::Ok((got, frames, h))
        }));
    }
    let started = Instant::now();
    let mut writers = Vec::new();
    for i in 0..a.streams {
        let mut conn = Conn::connect(port).await?;
        let key = format!("tokens:{}:{i}", a.tag);
        let (rate, secs) = (a.deltas_per_sec, a.secs);
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let n = (rate * secs).ceil() as u64;
            for _ in 0..n {
                tick.tick().await;
                let text = delta_text(tl::now_us());
                conn.call(&[b"XADD", key.as_bytes(), b"*", b"d", text.as_bytes()])
                    .await?;
            }
            anyhow::Ok(n)
        }));
    }
    streamed(writers, readers, started, &done).await
}

type Task<T> = tokio::task::JoinHandle<Result<T>>;

/// Waits for the writers (deltas each), then tells the readers appending is over
/// and sums what they received.
async fn streamed(
    writers: Vec<Task<u64>>,
    readers: Vec<Task<(u64, u64, Histogram<u64>)>>,
    started: Instant,
    done: &AtomicBool,
) -> Result<Streamed> {
    let mut deltas = 0;
    for w in futures_util::future::join_all(writers).await {
        deltas += w??;
    }
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Release);
    let (mut received, mut frames, mut hists) = (0, 0, Vec::new());
    for r in futures_util::future::join_all(readers).await {
        let (g, f, h) = r??;
        received += g;
        frames += f;
        hists.push(h);
    }
    Ok(Streamed {
        deltas,
        received,
        frames,
        secs,
        lat: (&merge(hists)).into(),
    })
}
