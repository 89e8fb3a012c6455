//! The side-by-side figure for a Rego policy on the inbound side (`tessera-benches
//! rego-paths`): the same HTTP/1.1 load through three Tessera pairs in front of one
//! nginx, measured in one run, the pairs taking turns:
//! - `no policy`: the pair as the main benchmark runs it, the baseline;
//! - `rego in proxy`: a CUSTOM AuthorizationPolicy on the server-side proxy, every request
//!   decided by the typical Rego policy of [`crate::rego`] inside the proxy;
//! - `opa hop`: the Istio-shaped alternative — behind a pair without policy, an
//!   ext_authz-like hop asks an OPA server (`opa run --server`, same policy and data)
//!   over loopback REST, on a kept-alive connection, before forwarding to nginx.
//!
//! The hop stands in for Envoy's ext_authz filter, so its own CPU (in this process) is
//! not counted: OPA's is, next to the proxies'. That makes `opa hop` a lower bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{HttpRequest, Request};
use tessera_tests::opa::{self, Bundle, OpaClient, OpaServer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::load::{HttpRequest as LoadRequest, open_loop, wrk};
use crate::proc_stats;
use crate::rego::{QUERY, TYPICAL_POLICY};
use crate::topology::backends::Backends;
use crate::topology::tessera::{NAMESPACE, TRUST_DOMAIN, TesseraPair};
use crate::topology::{Entry, free_port, local};

const CONNECTIONS: usize = 64;
const OPEN_LOOP_CONNECTIONS: usize = 32;
const CLIENT_ACCOUNT: &str = "bench-client";
const SERVER_ACCOUNT: &str = "bench-server";

/// How long and how hard.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub closed_loop: Duration,
    pub open_loop: Duration,
    pub rate_per_second: u32,
    pub rounds: usize,
}

/// One way of deciding, measured.
#[derive(Debug)]
pub struct Row {
    pub name: &'static str,
    pub requests_per_second: f64,
    /// Proxies' (and OPA's) CPU per request in the closed loop, µs.
    pub cpu_us_per_request: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// The typical policy's data, granting the benchmark's client what it asks for.
fn bench_data() -> Value {
    json!({
        "grants": {
            format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{CLIENT_ACCOUNT}"): [
                {"methods": ["GET"], "prefix": "/small"},
            ],
        },
        "admins": [],
    })
}

/// The CUSTOM policy of the `rego in proxy` pair: every request to the server side.
fn custom_policy() -> String {
    let module: String = TYPICAL_POLICY
        .lines()
        .map(|line| format!("          {line}\n"))
        .collect();
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: rego, namespace: {NAMESPACE}}}\nspec:\n  selector: {{serviceAccount: {SERVER_ACCOUNT}}}\n  action: CUSTOM\n  rules: [{{}}]\n  provider:\n    rego:\n      query: {QUERY}\n      modules:\n      - name: authz.rego\n        source: |\n{module}      data: {}\n",
        bench_data()
    )
}

/// A started path: where load enters and whose CPU counts.
struct Contender {
    name: &'static str,
    entry: SocketAddr,
    pids: Vec<u32>,
}

/// Runs the three paths, `settings.rounds` turns each; returns one row per path (its
/// median round by CPU per request).
pub async fn run(settings: Settings) -> anyhow::Result<Vec<Row>> {
    let opa_binary = opa::binary().context("tests/opa/build.sh builds OPA")?;
    let backends = Backends::start(true).await?;
    let baseline = TesseraPair::start(backends.entry).await?;
    let with_rego = TesseraPair::start(backends.entry).await?;
    with_rego
        .control_plane
        .write_config("rego.yaml", &custom_policy())?;
    wait_for_policy(with_rego.entry.http1).await?;
    let bundle = Bundle::new(&[("authz.rego", TYPICAL_POLICY)], &bench_data());
    let opa_server = OpaServer::start(&opa_binary, &bundle).await?;
    let hop = start_authz_hop(opa_server.address, backends.entry.http1).await?;
    let with_hop = TesseraPair::start(Entry {
        http1: hop,
        ..backends.entry
    })
    .await?;
    let pids = |pair: &TesseraPair| vec![pair.client.pid(), pair.server.pid()];
    let contenders = [
        Contender {
            name: "no policy",
            entry: baseline.entry.http1,
            pids: pids(&baseline),
        },
        Contender {
            name: "rego in proxy",
            entry: with_rego.entry.http1,
            pids: pids(&with_rego),
        },
        Contender {
            name: "opa hop",
            entry: with_hop.entry.http1,
            pids: [pids(&with_hop), vec![opa_server.process.pid()]].concat(),
        },
    ];
    let mut rounds: Vec<Vec<Row>> = contenders.iter().map(|_| Vec::new()).collect();
    for _ in 0..settings.rounds.max(1) {
        for (contender, rows) in contenders.iter().zip(&mut rounds) {
            rows.push(measure(contender, settings).await?);
        }
    }
    Ok(rounds.into_iter().filter_map(median).collect())
}

/// Waits until the pair denies what the policy denies (its client may not POST).
async fn wait_for_policy(entry: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if send(entry, http::Method::POST, "/small").await? == http::StatusCode::FORBIDDEN {
            break;
        }
        if Instant::now() > deadline {
            bail!("the Rego policy was not in force after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let allowed = send(entry, http::Method::GET, "/small").await?;
    anyhow::ensure!(allowed.is_success(), "GET /small through Rego: {allowed}");
    Ok(())
}

async fn send(
    entry: SocketAddr,
    method: http::Method,
    path: &str,
) -> anyhow::Result<http::StatusCode> {
    let stream = TcpStream::connect(entry).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "bench")
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(request).await?.status())
}

async fn measure(contender: &Contender, settings: Settings) -> anyhow::Result<Row> {
    let cpu = || -> anyhow::Result<Duration> {
        contender
            .pids
            .iter()
            .map(|&pid| Ok(proc_stats::cpu_time(pid)?))
            .sum()
    };
    let before = cpu()?;
    let closed = wrk::run(contender.entry, "/small", CONNECTIONS, settings.closed_loop).await?;
    let used = cpu()?.saturating_sub(before);
    let open = open_loop::run(
        &open_loop::Target::Http(LoadRequest::get(contender.entry, "/small")),
        open_loop::Settings {
            rate_per_second: settings.rate_per_second,
            duration: settings.open_loop,
            connections: OPEN_LOOP_CONNECTIONS,
            streams_per_connection: 1,
        },
    )
    .await?;
    let latency = open.latency.context("the open loop measures latency")?;
    Ok(Row {
        name: contender.name,
        requests_per_second: closed.per_second(),
        cpu_us_per_request: used.as_secs_f64() * 1e6 / closed.completed.max(1) as f64,
        p50_us: latency.p50_us,
        p99_us: latency.p99_us,
        errors: closed.errors + open.errors,
    })
}

fn median(mut rows: Vec<Row>) -> Option<Row> {
    rows.sort_by(|a, b| a.cpu_us_per_request.total_cmp(&b.cpu_us_per_request));
    let middle = rows.len() / 2;
    (!rows.is_empty()).then(|| rows.swap_remove(middle))
}

/// The rows as a table, with each path's cost over the baseline.
pub fn render(rows: &[Row], settings: Settings) -> String {
    let mut out = format!(
        "HTTP/1.1 GET /small through a Tessera pair, three ways (closed loop: wrk, {CONNECTIONS} connections, {:?}; open loop: {} req/s, {OPEN_LOOP_CONNECTIONS} connections, {:?}; median of {} round(s) by CPU per request)\n",
        settings.closed_loop,
        settings.rate_per_second,
        settings.open_loop,
        settings.rounds.max(1)
    );
    out.push_str("path             req/s   CPU µs/req (+ vs none)   p50 µs   p99 µs   errors\n");
    let baseline = rows.first().map_or(0.0, |row| row.cpu_us_per_request);
    for row in rows {
        out.push_str(&format!(
            "{:<14} {:>7.0}   {:>10.1} ({:>+6.1})   {:>6.0}   {:>6.0}   {:>6}\n",
            row.name,
            row.requests_per_second,
            row.cpu_us_per_request,
            row.cpu_us_per_request - baseline,
            row.p50_us,
            row.p99_us,
            row.errors
        ));
    }
    out.push_str("opa hop: the proxies' and OPA's CPU; the hop itself (Envoy's ext_authz filter in Istio) is not counted\n");
    out
}

/// The ext_authz-like hop: per connection, a kept-alive connection to OPA and one to the
/// application; each request's decision asked of OPA with OPA-Envoy's input, then the
/// request forwarded (or answered 403).
async fn start_authz_hop(opa: SocketAddr, app: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(local(free_port())).await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // A failure shows in the load generator's errors; the proxy closing its
            // pooled connections at the end of a run is no failure.
            tokio::spawn(serve_hop(stream, opa, app));
        }
    });
    Ok(address)
}

type AppSender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn serve_hop(stream: TcpStream, opa: SocketAddr, app: SocketAddr) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let opa = Arc::new(Mutex::new(OpaClient::connect(opa).await?));
    let app_stream = TcpStream::connect(app).await?;
    app_stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(app_stream)).await?;
    tokio::spawn(connection);
    let sender: Arc<Mutex<AppSender>> = Arc::new(Mutex::new(sender));
    let caller = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, CLIENT_ACCOUNT)?;
    let this = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, SERVER_ACCOUNT)?;
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let (opa, sender, caller, this) =
            (opa.clone(), sender.clone(), caller.clone(), this.clone());
        async move {
            let input = ext_authz_input(&request, &caller, &this)?;
            let allowed = opa.lock().await.query(QUERY, &input).await? == Some(Value::Bool(true));
            if !allowed {
                let mut denied = http::Response::new(http_body_util::Full::new(Bytes::new()));
                *denied.status_mut() = http::StatusCode::FORBIDDEN;
                return Ok::<_, anyhow::Error>(denied);
            }
            let forward = http::Request::get(request.uri().clone())
                .header(http::header::HOST, "bench")
                .body(Empty::new())?;
            let mut sender = sender.lock().await;
            sender.ready().await?;
            let answer = sender.send_request(forward).await?;
            let (parts, body) = answer.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok(http::Response::from_parts(
                parts,
                http_body_util::Full::new(body),
            ))
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}

/// OPA-Envoy's input for `request`, built as the proxy builds it for its own Rego.
fn ext_authz_input(
    request: &http::Request<hyper::body::Incoming>,
    caller: &SpiffeId,
    this: &SpiffeId,
) -> anyhow::Result<Value> {
    let header = |_: &http::HeaderName| None;
    tessera_mesh::policy::rego::input(&Request {
        source: Some(caller),
        destination: Some(this),
        request_principal: None,
        jwt_claims: None,
        port: 8080,
        http: Some(HttpRequest {
            method: request.method().as_str(),
            path: request.uri().path(),
            query: request.uri().query(),
            host: "bench",
            scheme: "http",
            protocol: "HTTP/1.1",
            header: &header,
            headers: Some(request.headers()),
        }),
    })
    .map_err(|failure| anyhow::anyhow!("input: {}", failure.as_str()))
}
