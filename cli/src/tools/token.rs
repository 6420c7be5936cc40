//! `threadline token`: mint a JWT for development and scripts.

use std::time::Duration;

use threadline_engine::Role;

use threadline_api::auth::Signer;
use threadline_api::config::{DataArgs, KeyArgs};

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// The user id the token speaks for (its `sub`), e.g. `alice` or `bob@example.com`.
    #[arg(long, value_name = "USER")]
    pub sub: String,
    /// The role: `user` reads and writes its own threads, `agent` appends agent events
    /// for any user, `auditor` reads everything and writes nothing.
    #[arg(long, default_value = "user", value_parser = ["user", "agent", "auditor"])]
    pub role: String,
    /// How long the token is valid (e.g. `1h`, `15m`, `30s`).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub ttl: Duration,
}

/// Prints the token alone on stdout.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    threadline_engine::UserId::parse(&args.sub)?;
    let role = Role::parse(&args.role)?;
    let signer = Signer::from_config(&args.keys, &args.data.data)?;
    println!("{}", signer.mint(&args.sub, role, args.ttl)?);
    Ok(())
}
