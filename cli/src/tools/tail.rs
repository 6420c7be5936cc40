//! `threadline tail`: follows one user's socket from a terminal with the Rust client
//! (`threadline-client`): one line per event, resuming across reconnects and server
//! restarts, acknowledging each event once it is printed.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use threadline_api::auth::Signer;
use threadline_api::config::{DataArgs, KeyArgs};
use threadline_client::{
    AckMode, Client, Config, Error, Event, Payload, Resume, State, TokenSource, Update,
};
use threadline_engine::{Role, UserId};

/// How long the acks of what was printed may take to become durable on exit.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(5);
/// Lifetime of the tokens `--sub` mints (renewed on the open socket before they expire).
const MINTED_TTL: Duration = Duration::from_secs(3600);

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One readable line per event: user_seq, time, thread, run, event type, data.
    Pretty,
    /// One socket frame per line, as JSON.
    Jsonl,
}

/// Follows a user's events from a running server. Each printed event is acknowledged
/// for --client-id, so the next `tail` with the same client id (and no --after) goes on
/// after it. Status lines go to stderr.
#[derive(Debug, clap::Args)]
#[command(mut_arg("data", |a| a.help(
    "Directory whose generated secret signs the --sub token (never created by this command)"
)))]
pub struct TailArgs {
    /// The server, e.g. http://127.0.0.1:7070 (or ws://…).
    #[arg(
        long,
        env = "THREADLINE_URL",
        default_value = "http://127.0.0.1:7070",
        value_name = "URL"
    )]
    pub url: String,
    /// The user's JWT. Without it, give --sub to mint one with the local key.
    #[arg(
        long,
        env = "THREADLINE_TOKEN",
        value_name = "JWT",
        hide_env_values = true,
        conflicts_with = "sub"
    )]
    pub token: Option<String>,
    /// Mint the user's tokens with the configured key (as `threadline token --sub`),
    /// renewing them on the open socket before they expire.
    #[arg(long, value_name = "USER")]
    pub sub: Option<String>,
    /// The client id whose durable cursor this tail's acks move.
    #[arg(long, default_value = "tail", value_name = "ID")]
    pub client_id: String,
    /// Start after this user_seq (0 = everything), or `latest` for new events only.
    /// Without it, start after this client id's durable cursor.
    #[arg(long, value_name = "USER_SEQ|latest", value_parser = parse_after)]
    pub after: Option<Resume>,
    /// Only this thread's events.
    #[arg(long, value_name = "THREAD")]
    pub thread: Option<String>,
    #[arg(long, value_enum, default_value = "pretty", value_name = "FORMAT")]
    pub format: Format,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
}

fn parse_after(s: &str) -> Result<Resume, String> {
    match s {
        "latest" => Ok(Resume::Latest),
        n => n
            .parse()
            .map(Resume::After)
            .map_err(|_| format!("{n:?} is not a user_seq or \"latest\"")),
    }
}

pub fn run(args: TailArgs) -> anyhow::Result<ExitCode> {
    let token = match (&args.token, &args.sub) {
        (Some(t), _) => TokenSource::fixed(t.clone()),
        (None, Some(sub)) => {
            UserId::parse(sub)?;
            let signer = Signer::from_config(&args.keys, &args.data.data)?;
            let sub = sub.clone();
            TokenSource::provider(move || {
                let minted = signer.mint(&sub, Role::User, MINTED_TTL);
                async move { minted }
            })
        }
        (None, None) => bail!("give --token <JWT> (or THREADLINE_TOKEN), or --sub <USER> to mint one with the local key"),
    };
    let mut config = Config::new(args.url.clone(), token)
        .client_id(args.client_id.clone())
        .resume(args.after.unwrap_or_default())
        .ack_mode(AckMode::Manual);
    if let Some(t) = &args.thread {
        config = config.thread_id(t.clone());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(follow(config, args.format))
}

async fn follow(config: Config, format: Format) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(config);
    let mut stdout = io::stdout().lock();
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let code = loop {
        #[cfg(unix)]
        let terminate = term.recv();
        #[cfg(not(unix))]
        let terminate = std::future::pending::<Option<()>>();
        let update = tokio::select! {
            u = client.next() => u,
            _ = &mut stop => break ExitCode::SUCCESS,
            _ = terminate => break ExitCode::SUCCESS,
        };
        match update {
            None => break ExitCode::FAILURE,
            Some(Update::Event(e)) => {
                let line = match format {
                    Format::Jsonl => e.to_frame_json(),
                    Format::Pretty => pretty(&e),
                };
                if writeln!(stdout, "{line}")
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    // Nobody reads any more (a closed pipe): this event was not printed.
                    break ExitCode::SUCCESS;
                }
                client.ack(e.user_seq);
            }
            Some(Update::CaughtUp { user_seq }) => {
                eprintln!("threadline tail: caught up at user_seq {user_seq}; following")
            }
            Some(Update::State(State::Reconnecting)) => {
                eprintln!("threadline tail: reconnecting")
            }
            Some(Update::State(_)) => {}
            Some(Update::Error(e)) => {
                eprintln!("threadline tail: {e}");
                if e.is_fatal() {
                    break ExitCode::FAILURE;
                }
            }
        }
    };
    // What was printed is acknowledged before leaving.
    match tokio::time::timeout(FLUSH_ON_EXIT, client.flush()).await {
        Ok(Ok(_)) | Ok(Err(Error::ClientClosed)) => {}
        Ok(Err(e)) => eprintln!("threadline tail: the last acks may not be durable: {e}"),
        Err(_) => {
            eprintln!("threadline tail: the last acks were not confirmed within {FLUSH_ON_EXIT:?}")
        }
    }
    client.close().await;
    Ok(code)
}

/// `#12  10:00:00.123  thread_demo_1  run_demo_1  agent_thinking  {"step":2}`
fn pretty(e: &Event) -> String {
    let time = e
        .recorded_at
        .split_once('T')
        .map_or(e.recorded_at.as_str(), |(_, t)| t.trim_end_matches('Z'));
    let data = match &e.payload {
        Payload::ThreadCreated { title, .. } => title
            .as_deref()
            .map_or_else(String::new, |t| format!("{t:?}")),
        Payload::RunRegistered { agent_name } => agent_name.clone(),
        Payload::RunExpired => String::new(),
        other => other.data().to_string(),
    };
    format!(
        "#{:<6} {time}  {}  {}  {:<15} {data}",
        e.user_seq,
        e.thread_id,
        e.run_id.as_deref().unwrap_or("-"),
        e.payload.event_type(),
    )
}
