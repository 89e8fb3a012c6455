//! `tessera-proxy`: parse arguments, then either program the pod's traffic capture
//! (`init`) or start the proxy and wait for a signal (`run`).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tessera_mesh::process::{
    self,
    logging::{self, LogFormat},
};
use tessera_proxy::ProxyConfig;
use tessera_proxy::capture::{self, CaptureConfig, Family};
use tessera_proxy::config::CONFIG_ENV;

/// glibc's malloc, with tokio's 128-byte-aligned tasks served from its per-thread cache
/// (the system allocator on other targets).
#[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
#[global_allocator]
static ALLOCATOR: tessera_proxy::allocator::Allocator = tessera_proxy::allocator::Allocator;

#[derive(Parser)]
#[command(name = "tessera-proxy", version, about = "Tessera data-plane proxy")]
struct Cli {
    /// Log format: text or json (any command; before or after its name).
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "TESSERA_LOG_FORMAT",
        help_heading = "Global options"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    #[command(after_help = "Examples:
  tessera-proxy run --config deploy/local/proxy.yaml
  TESSERA_PROXY_CONFIG=\"$(cat proxy.yaml)\" tessera-proxy run   # as an injected sidecar")]
    Run {
        /// Proxy configuration file (YAML). Without it, the YAML itself is read from the
        /// TESSERA_PROXY_CONFIG environment variable (how injected sidecars get it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Threads serving traffic. One (the default) runs everything on one thread
        /// with no cross-thread hand-offs: 20-40 % less CPU per request than two in the
        /// benchmarks. More only pay off for a pod whose traffic needs over a core.
        #[arg(long, env = "TESSERA_PROXY_WORKERS", default_value_t = 1)]
        workers: usize,
    },
    /// Program iptables (nat table) so the pod's TCP traffic goes through the proxy:
    /// inbound to --inbound-port, outbound to --outbound-port, except the proxy's own.
    /// Idempotent; prints the rules it installs.
    #[command(after_help = "Examples:
  tessera-proxy init --exclude-inbound-ports 15020
  tessera-proxy init --dry-run --exclude-outbound-cidrs 169.254.169.254/32
  tessera-proxy init --cleanup")]
    Init(InitArgs),
}

#[derive(Args)]
struct InitArgs {
    /// UID the proxy runs as; its traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// Also exempt traffic of this GID.
    #[arg(long)]
    proxy_gid: Option<u32>,
    /// Where captured inbound connections are sent: the proxy's `inboundListen` port.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Where captured outbound connections are sent: the proxy's `outboundListen` port.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Comma-separated destination ports whose inbound connections bypass the proxy.
    #[arg(long, default_value = "")]
    exclude_inbound_ports: String,
    /// Comma-separated source CIDRs whose inbound connections bypass the proxy.
    #[arg(long, default_value = "")]
    exclude_inbound_cidrs: String,
    /// Comma-separated destination ports whose outbound connections bypass the proxy.
    #[arg(long, default_value = "")]
    exclude_outbound_ports: String,
    /// Comma-separated destination CIDRs whose outbound connections bypass the proxy.
    #[arg(long, default_value = "")]
    exclude_outbound_cidrs: String,
    /// Remove every rule and chain `init` installed, then exit.
    #[arg(long)]
    cleanup: bool,
    /// Print the rules without touching iptables.
    #[arg(long)]
    dry_run: bool,
    /// Leave IPv6 alone (by default ip6tables is programmed when the host has it).
    #[arg(long)]
    no_ipv6: bool,
}

/// A comma-separated flag value, or an error naming the flag and the bad item.
fn list<T: std::str::FromStr>(flag: &str, text: &str) -> anyhow::Result<Vec<T>> {
    capture::parse_list(text).map_err(|reason| anyhow::anyhow!("{flag}: {reason}"))
}

fn main() -> ExitCode {
    tessera_mesh::tls::install_crypto_provider();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let done = match cli.command {
        Command::Run { config, workers } => runtime(workers)
            .context("cannot start the async runtime")
            .and_then(|runtime| runtime.block_on(run(config))),
        Command::Init(args) => init(args),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", process::error_report(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// One worker runs everything on the main thread: no work stealing, no cross-thread
/// wake-ups (futex calls, context switches) per I/O event, uncontended locks.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

async fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match config_path {
        Some(path) => ProxyConfig::load(&path)?,
        None => {
            let text = std::env::var(CONFIG_ENV).with_context(|| {
                format!("no configuration: pass --config FILE or set {CONFIG_ENV} to the YAML")
            })?;
            ProxyConfig::parse(&text, std::path::Path::new(CONFIG_ENV))?
        }
    };
    let proxy = tessera_proxy::start(config).await?;
    tessera_mesh::process::shutdown_signal()
        .await
        .context("cannot watch for signals")?;
    proxy.shutdown().await;
    tracing::info!(event = "proxy stopped");
    Ok(())
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let config = CaptureConfig {
        proxy_uid: args.proxy_uid,
        proxy_gid: args.proxy_gid,
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        exclude_inbound_ports: list("--exclude-inbound-ports", &args.exclude_inbound_ports)?,
        exclude_inbound_cidrs: list("--exclude-inbound-cidrs", &args.exclude_inbound_cidrs)?,
        exclude_outbound_ports: list("--exclude-outbound-ports", &args.exclude_outbound_ports)?,
        exclude_outbound_cidrs: list("--exclude-outbound-cidrs", &args.exclude_outbound_cidrs)?,
    };
    let mut families = vec![Family::V4];
    if !args.no_ipv6 && (args.dry_run || capture::available(Family::V6)) {
        families.push(Family::V6);
    }
    for family in families {
        let label = match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        if args.dry_run {
            println!("# {label} (dry run)\n{}", capture::rules(&config, family));
        } else if args.cleanup {
            capture::remove(family).with_context(|| format!("{label}: cleanup"))?;
            println!("# {label}: Tessera rules removed");
        } else {
            let batch =
                capture::install(&config, family).with_context(|| format!("{label}: install"))?;
            println!("# {label}: installed\n{batch}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_flag_has_help_and_every_command_examples() {
        let mut cli = Cli::command();
        cli.build();
        for command in cli.get_subcommands().filter(|c| c.get_name() != "help") {
            let name = command.get_name();
            let after_help = command.get_after_help().map(ToString::to_string);
            assert!(
                after_help.is_some_and(|text| text.contains("Examples:")),
                "{name}: no examples"
            );
            let flags = command.get_arguments();
            for arg in flags.filter(|a| !matches!(a.get_id().as_str(), "help" | "version")) {
                assert!(
                    arg.get_help().is_some(),
                    "{name} --{}: no help",
                    arg.get_id()
                );
            }
        }
    }

    /// `--log-format` is one flag: accepted before or after the command (as the
    /// manifests pass it), and each command's help lists it once, under its own heading.
    #[test]
    fn log_format_is_one_global_flag() {
        for args in [
            vec![
                "tessera-proxy",
                "--log-format",
                "json",
                "run",
                "--config",
                "p.yaml",
            ],
            vec![
                "tessera-proxy",
                "run",
                "--log-format=json",
                "--config",
                "p.yaml",
            ],
        ] {
            let cli = Cli::try_parse_from(&args).unwrap();
            assert_eq!(cli.log_format, LogFormat::Json, "{args:?}");
        }
        let mut cli = Cli::command();
        cli.build();
        for command in cli.get_subcommands_mut().filter(|c| c.get_name() != "help") {
            let help = command.render_long_help().to_string();
            let name = command.get_name().to_string();
            assert_eq!(help.matches("--log-format").count(), 1, "{name}: {help}");
            assert!(help.contains("Global options:"), "{name}: {help}");
        }
    }
}
