//! `tessera demo`: a whole mesh on loopback, no root and no cluster needed.
//!
//! A control plane, three services (frontend, orders, payments) each behind its own
//! proxy, traffic driven between them over mTLS (frontend calls orders, which calls
//! payments; frontend also calls payments directly), and two calls that must be refused: a
//! plaintext client knocking on an mTLS port, and a proxy told to expect a different
//! identity than the one the server proves. At the end it prints who talked to whom with
//! which verified identity, certificate renewals and refusals, and fails if the mesh did
//! not behave.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tessera_proto::SpiffeId;
use tessera_proxy::config::{
    ControlPlaneConfig, IdentityConfig, InboundPort, Limits, OutboundUpstream,
};
use tessera_proxy::{ProxyConfig, RunningProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::{self, RunningControlPlane};

const NAMESPACE: &str = "shop";
/// Short, so renewals happen while the demo watches.
const DEMO_CERT_TTL: &str = "12s";
const LOCALHOST: [u8; 4] = [127, 0, 0, 1];

/// Runs the demo for `duration`, or until Ctrl-C; returns an error if the mesh misbehaved.
pub async fn run(duration: Duration) -> anyhow::Result<()> {
    let workdir = std::env::temp_dir().join(format!("tessera-demo-{}", std::process::id()));
    let result = run_in(&workdir, duration).await;
    let _ = std::fs::remove_dir_all(&workdir);
    result
}

async fn run_in(workdir: &Path, duration: Duration) -> anyhow::Result<()> {
    let config_dir = workdir.join("config");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(
        config_dir.join("mesh.yaml"),
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: demo\nspec:\n  trustDomain: cluster.local\n  certificateTtl: {DEMO_CERT_TTL}\n"
        ),
    )?;
    let control_plane = app::start(app::Options {
        state_dir: workdir.join("state"),
        config_dir,
        grpc_listen: SocketAddr::from((LOCALHOST, 0)),
        admin_listen: SocketAddr::from((LOCALHOST, 0)),
    })
    .await?;
    println!(
        "Tessera demo: a mesh of three services on loopback, for {}",
        humantime::format_duration(duration)
    );
    println!(
        "  control plane    gRPC+TLS {}   admin http://{}/metrics",
        control_plane.grpc_address, control_plane.admin_address
    );

    let payments_app = start_service("payments", Arc::default()).await?;
    // Orders calls payments for every order, through the orders proxy.
    let orders_downstream: Arc<OnceLock<SocketAddr>> = Arc::default();
    let orders_app = start_service("orders", orders_downstream.clone()).await?;
    let payments = start_proxy(
        &control_plane,
        workdir,
        "payments",
        Some(payments_app),
        vec![],
    )
    .await?;
    let payments_in = payments.inbound_addresses[0];
    let orders = start_proxy(
        &control_plane,
        workdir,
        "orders",
        Some(orders_app),
        vec![upstream(payments_in, "payments")?],
    )
    .await?;
    let orders_in = orders.inbound_addresses[0];
    let _ = orders_downstream.set(orders.outbound_addresses[0]);
    let frontend = start_proxy(
        &control_plane,
        workdir,
        "frontend",
        None,
        vec![
            upstream(orders_in, "orders")?,
            upstream(payments_in, "payments")?,
            // Misconfigured on purpose: the server at orders' address is not payments.
            upstream(orders_in, "payments")?,
        ],
    )
    .await?;
    let proxies = [
        ("frontend", &frontend),
        ("orders", &orders),
        ("payments", &payments),
    ];
    for (name, proxy) in proxies {
        wait_ready(proxy)
            .await
            .with_context(|| format!("{name} proxy never got a certificate"))?;
        let status = proxy.identity.status().context("no certificate status")?;
        println!(
            "  {name:<9} proxy  {}  serial {}  admin http://{}/certs",
            status.identity,
            &status.serial[..12],
            proxy.admin_address
        );
    }

    println!(
        "\nDriving traffic: frontend → orders → payments, and frontend → payments (mTLS, identities verified both ways)..."
    );
    let frontend_to_orders = frontend.outbound_addresses[0];
    let frontend_to_payments = frontend.outbound_addresses[1];
    let impostor_route = frontend.outbound_addresses[2];
    let stats = Arc::new(Stats::default());
    let deadline = Instant::now() + duration;
    let traffic = tokio::spawn(drive(
        stats.clone(),
        deadline,
        [frontend_to_orders, frontend_to_payments],
    ));
    let interrupted = tokio::select! {
        _ = traffic => false,
        _ = tokio::signal::ctrl_c() => true,
    };

    println!("\nExpected refusals:");
    let plaintext_refused = !call(payments_in, "plaintext hello")
        .await
        .is_ok_and(|r| !r.is_empty());
    println!(
        "  plaintext client → payments' mTLS port          {}",
        verdict(plaintext_refused)
    );
    let impostor_refused = !call(impostor_route, "hello payments?")
        .await
        .is_ok_and(|r| !r.is_empty());
    println!(
        "  frontend expects payments, orders answers       {}",
        verdict(impostor_refused)
    );

    println!("\nWhat the proxies saw (from their /metrics):");
    let mut table = String::new();
    for (name, proxy) in proxies {
        let metrics = proxy.metrics.encode();
        for (labels, count) in series(&metrics, "tessera_tcp_connections_total") {
            let _ = writeln!(
                table,
                "  {name:<9} {:<9} {count:>5} mTLS connections with {}",
                label(&labels, "direction"),
                label(&labels, "peer_identity")
            );
        }
        for (labels, count) in series(&metrics, "tessera_tcp_connections_refused_total") {
            let _ = writeln!(
                table,
                "  {name:<9} {:<9} {count:>5} refused: {}",
                label(&labels, "direction"),
                label(&labels, "reason")
            );
        }
        let renewals = series(&metrics, "tessera_identity_cert_renewals_total")
            .first()
            .map_or(0.0, |(_, v)| *v);
        let _ = writeln!(
            table,
            "  {name:<9} certificates obtained: {renewals} (TTL {DEMO_CERT_TTL}, renewed at 50–70 %)"
        );
    }
    print!("{table}");

    let ok = stats.ok.load(Ordering::Relaxed);
    let failed = stats.failed.load(Ordering::Relaxed);
    println!(
        "\nRequests: {ok} answered, {failed} failed; refusals enforced: {}",
        plaintext_refused && impostor_refused
    );
    if interrupted {
        println!("(interrupted)");
    }
    if ok == 0 || failed > 0 || !plaintext_refused || !impostor_refused {
        bail!("the mesh did not behave as it should (see above)");
    }
    println!(
        "The mesh works: every byte above crossed mutual TLS between verified SPIFFE identities."
    );
    Ok(())
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    failed: AtomicU64,
}

async fn drive(stats: Arc<Stats>, deadline: Instant, routes: [SocketAddr; 2]) {
    let mut n = 0u64;
    while Instant::now() < deadline {
        for route in routes {
            n += 1;
            let message = format!("request #{n}");
            match call(route, &message).await {
                Ok(reply) if reply.ends_with(&message) => stats.ok.fetch_add(1, Ordering::Relaxed),
                _ => stats.failed.fetch_add(1, Ordering::Relaxed),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request over a fresh connection: send, half-close, read the whole answer.
async fn call(address: SocketAddr, message: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(message.as_bytes()).await?;
    stream.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply)).await??;
    Ok(reply)
}

/// A tiny service: answers "<name> got: <request>". With a downstream, it first asks that
/// service (through its own proxy) and appends the answer.
async fn start_service(
    name: &'static str,
    downstream: Arc<OnceLock<SocketAddr>>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0))).await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let downstream = downstream.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).await.is_err() {
                    return;
                }
                let request = String::from_utf8_lossy(&request);
                let mut reply = format!("{name} got: {request}");
                if let Some(next) = downstream.get() {
                    match call(*next, &request).await {
                        Ok(answer) => reply = format!("{name} asked → {answer}"),
                        Err(_) => reply = format!("{name}: downstream failed"),
                    }
                }
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok(address)
}

fn upstream(address: SocketAddr, service_account: &str) -> anyhow::Result<OutboundUpstream> {
    Ok(OutboundUpstream::fixed(
        SocketAddr::from((LOCALHOST, 0)),
        address.to_string(),
        SpiffeId::new("cluster.local", NAMESPACE, service_account)?,
    ))
}

async fn start_proxy(
    control_plane: &RunningControlPlane,
    workdir: &Path,
    service_account: &str,
    app: Option<SocketAddr>,
    outbound: Vec<OutboundUpstream>,
) -> anyhow::Result<RunningProxy> {
    let token = control_plane.create_token(NAMESPACE, service_account, Duration::from_secs(600))?;
    let token_file: PathBuf = workdir.join(format!("{service_account}.token"));
    std::fs::write(&token_file, token)?;
    let config = ProxyConfig {
        identity: IdentityConfig {
            trust_domain: control_plane.trust_domain.clone(),
            namespace: NAMESPACE.into(),
            service_account: service_account.into(),
            join_token_file: Some(token_file),
        },
        control_plane: ControlPlaneConfig {
            address: control_plane.grpc_address.to_string(),
            identity: None,
            trust_bundle_file: control_plane.trust_bundle_file.clone(),
        },
        admin: SocketAddr::from((LOCALHOST, 0)),
        inbound: app
            .map(|forward_to| InboundPort {
                listen: SocketAddr::from((LOCALHOST, 0)),
                forward_to,
            })
            .into_iter()
            .collect(),
        outbound,
        limits: Limits::default(),
    };
    Ok(tessera_proxy::start(config).await?)
}

async fn wait_ready(proxy: &RunningProxy) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.identity.has_valid_cert() {
        if Instant::now() > deadline {
            bail!("timed out");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn verdict(refused: bool) -> &'static str {
    if refused {
        "refused ✔"
    } else {
        "NOT REFUSED ✘"
    }
}

/// Samples of one metric from Prometheus text: (labels, value).
fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter_map(|rest| {
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

fn label<'a>(labels: &'a str, key: &str) -> &'a str {
    labels
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map_or("", |(_, v)| v.trim_matches('"'))
}
