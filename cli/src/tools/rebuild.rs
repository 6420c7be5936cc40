//! `threadline rebuild`: fold the whole log from position 1 into a fresh read
//! model and store it as the checkpoint in one atomic write.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use threadline_projections::{load_checkpoint, rebuild, store_checkpoint, ReadModel};
use threadline_storage::{Checkpoints, EventLog};

use threadline_api::config::DataArgs;

/// The projections the read model holds.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// Threads and runs (what thread lists and thread details show).
    Registry,
    /// Per-user `user_seq` queues and client cursors (what sockets deliver).
    Delivery,
    /// Both.
    All,
}

/// Rebuilds the projections from the log. Refuses while a server holds the data dir.
#[derive(Debug, clap::Args)]
#[command(mut_arg("data", |a| a.help(
    "Directory holding the event log and the projections (never created by this command)"
)))]
pub struct RebuildArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub log: crate::log_args::LogArgs,
    /// Which projection to rebuild. Registry and delivery are stored together in one
    /// checkpoint and delivery is folded from the registry's thread owners, so every value
    /// rebuilds and swaps in both; the value chooses which ones the report compares with
    /// the checkpoint they replace.
    #[arg(long, value_enum, default_value = "all", value_name = "PROJECTION")]
    pub projection: Projection,
    /// Do not draw the progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let data = &args.data.data;
    match args.log.nats(data, false, true)? {
        // A gateway's projections over the shared JetStream log live in its data dir.
        Some(options) => rebuild_on(crate::log_args::connect(options)?, &args),
        None => rebuild_on(
            super::open_log(data, "; stop it before rebuilding", false)?,
            &args,
        ),
    }
}

fn rebuild_on<L: EventLog + Checkpoints>(log: L, args: &RebuildArgs) -> anyhow::Result<ExitCode> {
    let data = &args.data.data;
    let head = log.head();

    // The checkpoint being replaced, caught up to the head, so the report can say
    // whether it was right. Unreadable is reported, not fatal: that is what rebuild fixes.
    let previous = match load_checkpoint(&log) {
        Ok(Some(model)) => Some(caught_up(&log, model).map_err(|e| e.to_string())),
        Ok(None) => None,
        Err(e) => Some(Err(e.to_string())),
    };

    let bar = super::position_bar(head.0, args.quiet, "rebuilding");
    let started = Instant::now();
    let model = rebuild(&log, |done, _| bar.set_position(done.0));
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let model = model.with_context(|| {
        format!(
            "rebuilding from {} failed (run `threadline verify --data {}` for a full report)",
            data.display(),
            data.display()
        )
    })?;
    store_checkpoint(&log, &model).context("storing the rebuilt checkpoint")?;
    log.close().context("closing the event log")?;

    let events = model.position().0;
    println!(
        "rebuilt {} from {events} events in {:.2}s ({:.0} events/s); checkpoint stored at position {}",
        match args.projection {
            Projection::All => "registry, delivery, the delivery ledger (acks) and the pending nudges",
            Projection::Registry => "registry (and delivery, stored with it)",
            Projection::Delivery => "delivery and its ledger (and registry, stored with them)",
        },
        elapsed.as_secs_f64(),
        super::rate(events, elapsed),
        model.position(),
    );
    let names: &[&str] = match args.projection {
        Projection::All => &["registry", "delivery", "streams", "acks", "nudges"],
        Projection::Registry => &["registry"],
        Projection::Delivery => &["delivery", "acks", "nudges"],
    };
    match previous {
        None => println!("there was no checkpoint before"),
        Some(Err(e)) => println!("the replaced checkpoint was unreadable: {e}"),
        Some(Ok(old)) => {
            let differing = model.digests().differing(&old.digests());
            for name in names {
                let verdict = if differing.contains(name) {
                    "differed from the rebuild and was replaced"
                } else {
                    "matched the rebuild"
                };
                println!("{name}: the replaced checkpoint {verdict}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `model` with every record after its position folded in, up to the head.
fn caught_up<L: EventLog>(log: &L, mut model: ReadModel) -> anyhow::Result<ReadModel> {
    let head = log.head();
    anyhow::ensure!(
        model.position() <= head,
        "checkpoint at {} is ahead of the log head {head}",
        model.position()
    );
    while model.position() < head {
        let page = log.read_from(model.position().next(), threadline_projections::PAGE)?;
        if page.is_empty() {
            break;
        }
        for record in &page {
            model.apply(record)?;
        }
    }
    Ok(model)
}
