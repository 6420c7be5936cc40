//! `threadline`: the one binary. Parses arguments and hands each subcommand to
//! its module; everything is wired here and nowhere else.

mod log_args;
mod serve;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Threadline: an event-sourced router that delivers AI agents' run events to
/// the right user's sockets, durably and in order.
#[derive(Debug, Parser)]
#[command(name = "threadline", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the HTTP + WebSocket server on the data directory (created if missing).
    Serve(Box<serve::ServeArgs>),
    /// Print a JWT signed with the configured key (or the data dir's generated secret).
    Token(tools::token::TokenArgs),
    /// Rebuild the projections from the log and swap them in atomically.
    Rebuild(tools::rebuild::RebuildArgs),
    /// Check checksums, dense positions and versions, and projections against a rebuild.
    Verify(tools::verify::VerifyArgs),
    /// Filter and print the event history, offline or from a running server.
    Audit(tools::audit::AuditArgs),
    /// Rewrite a format-1 event log (from an earlier Threadline) in the current format.
    Migrate(tools::maintenance::MigrateArgs),
    /// Rebuild a damaged event log from the intact copies of its records.
    Repair(tools::maintenance::RepairArgs),
    /// Follow one user's events from a running server, acknowledging what is printed.
    Tail(tools::tail::TailArgs),
}

/// Logs go to stderr; by default `serve` logs at info and the tools only warnings, so a
/// tool's stderr holds its progress and, on failure, one error line.
fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("THREADLINE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    // Everything this binary creates (the data dir, the log's files, the generated
    // secret) is private to its user: no bits for group or others.
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    init_tracing(match cli.command {
        Cmd::Serve(_) => "info",
        _ => "warn",
    });
    let result = match cli.command {
        Cmd::Serve(a) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(serve::run(*a)))
            .map(|()| ExitCode::SUCCESS),
        Cmd::Token(a) => tools::token::run(a).map(|()| ExitCode::SUCCESS),
        Cmd::Rebuild(a) => tools::rebuild::run(a),
        Cmd::Verify(a) => tools::verify::run(a),
        Cmd::Audit(a) => tools::audit::run(a),
        Cmd::Migrate(a) => tools::maintenance::migrate(a),
        Cmd::Repair(a) => tools::maintenance::repair(a),
        Cmd::Tail(a) => tools::tail::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("threadline: {e:#}");
            ExitCode::FAILURE
        }
    }
}
