//! The demo's request-level policies beyond allow and deny: a caller throttled by a
//! RateLimitPolicy on the orders replicas, and a request denied by Rego that the orders
//! proxies evaluate themselves (a CUSTOM AuthorizationPolicy), with the rule that denied
//! it named by `tessera policy explain`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tessera_mesh::SpiffeId;
use tokio::net::TcpStream;

/// The orders limits: reports are expensive, so each caller gets a few at a time.
pub(super) const RATE_LIMITS: &str = "\
apiVersion: tessera.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: reports, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  limits:
  - name: reports-per-caller
    match: {pathPrefix: /reports}
    requestsPerSecond: 2
    burst: 5
    key: identity
";

/// Refunds are for the payments service to issue: a Rego policy, as an Istio + OPA user
/// would write it, decides who may (OPA-Envoy's input, evaluated inside the proxy).
pub(super) const REFUNDS_REGO: &str = r#"apiVersion: tessera.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: refunds-opa, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: CUSTOM
  rules:
  - to: [{operation: {paths: ["/refunds/*"]}}]
  provider:
    name: opa
    rego:
      query: data.shop.refunds.allow
      modules:
      - name: refunds.rego
        source: |
          package shop.refunds
          import rego.v1
          default allow := false
          allow if count(deny) == 0
          deny contains "refunds are issued by payments only" if not refunder
          deny contains "refunds above 500 need a ticket" if {
            to_number(input.parsed_query.amount[0]) > 500
            not input.attributes.request.http.headers["x-ticket"]
          }
          refunder if data.refunders[_] == input.attributes.source.principal
      data:
        refunders: [spiffe://cluster.local/ns/shop/sa/payments]
"#;

/// The refund the frontend is not allowed to make.
pub(super) const REFUND_PATH: &str = "/refunds/7?amount=20";

/// Requests sent in one burst; with two replicas of burst 5 each, about half are served.
pub(super) const BURST: usize = 20;

/// What a burst of report requests met.
#[derive(Debug, Default)]
pub(super) struct Throttled {
    pub(super) served: usize,
    pub(super) limited: usize,
    /// Other answers (errors, other statuses): a well-behaved mesh has none.
    pub(super) other: usize,
    /// `Retry-After` of the first 429, when every 429 said `rate-limited`.
    pub(super) retry_after: Option<String>,
}

impl Throttled {
    /// Some served, some throttled the way the policy says, nothing else.
    pub(super) fn as_expected(&self) -> bool {
        self.served > 0 && self.limited > 0 && self.other == 0 && self.retry_after.is_some()
    }
}

/// One request on a fresh connection through `route`; returns the status.
pub(super) async fn send(
    route: SocketAddr,
    method: http::Method,
    path: &str,
) -> anyhow::Result<http::StatusCode> {
    let stream = TcpStream::connect(route).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "orders.shop")
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(request).await?.status())
}

/// The `rego:` line of `tessera policy explain` for the frontend's refund: the rule that
/// denied it, from the engine the proxies run.
pub(super) fn explain_refund(config_dir: &Path, frontend: SpiffeId) -> anyhow::Result<String> {
    let labels = BTreeMap::from([("app".to_string(), "orders".to_string())]);
    let (report, _) = crate::cli::explain(
        config_dir,
        &crate::cli::Hypothetical {
            from: Some(frontend),
            to: "orders.shop",
            port: 8080,
            method: Some("POST"),
            path: REFUND_PATH,
            host: None,
            headers: &[],
            request_principal: None,
            labels: &labels,
        },
    )?;
    report
        .lines()
        .find_map(|line| line.trim().strip_prefix("rego: "))
        .map(str::to_owned)
        .context("explain gave no Rego decision")
}

/// Sends [`BURST`] GETs of a report back to back on one connection through `route`.
pub(super) async fn report_burst(route: SocketAddr) -> anyhow::Result<Throttled> {
    let stream = TcpStream::connect(route).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut seen = Throttled::default();
    let mut all_said_why = true;
    for _ in 0..BURST {
        sender
            .ready()
            .await
            .context("orders closed the connection")?;
        let request = http::Request::get("/reports/daily")
            .header(http::header::HOST, "orders.shop")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        match response.status() {
            http::StatusCode::OK => seen.served += 1,
            http::StatusCode::TOO_MANY_REQUESTS => {
                seen.limited += 1;
                all_said_why &= header("tessera-proxy-error").as_deref() == Some("rate-limited");
                if seen.retry_after.is_none() {
                    seen.retry_after = header("retry-after");
                }
            }
            _ => seen.other += 1,
        }
        // Read to the end, so that the connection can carry the next request.
        response.into_body().collect().await?;
    }
    if !all_said_why {
        seen.retry_after = None;
    }
    Ok(seen)
}
