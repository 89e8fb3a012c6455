//! `tessera demo`: a whole mesh on loopback, no root and no cluster needed.
//!
//! A control plane and four workloads, each behind its own proxy, all configured the way
//! an operator would (resource files the control plane watches):
//! - `orders`, an HTTP service with two replicas; `orders-2` fails 30 % of its requests,
//!   and a RoutePolicy with retries hides that from callers;
//! - `payments`, an opaque TCP service;
//! - `frontend`, which calls both through its proxy.
//!
//! Three calls must be refused: a plaintext client knocking on an mTLS port, a proxy
//! told to expect a different identity than the server proves, and a DELETE that an
//! AuthorizationPolicy forbids; a refund that a Rego policy (evaluated in the orders
//! proxies) forbids must be denied with its rule named, and a burst of report requests
//! throttled by a RateLimitPolicy. At the end the demo
//! prints who talked to whom with which verified identity, what the retries masked,
//! certificate renewals and refusals — and fails if the mesh did not behave. With a
//! Jaeger (`--jaeger`, or a `jaeger` on PATH) every hop is traced, and the demo links to
//! a retried and a denied call in its UI.

mod policy;
mod traces;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tessera_mesh::SpiffeId;
use tessera_proxy::config::{
    ControlPlaneConfig, IdentityConfig, InboundPort, Limits, OutboundUpstream,
};
use tessera_proxy::{ProxyConfig, RunningProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::{self, RunningControlPlane};
pub use traces::Options as TraceOptions;
pub use traces::{JaegerPorts, all_in_one_config as jaeger_config};

const NAMESPACE: &str = "shop";
/// Short, so renewals happen while the demo watches.
const DEMO_CERT_TTL: &str = "12s";
const LOCALHOST: [u8; 4] = [127, 0, 0, 1];
/// How often the flaky orders replica fails, in percent.
const FLAKY_PERCENT: u32 = 30;

const SERVICES: &str = "\
apiVersion: tessera.dev/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tessera.dev/v1alpha1
kind: RoutePolicy
metadata: {name: orders, namespace: shop}
spec:
  service: orders
  timeout: 2s
  retries:
    attempts: 3
    budget: {ratio: 0.5, minPerSecond: 10}
---
apiVersion: tessera.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-cancel, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: DENY
  rules:
  - to: [{operation: {methods: [DELETE]}}]
---
apiVersion: tessera.dev/v1alpha1
kind: Service
metadata: {name: payments, namespace: shop}
spec:
  ports: [{port: 9090, protocol: opaque}]
---
# Declared, called by no demo workload: no proxy holds them.
apiVersion: tessera.dev/v1alpha1
kind: Service
metadata: {name: inventory, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: tessera.dev/v1alpha1
kind: Service
metadata: {name: ledger, namespace: billing}
spec:
  ports: [{port: 8080, protocol: grpc}]
---
apiVersion: tessera.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger-callers, namespace: billing}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/billing/sa/payroll]}}]
";

/// Runs the demo for `duration`, or until Ctrl-C; returns an error if the mesh misbehaved.
pub async fn run(duration: Duration, traces: TraceOptions) -> anyhow::Result<()> {
    let workdir = std::env::temp_dir().join(format!("tessera-demo-{}", std::process::id()));
    let result = run_in(&workdir, duration, traces).await;
    let _ = std::fs::remove_dir_all(&workdir);
    result
}

async fn run_in(workdir: &Path, duration: Duration, traces: TraceOptions) -> anyhow::Result<()> {
    let config_dir = workdir.join("config");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(
        config_dir.join("mesh.yaml"),
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: demo\nspec:\n  trustDomain: cluster.local\n  certificateTtl: {DEMO_CERT_TTL}\n"
        ),
    )?;
    std::fs::write(config_dir.join("services.yaml"), SERVICES)?;
    std::fs::write(config_dir.join("limits.yaml"), policy::RATE_LIMITS)?;
    std::fs::write(config_dir.join("refunds.yaml"), policy::REFUNDS_REGO)?;
    let control_plane = app::start(app::Options {
        state_dir: workdir.join("state"),
        config_dir: config_dir.clone(),
        grpc_listen: SocketAddr::from((LOCALHOST, 0)),
        admin_listen: SocketAddr::from((LOCALHOST, 0)),
        webhook_listen: SocketAddr::from((LOCALHOST, 0)),
        inject: Default::default(),
        cluster: None,
    })
    .await?;
    println!(
        "Tessera demo: four workloads on loopback, for {}",
        humantime::format_duration(duration)
    );
    println!(
        "  control plane     gRPC+TLS {}   admin http://{}/metrics   config {}",
        control_plane.grpc_address,
        control_plane.admin_address,
        config_dir.display()
    );

    let jaeger = traces::Jaeger::find(traces, workdir).await;
    if let Some(jaeger) = &jaeger {
        println!("{}", jaeger.describe());
    }
    let tracing = jaeger.as_ref().map(traces::Jaeger::tracing_config);

    show_injection()?;

    let orders_1_app = start_orders("orders-1", 0, Duration::from_millis(3)).await?;
    let orders_2_app = start_orders("orders-2", FLAKY_PERCENT, Duration::from_millis(1)).await?;
    let payments_app = start_payments().await?;
    let orders_1 = start_proxy(
        &control_plane,
        workdir,
        "orders",
        Some(orders_1_app.address),
        vec![],
        tracing.clone(),
    )
    .await?;
    let orders_2 = start_proxy(
        &control_plane,
        workdir,
        "orders",
        Some(orders_2_app.address),
        vec![],
        tracing.clone(),
    )
    .await?;
    let payments = start_proxy(
        &control_plane,
        workdir,
        "payments",
        Some(payments_app),
        vec![],
        tracing.clone(),
    )
    .await?;
    // The workloads, as an operator (or Kubernetes) would register them once they run.
    std::fs::write(
        config_dir.join("workloads.yaml"),
        [
            workload("orders-1", "orders", orders_1.inbound_addresses[0]),
            workload("orders-2", "orders", orders_2.inbound_addresses[0]),
            workload("payments-1", "payments", payments.inbound_addresses[0]),
        ]
        .join("---\n"),
    )?;
    let any = SocketAddr::from((LOCALHOST, 0));
    let frontend = start_proxy(
        &control_plane,
        workdir,
        "frontend",
        None,
        vec![
            OutboundUpstream::service(any, "orders.shop".into()),
            OutboundUpstream::service(any, "payments.shop".into()),
            // Misconfigured on purpose: the server at orders-1's address is not payments.
            OutboundUpstream::fixed(
                any,
                orders_1.inbound_addresses[0].to_string(),
                identity("payments")?,
            ),
        ],
        tracing,
    )
    .await?;
    let proxies = [
        ("frontend", &frontend),
        ("orders-1", &orders_1),
        ("orders-2", &orders_2),
        ("payments", &payments),
    ];
    for (name, proxy) in proxies {
        wait_ready(proxy)
            .await
            .with_context(|| format!("{name} proxy never became ready"))?;
        let status = proxy.identity.status().context("no certificate status")?;
        println!(
            "  {name:<9} proxy   {}  serial {}  admin http://{}/certs",
            status.identity,
            &status.serial[..12],
            proxy.admin_address
        );
    }
    wait_for_endpoints(&frontend, &["orders.shop", "payments.shop"]).await?;
    show_what_proxies_hold(&control_plane, &proxies).await?;

    println!(
        "\nWhile it runs: {} stat{} --window 2s\n  or, the proxies the control plane knows: {} stat --control-plane-admin {} --window 2s\n  (this demo runs {}; `demo --duration 2m` leaves time to try it)",
        this_program(),
        proxies
            .iter()
            .map(|(_, p)| format!(" --proxy {}", p.admin_address))
            .collect::<String>(),
        this_program(),
        control_plane.admin_address,
        humantime::format_duration(duration)
    );
    let admins: Vec<String> = proxies
        .iter()
        .map(|(_, proxy)| proxy.admin_address.to_string())
        .collect();
    let traffic_start = crate::cli::Scrape::take(&admins).await.ok();
    println!(
        "\nDriving traffic: frontend → orders (HTTP, 2 replicas, one flaky) and frontend → payments (TCP)..."
    );
    let orders_route = frontend.outbound_addresses[0];
    let payments_route = frontend.outbound_addresses[1];
    let impostor_route = frontend.outbound_addresses[2];
    let stats = Arc::new(Stats::default());
    let deadline = Instant::now() + duration;
    let traffic = tokio::spawn(drive(stats.clone(), deadline, orders_route, payments_route));
    let interrupted = tokio::select! {
        _ = traffic => false,
        _ = tokio::signal::ctrl_c() => true,
    };

    println!("\nExpected refusals:");
    let plaintext_refused = !call(payments.inbound_addresses[0], "plaintext hello")
        .await
        .is_ok_and(|r| !r.is_empty());
    println!(
        "  plaintext client → payments' mTLS port            {}",
        verdict(plaintext_refused)
    );
    let impostor_refused = !call(impostor_route, "hello payments?")
        .await
        .is_ok_and(|r| !r.is_empty());
    println!(
        "  frontend expects payments, orders-1 answers       {}",
        verdict(impostor_refused)
    );
    let (traceparent, denied_trace) = traces::new_trace();
    let cancel_status = delete(orders_route, "/order/1", &traceparent)
        .await
        .unwrap_or_default();
    let cancel_denied = cancel_status == http::StatusCode::FORBIDDEN;
    println!(
        "  frontend DELETE /order/1 (shop/no-cancel, app=orders) {} ({cancel_status})",
        verdict(cancel_denied)
    );
    let refund_status = policy::send(orders_route, http::Method::POST, policy::REFUND_PATH)
        .await
        .unwrap_or_default();
    let refund_denied = refund_status == http::StatusCode::FORBIDDEN;
    println!(
        "  frontend POST {} (shop/refunds-opa: Rego in the proxy) {} ({refund_status})",
        policy::REFUND_PATH,
        verdict(refund_denied)
    );
    let rule = policy::explain_refund(&config_dir, identity("frontend")?);
    let rule_named = rule.as_ref().is_ok_and(|line| line.contains("deny: "));
    match &rule {
        Ok(line) => println!("      tessera policy explain → rego: {line}"),
        Err(error) => println!("      tessera policy explain failed: {error:#}"),
    }
    let throttled = policy::report_burst(orders_route)
        .await
        .unwrap_or_else(|error| {
            println!("  (report burst failed: {error:#})");
            policy::Throttled::default()
        });
    println!(
        "  frontend GET /reports/daily ×{} at once (shop/reports: 2/s, burst 5 per caller on each replica): {} served, {} throttled with 429 rate-limited, Retry-After: {}  {}",
        policy::BURST,
        throttled.served,
        throttled.limited,
        throttled.retry_after.as_deref().unwrap_or("-"),
        if throttled.as_expected() {
            "✔"
        } else {
            "✘"
        }
    );

    println!("\nWhat the proxies saw (from their /metrics):");
    let mut table = String::new();
    for (name, proxy) in proxies {
        let metrics = proxy.metrics.encode();
        for (labels, count) in series(&metrics, "tessera_tcp_connections_total") {
            // The other end: the destination of what this proxy sent, the source of
            // what it received.
            let peer = match label(&labels, "direction") {
                "outbound" => label(&labels, "destination_identity"),
                _ => label(&labels, "source_identity"),
            };
            let _ = writeln!(
                table,
                "  {name:<9} {:<9} {count:>5} mTLS connections with {peer}",
                label(&labels, "direction"),
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
        for (labels, count) in series(&metrics, "tessera_authz_decisions_total") {
            if label(&labels, "decision") == "deny" {
                let _ = writeln!(
                    table,
                    "  {name:<9} {:<9} {count:>5} denied by policy {}",
                    "inbound",
                    label(&labels, "policy")
                );
            }
        }
        for (labels, count) in series(&metrics, "tessera_rate_limited_total") {
            let _ = writeln!(
                table,
                "  {name:<9} {:<9} {count:>5} throttled by {} ({})",
                "inbound",
                label(&labels, "policy"),
                label(&labels, "limit")
            );
        }
        for (labels, count) in series(&metrics, "tessera_retries_total") {
            if count > 0.0 {
                let _ = writeln!(
                    table,
                    "  {name:<9} {:<9} {count:>5} retries to {}",
                    "outbound",
                    label(&labels, "destination_service")
                );
            }
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

    println!(
        "\nRED figures per workload over the run, as the serving proxies saw them (what `tessera stat` prints).\nSUCCESS counts every answer of the serving side, before the callers' retries: below it, what callers saw."
    );
    match crate::cli::Scrape::take(&admins).await {
        Ok(now) => print!(
            "{}",
            crate::cli::stat_table(&now.since(traffic_start.as_ref()))
        ),
        Err(error) => println!("  (stat failed: {error:#})"),
    }

    let orders_ok = stats.orders_ok.load(Ordering::Relaxed);
    let orders_failed = stats.orders_failed.load(Ordering::Relaxed);
    let payments_ok = stats.payments_ok.load(Ordering::Relaxed);
    let payments_failed = stats.payments_failed.load(Ordering::Relaxed);
    let flaky_failures = orders_2_app.failures.load(Ordering::Relaxed);
    println!(
        "\nOrders:   {orders_ok} answered, {orders_failed} failed. orders-1 served {}, orders-2 served {} and failed {flaky_failures} of them ({FLAKY_PERCENT} % flaky): the frontend proxy retried them, no caller saw one",
        orders_1_app.served.load(Ordering::Relaxed),
        orders_2_app.served.load(Ordering::Relaxed),
    );
    // Every payments call is a new TCP connection; the proxies tunnel each one as a
    // stream on the mTLS connection they keep, instead of a handshake per connection.
    let payments_mtls: f64 = series(&payments.metrics.encode(), "tessera_tcp_connections_total")
        .iter()
        .filter(|(labels, _)| label(labels, "direction") == "inbound")
        .map(|(_, count)| count)
        .sum();
    println!(
        "Payments: {payments_ok} answered, {payments_failed} failed: {} new TCP connections, carried between the proxies over {payments_mtls} mTLS connection(s)",
        payments_ok + payments_failed
    );
    let traces_arrived = match &jaeger {
        Some(jaeger) => {
            let retried = orders_2_app
                .failed_trace
                .lock()
                .ok()
                .and_then(|t| t.clone());
            let shown = jaeger
                .show(&[
                    ("a retried call (orders-2: 503)", retried),
                    ("the denied DELETE", Some(denied_trace)),
                ])
                .await;
            shown.map_err(|error| println!("  {error:#}")).is_ok()
        }
        None => true,
    };
    if interrupted {
        println!("(interrupted)");
    }
    let failed = orders_failed + payments_failed;
    if orders_ok == 0
        || payments_ok == 0
        || failed > 0
        || !plaintext_refused
        || !impostor_refused
        || !cancel_denied
        || !throttled.as_expected()
        || !refund_denied
        || !rule_named
        || !traces_arrived
    {
        bail!("the mesh did not behave as it should (see above)");
    }
    println!(
        "The mesh works: every byte above crossed mutual TLS between verified SPIFFE identities."
    );
    if let Some(jaeger) = jaeger.filter(|j| j.started_here()) {
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) && !interrupted {
            println!("Jaeger keeps these traces until you press Ctrl-C.");
            let _ = tokio::signal::ctrl_c().await;
        }
        drop(jaeger);
    }
    Ok(())
}

/// A Deployment as a team would write it, before injection.
const SAMPLE_DEPLOYMENT: &str = r#"{
  "apiVersion": "apps/v1", "kind": "Deployment",
  "metadata": {"name": "orders", "namespace": "shop"},
  "spec": {"template": {
    "metadata": {"labels": {"app": "orders"}},
    "spec": {"serviceAccountName": "orders", "containers": [{
      "name": "orders", "image": "shop/orders:1.4",
      "ports": [{"name": "http", "containerPort": 8080}],
      "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}}}]}}}}"#;

/// What `tessera inject` (and the webhook) add to a pod, shown on a sample Deployment.
fn show_injection() -> anyhow::Result<()> {
    use crate::inject::{self, Outcome, SkipReason};
    let mut deployment: serde_json::Value = serde_json::from_str(SAMPLE_DEPLOYMENT)?;
    let options = inject::Options::default();
    let outcome = inject::inject_object(&mut deployment, &options)?;
    let pod = &deployment["spec"]["template"]["spec"];
    let (Outcome::Injected, Some(init), Some(proxy)) = (
        outcome,
        pod["initContainers"].get(0),
        pod["initContainers"].get(1),
    ) else {
        bail!("injection did not add the sidecar: {outcome:?}");
    };
    let args: Vec<&str> = init["args"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let added: Vec<&str> = init["securityContext"]["capabilities"]["add"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    println!(
        "\nKubernetes injection (tessera inject, or the webhook on 15017) of Deployment shop/orders:"
    );
    println!(
        "  + init container {}: tessera-proxy {} (capabilities: {})",
        init["name"].as_str().unwrap_or("?"),
        args.join(" "),
        added.join(", ")
    );
    println!(
        "  + native sidecar {} (restartPolicy {}, UID {}, read-only root: {}), probes on 15020",
        proxy["name"].as_str().unwrap_or("?"),
        proxy["restartPolicy"].as_str().unwrap_or("?"),
        proxy["securityContext"]["runAsUser"],
        proxy["securityContext"]["readOnlyRootFilesystem"],
    );
    let probe = &pod["containers"][0]["readinessProbe"]["httpGet"];
    println!(
        "  ~ readinessProbe of orders → :{}{} (STRICT mTLS would refuse the kubelet's plaintext)",
        probe["port"],
        probe["path"].as_str().unwrap_or("?")
    );
    let again = inject::inject_object(&mut deployment, &options)?;
    if again != Outcome::Skipped(SkipReason::AlreadyInjected) {
        bail!("injecting twice changed the Deployment again: {again:?}");
    }
    println!("  injecting again changes nothing");
    Ok(())
}

#[derive(Default)]
struct Stats {
    orders_ok: AtomicU64,
    orders_failed: AtomicU64,
    payments_ok: AtomicU64,
    payments_failed: AtomicU64,
}

async fn drive(stats: Arc<Stats>, deadline: Instant, orders: SocketAddr, payments: SocketAddr) {
    let mut client = None;
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let ok = match get(&mut client, orders, &format!("/order/{n}")).await {
            Ok(body) => body.contains(&format!("order #{n}")),
            Err(_) => false,
        };
        let counter = if ok {
            &stats.orders_ok
        } else {
            &stats.orders_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(5) {
            let message = format!("charge #{n}");
            let ok = call(payments, &message)
                .await
                .is_ok_and(|reply| reply.ends_with(&message));
            let counter = if ok {
                &stats.payments_ok
            } else {
                &stats.payments_failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// One GET on a kept-alive HTTP/1.1 connection, reconnecting when it closed.
async fn get(
    client: &mut Option<Sender>,
    address: SocketAddr,
    path: &str,
) -> anyhow::Result<String> {
    if client.as_ref().is_none_or(Sender::is_closed) {
        let stream = TcpStream::connect(address).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        *client = Some(sender);
    }
    let sender = client.as_mut().context("no connection")?;
    sender.ready().await?;
    let request = http::Request::get(path)
        .header(http::header::HOST, "orders.shop")
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A DELETE on a fresh connection, in trace `traceparent`; returns the status.
async fn delete(
    address: SocketAddr,
    path: &str,
    traceparent: &str,
) -> anyhow::Result<http::StatusCode> {
    let stream = TcpStream::connect(address).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::delete(path)
        .header(http::header::HOST, "orders.shop")
        .header("traceparent", traceparent)
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(request).await?.status())
}

/// One request over a fresh TCP connection: send, half-close, read the whole answer.
async fn call(address: SocketAddr, message: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(message.as_bytes()).await?;
    stream.shutdown().await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply)).await??;
    Ok(reply)
}

/// An orders replica: answers "<name>: order #<n>", or 503 for `failure_percent` of them.
struct OrdersApp {
    address: SocketAddr,
    served: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    /// The trace of the first request it failed (the proxy's `traceparent`).
    failed_trace: Arc<std::sync::Mutex<Option<String>>>,
}

/// `work` is how long each order takes, so the balancer has latency to compare.
async fn start_orders(
    name: &'static str,
    failure_percent: u32,
    work: Duration,
) -> anyhow::Result<OrdersApp> {
    let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0))).await?;
    let address = listener.local_addr()?;
    let served = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let failed_trace = Arc::new(std::sync::Mutex::new(None));
    let counters = (served.clone(), failures.clone(), failed_trace.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counters = counters.clone();
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let (served, counter, failed_trace) = counters.clone();
                async move {
                    served.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(work).await;
                    let order = request
                        .uri()
                        .path()
                        .trim_start_matches("/order/")
                        .to_string();
                    let mut response = http::Response::new(Full::new(Bytes::from(format!(
                        "{name}: order #{order}"
                    ))));
                    if rand::random::<u32>() % 100 < failure_percent {
                        counter.fetch_add(1, Ordering::Relaxed);
                        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        if let Ok(mut first) = failed_trace.lock()
                            && first.is_none()
                        {
                            *first = traces::trace_id(request.headers());
                        }
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(OrdersApp {
        address,
        served,
        failures,
        failed_trace,
    })
}

/// The payments service: answers "payments got: <request>" over plain TCP.
async fn start_payments() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(SocketAddr::from((LOCALHOST, 0))).await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).await.is_ok() {
                    let reply = format!("payments got: {}", String::from_utf8_lossy(&request));
                    let _ = stream.write_all(reply.as_bytes()).await;
                }
            });
        }
    });
    Ok(address)
}

fn workload(name: &str, service: &str, address: SocketAddr) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec: {{service: {service}, serviceAccount: {service}, address: \"{address}\"}}\n"
    )
}

fn identity(service_account: &str) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::new("cluster.local", NAMESPACE, service_account)?)
}

async fn start_proxy(
    control_plane: &RunningControlPlane,
    workdir: &Path,
    service_account: &str,
    app: Option<SocketAddr>,
    outbound: Vec<OutboundUpstream>,
    tracing: Option<tessera_proxy::config::TracingConfig>,
) -> anyhow::Result<RunningProxy> {
    let token = control_plane.create_token(NAMESPACE, service_account, Duration::from_secs(600))?;
    let token_file: PathBuf =
        workdir.join(format!("{service_account}-{}.token", rand::random::<u32>()));
    std::fs::write(&token_file, token)?;
    let config = ProxyConfig {
        identity: IdentityConfig {
            trust_domain: control_plane.trust_domain.clone(),
            namespace: NAMESPACE.into(),
            service_account: service_account.into(),
            join_token_file: Some(token_file),
            service_account_token_file: None,
        },
        // What a pod's labels would be; the orders policy selects by them.
        labels: BTreeMap::from([("app".to_string(), service_account.to_string())]),
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
        tracing,
        access_log: false,
        transparent: None,
        app_probes: Default::default(),
    };
    Ok(tessera_proxy::start(config).await?)
}

/// Each proxy holds what it uses — the services it calls, its namespace's policies —
/// not the mesh; and each has acknowledged the configuration in force.
async fn show_what_proxies_hold(
    control_plane: &RunningControlPlane,
    proxies: &[(&str, &RunningProxy)],
) -> anyhow::Result<()> {
    let services = SERVICES.matches("\nkind: Service\n").count();
    println!(
        "\nWhat each proxy holds (discovery on demand; the mesh declares {services} services and policies in shop and billing):"
    );
    for (name, proxy) in proxies {
        let view = proxy.discovery.current().context("no configuration")?;
        let mut services: Vec<&str> = view.services.keys().map(String::as_str).collect();
        services.sort_unstable();
        let policies = view
            .authorization_policies
            .iter()
            .map(|p| p.id())
            .chain(view.rate_limit_policies.iter().map(|p| p.id()));
        println!(
            "  {name:<9} services: {:<28}  policies: {}",
            if services.is_empty() {
                "none (it calls none)".to_string()
            } else {
                services.join(", ")
            },
            policies.collect::<Vec<_>>().join(", ")
        );
    }
    let generation = u64::try_from(control_plane.metrics.config_generation.get()).unwrap_or(0);
    let rollout = || crate::cli::Rollout::of(generation, &control_plane.proxies.list());
    // Acknowledgements follow the answers by a round trip.
    let _ = wait_until(|| {
        let rollout = rollout();
        rollout.behind.is_empty() && rollout.proxies == proxies.len()
    })
    .await;
    let rollout = rollout();
    println!(
        "  configuration generation {generation} in force on {} of {} proxies (each acknowledged it; `/proxies` on the control plane's admin port)",
        rollout.in_force(),
        rollout.proxies
    );
    Ok(())
}

async fn wait_ready(proxy: &RunningProxy) -> anyhow::Result<()> {
    wait_until(|| proxy.identity.has_valid_cert() && proxy.discovery.has_view()).await
}

async fn wait_for_endpoints(proxy: &RunningProxy, services: &[&str]) -> anyhow::Result<()> {
    wait_until(|| {
        proxy.discovery.current().is_some_and(|view| {
            services.iter().all(|key| {
                view.services
                    .get(*key)
                    .is_some_and(|s| !s.endpoints.is_empty())
            })
        })
    })
    .await
    .context("the frontend proxy never learned the workloads")
}

async fn wait_until(condition: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
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

/// How to run this program again from here: `tessera` when that is what the shell finds,
/// else the path of this binary (after `cargo run`, it is not on PATH).
fn this_program() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "tessera".into();
    };
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("tessera") == exe));
    if on_path {
        return "tessera".into();
    }
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf));
    relative.unwrap_or(exe).display().to_string()
}
