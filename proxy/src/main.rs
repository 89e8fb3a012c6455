//! `tessera-proxy`: parse arguments, start the proxy, wait for a signal.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tessera_proto::logging::{self, LogFormat};
use tessera_proxy::ProxyConfig;

#[derive(Parser)]
#[command(name = "tessera-proxy", version, about = "Tessera data-plane proxy")]
struct Cli {
    /// Log format: text or json.
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "TESSERA_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Proxy configuration file (YAML).
        #[arg(long, env = "TESSERA_PROXY_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tessera_proto::tls::install_crypto_provider();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run { config } => runtime.block_on(run(config)),
    }
}

async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = ProxyConfig::load(&config_path)?;
    let proxy = tessera_proxy::start(config).await?;
    tessera_proxy::app::shutdown_signal()
        .await
        .context("cannot watch for signals")?;
    proxy.shutdown().await;
    tracing::info!(event = "proxy stopped");
    Ok(())
}
