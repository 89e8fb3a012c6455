//! `tessera-benches`: the side-by-side benchmark harness.
//!
//! `all` builds the release binaries and the proxy as shipped, starts every path and
//! measures them (~5 min, and the shipped proxy's build the first time);
//! `smoke` runs every path briefly and fails when one does not serve (CI). The table is
//! printed and the JSON written to `--json` (default:
//! `<target dir>/bench-results/<date>-<commit>-<command>.json`, named as
//! `benches/results/` names what it keeps).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tessera_benches::process::binary_dir;
use tessera_benches::scenario::{self, Plan};
use tessera_benches::topology::backends;
use tessera_benches::topology::tessera::set_proxy_binary;

#[derive(Parser)]
#[command(
    name = "tessera-benches",
    about = "Tessera vs direct vs HAProxy, measured in one run"
)]
struct Cli {
    /// Where to write the JSON results.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The full run (release build required): builds the control plane and the proxy as
    /// shipped (scripts/build-proxy.sh) first.
    All {
        /// Use the binaries as they are, without building them.
        #[arg(long)]
        no_build: bool,
        /// Measure the everyday release build of the proxy instead of the shipped one
        /// (quicker to rebuild while optimizing; no profile-guided optimization).
        #[arg(long)]
        release_proxy: bool,
        /// Runs of each load measurement, paths taking turns; the median is reported
        /// (this VM's single runs swing 20-30 %).
        #[arg(long, default_value = "1")]
        repeat: usize,
    },
    /// A short run of every path and workload; exits non-zero when a path fails to
    /// serve. Asserts nothing about timing.
    Smoke,
    /// Start every path and keep it up until Ctrl-C (prints addresses and pids): for
    /// profiling a proxy under load by hand.
    Up,
    /// Connect → echo → close loops against one address (e.g. a pair's TCP entry
    /// printed by `up`), for profiling the handshake path by hand.
    NewConnections {
        address: std::net::SocketAddr,
        #[arg(long, default_value = "10")]
        seconds: u64,
        #[arg(long, default_value = "16")]
        concurrency: usize,
    },
    /// HTTP/1.1 GETs of `path` at a fixed rate against one address (e.g. a pair's
    /// HTTP/1.1 entry printed by `up`), for profiling the fixed-rate path by hand.
    OpenLoop {
        address: std::net::SocketAddr,
        #[arg(long, default_value = "/small")]
        path: String,
        #[arg(long, default_value = "1000")]
        rate: u32,
        #[arg(long, default_value = "10")]
        seconds: u64,
        #[arg(long, default_value = "32")]
        connections: usize,
    },
    /// A Tessera pair with a RateLimitPolicy on its HTTP service, offered a multiple of
    /// the limit by several callers: prints the limit and the offered and admitted
    /// rates, and how far admitted is from what a token bucket admits.
    RateLimit {
        /// Requests a second the policy allows.
        #[arg(long, default_value = "200")]
        limit: u32,
        #[arg(long, default_value = "20")]
        burst: u32,
        /// Offered load as a multiple of the limit.
        #[arg(long, default_value = "5")]
        overload: u32,
        #[arg(long, default_value = "8")]
        callers: u32,
        #[arg(long, default_value = "10")]
        seconds: u64,
    },
    /// A Rego authorization decision, timed in the proxy's evaluator and asked of an OPA
    /// server over loopback REST (tests/opa/build.sh builds it), one after the other.
    Rego {
        #[arg(long, default_value = "20000")]
        samples: usize,
    },
    /// HTTP/1.1 through three Tessera pairs in one run, taking turns: no policy, a Rego
    /// CUSTOM policy in the server-side proxy, and the same decision asked of an OPA
    /// server by an ext_authz-like hop (needs nginx, wrk and tests/opa/bin/opa).
    RegoPaths {
        /// Seconds of each closed-loop and each open-loop run.
        #[arg(long, default_value = "5")]
        seconds: u64,
        /// Open-loop rate, requests a second.
        #[arg(long, default_value = "1000")]
        rate: u32,
        /// Turns of each path; the median is reported.
        #[arg(long, default_value = "3")]
        rounds: usize,
    },
    /// Fleet scale (release build): a control plane serving a large simulated mesh to
    /// many simulated proxies (discovery streams in this process, one mTLS connection
    /// each), next to a small mesh with fewer streams; then one real proxy in both, and
    /// in transparent mode in a network-namespace pod (as root; skipped otherwise).
    /// Needs the release binaries built first.
    Fleet {
        #[arg(long, default_value = "10000")]
        services: usize,
        #[arg(long, default_value = "5")]
        endpoints_per_service: usize,
        #[arg(long, default_value = "10000")]
        streams: usize,
        #[arg(long, default_value = "10")]
        baseline_services: usize,
        #[arg(long, default_value = "1000")]
        baseline_streams: usize,
        /// Services each simulated proxy watches, one of them watched by all.
        #[arg(long, default_value = "10")]
        services_per_stream: usize,
        /// Skip the real proxy.
        #[arg(long, conflicts_with = "proxy_only")]
        no_proxy: bool,
        /// Only the real proxy (in the large mesh), no simulated streams.
        #[arg(long)]
        proxy_only: bool,
        /// The simulated streams against a control plane in cluster mode, the mesh
        /// created in a real kube-apiserver (tests/kube/build.sh builds it); the real
        /// proxy is measured in file mode only, so not here.
        #[arg(long, conflicts_with = "proxy_only")]
        cluster: bool,
    },
    /// Internal: the gRPC and TCP echo servers, run as a child process.
    #[command(hide = true)]
    ServeBackends,
    /// Internal: `fleet`'s application in a transparent pod; prints its samples as JSON.
    #[command(hide = true)]
    FleetClient {
        /// Virtual IP:port the proxy has resolved (one connection each is made first).
        #[arg(long, value_delimiter = ',', required = true)]
        known: Vec<std::net::SocketAddr>,
        /// Virtual IP:port never connected to: the first connection to each is timed.
        #[arg(long, value_delimiter = ',', required = true)]
        new: Vec<std::net::SocketAddr>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    tessera_mesh::tls::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The plan, and the command's name for the results file.
    let (plan, command) = match cli.command {
        Command::ServeBackends => {
            runtime.block_on(backends::serve())?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::FleetClient { known, new } => {
            use tessera_benches::fleet::proxy::transparent;
            let samples = runtime.block_on(transparent::client(&known, &new))?;
            println!(
                "{}",
                serde_json::to_string(&samples).context("serialize the samples")?
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::All {
            no_build,
            release_proxy,
            repeat,
        } => {
            if cfg!(debug_assertions) {
                bail!(
                    "`all` measures release builds: run `cargo run --release -p tessera-benches -- all`"
                );
            }
            if !no_build {
                build_release_binaries()?;
            }
            // TESSERA_BENCH_PROXY, when set, names the build to measure instead.
            if !release_proxy && std::env::var_os("TESSERA_BENCH_PROXY").is_none() {
                set_proxy_binary(shipped_proxy(!no_build)?);
            }
            let plan = Plan {
                repeat,
                ..Plan::all()
            };
            (plan, "all")
        }
        Command::Smoke => (Plan::smoke(), "smoke"),
        Command::NewConnections {
            address,
            seconds,
            concurrency,
        } => {
            let duration = std::time::Duration::from_secs(seconds);
            let result = runtime.block_on(tessera_benches::load::echo::connection_rate(
                address,
                concurrency,
                duration,
            ))?;
            println!(
                "{:.0} connections/s ({} ok, {} errors) [{}]",
                result.per_second(),
                result.completed,
                result.errors,
                result.generator
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::OpenLoop {
            address,
            path,
            rate,
            seconds,
            connections,
        } => {
            use tessera_benches::load::{HttpRequest, open_loop};
            let settings = open_loop::Settings {
                rate_per_second: rate,
                duration: std::time::Duration::from_secs(seconds),
                connections,
                streams_per_connection: 1,
            };
            let target = open_loop::Target::Http(HttpRequest::get(address, &path));
            let result = runtime.block_on(open_loop::run(&target, settings))?;
            println!("{result:#?}");
            return Ok(ExitCode::SUCCESS);
        }
        Command::RateLimit {
            limit,
            burst,
            overload,
            callers,
            seconds,
        } => {
            let settings = tessera_benches::rate_limit::Settings {
                limit,
                burst,
                overload,
                callers,
                duration: std::time::Duration::from_secs(seconds),
            };
            let figures = runtime.block_on(tessera_benches::rate_limit::run(settings))?;
            println!("{}", figures.render());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Up => {
            runtime.block_on(scenario::hold())?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::RegoPaths {
            seconds,
            rate,
            rounds,
        } => {
            let settings = tessera_benches::authz_paths::Settings {
                closed_loop: std::time::Duration::from_secs(seconds),
                open_loop: std::time::Duration::from_secs(seconds),
                rate_per_second: rate,
                rounds,
            };
            let rows = runtime.block_on(tessera_benches::authz_paths::run(settings))?;
            print!("{}", tessera_benches::authz_paths::render(&rows, settings));
            return Ok(ExitCode::SUCCESS);
        }
        Command::Fleet {
            services,
            endpoints_per_service,
            streams,
            baseline_services,
            baseline_streams,
            services_per_stream,
            no_proxy,
            proxy_only,
            cluster,
        } => {
            use tessera_benches::fleet::{self, MeshShape, Source};
            let settings = fleet::Settings {
                source: if cluster {
                    Source::Cluster
                } else {
                    Source::Files
                },
                mesh: MeshShape {
                    services,
                    endpoints_per_service,
                },
                streams,
                baseline_mesh: MeshShape {
                    services: baseline_services,
                    endpoints_per_service,
                },
                baseline_streams,
                services_per_stream,
                streams_run: !proxy_only,
                proxy: !no_proxy && !cluster,
            };
            let (runs, proxy) = runtime.block_on(fleet::run(settings))?;
            print!("{}", fleet::render(&runs, proxy.as_ref()));
            if let Some(path) = cli.json {
                let json = serde_json::json!({ "streams": runs, "proxy": proxy });
                let json = serde_json::to_string_pretty(&json).context("serialize the results")?;
                std::fs::write(&path, json).with_context(|| format!("write {}", path.display()))?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Rego { samples } => {
            let (in_proxy, over_rest) =
                runtime.block_on(tessera_benches::rego::compare(samples))?;
            println!("Rego decision, typical policy ({samples} samples), µs:");
            println!(
                "  in the proxy (regorus, input built):  p50 {:.1}  p99 {:.1}  mean {:.1}",
                in_proxy.p50_us, in_proxy.p99_us, in_proxy.mean_us
            );
            match over_rest {
                Some(rest) => println!(
                    "  OPA server, loopback REST, kept alive: p50 {:.1}  p99 {:.1}  mean {:.1}",
                    rest.p50_us, rest.p99_us, rest.mean_us
                ),
                None => println!("  OPA server: skipped (no tests/opa/bin/opa)"),
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let report = runtime.block_on(scenario::run(plan))?;
    println!("{}", report.render());
    let run_stem =
        tessera_benches::run_name::run_stem(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")));
    let json_path = match cli.json {
        Some(path) => path,
        None => default_json_path(&run_stem, command)?,
    };
    let json = serde_json::to_string_pretty(&report).context("serialize the results")?;
    std::fs::write(&json_path, json).with_context(|| format!("write {}", json_path.display()))?;
    println!("results written to {}", json_path.display());
    if command == "all" {
        println!(
            "to keep this run, save this output as benches/results/{run_stem}-<build>[-median-of-N].txt (benches/results/README.md)"
        );
    }
    let failures = scenario::failures(&report);
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("paths that failed to serve:\n  {}", failures.join("\n  "));
        Ok(ExitCode::FAILURE)
    }
}

/// `cargo build --release --bins` for the two binaries under test, into the target
/// directory this executable runs from (cargo honours `CARGO_TARGET_DIR` either way).
fn build_release_binaries() -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "building release binaries: cargo build --release --bins -p tessera-proxy -p tessera-control-plane"
    );
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bins",
            "-p",
            "tessera-proxy",
            "-p",
            "tessera-control-plane",
        ])
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release --bins failed ({status})");
    }
    Ok(())
}

/// The proxy as shipped, built by `scripts/build-proxy.sh` into the target directory
/// this executable runs from (or only located there, with `build` false).
fn shipped_proxy(build: bool) -> anyhow::Result<PathBuf> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-proxy.sh");
    let profile_dir = binary_dir()?;
    let target_dir = profile_dir.parent().unwrap_or(&profile_dir);
    let mut command = std::process::Command::new(script);
    command.env("CARGO_TARGET_DIR", target_dir);
    if build {
        eprintln!("building the proxy as shipped: scripts/build-proxy.sh");
    } else {
        command.arg("--path");
    }
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("run {script}"))?;
    if !output.status.success() {
        bail!("{script} failed ({})", output.status);
    }
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !path.is_file() {
        bail!(
            "no shipped proxy at {} (build it: scripts/build-proxy.sh)",
            path.display()
        );
    }
    Ok(path)
}

/// `<target dir>/bench-results/<date>-<commit>-<command>.json`, beside the profile
/// directories: each run its own file, named by when it ran and the code it measured.
fn default_json_path(run_stem: &str, command: &str) -> anyhow::Result<PathBuf> {
    let profile_dir = binary_dir()?;
    let target_dir = profile_dir.parent().unwrap_or(&profile_dir);
    let results_dir = target_dir.join("bench-results");
    std::fs::create_dir_all(&results_dir)
        .with_context(|| format!("create {}", results_dir.display()))?;
    Ok(results_dir.join(format!("{run_stem}-{command}.json")))
}
