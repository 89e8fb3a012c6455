//! `tessera`: the control plane server and the operator's command line.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
#[cfg(feature = "demo")]
use tessera_control_plane::demo;
use tessera_control_plane::{app, ca, check, cli, inject, install, kubernetes};
use tessera_mesh::process::{
    self,
    logging::{self, LogFormat},
};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera service mesh: control plane and CLI"
)]
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
    /// Run the control plane: CA and identity API, discovery API (15012), admin (15014),
    /// sidecar injection webhook (15017).
    #[command(after_help = "Examples:
  tessera control-plane --config deploy/local/mesh
  tessera control-plane --config /etc/tessera/config --kubernetes   # in a cluster")]
    ControlPlane {
        /// Directory of tessera.dev/v1alpha1 resources (YAML).
        #[arg(long)]
        config: PathBuf,
        /// Where the CA and token keys live [default: <config>/.tessera-state].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The identity and discovery APIs (gRPC over mTLS) that proxies call.
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// Admin HTTP: /metrics, /ready, /live.
        #[arg(long, default_value = "0.0.0.0:15014")]
        admin: SocketAddr,
        /// The admission webhook (HTTPS, POST /inject).
        #[arg(long, default_value = "0.0.0.0:15017")]
        webhook: SocketAddr,
        /// Image the webhook injects.
        #[arg(long, default_value_t = inject::default_proxy_image())]
        proxy_image: String,
        /// Where injected proxies reach this control plane.
        #[arg(long, default_value = inject::DEFAULT_CONTROL_PLANE_ADDRESS, value_parser = cli::parse_host_port)]
        control_plane_address: String,
        /// Cluster mode: verify pods' service-account tokens with the Kubernetes API
        /// (in-cluster configuration unless --kubeconfig).
        #[arg(long)]
        kubernetes: bool,
        /// The Kubernetes API from a kubeconfig file instead of the pod's own.
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// How long a replica that stops renewing the Lease keeps the right to write to
        /// the API (another takes over after it).
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, requires = "kubernetes")]
        lease_duration: Duration,
    },
    /// Join tokens for workloads outside Kubernetes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Is the mesh installed and healthy on this cluster (`--pre`: can it be installed)?
    /// One line per check (✔ passed, ‼ warning, × failed, with a hint); exits 1 when a
    /// check failed. `check migration` and `check config` check other things.
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = "Examples:
  tessera check --pre
  tessera check
  tessera check -o json | jq '.checks[] | select(.status != \"ok\")'
  tessera check config deploy/local/mesh"
    )]
    Check {
        #[command(subcommand)]
        command: Option<CheckCommand>,
        /// Before installing: may the mesh be installed here?
        #[arg(long)]
        pre: bool,
        /// Output: table or json.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
        /// The cluster's kubeconfig [default: KUBECONFIG, ~/.kube/config, in-cluster].
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Print the manifests that install the mesh on a cluster (CRDs, the control plane,
    /// RBAC, the webhook), for `kubectl apply --server-side -f -`. The same objects as
    /// the Helm chart deploy/helm/tessera with the matching values.
    #[command(after_help = "Examples:
  tessera install | kubectl apply --server-side -f -
  tessera install --ca-secret tessera-ca --trust-domain corp.example | kubectl apply --server-side -f -
  tessera install --registry registry.example.com/mesh --replicas 3 > tessera.yaml")]
    Install {
        /// Images are REGISTRY/tessera and REGISTRY/tessera-proxy (chart: images.registry).
        #[arg(long, default_value = "ghcr.io/tessera-mesh")]
        registry: String,
        /// Image tag [default: this binary's version] (chart: images.tag).
        #[arg(long)]
        tag: Option<String>,
        /// The SPIFFE trust domain, fixed for the life of the mesh (chart: mesh.trustDomain).
        #[arg(long, default_value = tessera_mesh::spiffe::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Lifetime of workload certificates, 5s..90d (chart: mesh.certificateTtl).
        #[arg(long, default_value = "24h")]
        certificate_ttl: String,
        /// Sign with the plug-in intermediate in this Secret of tessera-system (`tessera ca
        /// create` files or a cert-manager Certificate) instead of a development root
        /// (chart: ca.source=secret, ca.secretName).
        #[arg(long)]
        ca_secret: Option<String>,
        /// Control-plane replicas; 2 or more get a PodDisruptionBudget (chart:
        /// controlPlane.replicas).
        #[arg(long, default_value_t = 2)]
        replicas: u16,
        /// What the API server does with a meshed pod when no replica answers: Fail
        /// refuses it, Ignore creates it without a sidecar (chart: webhook.failurePolicy).
        #[arg(long, value_enum, default_value_t = install::FailurePolicy::Fail)]
        webhook_failure_policy: install::FailurePolicy,
        /// How long the API server waits for the webhook, 1-30 s (chart: webhook.timeoutSeconds).
        #[arg(long, default_value_t = 10)]
        webhook_timeout: u8,
        /// Leave out the control plane's NetworkPolicy (chart: networkPolicy.enabled=false).
        #[arg(long)]
        no_network_policy: bool,
    },
    /// Success rate, requests per second and latency percentiles per workload, read from
    /// proxies' admin endpoints.
    #[command(after_help = "Examples:
  tessera stat --proxy localhost:15020 --proxy localhost:15021
  tessera stat --proxy 10.0.3.7:15020 --window 30s -o json
  tessera stat --control-plane-admin localhost:15014   # every proxy connected to it")]
    Stat {
        /// Admin address of a proxy, HOST:PORT (repeat for each).
        #[arg(long = "proxy", required_unless_present = "control_plane_admin", value_parser = cli::parse_host_port)]
        proxies: Vec<String>,
        /// The control plane's admin address, HOST:PORT: read every proxy connected to
        /// it (its /proxies), instead of naming each with --proxy.
        #[arg(long, conflicts_with = "proxies", value_parser = cli::parse_host_port)]
        control_plane_admin: Option<String>,
        /// Measure over this window (0s: totals since the proxies started).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        window: Duration,
        /// Output: table or json.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
    },
    /// Questions about policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Add the Tessera sidecar to Kubernetes workloads in YAML (printed to stdout).
    #[command(after_help = "Examples:
  tessera inject -f deploy.yaml > meshed.yaml
  kubectl get deploy web -o yaml | tessera inject | kubectl apply -f -")]
    Inject {
        /// YAML file, possibly multi-document; `-` or none for stdin (repeatable).
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Image of the proxy and of its init container.
        #[arg(long, default_value_t = inject::default_proxy_image())]
        proxy_image: String,
        /// Where injected proxies reach the control plane.
        #[arg(long, default_value = inject::DEFAULT_CONTROL_PLANE_ADDRESS, value_parser = cli::parse_host_port)]
        control_plane_address: String,
        /// The mesh's trust domain (the control plane's MeshConfig `trustDomain`).
        #[arg(long, default_value = tessera_mesh::spiffe::DEFAULT_TRUST_DOMAIN, value_parser = cli::parse_trust_domain)]
        trust_domain: String,
    },
    /// Print the tessera.dev CustomResourceDefinitions (YAML), for `kubectl apply -f -`.
    Crds,
    /// The mesh's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run a small mesh on loopback and show what it does.
    #[cfg(feature = "demo")]
    #[command(after_help = "Examples:
  tessera demo
  tessera demo --duration 2m   # time to try `tessera stat` on its proxies
  PATH=$PWD/tests/telemetry/bin:$PATH tessera demo   # traces in a Jaeger it starts
  tessera demo --jaeger localhost:16686              # traces in your Jaeger")]
    Demo {
        /// How long to drive traffic.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// A running Jaeger's query/UI address (HOST:16686) to send the traces to.
        /// Without it, a `jaeger` on PATH is started for the demo's length.
        #[arg(long, value_name = "HOST:PORT")]
        jaeger: Option<String>,
        /// That Jaeger's OTLP/gRPC receiver, when not port 4317 of the same host.
        #[arg(long, value_name = "HOST:PORT", requires = "jaeger")]
        jaeger_otlp: Option<String>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a root and an intermediate for the control plane's plug-in CA: the
    /// intermediate as the four files of `pluginCertsDir`, the root in its own directory
    /// (keep it offline). Prints both certificates' SHA-256 fingerprints and expiry. Run
    /// again with the same --root-dir and --force to renew the intermediate.
    #[command(after_help = "Examples:
  tessera ca create --out cacerts --root-dir tessera-root
  tessera ca create --out cacerts --root-dir tessera-root --force   # renew the intermediate
  tessera ca create --trust-domain prod.example --root-validity 20y --intermediate-validity 90d")]
    Create {
        /// The plug-in CA directory to write: ca-cert.pem, ca-key.pem (mode 0600),
        /// cert-chain.pem, root-cert.pem.
        #[arg(long, default_value = "cacerts")]
        out: PathBuf,
        /// Where the root is kept (root-cert.pem, root-key.pem mode 0600): an existing
        /// root there signs the new intermediate; otherwise a new root is created there.
        #[arg(long, default_value = "tessera-root")]
        root_dir: PathBuf,
        /// The mesh's trust domain (the MeshConfig's `trustDomain`), named in the
        /// certificates' subjects.
        #[arg(long, default_value = tessera_mesh::spiffe::DEFAULT_TRUST_DOMAIN, value_parser = cli::parse_trust_domain)]
        trust_domain: String,
        /// How long a new root is valid, e.g. 10y.
        #[arg(long, default_value = "10y", value_parser = humantime::parse_duration)]
        root_validity: Duration,
        /// How long the intermediate is valid, e.g. 1y or 90d (within the root's).
        #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
        intermediate_validity: Duration,
        /// Replace the intermediate already in --out (renewal); the root is never
        /// replaced.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum CheckCommand {
    /// Who still sends plaintext to each port, and would STRICT break them? Exits 1
    /// when a port would break, so it can gate a rollout.
    #[command(after_help = "Examples:
  tessera check migration --proxy localhost:15020
  tessera check migration --proxy web-1:15020 --proxy web-2:15020 && echo safe to go STRICT")]
    Migration {
        /// Admin address of a proxy, HOST:PORT (repeat for each).
        #[arg(long = "proxy", required = true, value_parser = cli::parse_host_port)]
        proxies: Vec<String>,
    },
    /// Checks a configuration directory offline, as the control plane would, and lists
    /// every problem. Exits 1 when there is one.
    #[command(after_help = "Examples:
  tessera check config deploy/local/mesh
  tessera check config ./mesh && cp ./mesh/*.yaml /etc/tessera/config/")]
    Config {
        /// The configuration directory (tessera.dev/v1alpha1 YAML files).
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// The decision for one request, and the rule that made it.
    #[command(after_help = "Examples:
  tessera policy explain --config deploy/local/mesh --from spiffe://cluster.local/ns/shop/sa/frontend \\
      --to orders.shop --port 8080 --method POST --path /orders
  tessera policy explain --config deploy/local/mesh --from unauthenticated --to cache.shop --port 6379

Exit status: 0 allowed; 3 denied (by policy, by the mTLS handshake, or a port the service does not
route); 2 a request the proxy refuses before policy.")]
    Explain {
        /// The control plane's configuration directory.
        #[arg(long)]
        config: PathBuf,
        /// The caller's SPIFFE ID, or "unauthenticated" for plaintext.
        #[arg(long)]
        from: String,
        /// The service called, name.namespace.
        #[arg(long)]
        to: String,
        /// The port called: one the service declares (or a workload's port for one). Policies
        /// match the workload's application port: its targetPort for it, else this one.
        #[arg(long)]
        port: u16,
        /// HTTP method; leave out for opaque TCP.
        #[arg(long)]
        method: Option<String>,
        /// The request path (HTTP).
        #[arg(long, default_value = "/")]
        path: String,
        /// The request's Host (authority), for rules on `hosts`.
        #[arg(long)]
        host: Option<String>,
        /// A request header, name=value (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// iss/sub of a validated JWT.
        #[arg(long)]
        request_principal: Option<String>,
        /// A label of the called workload, key=value (repeatable), for policies whose
        /// selector has `matchLabels`.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a join token for one namespace and service account. It is single-use: the
    /// first certificate issued with it consumes it.
    #[command(after_help = "Examples:
  tessera token create --config deploy/local/mesh --namespace shop --service-account orders
  tessera token create --config deploy/local/mesh --namespace shop --service-account batch \\
      --ttl 24h --reusable")]
    Create {
        /// Namespace of the identity the token is for.
        #[arg(long)]
        namespace: String,
        /// Service account of the identity the token is for.
        #[arg(long)]
        service_account: String,
        /// How long the token can be used (at most 30 days), e.g. 10m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Usable for any number of workloads until it expires (a fleet or autoscaling
        /// group booting from one token), instead of once.
        #[arg(long)]
        reusable: bool,
        /// The control plane's configuration directory.
        #[arg(long)]
        config: PathBuf,
        /// The control plane's state directory [default: <config>/.tessera-state].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tessera_mesh::tls::install_crypto_provider();
    let cli = Cli::parse();
    run(cli).unwrap_or_else(|error| {
        eprintln!("error: {}", process::error_report(error.as_ref()));
        ExitCode::FAILURE
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The servers log to stdout. The demo prints its own story; only errors should
    // interrupt it. Every other command's stdout is its output (YAML, a report, JSON):
    // its logs go to stderr, and the Kubernetes client's own (a refused request is
    // already in the report) are left out unless RUST_LOG asks.
    match cli.command {
        Command::ControlPlane { .. } => logging::init_with_default(cli.log_format, "info"),
        #[cfg(feature = "demo")]
        Command::Demo { .. } => logging::init_with_default(cli.log_format, "error"),
        _ => logging::init_for_command(cli.log_format, "warn,kube_client=off"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::ControlPlane {
            config,
            state_dir,
            listen,
            admin,
            webhook,
            proxy_image,
            control_plane_address,
            kubernetes,
            kubeconfig,
            lease_duration,
        } => runtime.block_on(async {
            let state_dir = state_dir.unwrap_or_else(|| app::Options::default_state_dir(&config));
            let _control_plane = app::start(app::Options {
                config_dir: config,
                state_dir,
                grpc_listen: listen,
                admin_listen: admin,
                webhook_listen: webhook,
                inject: inject::Options {
                    proxy_image,
                    control_plane_address,
                    // The trust domain is the MeshConfig's, set by `app::start`.
                    ..inject::Options::default()
                },
                cluster: kubernetes.then_some(kubernetes::ClusterMode {
                    kubeconfig,
                    lease_duration,
                }),
            })
            .await?;
            tessera_mesh::process::shutdown_signal()
                .await
                .context("cannot watch for signals")?;
            tracing::info!(event = "control plane stopping");
            Ok(ExitCode::SUCCESS)
        }),
        Command::Token {
            command:
                TokenCommand::Create {
                    namespace,
                    service_account,
                    ttl,
                    reusable,
                    config,
                    state_dir,
                },
        } => {
            let state_dir = state_dir.unwrap_or_else(|| app::Options::default_state_dir(&config));
            let usage = if reusable {
                tessera_control_plane::token::TokenUse::Reusable
            } else {
                tessera_control_plane::token::TokenUse::SingleUse
            };
            let token = app::create_token(
                &config,
                &state_dir,
                &namespace,
                &service_account,
                ttl,
                usage,
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            duration,
            jaeger,
            jaeger_otlp,
        } => {
            let traces = demo::TraceOptions {
                query: jaeger,
                otlp: jaeger_otlp,
            };
            runtime.block_on(demo::run(duration, traces))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crds => {
            print!("{}", kubernetes::crds::render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command:
                CaCommand::Create {
                    out,
                    root_dir,
                    trust_domain,
                    root_validity,
                    intermediate_validity,
                    force,
                },
        } => {
            let created = ca::create::create(&ca::create::CreateOptions {
                out_dir: out,
                root_dir,
                trust_domain,
                root_validity,
                intermediate_validity,
                force,
            })?;
            print!("{created}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Inject {
            mut files,
            proxy_image,
            control_plane_address,
            trust_domain,
        } => {
            if files.is_empty() {
                files.push(PathBuf::from("-"));
            }
            let options = inject::Options {
                proxy_image,
                control_plane_address,
                trust_domain,
            };
            let (yaml, report) = cli::inject(&files, &options)?;
            for line in report {
                eprintln!("{line}");
            }
            std::io::Write::write_all(&mut std::io::stdout().lock(), yaml.as_bytes())
                .context("cannot write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stat {
            proxies,
            control_plane_admin,
            window,
            output,
        } => {
            let (proxies, rollout) = match control_plane_admin {
                Some(admin) => {
                    let connected = runtime.block_on(cli::connected_proxies(&admin))?;
                    for line in connected.unknown {
                        eprintln!("skipped {line}");
                    }
                    (connected.admins, Some(connected.rollout))
                }
                None => (proxies, None),
            };
            let stats = runtime.block_on(cli::stat(&proxies, window))?;
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&stats)?),
                "table" => {
                    print!("{}", cli::stat_table(&stats));
                    if let Some(rollout) = rollout {
                        print!("\n{}", rollout.summary());
                    }
                }
                other => anyhow::bail!("unknown output {other:?}: use table or json"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            command: None,
            pre,
            output,
            kubeconfig,
        } => runtime.block_on(async {
            let client = kubernetes::client(kubeconfig.as_deref()).await?;
            let checks = if pre {
                check::pre::run(&client).await
            } else {
                check::installed::run(&client).await
            };
            let report = check::Report::new(checks);
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&report)?),
                "table" => print!("{}", report.table()),
                other => anyhow::bail!("unknown output {other:?}: use table or json"),
            }
            Ok(if report.success {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }),
        Command::Install {
            registry,
            tag,
            trust_domain,
            certificate_ttl,
            ca_secret,
            replicas,
            webhook_failure_policy,
            webhook_timeout,
            no_network_policy,
        } => {
            let choices = install::Choices {
                registry,
                tag: tag.unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
                trust_domain,
                certificate_ttl,
                ca: ca_secret.map_or(install::CaSource::Development, install::CaSource::Secret),
                replicas,
                failure_policy: webhook_failure_policy,
                webhook_timeout_seconds: webhook_timeout,
                network_policy: !no_network_policy,
            };
            print!("{}", install::render(&choices)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            command: Some(CheckCommand::Migration { proxies }),
            ..
        } => {
            let check = runtime.block_on(cli::check_migration(&proxies))?;
            print!("{}", check.report);
            Ok(if check.breaking == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Check {
            command: Some(CheckCommand::Config { dir }),
            ..
        } => {
            let (report, good) = cli::check_config(&dir);
            print!("{report}");
            Ok(if good {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    config,
                    from,
                    to,
                    port,
                    method,
                    path,
                    host,
                    headers,
                    request_principal,
                    labels,
                },
        } => {
            let from = match from.as_str() {
                "unauthenticated" | "plaintext" => None,
                id => Some(id.parse().context("--from")?),
            };
            let headers = pairs(&headers, "--header must be name=value")?;
            let labels = pairs(&labels, "--label must be key=value")?
                .into_iter()
                .collect();
            let explained = cli::explain(
                &config,
                &cli::Hypothetical {
                    from,
                    to: &to,
                    port,
                    method: method.as_deref(),
                    path: &path,
                    host: host.as_deref(),
                    headers: &headers,
                    request_principal: request_principal.as_deref(),
                    labels: &labels,
                },
            );
            // A path the proxy refuses is the caller's mistake, like a bad argument: 2.
            if let Err(error) = &explained
                && let Some(refused) = error.downcast_ref::<cli::RefusedPath>()
            {
                eprintln!("error: {refused}");
                return Ok(ExitCode::from(2));
            }
            let (report, allowed) = explained?;
            print!("{report}");
            // Scripts can test the outcome: 0 allowed, 3 denied, 2 refused before policy.
            Ok(if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
    }
}

/// `key=value` arguments as pairs; `expected` says what each must look like.
fn pairs(arguments: &[String], expected: &'static str) -> anyhow::Result<Vec<(String, String)>> {
    arguments
        .iter()
        .map(|argument| {
            argument
                .split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .context(expected)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every flag says what it is for, and every command that takes flags shows examples.
    #[test]
    fn every_flag_has_help_and_every_command_examples() {
        fn check(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let builtin = |arg: &clap::Arg| matches!(arg.get_id().as_str(), "help" | "version");
            for arg in command.get_arguments().filter(|a| !builtin(a)) {
                if arg.get_help().is_none() {
                    missing.push(format!("{path} --{}: no help", arg.get_id()));
                }
            }
            let subcommands: Vec<_> = command.get_subcommands().collect();
            let takes_flags = command
                .get_arguments()
                .any(|a| !builtin(a) && !a.is_global_set());
            if subcommands.is_empty()
                && takes_flags
                && !command
                    .get_after_help()
                    .is_some_and(|text| text.to_string().contains("Examples:"))
            {
                missing.push(format!("{path}: no examples"));
            }
            for subcommand in subcommands {
                let path = format!("{path} {}", subcommand.get_name());
                check(subcommand, &path, missing);
            }
        }
        let mut missing = Vec::new();
        let mut command = Cli::command();
        command.build();
        check(&command, "tessera", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }

    /// `--log-format` is one flag: accepted before or after the command (as the
    /// manifests pass it), and each command's help lists it once, under its own heading.
    #[test]
    fn log_format_is_one_global_flag() {
        for args in [
            vec!["tessera", "--log-format", "json", "crds"],
            vec!["tessera", "crds", "--log-format=json"],
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
