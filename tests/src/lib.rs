//! Support for Tessera's end-to-end tests: real `tessera` and `tessera-proxy` processes,
//! real sockets, real TLS. Every e2e test builds on these helpers.
//!
//! Processes are killed when their handle drops, and their output is captured line by
//! line so tests can assert on what each side logged.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub mod backend;
pub mod certs;
pub mod grpc;
pub mod hostile;
pub mod jwt;
pub mod kube;
pub mod kubelet;
pub mod l7;
pub mod netns;
pub mod opa;
pub mod otlp;
pub mod podman;
pub mod telemetry;

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "shop";

/// Path of a binary built from this workspace (same profile as the running test).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins)",
        path.display()
    );
    path
}

/// `tests/<dir>/<name>`, a tool the test command builds with `build`; `None`, saying so,
/// when it has not been built. Under CI (`CI=true`) it must have been.
fn built_tool(dir: &str, name: &str, build: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(name);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is missing; build it: {build}",
        path.display()
    );
    eprintln!("SKIPPED: no {name}; build it with {build}");
    None
}

/// A free loopback port, chosen below the kernel's ephemeral range (32768+) so that no
/// outgoing connection can grab it between this call and the process binding it. Ports
/// handed out are remembered so parallel tests in one process never share one.
pub fn free_port() -> u16 {
    static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        let mut taken = TAKEN.lock().expect("port registry");
        if !taken.contains(&port) && StdListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return port;
        }
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A scratch directory removed at drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tessera-e2e-{label}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Captured output lines of a process.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    fn capture(&self, stream: impl std::io::Read + Send + 'static, echo_prefix: String) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if std::env::var_os("TESSERA_TEST_ECHO").is_some() {
                    eprintln!("[{echo_prefix}] {line}");
                }
                lines.lock().expect("log lines").push(line);
            }
        });
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().expect("log lines").clone()
    }

    /// Lines containing every one of `needles`.
    pub fn matching(&self, needles: &[&str]) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .collect()
    }

    /// The panics the process reported, each as the standard hook's `thread '…' (id)
    /// panicked at file:line:column:` line followed by the message's first line.
    pub fn panics(&self) -> Vec<String> {
        let lines = self.lines();
        lines
            .iter()
            .enumerate()
            .filter(|(_, line)| line.starts_with("thread '") && line.contains(" panicked at "))
            .map(|(at, line)| match lines.get(at + 1) {
                Some(message) => format!("{line} {message}"),
                None => line.clone(),
            })
            .collect()
    }

    pub fn count(&self, needles: &[&str]) -> usize {
        self.matching(needles).len()
    }

    /// Waits until a line contains all of `needles`; returns it.
    pub async fn wait_for(&self, needles: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.matching(needles).into_iter().next() {
                return Ok(line);
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line with {needles:?} within {timeout:?}; log:\n{}",
                    self.lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A child process killed at drop.
pub struct Process {
    child: Child,
    pub logs: Logs,
}

impl Process {
    pub fn spawn(label: &str, command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label}: {e}"));
        let logs = Logs::default();
        if let Some(out) = child.stdout.take() {
            logs.capture(out, label.to_string());
        }
        if let Some(err) = child.stderr.take() {
            logs.capture(err, label.to_string());
        }
        Self { child, logs }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, as Kubernetes does when stopping a pod.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Peak resident memory (VmHWM) in bytes, from /proc.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `tessera control-plane` process with its own config and state directories.
pub struct ControlPlane {
    /// Appended to the YAML of every proxy this control plane starts.
    pub proxy_extra_yaml: String,
    /// Lines added under `limits:` in every proxy's configuration (`  name: value\n`).
    pub proxy_limits: String,
    pub dir: TempDir,
    pub grpc_port: u16,
    pub admin_port: u16,
    /// Where the gRPC port listens: loopback, or a bridge address that network-namespace
    /// pods can reach.
    pub listen_ip: std::net::IpAddr,
    /// Flags added to `tessera control-plane` (kept across restarts).
    extra_args: Vec<std::ffi::OsString>,
    /// What proxies are told to connect to, when not the gRPC port's own address (a
    /// name that resolves to several replicas).
    pub advertised: Option<String>,
    pub process: Process,
}

impl ControlPlane {
    /// Starts a control plane whose MeshConfig has `certificate_ttl` and any `extra_spec`
    /// lines (indented under `spec:`).
    pub async fn start(certificate_ttl: &str, extra_spec: &str) -> Self {
        Self::start_on(local(0).ip(), certificate_ttl, extra_spec).await
    }

    /// [`ControlPlane::start`], with the gRPC port listening on `listen_ip`.
    pub async fn start_on(
        listen_ip: std::net::IpAddr,
        certificate_ttl: &str,
        extra_spec: &str,
    ) -> Self {
        Self::start_with(
            listen_ip,
            free_port(),
            certificate_ttl,
            extra_spec,
            Vec::new(),
        )
        .await
    }

    /// [`ControlPlane::start`] in cluster mode, against the API server of `kubeconfig`.
    pub async fn start_in_cluster(kubeconfig: &Path) -> Self {
        Self::start_in_cluster_with(kubeconfig, &[]).await
    }

    /// [`ControlPlane::start_in_cluster`] with lines added under the MeshConfig's `spec:`.
    pub async fn start_in_cluster_with_spec(kubeconfig: &Path, extra_spec: &str) -> Self {
        let all = Self::cluster_args(kubeconfig, std::iter::empty());
        Self::start_with(local(0).ip(), free_port(), "1h", extra_spec, all).await
    }

    /// [`ControlPlane::start_in_cluster`] with more arguments.
    pub async fn start_in_cluster_with(kubeconfig: &Path, args: &[&str]) -> Self {
        let all = Self::cluster_args(kubeconfig, args.iter().map(std::ffi::OsString::from));
        Self::start_with(local(0).ip(), free_port(), "1h", "", all).await
    }

    /// [`ControlPlane::start_in_cluster`] with the gRPC port on `listen_ip`, injecting
    /// sidecars that reach it as `service` (a name their pods resolve to `listen_ip`).
    pub async fn start_in_cluster_on(
        listen_ip: std::net::IpAddr,
        kubeconfig: &Path,
        service: &str,
    ) -> Self {
        let grpc_port = free_port();
        let address = format!("{service}:{grpc_port}");
        let all = Self::cluster_args(
            kubeconfig,
            ["--control-plane-address".into(), address.into()],
        );
        Self::start_with(listen_ip, grpc_port, "1h", "", all).await
    }

    fn cluster_args(
        kubeconfig: &Path,
        more: impl IntoIterator<Item = std::ffi::OsString>,
    ) -> Vec<std::ffi::OsString> {
        let mut all = vec![
            "--kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
        ];
        all.extend(more);
        all
    }

    async fn start_with(
        listen_ip: std::net::IpAddr,
        grpc_port: u16,
        certificate_ttl: &str,
        extra_spec: &str,
        extra_args: Vec<std::ffi::OsString>,
    ) -> Self {
        let dir = TempDir::new("cp");
        std::fs::create_dir_all(dir.path().join("config")).expect("config dir");
        std::fs::write(
            dir.path().join("config/mesh.yaml"),
            format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: {TRUST_DOMAIN}\n  certificateTtl: {certificate_ttl}\n{extra_spec}"
            ),
        )
        .expect("write mesh.yaml");
        let admin_port = free_port();
        let grpc = SocketAddr::new(listen_ip, grpc_port);
        let process = Self::spawn(&dir, grpc, admin_port, &extra_args);
        let control_plane = Self {
            proxy_extra_yaml: String::new(),
            proxy_limits: String::new(),
            dir,
            grpc_port,
            admin_port,
            listen_ip,
            extra_args,
            advertised: None,
            process,
        };
        control_plane.wait_started().await;
        control_plane
    }

    fn spawn(
        dir: &TempDir,
        grpc: SocketAddr,
        admin_port: u16,
        extra_args: &[std::ffi::OsString],
    ) -> Process {
        Process::spawn(
            "control-plane",
            Command::new(binary("tessera"))
                .arg("control-plane")
                .arg("--config")
                .arg(dir.path().join("config"))
                .arg("--state-dir")
                .arg(dir.path().join("state"))
                .arg("--listen")
                .arg(grpc.to_string())
                .arg("--admin")
                .arg(local(admin_port).to_string())
                // Port 0: parallel tests never fight over 15017; see `webhook_address`.
                .arg("--webhook")
                .arg(local(0).to_string())
                // A plug-in CA's files are re-read every 300 ms (15 s by default), so a
                // test of a renewed CA need not wait.
                .env("TESSERA_PLUGIN_CA_POLL_INTERVAL", "300ms")
                .args(extra_args),
        )
    }

    async fn wait_started(&self) {
        self.process
            .logs
            .wait_for(&["control plane started"], Duration::from_secs(20))
            .await
            .expect("control plane starts");
    }

    /// Kills the process (as a crash would).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same ports and state.
    pub async fn restart(&mut self) {
        self.process.kill();
        let grpc = SocketAddr::new(self.listen_ip, self.grpc_port);
        self.process = Self::spawn(&self.dir, grpc, self.admin_port, &self.extra_args);
        self.wait_started().await;
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn trust_bundle_file(&self) -> PathBuf {
        self.state_dir().join("root-cert.pem")
    }

    /// Where the admission webhook listens (chosen by the OS at start, read from the
    /// start-up log line).
    pub fn webhook_address(&self) -> SocketAddr {
        self.process
            .logs
            .matching(&["control plane started"])
            .last()
            .and_then(|line| {
                line.split_once("webhook=")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .expect("control plane logs its webhook address")
    }

    /// A join token from `tessera token create`: single-use, as by default.
    pub fn token(&self, service_account: &str, ttl: &str) -> String {
        self.create_token(service_account, ttl, &[])
    }

    /// A `tessera token create --reusable` token: usable until it expires.
    pub fn reusable_token(&self, service_account: &str, ttl: &str) -> String {
        self.create_token(service_account, ttl, &["--reusable"])
    }

    fn create_token(&self, service_account: &str, ttl: &str, flags: &[&str]) -> String {
        let output = Command::new(binary("tessera"))
            .args([
                "token",
                "create",
                "--namespace",
                NAMESPACE,
                "--service-account",
                service_account,
                "--ttl",
                ttl,
            ])
            .args(flags)
            .arg("--config")
            .arg(self.config_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .output()
            .expect("run tessera token create");
        assert!(
            output.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("utf-8 token")
            .trim()
            .to_string()
    }

    pub fn address(&self) -> String {
        self.advertised
            .clone()
            .unwrap_or_else(|| SocketAddr::new(self.listen_ip, self.grpc_port).to_string())
    }

    /// The `tessera_discovery_connected_proxies` gauge.
    pub async fn connected_proxies(&self) -> u64 {
        let (_, metrics) = http_get(local(self.admin_port), "/metrics")
            .await
            .unwrap_or_default();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("tessera_discovery_connected_proxies "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The configuration generation in force on the control plane.
    pub async fn generation(&self) -> u64 {
        let (_, metrics) = http_get(local(self.admin_port), "/metrics")
            .await
            .unwrap_or_default();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("tessera_config_generation "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until a generation after `after` is in force on the control plane and on
    /// `proxies` connected proxies — each acknowledged applying every change of it that
    /// concerns it — and returns it.
    pub async fn wait_in_force(
        &self,
        after: u64,
        proxies: usize,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let generation = self.generation().await;
            let (_, listed) = http_get(local(self.admin_port), "/proxies")
                .await
                .unwrap_or_default();
            let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap_or_default();
            let in_force = listed
                .iter()
                .filter(|p| p["generation"].as_u64().is_some_and(|g| g >= generation))
                .count();
            if generation > after && in_force >= proxies {
                return Ok(generation);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "generation {generation} (waiting for one after {after}) in force on {in_force} of {proxies} proxies: {listed:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Writes (or replaces) a resource file in the configuration directory.
    pub fn write_config(&self, name: &str, yaml: &str) {
        let path = self.config_dir().join(name);
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, yaml).expect("write config");
        std::fs::rename(&temporary, &path).expect("move config into place");
    }

    /// A proxy for a workload whose inbound port is fixed in advance.
    pub fn workload_proxy(
        &self,
        service_account: &str,
        app: SocketAddr,
        inbound_port: u16,
    ) -> Proxy {
        self.workload_proxy_at(service_account, app, local(inbound_port))
    }

    /// [`ControlPlane::workload_proxy`] with its inbound listening at `inbound` (an
    /// address of this host's other than loopback, which Kubernetes refuses in an
    /// EndpointSlice).
    pub fn workload_proxy_at(
        &self,
        service_account: &str,
        app: SocketAddr,
        inbound: SocketAddr,
    ) -> Proxy {
        let token = self.token(service_account, "10m");
        let inbound_port = inbound.port();
        Proxy::launch(
            &self.address(),
            &self.trust_bundle_file(),
            service_account,
            &token,
            Some((app, inbound_port)),
            &[],
            Extra {
                yaml: &self.proxy_extra_yaml,
                limits: &self.proxy_limits,
                nofile: None,
                inbound_ip: Some(inbound.ip()),
            },
        )
    }

    /// Starts a proxy certified by this control plane (token valid 10 minutes).
    pub fn proxy(
        &self,
        service_account: &str,
        app: Option<SocketAddr>,
        upstreams: &[Upstream],
    ) -> Proxy {
        self.proxy_with_nofile(service_account, app, upstreams, None)
    }

    /// Like [`ControlPlane::proxy`], under an open-file limit the proxy cannot raise.
    pub fn proxy_with_nofile(
        &self,
        service_account: &str,
        app: Option<SocketAddr>,
        upstreams: &[Upstream],
        nofile: Option<u64>,
    ) -> Proxy {
        let token = self.token(service_account, "10m");
        Proxy::launch(
            &self.address(),
            &self.trust_bundle_file(),
            service_account,
            &token,
            app.map(|app| (app, free_port())),
            upstreams,
            Extra {
                yaml: &self.proxy_extra_yaml,
                limits: &self.proxy_limits,
                nofile,
                inbound_ip: None,
            },
        )
    }
}

/// One outbound listener of a test proxy.
pub struct Upstream {
    pub listen_port: u16,
    pub target: Target,
}

/// Where an outbound listener sends traffic.
pub enum Target {
    /// A fixed remote proxy that must prove `identity`.
    Fixed {
        address: SocketAddr,
        identity: String,
    },
    /// A service (`name.namespace`) resolved through discovery.
    Service(String),
}

impl Upstream {
    pub fn fixed(address: SocketAddr, identity: String) -> Self {
        Self {
            listen_port: free_port(),
            target: Target::Fixed { address, identity },
        }
    }

    pub fn service(key: &str) -> Self {
        Self {
            listen_port: free_port(),
            target: Target::Service(key.to_string()),
        }
    }

    fn yaml(&self) -> String {
        let listen = local(self.listen_port);
        match &self.target {
            Target::Fixed { address, identity } => {
                format!("  - listen: {listen}\n    address: {address}\n    identity: {identity}\n")
            }
            Target::Service(key) => format!("  - listen: {listen}\n    service: {key}\n"),
        }
    }
}

/// A `tessera-proxy run` process.
pub struct Proxy {
    pub dir: TempDir,
    pub admin_port: u16,
    pub inbound_port: Option<u16>,
    pub outbound_ports: Vec<u16>,
    pub process: Process,
}

/// What a test adds to a proxy's configuration: whole sections, and lines under
/// `limits:` (`  name: value\n`).
#[derive(Default, Clone, Copy)]
pub struct Extra<'a> {
    pub yaml: &'a str,
    pub limits: &'a str,
    /// The proxy's open-file limit, soft and hard (run under util-linux `prlimit`).
    pub nofile: Option<u64>,
    /// Where the inbound listens (with the inbound port); loopback when `None`.
    pub inbound_ip: Option<std::net::IpAddr>,
}

impl Proxy {
    /// Starts a proxy for `service_account`, with an inbound port forwarding to `app` (if
    /// any) and the given upstreams. `token` is written to a file the proxy reads.
    pub fn start(
        control_plane_address: &str,
        trust_bundle: &Path,
        service_account: &str,
        token: &str,
        app: Option<SocketAddr>,
        upstreams: &[Upstream],
    ) -> Self {
        let inbound_port = app.map(|_| free_port());
        Self::launch(
            control_plane_address,
            trust_bundle,
            service_account,
            token,
            app.zip(inbound_port),
            upstreams,
            Extra::default(),
        )
    }

    /// Like [`Proxy::start`], with the inbound listener on a port chosen beforehand (so
    /// a Workload resource can name it).
    pub fn launch(
        control_plane_address: &str,
        trust_bundle: &Path,
        service_account: &str,
        token: &str,
        inbound: Option<(SocketAddr, u16)>,
        upstreams: &[Upstream],
        extra: Extra<'_>,
    ) -> Self {
        let app = inbound.map(|(app, _)| app);
        let inbound_port = inbound.map(|(_, port)| port);
        let dir = TempDir::new(service_account);
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token).expect("write token");
        let admin_port = free_port();
        let mut yaml = format!(
            "identity:\n  trustDomain: {TRUST_DOMAIN}\n  namespace: {NAMESPACE}\n  serviceAccount: {service_account}\n  joinTokenFile: {}\ncontrolPlane:\n  address: {control_plane_address}\n  trustBundleFile: {}\nadmin: {}\nlimits:\n  handshakeTimeout: 3s\n{}",
            token_file.display(),
            trust_bundle.display(),
            local(admin_port),
            extra.limits,
        );
        if let (Some(app), Some(port)) = (app, inbound_port) {
            yaml.push_str(&format!(
                "inbound:\n  - listen: {}\n    forwardTo: {app}\n",
                SocketAddr::new(extra.inbound_ip.unwrap_or(local(0).ip()), port)
            ));
        }
        if !upstreams.is_empty() {
            yaml.push_str("outbound:\n");
            for upstream in upstreams {
                yaml.push_str(&upstream.yaml());
            }
        }
        yaml.push_str(extra.yaml);
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml).expect("write proxy.yaml");
        let mut command = match extra.nofile {
            Some(files) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={files}:{files}"))
                    .arg(binary("tessera-proxy"));
                command
            }
            None => Command::new(binary("tessera-proxy")),
        };
        command
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .env_remove("TESSERA_JOIN_TOKEN");
        let process = Process::spawn(service_account, &mut command);
        Self {
            dir,
            admin_port,
            inbound_port,
            outbound_ports: upstreams.iter().map(|u| u.listen_port).collect(),
            process,
        }
    }

    pub fn inbound(&self) -> SocketAddr {
        local(self.inbound_port.expect("proxy has an inbound port"))
    }

    pub fn outbound(&self, index: usize) -> SocketAddr {
        local(self.outbound_ports[index])
    }

    /// GETs an admin path; returns (status, body).
    pub async fn admin(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(local(self.admin_port), path).await
    }

    /// Waits until `/ready` says 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.admin("/ready").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "proxy not ready within {timeout:?}; log:\n{}",
                    self.process.logs.lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The usual topology: a "server" proxy in front of `app`, and a "client" proxy with one
/// outbound upstream per entry of `expected`, all pointing at the server proxy but each
/// expecting the given service account. Both are ready when this returns.
pub struct ProxyPair {
    pub server: Proxy,
    pub client: Proxy,
}

impl ProxyPair {
    pub async fn start(control_plane: &ControlPlane, app: SocketAddr, expected: &[&str]) -> Self {
        let server = control_plane.proxy("server", Some(app), &[]);
        let upstreams: Vec<Upstream> = expected
            .iter()
            .map(|service_account| Upstream::fixed(server.inbound(), spiffe(service_account)))
            .collect();
        let client = control_plane.proxy("client", None, &upstreams);
        for proxy in [&server, &client] {
            proxy
                .wait_ready(Duration::from_secs(20))
                .await
                .expect("proxy ready");
        }
        Self { server, client }
    }
}

/// Identity of a service account in the test namespace.
pub fn spiffe(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

/// A minimal HTTP/1.1 GET, enough for the admin endpoints.
pub async fn http_get(address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// A TCP echo server that counts every byte it receives.
pub struct EchoServer {
    pub address: SocketAddr,
    pub bytes_received: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo server");
        let address = listener.local_addr().expect("echo address");
        let bytes_received = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (bytes, conns) = (bytes_received.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let bytes = bytes.clone();
                tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.split();
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        match reader.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                bytes.fetch_add(n as u64, Ordering::SeqCst);
                                if writer.write_all(&buffer[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    // Half-close answered by closing our side once all is echoed.
                    let _ = writer.shutdown().await;
                });
            }
        });
        Self {
            address,
            bytes_received,
            connections,
            task,
        }
    }

    pub fn received(&self) -> u64 {
        self.bytes_received.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `payload` over a fresh connection, half-closes, and reads the whole echo back.
pub async fn echo_roundtrip(address: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut reader, mut writer) = stream.into_split();
    let payload = payload.to_vec();
    let sender = tokio::spawn(async move {
        writer.write_all(&payload).await?;
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(writer)
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut echoed)).await??;
    sender.await??;
    Ok(echoed)
}

/// Random bytes for payloads.
pub fn random_payload(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// Waits until `condition` holds, polling.
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    condition()
}

/// Installs the crypto provider for in-test TLS clients.
pub fn init() {
    tessera_mesh::tls::install_crypto_provider();
}
