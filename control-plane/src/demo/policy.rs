//! The demo's request-level policies beyond allow and deny: a caller throttled by a
//! RateLimitPolicy on the orders replicas.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
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
