//! `threadline`: the one binary. Parses arguments and hands each subcommand to
//! its module; everything is wired here and nowhere else.

mod config_file;
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

// Parsed once at start: the size of `serve`'s arguments costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
/// tool's stderr holds its progress and, on failure, one error line. `serve
/// --log-format json` writes one JSON object per line instead, with the fields of
/// the current spans (a request's `request_id` among them) flattened into it.
fn init_tracing(default: &str, format: serve::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("THREADLINE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        serve::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        serve::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

fn main() -> ExitCode {
    // Everything this binary creates (the data dir, the log's files, the generated
    // secret) is private to its user: no bits for group or others.
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let (cli, effective) = match config_file::parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("threadline: {e:#}");
            return ExitCode::from(2);
        }
    };
    let format = match &cli.command {
        Cmd::Serve(a) => a.log_format,
        _ => serve::LogFormat::Text,
    };
    init_tracing(
        if matches!(cli.command, Cmd::Serve(_)) {
            "info"
        } else {
            "warn"
        },
        format,
    );
    let result = match cli.command {
        Cmd::Serve(a) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(serve::run(*a, effective)))
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
        // With JSON logs, the last word is a JSON line too.
        Err(e) if format == serve::LogFormat::Json => {
            tracing::error!(error = format!("{e:#}"), "threadline stopped");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("threadline: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Each env var names one option of a command, and none is `THREADLINE_LOG`, the log
    /// filter read before parsing (`--log`'s env var once was, and every test server's
    /// `THREADLINE_LOG=info` became an event-log URL).
    #[test]
    fn env_vars_are_unique_per_command_and_leave_the_log_filter_alone() {
        for sub in Cli::command().get_subcommands() {
            let mut seen = std::collections::HashMap::new();
            for arg in sub.get_arguments() {
                let Some(env) = arg.get_env() else { continue };
                let env = env.to_string_lossy().into_owned();
                assert_ne!(
                    env,
                    "THREADLINE_LOG",
                    "{} --{:?}",
                    sub.get_name(),
                    arg.get_long()
                );
                if let Some(other) = seen.insert(env.clone(), arg.get_id().to_string()) {
                    panic!(
                        "{}: {env} names both {other} and {}",
                        sub.get_name(),
                        arg.get_id()
                    );
                }
            }
        }
    }
}
