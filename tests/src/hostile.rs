//! Support for the hostile-peer suite (`tests/tests/e2e/hostile.rs`): a proxy pair with
//! short timeouts in front of an application that can answer large and slowly, the
//! attacker (`tests/hostile/attack.py`, raw HTTP/2 frames from the `h2` package) run as
//! a process against either side, the proxies' memory and descriptors read from /proc,
//! and a well-behaved caller whose answers are counted while an attack runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::certs::TestCa;
use crate::l7::Http1Client;
use crate::{ControlPlane, Process, Proxy, TRUST_DOMAIN, TempDir, Upstream, free_port, local};

/// Timeouts for the proxies under attack, short so that a test sees them fire. (The
/// defaults are minutes; what is asserted is that they exist and are honoured.) Streams
/// a caller stalls are ended well within the well-behaved caller's 5 s.
pub const LIMITS: &str = "  handshakeTimeout: 3s\n  headerReadTimeout: 2s\n  connectionIdleTimeout: 5s\n  streamIdleTimeout: 2s\n  requestBodyTimeout: 2s\n";

/// The installation command a failing or skipping test names.
pub const INSTALL: &str = "python3 -m pip install -r tests/hostile/requirements.txt (pip itself: apt-get install python3-pip)";

/// True when `python3` can import the attacker's libraries. Without them the suite
/// fails in CI (`CI=true`) with the command that installs them, and says it skipped
/// elsewhere.
pub fn attacker_available() -> bool {
    let imported = Command::new("python3")
        .args(["-c", "import h2, hpack, hyperframe"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !imported {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3 cannot import h2/hpack/hyperframe; install them: {INSTALL}"
        );
        eprintln!("skipped: python3 cannot import h2; install with: {INSTALL}");
    }
    imported
}

/// Resident memory (VmRSS) of a process, in bytes; 0 once it is gone.
pub fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resident memory of a process split by what backs it, in bytes: anonymous (heap and
/// stacks: what an attacker can make the proxy allocate) and file-backed (the mapped
/// binary, whose debug build carries ~120 MiB of DWARF: reading it to print a panic's
/// backtrace alone adds ~130 MiB, half of it file pages). Zeros once the process is gone.
pub fn rss_by_kind(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

pub const MIB: u64 = 1024 * 1024;

/// Samples a process's RSS every 20 ms until stopped; keeps the highest.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (peak.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !stopped.load(Ordering::SeqCst) {
                seen.fetch_max(rss(pid), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self { peak, stop, task }
    }

    /// The highest RSS seen, in bytes.
    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.peak.load(Ordering::SeqCst)
    }
}

/// The application behind the server proxy, HTTP/1.1 and HTTP/2 (prior knowledge) on
/// one port: `/big/<n>` answers `n` bytes in 64 KiB chunks, `/slow` answers after two
/// seconds, `/upload` reads the whole body and answers its length, anything else "ok".
pub struct Backend {
    pub address: SocketAddr,
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

impl Backend {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let address = listener.local_addr().expect("backend address");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        answer(request)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            address,
            requests,
            task,
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn answer(
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<BoxBody>, std::io::Error> {
    let path = request.uri().path().to_string();
    let full = |text: String| Full::new(Bytes::from(text)).map_err(|never| match never {});
    let body = if let Some(size) = path.strip_prefix("/big/") {
        let size: usize = size.parse().unwrap_or(0);
        let chunks = (0..size.div_ceil(64 * 1024)).map(move |i| {
            let len = (size - i * 64 * 1024).min(64 * 1024);
            Ok(Frame::data(Bytes::from(vec![b'x'; len])))
        });
        StreamBody::new(tokio_stream::iter(chunks)).boxed()
    } else if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
        full("slow".into()).boxed()
    } else if path == "/upload" {
        let mut body = request.into_body();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(std::io::Error::other)?;
            total += frame.data_ref().map_or(0, Bytes::len);
        }
        full(total.to_string()).boxed()
    } else {
        full("ok".into()).boxed()
    };
    Ok(http::Response::new(body))
}

/// The mesh under attack: a server proxy in front of [`Backend`] and a client proxy
/// whose one outbound listener targets it, both with [`LIMITS`]; and a certificate for
/// a valid workload identity (`hostile`) that a hostile mesh peer presents.
pub struct HostileMesh {
    pub control_plane: ControlPlane,
    pub backend: Backend,
    pub server: Proxy,
    pub client: Proxy,
    peer: TempDir,
}

/// Which listener an attacker targets.
#[derive(Clone, Copy, Debug)]
pub enum Surface {
    /// The client proxy's plaintext outbound listener, where local applications call.
    Outbound,
    /// The server proxy's inbound mTLS port, as a mesh peer with a valid identity.
    Inbound,
}

impl HostileMesh {
    /// The mesh with [`LIMITS`].
    pub async fn start() -> Self {
        Self::start_with(LIMITS).await
    }

    /// The mesh with these `limits:` lines in both proxies' configuration.
    pub async fn start_with(limits: &str) -> Self {
        crate::init();
        let control_plane = ControlPlane::start("1h", "").await;
        let backend = Backend::start().await;
        let server = launch(&control_plane, limits, "server", Some(backend.address), &[]);
        let upstream = Upstream::fixed(server.inbound(), crate::spiffe("server"));
        let client = launch(&control_plane, limits, "client", None, &[upstream]);
        for proxy in [&server, &client] {
            proxy
                .wait_ready(Duration::from_secs(20))
                .await
                .expect("proxy ready");
        }
        let peer = TempDir::new("hostile-peer");
        let leaf = TestCa::from_state_dir(&control_plane.state_dir()).leaf(
            &crate::spiffe("hostile"),
            Duration::from_secs(60),
            Duration::from_secs(3600),
            false,
        );
        let chain: String = leaf
            .chain
            .iter()
            .map(tessera_mesh::tls::der_to_pem)
            .collect();
        std::fs::write(peer.path().join("cert.pem"), chain).expect("write peer cert");
        std::fs::write(
            peer.path().join("key.pem"),
            pem("PRIVATE KEY", leaf.key.secret_der()),
        )
        .expect("write peer key");
        Self {
            control_plane,
            backend,
            server,
            client,
            peer,
        }
    }

    /// Where the well-behaved caller sends its requests.
    pub fn entry(&self) -> SocketAddr {
        self.client.outbound(0)
    }

    /// The proxy that `surface` belongs to.
    pub fn proxy(&self, surface: Surface) -> &Proxy {
        match surface {
            Surface::Outbound => &self.client,
            Surface::Inbound => &self.server,
        }
    }

    /// Starts `attack.py <attack>` against `surface` with extra arguments.
    pub fn attack(&self, surface: Surface, attack: &str, args: &[&str]) -> Attack {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hostile/attack.py");
        let mut command = tokio::process::Command::new("python3");
        command.arg(script).arg(attack).args(args);
        match surface {
            Surface::Outbound => {
                command.arg("--port").arg(self.entry().port().to_string());
            }
            Surface::Inbound => {
                command
                    .arg("--port")
                    .arg(self.server.inbound().port().to_string())
                    .arg("--cert")
                    .arg(self.peer.path().join("cert.pem"))
                    .arg("--key")
                    .arg(self.peer.path().join("key.pem"))
                    .arg("--ca")
                    .arg(self.control_plane.trust_bundle_file());
            }
        }
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run python3 tests/hostile/attack.py");
        Attack {
            label: format!("{attack} on {surface:?}"),
            child,
        }
    }
}

/// A running attacker process.
pub struct Attack {
    pub label: String,
    child: tokio::process::Child,
}

impl Attack {
    /// Waits for the attacker (at most 45 s: every attack bounds itself to 30 s) and
    /// returns the JSON report it printed last.
    pub async fn finish(self) -> serde_json::Value {
        let label = self.label;
        let output = tokio::time::timeout(Duration::from_secs(45), self.child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{label}: attacker still running after 45 s"))
            .expect("attacker output");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{label}: attacker failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{label}: attacker report {last:?}: {e}"))
    }
}

/// What the well-behaved caller saw.
#[derive(Debug, Default)]
pub struct LegitReport {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub errors: Vec<String>,
}

impl LegitReport {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    pub fn success_ratio(&self) -> f64 {
        if self.total() == 0 {
            0.0
        } else {
            self.ok as f64 / self.total() as f64
        }
    }
}

/// A caller that does nothing wrong: alternately an HTTP/1.1 and an HTTP/2 (prior
/// knowledge) GET through `entry`, each on its own kept-alive connection, every 50 ms
/// until stopped; an answer that is not 200 "ok" within 5 s is a failure.
pub struct Legit {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LegitReport>,
}

impl Legit {
    pub fn start(entry: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut caller = Caller::default();
            while !stopped.load(Ordering::SeqCst) {
                caller.round(entry).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            caller.report
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> LegitReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap_or_default()
    }

    /// `count` requests back to back, on connections of their own.
    pub async fn burst(entry: SocketAddr, count: u64) -> LegitReport {
        let mut caller = Caller::default();
        for _ in 0..count {
            caller.round(entry).await;
        }
        caller.report
    }
}

impl LegitReport {
    fn fail(&mut self, error: String) {
        self.failed += 1;
        if self.errors.len() < 5 {
            self.errors.push(error);
        }
    }
}

/// The well-behaved caller's connections and tally.
#[derive(Default)]
struct Caller {
    http1: Option<Http1Client>,
    http2: Option<H2Client>,
    round: u64,
    report: LegitReport,
}

impl Caller {
    async fn round(&mut self, entry: SocketAddr) {
        let over_http1 = self.round.is_multiple_of(2);
        let outcome = if over_http1 {
            tokio::time::timeout(Duration::from_secs(5), get_http1(entry, &mut self.http1)).await
        } else {
            tokio::time::timeout(Duration::from_secs(5), get_http2(entry, &mut self.http2)).await
        };
        let round = self.round;
        self.round += 1;
        let error = match outcome {
            Ok(Ok(())) => {
                self.report.ok += 1;
                return;
            }
            Ok(Err(error)) => format!("round {round}: {error:#}"),
            Err(_) => format!("round {round}: no answer within 5 s"),
        };
        self.report.fail(error);
        // A fresh connection for the next try.
        if over_http1 {
            self.http1 = None;
        } else {
            self.http2 = None;
        }
    }
}

/// An HTTP/2 client connection with prior knowledge, as gRPC clients hold one.
type H2Client = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn get_http1(entry: SocketAddr, client: &mut Option<Http1Client>) -> anyhow::Result<()> {
    if client.as_ref().is_none_or(|c| !c.is_open()) {
        *client = Some(Http1Client::connect(entry).await?);
    }
    let Some(connection) = client.as_mut() else {
        anyhow::bail!("no connection");
    };
    let answer = connection.get("/").await?;
    anyhow::ensure!(
        answer.status == http::StatusCode::OK && answer.body == "ok",
        "HTTP/1.1 answer {} {:?}",
        answer.status,
        answer.body
    );
    Ok(())
}

async fn get_http2(entry: SocketAddr, client: &mut Option<H2Client>) -> anyhow::Result<()> {
    if client.as_ref().is_none_or(H2Client::is_closed) {
        let stream = tokio::net::TcpStream::connect(entry).await?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(connection);
        *client = Some(sender);
    }
    let Some(sender) = client.as_mut() else {
        anyhow::bail!("no connection");
    };
    sender.ready().await?;
    let request = http::Request::get("http://backend.shop/").body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status == http::StatusCode::OK && body == "ok",
        "HTTP/2 answer {status} {body:?}"
    );
    Ok(())
}

/// A proxy like [`ControlPlane::proxy`] starts, with `limits` in its configuration.
fn launch(
    control_plane: &ControlPlane,
    limits: &str,
    service_account: &str,
    app: Option<SocketAddr>,
    upstreams: &[Upstream],
) -> Proxy {
    let token = control_plane.token(service_account, "10m");
    let dir = TempDir::new(service_account);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).expect("write token");
    let admin_port = free_port();
    let inbound_port = app.map(|_| free_port());
    let mut yaml = format!(
        "identity:\n  trustDomain: {TRUST_DOMAIN}\n  namespace: {}\n  serviceAccount: {service_account}\n  joinTokenFile: {}\ncontrolPlane:\n  address: {}\n  trustBundleFile: {}\nadmin: {}\nlimits:\n{limits}",
        crate::NAMESPACE,
        token_file.display(),
        control_plane.address(),
        control_plane.trust_bundle_file().display(),
        local(admin_port)
    );
    if let (Some(app), Some(port)) = (app, inbound_port) {
        yaml.push_str(&format!(
            "inbound:\n  - listen: {}\n    forwardTo: {app}\n",
            local(port)
        ));
    }
    if !upstreams.is_empty() {
        yaml.push_str("outbound:\n");
        for upstream in upstreams {
            let crate::Target::Fixed { address, identity } = &upstream.target else {
                panic!("the hostile mesh uses fixed upstreams");
            };
            yaml.push_str(&format!(
                "  - listen: {}\n    address: {address}\n    identity: {identity}\n",
                local(upstream.listen_port)
            ));
        }
    }
    let config: PathBuf = dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml).expect("write proxy.yaml");
    let process = Process::spawn(
        service_account,
        Command::new(crate::binary("tessera-proxy"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .env_remove("TESSERA_JOIN_TOKEN"),
    );
    Proxy {
        dir,
        admin_port,
        inbound_port,
        outbound_ports: upstreams.iter().map(|u| u.listen_port).collect(),
        process,
    }
}

/// DER as PEM with `label`.
fn pem(label: &str, der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}
