//! Rebuild and open-to-ready benchmark for the read model, on a real `SledLog`.
//!
//! THE NUMBER TO WATCH: full-rebuild events/s relative to raw scan+decode
//! events/s of the same log in the same run (the `ratio` of the `full rebuild`
//! row). The raw scan is the floor set by the log and the payload codec; the
//! ratio says how much the fold itself (`ReadModel::apply`) costs on top. A
//! ratio well below ~0.5 means the projections, not the log, bound a rebuild.
//! Second: `open→ready` with a checkpoint at the head, which bounds restart time.
//!
//! Not criterion (STYLE.md 11's default for `benches/`): one pass over 1M events
//! takes seconds, so this binary fills a log once, measures every case in the
//! same run and prints a table with the machine, like the load tool does.
//!
//! Run (release; the default is 1M events, several minutes including the fill):
//!   cargo bench -p threadline-projections --bench rebuild
//!   THREADLINE_BENCH_EVENTS=100000 cargo bench -p threadline-projections --bench rebuild
//!
//! Workload: ~1000 users, each with a few threads; runs of agent events
//! (`agent_started`, thinking / tool_executing + tool_completed steps, one
//! terminal `agent_completed` or, rarely, `agent_error`) carrying ~200-byte JSON
//! data; some `cursor_advanced`. Users interleave at random (deterministic seed).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use threadline_engine::{AgentEventKind, ClientId, Event, RunId, ThreadId, UserId};
use threadline_projections::{
    decode_event, encode_event, rebuild, store_checkpoint, Projector, ReadModel,
};
use threadline_storage::{EventLog, NewEvent, Position, SledLog, SledOptions};
use uuid::Uuid;

const USERS: usize = 1000;
const BATCH: usize = 1000;
const PAGE: usize = 1000;

/// splitmix64: a tiny deterministic PRNG (no extra dev-dependency).
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn uuid(&mut self) -> Uuid {
        let hi = u128::from(self.next());
        let lo = u128::from(self.next());
        uuid::Builder::from_random_bytes(((hi << 64) | lo).to_be_bytes()).into_uuid()
    }
}

#[derive(Debug)]
struct ActiveRun {
    thread: ThreadId,
    run: RunId,
    started: bool,
    steps_left: u32,
    open_tool: Option<String>,
    step: u32,
}

#[derive(Debug, Default)]
struct UserState {
    threads: Vec<ThreadId>,
    run: Option<ActiveRun>,
    /// Events of this user's threads so far (its `user_seq` head).
    seq: u64,
}

/// Generates a valid, interleaved multi-user event stream.
#[derive(Debug)]
struct Workload {
    rng: Rng,
    users: Vec<(UserId, UserState)>,
    clients: [ClientId; 2],
    tool_calls: u64,
}

const TOOLS: [&str; 4] = ["web_search", "read_file", "run_sql", "http_get"];

impl Workload {
    fn new(seed: u64) -> Workload {
        Workload {
            rng: Rng(seed),
            users: (0..USERS)
                .map(|u| {
                    (
                        UserId::parse(&format!("user-{u:04}@bench.example")).unwrap(),
                        UserState::default(),
                    )
                })
                .collect(),
            clients: [
                ClientId::parse("web").unwrap(),
                ClientId::parse("mobile-1").unwrap(),
            ],
            tool_calls: 0,
        }
    }

    /// ~200 bytes of JSON object text.
    fn data(&mut self, kind: &str, step: u32, tool: Option<(&str, &str)>) -> String {
        let n = self.rng.next();
        match tool {
            Some((name, call)) => format!(
                r#"{{"kind":"{kind}","step":{step},"tool":"{name}","tool_call_id":"{call}","args":{{"query":"quarterly revenue by region {n:016x}","limit":25}},"elapsed_ms":{}}}"#,
                n % 5000
            ),
            None => format!(
                r#"{{"kind":"{kind}","step":{step},"text":"Considering the next step of the plan; checking constraints and earlier results before acting. ref {n:016x}","tokens":{}}}"#,
                n % 4096
            ),
        }
    }

    fn next_event(&mut self) -> Event {
        let u = self.rng.below(USERS as u64) as usize;
        let event = self.step_user(u);
        if event.thread_id().is_some() {
            self.users[u].1.seq += 1;
        }
        event
    }

    fn step_user(&mut self, u: usize) -> Event {
        // An occasional acknowledgement from one of the user's clients.
        if self.users[u].1.seq > 0 && self.rng.chance(2) {
            let client = self.clients[self.rng.below(2) as usize].clone();
            let (user_id, state) = &self.users[u];
            return Event::CursorAdvanced {
                user_id: user_id.clone(),
                client_id: client,
                user_seq: state.seq,
            };
        }
        if self.users[u].1.run.is_some() {
            return self.step_run(u);
        }
        let new_thread = self.users[u].1.threads.is_empty()
            || (self.users[u].1.threads.len() < 8 && self.rng.chance(15));
        if new_thread {
            let thread_id = ThreadId::parse(&self.rng.uuid().to_string()).unwrap();
            let n = self.users[u].1.threads.len();
            self.users[u].1.threads.push(thread_id.clone());
            return Event::ThreadCreated {
                thread_id,
                owner: self.users[u].0.clone(),
                title: Some(format!("Research session {n}")),
                metadata: Some(r#"{"source":"bench","priority":"normal"}"#.into()),
            };
        }
        let pick = self.rng.below(self.users[u].1.threads.len() as u64) as usize;
        let thread = self.users[u].1.threads[pick].clone();
        let run = RunId::parse(&self.rng.uuid().to_string()).unwrap();
        let steps_left = 4 + self.rng.below(24) as u32;
        self.users[u].1.run = Some(ActiveRun {
            thread: thread.clone(),
            run: run.clone(),
            started: false,
            steps_left,
            open_tool: None,
            step: 0,
        });
        Event::RunRegistered {
            thread_id: thread,
            run_id: run,
            agent_name: "research-agent".into(),
        }
    }

    fn step_run(&mut self, u: usize) -> Event {
        let mut active = self.users[u].1.run.take().expect("an active run");
        active.step += 1;
        let (kind, tool_call_id) = if !active.started {
            active.started = true;
            (AgentEventKind::Started, None)
        } else if let Some(call) = active.open_tool.take() {
            (AgentEventKind::ToolCompleted, Some(call))
        } else if active.steps_left == 0 {
            let kind = if self.rng.chance(3) {
                AgentEventKind::Error
            } else {
                AgentEventKind::Completed
            };
            (kind, None)
        } else {
            active.steps_left -= 1;
            if self.rng.chance(50) {
                self.tool_calls += 1;
                let call = format!("call_{}", self.tool_calls);
                active.open_tool = Some(call.clone());
                (AgentEventKind::ToolExecuting, Some(call))
            } else {
                (AgentEventKind::Thinking, None)
            }
        };
        let tool = tool_call_id
            .as_deref()
            .map(|c| (TOOLS[(active.step as usize) % TOOLS.len()], c));
        let data = self.data(kind.as_str(), active.step, tool);
        let event = Event::AgentEventRecorded {
            thread_id: active.thread.clone(),
            run_id: active.run.clone(),
            kind,
            data,
            tool_call_id,
        };
        if !kind.is_terminal() {
            self.users[u].1.run = Some(active);
        }
        event
    }
}

/// Appends `count` generated events in batches of [`BATCH`], waiting for each.
fn fill(log: &SledLog, workload: &mut Workload, count: u64, payload_bytes: &mut u64) {
    let mut left = count;
    while left > 0 {
        let n = left.min(BATCH as u64);
        let batch = (0..n)
            .map(|_| {
                let event = workload.next_event();
                let payload = encode_event(&event);
                *payload_bytes += payload.len() as u64;
                NewEvent {
                    event_id: workload.rng.uuid(),
                    stream: event.stream().into_string(),
                    expected_version: None,
                    actor: "agent:bench".into(),
                    event_type: event.type_name().into(),
                    payload,
                }
            })
            .collect();
        log.append(batch).wait().expect("append");
        left -= n;
    }
}

fn open_log(dir: &Path) -> SledLog {
    SledLog::open(dir, SledOptions::default()).expect("open log")
}

/// Closes the log and waits for its writer and flush.
fn close(log: Arc<SledLog>) {
    log.close().expect("close log");
    drop(log);
}

/// Reads every record in pages and decodes each payload; returns the count.
fn raw_scan(log: &SledLog) -> u64 {
    let mut from = Position(1);
    let mut count = 0u64;
    loop {
        let page = log.read_from(from, PAGE).expect("read");
        let Some(last) = page.last().map(|r| r.position) else {
            break;
        };
        for record in &page {
            let event = decode_event(&record.payload).expect("decode");
            std::hint::black_box(&event);
            count += 1;
        }
        from = last.next();
    }
    count
}

/// Folds records 1..=`until` into a fresh model (the checkpoint "behind head").
fn fold_until(log: &SledLog, until: Position) -> ReadModel {
    let mut model = ReadModel::default();
    while model.position() < until {
        let want = ((until.0 - model.position().0) as usize).min(PAGE);
        let page = log.read_from(model.position().next(), want).expect("read");
        assert!(!page.is_empty(), "log ends before {until}");
        for record in &page {
            model.apply(record).expect("apply");
        }
    }
    model
}

/// Reopens the log and opens the projector; returns it with the seconds taken.
fn open_to_ready(dir: &Path) -> (Projector<SledLog>, f64) {
    let t = Instant::now();
    let log = Arc::new(open_log(dir));
    let projector = Projector::open(log).expect("projector open");
    let secs = t.elapsed().as_secs_f64();
    (projector, secs)
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[derive(Debug)]
struct Row {
    case: String,
    events: u64,
    secs: f64,
    rate: bool,
    ratio: Option<f64>,
}

fn rate(events: u64, secs: f64) -> f64 {
    events as f64 / secs.max(1e-9)
}

fn main() {
    let total: u64 = std::env::var("THREADLINE_BENCH_EVENTS")
        .ok()
        .map(|v| {
            v.replace('_', "")
                .parse()
                .expect("THREADLINE_BENCH_EVENTS: a count")
        })
        .unwrap_or(1_000_000);
    assert!(total >= 10, "THREADLINE_BENCH_EVENTS must be at least 10");
    let behind_at = Position(total - total / 10);

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("threadline projections rebuild bench");
    println!("machine: {cores} cores, {}", cpu_model());
    println!(
        "events: {total} ({USERS} users, appended in batches of {BATCH}, read in pages of {PAGE})"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");

    // Fill.
    let mut workload = Workload::new(0x7EAD_11E5);
    let mut payload_bytes = 0u64;
    let log = Arc::new(open_log(&dir));
    let t = Instant::now();
    fill(&log, &mut workload, total, &mut payload_bytes);
    let fill_secs = t.elapsed().as_secs_f64();
    assert_eq!(log.head(), Position(total));
    close(log);
    println!(
        "fill: {total} events in {fill_secs:.2} s = {:.0} events/s; avg payload {} B; log on disk {:.1} MiB",
        rate(total, fill_secs),
        payload_bytes / total,
        dir_bytes(&dir) as f64 / (1024.0 * 1024.0)
    );

    let mut rows = Vec::new();

    // 1 and 2: raw scan+decode, then the full rebuild, over the same reopened
    // log. The first scan after the reopen warms sled's cache; the second is
    // the reference, so the rebuild that follows it is compared like for like.
    let t = Instant::now();
    let log = Arc::new(open_log(&dir));
    let open_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let scanned = raw_scan(&log);
    let first_secs = t.elapsed().as_secs_f64();
    assert_eq!(scanned, total);
    let t = Instant::now();
    let scanned = raw_scan(&log);
    let raw_secs = t.elapsed().as_secs_f64();
    assert_eq!(scanned, total);
    let raw_rate = rate(total, raw_secs);
    rows.push(Row {
        case: "SledLog::open alone".into(),
        events: 0,
        secs: open_secs,
        rate: false,
        ratio: None,
    });
    rows.push(Row {
        case: "raw scan+decode, 1st pass".into(),
        events: total,
        secs: first_secs,
        rate: true,
        ratio: Some(rate(total, first_secs) / raw_rate),
    });
    rows.push(Row {
        case: "raw scan+decode".into(),
        events: total,
        secs: raw_secs,
        rate: true,
        ratio: Some(1.0),
    });

    let t = Instant::now();
    let rebuilt = rebuild(&*log, |_, _| {}).expect("rebuild");
    let rebuild_secs = t.elapsed().as_secs_f64();
    assert_eq!(rebuilt.position(), Position(total));
    let rebuild_rate = rate(total, rebuild_secs);
    rows.push(Row {
        case: "full rebuild".into(),
        events: total,
        secs: rebuild_secs,
        rate: true,
        ratio: Some(rebuild_rate / raw_rate),
    });
    let digests = rebuilt.digests();
    drop(rebuilt);
    close(log);

    // 5: open → ready with no checkpoint stored (the log has never had one):
    // reopen the log and `Projector::open` folds all of it.
    let (projector, none_secs) = open_to_ready(&dir);
    assert_eq!(projector.position(), Position(total));
    assert_eq!(projector.read(|m| m.digests()), digests);
    rows.push(Row {
        case: "open→ready, no checkpoint".into(),
        events: total,
        secs: none_secs,
        rate: true,
        ratio: Some(rate(total, none_secs) / raw_rate),
    });

    // 6: the checkpoint at the head: its size and the time to write it.
    let checkpoint_bytes = projector.read(|m| m.to_checkpoint().len());
    let t = Instant::now();
    projector.checkpoint().expect("checkpoint");
    let write_secs = t.elapsed().as_secs_f64();
    let log = projector.log().clone();
    drop(projector);
    close(log);

    // 3: open → ready with the checkpoint at the head (nothing to catch up).
    let (projector, head_secs) = open_to_ready(&dir);
    assert_eq!(projector.position(), Position(total));
    assert_eq!(projector.read(|m| m.digests()), digests);
    let log = projector.log().clone();
    drop(projector);

    // 4: replace it with a checkpoint of the model at 90% of the log, then
    // open → ready catches up the last 10%.
    let behind = fold_until(&log, behind_at);
    store_checkpoint(&*log, &behind).expect("store checkpoint");
    drop(behind);
    close(log);
    let (projector, behind_secs) = open_to_ready(&dir);
    assert_eq!(projector.position(), Position(total));
    assert_eq!(projector.read(|m| m.digests()), digests);
    let caught_up = total - behind_at.0;
    let log = projector.log().clone();
    drop(projector);
    close(log);

    rows.push(Row {
        case: "open→ready, checkpoint at head".into(),
        events: 0,
        secs: head_secs,
        rate: false,
        ratio: Some(head_secs / none_secs),
    });
    rows.push(Row {
        case: "open→ready, checkpoint 10% behind".into(),
        events: caught_up,
        secs: behind_secs,
        rate: false,
        ratio: Some(behind_secs / none_secs),
    });
    rows.push(Row {
        case: format!("checkpoint write ({checkpoint_bytes} B)"),
        events: total,
        secs: write_secs,
        rate: false,
        ratio: None,
    });

    println!(
        "checkpoint: {checkpoint_bytes} B ({:.1} MiB), written in {write_secs:.3} s",
        checkpoint_bytes as f64 / (1024.0 * 1024.0)
    );
    println!("digests (rebuild = every open→ready above): {digests}");
    println!();
    print_table(&rows);
    println!();
    println!("ratio: throughput rows = events/s ÷ raw scan+decode events/s;");
    println!(
        "       checkpointed open→ready rows = seconds ÷ seconds of open→ready with no checkpoint."
    );
    println!("events: records folded (open→ready rows); model size in events (checkpoint write).");
    println!(
        "the number to watch: full rebuild / raw scan+decode = {:.2}",
        rebuild_rate / raw_rate
    );
}

fn print_table(rows: &[Row]) {
    let header = ["case", "events", "seconds", "events/s", "ratio"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.case.clone(),
                r.events.to_string(),
                format!("{:.3}", r.secs),
                if r.rate {
                    format!("{:.0}", rate(r.events, r.secs))
                } else {
                    "-".into()
                },
                r.ratio.map_or("-".into(), |x| format!("{x:.3}")),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String]| {
        let parts: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths[i] - c.chars().count();
                if i == 0 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(&header.map(String::from));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", rule.join("-|-"));
    for row in &cells {
        line(row);
    }
}
