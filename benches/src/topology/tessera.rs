//! The Tessera pair: a control plane whose configuration directory declares one Service
//! per workload (with its port's protocol, so neither proxy sniffs), a server-side proxy
//! with one inbound listener per server, and a client-side proxy with one outbound
//! listener per service (`service: name.namespace`, resolved through discovery).

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};
use crate::process::{Process, ScratchDir, workspace_binary};
use crate::topology::{Entry, Path, PathKind, ProxyProcess, free_port, local};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "bench";
pub const SERVER_ACCOUNT: &str = "bench-server";
pub const CLIENT_ACCOUNT: &str = "bench-client";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One service of the benchmark mesh.
struct BenchService {
    name: &'static str,
    protocol: &'static str,
    /// The server it ends at.
    app: SocketAddr,
    /// The server-side proxy's inbound port for it (the Workload's address).
    inbound_port: u16,
    /// The client-side proxy's outbound port for it.
    outbound_port: u16,
}

pub struct TesseraPair {
    pub control_plane: ControlPlane,
    pub client: Process,
    pub server: Process,
    pub entry: Entry,
    _dir: ScratchDir,
}

/// A running `tessera control-plane`.
pub struct ControlPlane {
    pub process: Process,
    pub address: SocketAddr,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Arguments added to `tessera control-plane`'s (cluster mode's), kept for a restart.
    extra_args: Vec<OsString>,
}

impl ControlPlane {
    /// Starts `tessera control-plane` on the resources already in `dir/config` (plus
    /// the bench's MeshConfig), with its state in `dir/state`; waits up to
    /// `ready_timeout` for it to serve.
    pub async fn start(dir: &ScratchDir, ready_timeout: Duration) -> Result<Self> {
        Self::start_at(dir, local(0).ip(), ready_timeout, Vec::new()).await
    }

    /// [`ControlPlane::start`] with its discovery port on `ip`: proxies in network
    /// namespaces reach it on their bridge's address.
    pub async fn start_on(dir: &ScratchDir, ip: IpAddr, ready_timeout: Duration) -> Result<Self> {
        Self::start_at(dir, ip, ready_timeout, Vec::new()).await
    }

    /// [`ControlPlane::start`] with more arguments (`--kubernetes --kubeconfig FILE`).
    pub async fn start_with(
        dir: &ScratchDir,
        ready_timeout: Duration,
        extra_args: Vec<OsString>,
    ) -> Result<Self> {
        Self::start_at(dir, local(0).ip(), ready_timeout, extra_args).await
    }

    async fn start_at(
        dir: &ScratchDir,
        ip: IpAddr,
        ready_timeout: Duration,
        extra_args: Vec<OsString>,
    ) -> Result<Self> {
        dir.write(
            "config/mesh.yaml",
            format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: {TRUST_DOMAIN}\n  certificateTtl: 2h\n"
            ),
        )?;
        let config_dir = dir.path().join("config");
        let state_dir = dir.path().join("state");
        let address = SocketAddr::new(ip, free_port());
        let process =
            spawn_control_plane(&config_dir, &state_dir, address, &extra_args, ready_timeout)
                .await?;
        Ok(Self {
            process,
            address,
            config_dir,
            state_dir,
            extra_args,
        })
    }

    /// Kills the process (as a crash would) and starts it again on the same address,
    /// configuration and state (the same CA); returns once it serves again.
    pub async fn restart(&mut self, ready_timeout: Duration) -> Result<()> {
        self.kill();
        self.process = spawn_control_plane(
            &self.config_dir,
            &self.state_dir,
            self.address,
            &self.extra_args,
            ready_timeout,
        )
        .await?;
        Ok(())
    }

    /// Kills the process and waits for it to be gone: its connections are reset.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// `tessera token create` for a service account of the bench namespace: single-use,
    /// one per proxy.
    pub fn token(&self, service_account: &str) -> Result<String> {
        self.create_token(service_account, &[])
    }

    /// A `--reusable` token, for the Certify benchmark that presents one token per call.
    pub fn reusable_token(&self, service_account: &str) -> Result<String> {
        self.create_token(service_account, &["--reusable"])
    }

    fn create_token(&self, service_account: &str, flags: &[&str]) -> Result<String> {
        let output = Command::new(workspace_binary("tessera")?)
            .args(["token", "create", "--namespace", NAMESPACE])
            .args(["--service-account", service_account, "--ttl", "2h"])
            .args(flags)
            .arg("--config")
            .arg(&self.config_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .map_err(BenchError::io("run tessera token create"))?;
        if !output.status.success() {
            return Err(BenchError::failed(
                "tessera token create",
                String::from_utf8_lossy(&output.stderr),
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    pub fn trust_bundle_file(&self) -> PathBuf {
        self.state_dir.join("root-cert.pem")
    }

    /// Replaces a resource file the way an operator's editor would: write, then rename.
    pub fn write_config(&self, name: &str, yaml: &str) -> Result<()> {
        let path = self.config_dir.join(name);
        let temporary = self.config_dir.join(format!(".{name}.tmp"));
        std::fs::write(&temporary, yaml)
            .map_err(BenchError::io(format!("write {}", temporary.display())))?;
        std::fs::rename(&temporary, &path)
            .map_err(BenchError::io(format!("rename to {}", path.display())))
    }
}

impl TesseraPair {
    pub async fn start(servers: Entry) -> Result<Self> {
        let dir = ScratchDir::new("tessera")?;
        let services = [
            ("bench-http", "http", servers.http1),
            ("bench-grpc", "http2", servers.grpc),
            ("bench-tcp", "opaque", servers.tcp),
        ]
        .map(|(name, protocol, app)| BenchService {
            name,
            protocol,
            app,
            inbound_port: free_port(),
            outbound_port: free_port(),
        });
        let control_plane = start_control_plane(&dir, &services).await?;
        let server = start_proxy(
            &dir,
            &control_plane,
            SERVER_ACCOUNT,
            &server_listeners(&services),
        )?;
        let client = start_proxy(
            &dir,
            &control_plane,
            CLIENT_ACCOUNT,
            &client_listeners(&services),
        )?;
        let (mut server, mut client) = (server, client);
        wait_ready(&mut server).await?;
        wait_ready(&mut client).await?;
        let [http, grpc, tcp] = &services;
        Ok(Self {
            control_plane,
            entry: Entry {
                http1: local(http.outbound_port),
                grpc: local(grpc.outbound_port),
                tcp: local(tcp.outbound_port),
            },
            client: client.process,
            server: server.process,
            _dir: dir,
        })
    }

    pub fn path(&self) -> Path {
        Path {
            kind: PathKind::Tessera,
            entry: self.entry,
            proxies: vec![
                ProxyProcess {
                    side: "client-side",
                    pid: self.client.pid(),
                },
                ProxyProcess {
                    side: "server-side",
                    pid: self.server.pid(),
                },
            ],
        }
    }
}

async fn start_control_plane(dir: &ScratchDir, services: &[BenchService]) -> Result<ControlPlane> {
    dir.write("config/bench.yaml", services_yaml(services))?;
    ControlPlane::start(dir, READY_TIMEOUT).await
}

async fn spawn_control_plane(
    config_dir: &std::path::Path,
    state_dir: &std::path::Path,
    address: SocketAddr,
    extra_args: &[OsString],
    ready_timeout: Duration,
) -> Result<Process> {
    let mut process = Process::spawn(
        "control-plane",
        Command::new(workspace_binary("tessera")?)
            .arg("control-plane")
            .arg("--config")
            .arg(config_dir)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--listen")
            .arg(address.to_string())
            .arg("--admin")
            .arg(local(free_port()).to_string())
            // Port 0: the admission webhook must not need 15017, which another control
            // plane on this machine may hold.
            .args(["--webhook", "127.0.0.1:0"])
            .args(extra_args),
    )?;
    process
        .wait_for_output("control plane started", ready_timeout)
        .await?;
    Ok(process)
}

/// Service + Workload resources: each service's single workload is the server-side
/// proxy's inbound port for it.
fn services_yaml(services: &[BenchService]) -> String {
    services
        .iter()
        .map(|service| {
            let BenchService { name, protocol, inbound_port, .. } = service;
            format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  ports: [{{port: 8080, protocol: {protocol}}}]\n---\napiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}-0, namespace: {NAMESPACE}}}\nspec: {{service: {name}, serviceAccount: {SERVER_ACCOUNT}, address: \"127.0.0.1:{inbound_port}\"}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn server_listeners(services: &[BenchService]) -> String {
    let mut yaml = String::from("inbound:\n");
    for service in services {
        yaml.push_str(&format!(
            "  - listen: {}\n    forwardTo: {}\n",
            local(service.inbound_port),
            service.app
        ));
    }
    yaml
}

fn client_listeners(services: &[BenchService]) -> String {
    let mut yaml = String::from("outbound:\n");
    for service in services {
        yaml.push_str(&format!(
            "  - listen: {}\n    service: {}.{NAMESPACE}\n",
            local(service.outbound_port),
            service.name
        ));
    }
    yaml
}

/// A started proxy and its admin address.
pub struct StartedProxy {
    pub process: Process,
    pub admin: SocketAddr,
}

/// Starts a proxy of the bench namespace as `service_account`, with `listeners` (the
/// `inbound:`/`outbound:` YAML of its configuration), joining with a fresh token.
pub fn start_proxy(
    dir: &ScratchDir,
    control_plane: &ControlPlane,
    service_account: &str,
    listeners: &str,
) -> Result<StartedProxy> {
    let token_file = dir.write(
        &format!("{service_account}.token"),
        control_plane.token(service_account)?,
    )?;
    let admin = local(free_port());
    let config = format!(
        "identity:\n  trustDomain: {TRUST_DOMAIN}\n  namespace: {NAMESPACE}\n  serviceAccount: {service_account}\n  joinTokenFile: {}\ncontrolPlane:\n  address: {}\n  trustBundleFile: {}\nadmin: {admin}\n{listeners}",
        token_file.display(),
        control_plane.address,
        control_plane.trust_bundle_file().display(),
    );
    let config_file = dir.write(&format!("{service_account}.yaml"), config)?;
    let process = Process::spawn(
        service_account,
        Command::new(proxy_binary()?)
            .args(["run", "--config"])
            .arg(config_file)
            .env_remove("TESSERA_JOIN_TOKEN")
            .env_remove("RUST_LOG"),
    )?;
    Ok(StartedProxy { process, admin })
}

/// Waits until `/ready` answers 200: certificate and configuration in hand.
pub async fn wait_ready(proxy: &mut StartedProxy) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok((200, _)) = tessera_tests::http_get(proxy.admin, "/ready").await {
            return Ok(());
        }
        proxy.process.ensure_running()?;
        if Instant::now() > deadline {
            return Err(proxy.process.not_ready(READY_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The build of the proxy `all` measures when `TESSERA_BENCH_PROXY` does not name one:
/// the shipped build it made.
static PROXY_UNDER_TEST: OnceLock<PathBuf> = OnceLock::new();

/// Measures this build of the proxy from now on (unless `TESSERA_BENCH_PROXY` is set).
pub fn set_proxy_binary(path: PathBuf) {
    let _ = PROXY_UNDER_TEST.set(path);
}

/// The proxy under test: `TESSERA_BENCH_PROXY` when set, else the one set by
/// [`set_proxy_binary`], else this profile's build.
pub fn proxy_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("TESSERA_BENCH_PROXY") {
        return Ok(path.into());
    }
    match PROXY_UNDER_TEST.get() {
        Some(path) => Ok(path.clone()),
        None => workspace_binary("tessera-proxy"),
    }
}
