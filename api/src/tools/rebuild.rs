//! `threadline rebuild` (being written).

#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub data: crate::config::DataArgs,
}

pub fn run(_args: RebuildArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not implemented yet")
}
