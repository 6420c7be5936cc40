//! `threadline verify` (being written).

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub data: crate::config::DataArgs,
}

pub fn run(_args: VerifyArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not implemented yet")
}
