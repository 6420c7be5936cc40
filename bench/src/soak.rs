//! `--soak SECS`: a long steady load on one server, sampled every interval. Paced
//! appends over many sockets of which a fraction disconnects and resumes at random;
//! every client checks its own stream (dense `user_seq`, nothing twice, everything
//! acknowledged for it received). Reports RSS, descriptors and append→frame latency
//! per interval, and the losses and duplicates counted at the end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::{stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::time::timeout;

use crate::procs::{self, Threadline};
use crate::scenarios::{self as sc, Lat};
use crate::tl::{self, Http};
use threadline_client::{Client, Config, Resume, TokenSource, Update};

pub struct SoakArgs {
    pub users: usize,
    pub appenders: usize,
    pub batch: usize,
    pub rate: f64,
    pub secs: f64,
    pub interval: Duration,
    /// Share of the sockets that disconnect and resume at random.
    pub reconnecting: f64,
    /// A reconnecting socket stays connected a random time up to this.
    pub max_connected: Duration,
    pub payload: usize,
}

/// One interval's figures.
#[derive(Debug, Clone)]
pub struct Sample {
    pub end_s: f64,
    pub rss: u64,
    pub fds: usize,
    pub appended: u64,
    pub received: u64,
    pub reconnects: u64,
    pub lat: Lat,
}

#[derive(Debug, Default)]
pub struct Soak {
    pub samples: Vec<Sample>,
    pub appended: u64,
    pub received: u64,
    /// Events acknowledged for a user that its client never received.
    pub lost: u64,
    /// `user_seq`s a client was given a second time.
    pub duplicated: u64,
    /// `user_seq`s skipped over in a client's stream.
    pub gaps: u64,
    pub reconnects: u64,
    /// Reconnects that resumed from the durable cursor (the rest: after the last seen).
    pub cursor_resumes: u64,
    /// Errors the client reported and handled (its own reconnects).
    pub client_errors: u64,
    /// Append requests sent again after a `503` (`overloaded`).
    pub retried: u64,
    pub achieved_rate: f64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    reconnects: AtomicU64,
    cursor_resumes: AtomicU64,
    duplicated: AtomicU64,
    gaps: AtomicU64,
    client_errors: AtomicU64,
}

fn socket(addr: std::net::SocketAddr, token: &str, resume: Resume) -> Client {
    let mut config = Config::new(format!("ws://{addr}"), TokenSource::fixed(token))
        .client_id("soak")
        .resume(resume);
    config.connect_timeout = Duration::from_secs(60);
    Client::connect(config)
}

/// Reads a socket that resumed at `Latest` up to its `caught_up`: the user's head.
async fn caught_up_at(client: &mut Client) -> Result<u64> {
    loop {
        match timeout(Duration::from_secs(300), client.next()).await {
            Err(_) => bail!("no caught_up within 300 s"),
            Ok(Some(Update::CaughtUp { user_seq })) => return Ok(user_seq),
            Ok(Some(Update::Event(e))) => {
                bail!("an event ({}) before caught_up at the head", e.user_seq)
            }
            Ok(Some(Update::Error(e))) => bail!("socket: {e}"),
            Ok(Some(Update::State(_))) => {}
            Ok(None) => bail!("socket ended before caught_up"),
        }
    }
}

/// What one client saw of its stream.
struct Seen {
    last: u64,
    got: u64,
}

impl Seen {
    /// Checks a frame against the stream so far (a merged frame covers `from..=seq`).
    fn frame(&mut self, e: &threadline_client::Event, c: &Counters, h: &Mutex<Histogram<u64>>) {
        let from = e.from_user_seq.unwrap_or(e.user_seq);
        if from <= self.last {
            c.duplicated
                .fetch_add(self.last.min(e.user_seq) - from + 1, Ordering::Relaxed);
        } else if from > self.last + 1 {
            c.gaps.fetch_add(from - self.last - 1, Ordering::Relaxed);
        }
        self.last = self.last.max(e.user_seq);
        if let Some(t) = tl::event_t(e) {
            self.got += 1;
            c.received.fetch_add(1, Ordering::Relaxed);
            let mut h = h.lock().unwrap();
            h.saturating_record(tl::now_us().saturating_sub(t));
        }
    }
}

pub async fn tl_soak(server: &Threadline, http: &Http, secret: &str, a: &SoakArgs) -> Result<Soak> {
    let agent = tl::token(secret, "soak-agent", "agent");
    let users: Vec<String> = (0..a.users).map(|i| format!("soak-user-{i}")).collect();
    let runs = Arc::new(http.started_runs(&agent, &users).await?);
    let addr = server.addr;
    // Every socket starts at its user's head, with a durable cursor at it.
    let sockets = stream::iter(users.iter().cloned())
        .map(|u| async move {
            let token = tl::token(secret, &u, "user");
            let mut ws = socket(addr, &token, Resume::Latest);
            let head = caught_up_at(&mut ws).await?;
            anyhow::Ok((token, ws, head))
        })
        .buffered(100)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..a.users).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let interval_hist = Arc::new(Mutex::new(sc::hist()));
    let every = (1.0 / a.reconnecting.max(1e-9)).round().max(1.0) as usize;
    let hard = Instant::now() + Duration::from_secs_f64(a.secs + 120.0);
    let max_connected = a.max_connected;
    let readers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, (token, mut ws, head))| {
            let (acked, done, c, h) = (
                acked.clone(),
                done.clone(),
                counters.clone(),
                interval_hist.clone(),
            );
            let flaky = a.reconnecting > 0.0 && i % every == 0;
            tokio::spawn(async move {
                let mut seen = Seen { last: head, got: 0 };
                let connected_for = || max_connected.mul_f64(0.1 + 0.9 * fastrand::f64());
                let mut drop_at = Instant::now() + connected_for();
                loop {
                    let finished = done.load(Ordering::Acquire)
                        && seen.got >= acked[i].load(Ordering::Relaxed);
                    if finished || Instant::now() > hard {
                        break;
                    }
                    if flaky && !done.load(Ordering::Acquire) && Instant::now() >= drop_at {
                        // A tab closing: acks made durable, socket closed, a new one resumes
                        // from the durable cursor (or after what it saw, if the flush failed).
                        let handle = ws.handle();
                        let resume = match timeout(Duration::from_secs(10), handle.flush()).await {
                            Ok(Ok(cursor)) if cursor == seen.last => {
                                c.cursor_resumes.fetch_add(1, Ordering::Relaxed);
                                Resume::Cursor
                            }
                            _ => Resume::After(seen.last),
                        };
                        handle.close().await;
                        drop(ws);
                        ws = socket(addr, &token, resume);
                        c.reconnects.fetch_add(1, Ordering::Relaxed);
                        drop_at = Instant::now() + connected_for();
                    }
                    match timeout(Duration::from_millis(200), ws.next()).await {
                        Err(_) => {}
                        Ok(Some(Update::Event(e))) => seen.frame(&e, &c, &h),
                        Ok(Some(Update::Error(e))) if e.is_fatal() => {
                            bail!("socket of user {i}: {e}")
                        }
                        Ok(Some(Update::Error(_))) => {
                            c.client_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => bail!("socket of user {i} ended"),
                    }
                }
                anyhow::Ok(seen.got)
            })
        })
        .collect();

    // The sampler: one row per interval.
    let pid = server.pid();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (acked, done, c, h, samples) = (
            acked.clone(),
            done.clone(),
            counters.clone(),
            interval_hist.clone(),
            samples.clone(),
        );
        let interval = a.interval;
        tokio::spawn(async move {
            let started = Instant::now();
            let (mut appended0, mut received0, mut reconnects0) = (0, 0, 0);
            let mut tick = tokio::time::interval_at((started + interval).into(), interval);
            while !done.load(Ordering::Acquire) {
                tick.tick().await;
                let lat: Lat = (&std::mem::replace(&mut *h.lock().unwrap(), sc::hist())).into();
                let appended: u64 = acked.iter().map(|x| x.load(Ordering::Relaxed)).sum();
                let received = c.received.load(Ordering::Relaxed);
                let reconnects = c.reconnects.load(Ordering::Relaxed);
                let s = Sample {
                    end_s: started.elapsed().as_secs_f64(),
                    rss: procs::rss_bytes(pid),
                    fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
                    appended: appended - appended0,
                    received: received - received0,
                    reconnects: reconnects - reconnects0,
                    lat,
                };
                eprintln!(
                    "soak {:>6.0} s: RSS {:.1} MiB, {} fds, {} appended, {} received, {} reconnects, p50/p99 {:.2}/{:.2} ms",
                    s.end_s,
                    s.rss as f64 / 1048576.0,
                    s.fds,
                    s.appended,
                    s.received,
                    s.reconnects,
                    s.lat.p50,
                    s.lat.p99
                );
                (appended0, received0, reconnects0) = (appended, received, reconnects);
                samples.lock().unwrap().push(s);
            }
        })
    };

    let pace = sc::Pace {
        users: a.users,
        appenders: a.appenders,
        batch: a.batch,
        rate: a.rate,
        secs: a.secs,
    };
    let (spent, retried) =
        sc::tl_paced(http, secret, "soak-agent", runs, pace, a.payload, &acked).await?;
    done.store(true, Ordering::Release);
    sampler.abort();

    let mut soak = Soak {
        retried,
        ..Soak::default()
    };
    for (i, r) in futures_util::future::join_all(readers)
        .await
        .into_iter()
        .enumerate()
    {
        let got = r??;
        soak.lost += acked[i].load(Ordering::Relaxed).saturating_sub(got);
    }
    soak.appended = acked.iter().map(|x| x.load(Ordering::Relaxed)).sum();
    soak.received = counters.received.load(Ordering::Relaxed);
    soak.duplicated = counters.duplicated.load(Ordering::Relaxed);
    soak.gaps = counters.gaps.load(Ordering::Relaxed);
    soak.reconnects = counters.reconnects.load(Ordering::Relaxed);
    soak.cursor_resumes = counters.cursor_resumes.load(Ordering::Relaxed);
    soak.client_errors = counters.client_errors.load(Ordering::Relaxed);
    soak.achieved_rate = soak.appended as f64 / spent.as_secs_f64();
    soak.samples = std::mem::take(&mut *samples.lock().unwrap());
    Ok(soak)
}

/// RSS after the first (warm-up) interval: (min, max, spread as ± % of their mean).
pub fn rss_spread(samples: &[Sample]) -> Option<(u64, u64, f64)> {
    let after = samples.get(1..).filter(|s| !s.is_empty())?;
    let min = after.iter().map(|s| s.rss).min()?;
    let max = after.iter().map(|s| s.rss).max()?;
    let mean = (min + max) as f64 / 2.0;
    Some((min, max, (max - min) as f64 / 2.0 / mean * 100.0))
}

/// Prints the per-interval table.
pub fn print_samples(samples: &[Sample]) {
    println!();
    println!("| until, s | server RSS, MiB | open fds | appended | received | reconnects | p50 append→frame, ms | p99, ms | max, ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in samples {
        println!(
            "| {:.0} | {:.1} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
            s.end_s,
            s.rss as f64 / 1048576.0,
            s.fds,
            s.appended,
            s.received,
            s.reconnects,
            s.lat.p50,
            s.lat.p99,
            s.lat.max
        );
    }
}

/// Fails the run when a client lost, skipped or was given twice anything.
pub fn check(s: &Soak) -> Result<()> {
    if s.lost > 0 || s.duplicated > 0 || s.gaps > 0 {
        bail!(
            "soak: {} events lost, {} duplicated, {} skipped over (appended {}, received {})",
            s.lost,
            s.duplicated,
            s.gaps,
            s.appended,
            s.received
        );
    }
    Ok(())
}
