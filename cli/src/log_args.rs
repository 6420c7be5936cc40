//! `--log`: which event log a command uses: the data dir's sled log (the
//! default) or a NATS JetStream stream shared by several gateways, with the
//! connection's credentials and TLS options.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use threadline_storage_nats::{NatsLog, NatsOptions};

/// The event log's location and, for NATS, how to reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Where the event log lives: `sled` (in the data dir; the default) or a NATS JetStream
    /// cluster as `nats://HOST:PORT[,nats://HOST:PORT…]` (`tls://` for TLS). Several gateways
    /// may serve one JetStream log; see docs/scaling.md.
    #[arg(
        long = "log",
        env = "THREADLINE_EVENT_LOG",
        default_value = "sled",
        value_name = "sled|nats://HOST:PORT,…"
    )]
    pub log: String,
    /// The JetStream stream holding the log (created with R3 and file storage when missing).
    #[arg(
        long,
        env = "THREADLINE_NATS_STREAM",
        default_value = "THREADLINE",
        value_name = "NAME"
    )]
    pub nats_stream: String,
    /// Subjects of the stream are `<PREFIX>.s.<stream name>` (streams on one cluster must not share them).
    #[arg(
        long,
        env = "THREADLINE_NATS_SUBJECT_PREFIX",
        default_value = "tl",
        value_name = "PREFIX"
    )]
    pub nats_subject_prefix: String,
    /// Replicas when the stream is created (3 survives the loss of one node).
    #[arg(
        long,
        env = "THREADLINE_NATS_REPLICAS",
        default_value_t = 3,
        value_name = "N"
    )]
    pub nats_replicas: usize,
    /// A NATS `.creds` file (user JWT and NKey seed).
    #[arg(long, env = "THREADLINE_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user name (with --nats-password).
    #[arg(
        long,
        env = "THREADLINE_NATS_USER",
        value_name = "USER",
        requires = "nats_password"
    )]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(
        long,
        env = "THREADLINE_NATS_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD",
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(
        long,
        env = "THREADLINE_NATS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub nats_token: Option<String>,
    /// CA certificates (PEM) to verify the NATS servers with; turns TLS on.
    #[arg(long, env = "THREADLINE_NATS_TLS_CA", value_name = "PEM_FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --nats-tls-key).
    #[arg(
        long,
        env = "THREADLINE_NATS_TLS_CERT",
        value_name = "PEM_FILE",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (with --nats-tls-cert).
    #[arg(
        long,
        env = "THREADLINE_NATS_TLS_KEY",
        value_name = "PEM_FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
}

impl LogArgs {
    /// The NATS options when `--log` names a cluster; `None` for sled. This
    /// gateway's checkpoints go under `<data>/nats/<stream>`. `create`: make the
    /// stream and the data dir when missing (serve); the tools never create a data
    /// dir. `hold`: lock this gateway's dir for the process (serve, rebuild).
    pub fn nats(
        &self,
        data: &Path,
        create: bool,
        hold: bool,
    ) -> anyhow::Result<Option<NatsOptions>> {
        let log = self.log.trim();
        if log == "sled" {
            return Ok(None);
        }
        if !create && !data.is_dir() {
            let d = data.display();
            if data.exists() {
                bail!("data dir {d} is not a directory");
            }
            bail!("data dir {d} does not exist");
        }
        let urls: Vec<&str> = log.split(',').map(str::trim).collect();
        for url in &urls {
            let Some((scheme, rest)) = url.split_once("://") else {
                bail!("--log {log:?}: expected `sled` or nats://HOST:PORT[,…]");
            };
            if !matches!(scheme, "nats" | "tls") || rest.is_empty() {
                bail!("--log {log:?}: {url:?} is not a nats:// or tls:// URL");
            }
        }
        let mut options = NatsOptions::new(log, data.join("nats").join(&self.nats_stream));
        options.stream = self.nats_stream.clone();
        options.replicas = self.nats_replicas;
        options.subject_prefix = self.nats_subject_prefix.clone();
        options.create = create;
        options.hold_dir = hold;
        options.credentials = self.nats_creds.clone();
        options.user = self.nats_user.clone();
        options.password = self.nats_password.clone();
        options.token = self.nats_token.clone();
        options.tls_ca = self.nats_tls_ca.clone();
        options.tls_cert = self.nats_tls_cert.clone();
        options.tls_key = self.nats_tls_key.clone();
        options.tls_required = urls.iter().any(|u| u.starts_with("tls://"));
        Ok(Some(options))
    }
}

/// Connects to the JetStream log (off the async runtime: it blocks while it folds the stream).
pub fn connect(options: NatsOptions) -> anyhow::Result<NatsLog> {
    let what = format!("{} on {}", options.stream, options.servers.join(","));
    NatsLog::connect(options).with_context(|| format!("opening the JetStream log {what}"))
}
