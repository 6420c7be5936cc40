//! `threadline audit` (being written).

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub data: crate::config::DataArgs,
}

pub fn run(_args: AuditArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not implemented yet")
}
