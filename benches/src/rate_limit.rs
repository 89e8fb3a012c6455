//! How closely a RateLimitPolicy holds its rate under overload: a real Tessera pair
//! whose server-side proxy carries a total limit on the HTTP service, and several
//! callers offering a multiple of it for a while, each on its own connection at a
//! fixed pace. Admitted is what the application answered (200); refused is the
//! proxy's 429. A token bucket admits its burst once plus the rate over the window, so
//! that is what the admitted count is compared with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tessera_tests::backend::HttpBackend;
use tessera_tests::l7::Http1Client;

use crate::error::{BenchError, Result};
use crate::topology::Entry;
use crate::topology::backends::Backends;
use crate::topology::tessera::{NAMESPACE, TesseraPair};

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The limit, requests a second.
    pub limit: u32,
    /// Tokens the bucket holds.
    pub burst: u32,
    /// Offered load as a multiple of the limit.
    pub overload: u32,
    /// Concurrent callers, each on its own connection.
    pub callers: u32,
    pub duration: Duration,
}

/// What was measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub limit_per_second: u32,
    pub burst: u32,
    pub callers: u32,
    pub seconds: f64,
    pub offered_per_second: f64,
    pub admitted_per_second: f64,
    /// What a token bucket admits in the window: the burst plus the rate over it.
    pub expected_admitted: f64,
    pub admitted: u64,
    pub refused: u64,
    /// Any other answer (or none): a broken run, not a limit.
    pub failed: u64,
    /// (admitted − expected) / expected, in percent.
    pub error_percent: f64,
}

impl Figures {
    pub fn render(&self) -> String {
        format!(
            "rate limit accuracy: limit {} req/s (burst {}), {} callers for {:.1} s\n  \
             offered   {:>9.1} req/s\n  admitted  {:>9.1} req/s ({} requests; expected {:.0} = burst + limit × time)\n  \
             refused   {:>9} (429)\n  other     {:>9}\n  error     {:>+9.2} %",
            self.limit_per_second,
            self.burst,
            self.callers,
            self.seconds,
            self.offered_per_second,
            self.admitted_per_second,
            self.admitted,
            self.expected_admitted,
            self.refused,
            self.failed,
            self.error_percent,
        )
    }
}

#[derive(Default)]
struct Counts {
    admitted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// Starts the pair, applies the limit, waits for a full bucket, then measures.
pub async fn run(settings: Settings) -> Result<Figures> {
    let http = HttpBackend::start("limited").await;
    let backends = Backends::start(false).await?;
    let pair = TesseraPair::start(Entry {
        http1: http.address,
        ..backends.entry
    })
    .await?;
    pair.control_plane.write_config(
        "rate-limit.yaml",
        &format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: bench, namespace: {NAMESPACE}}}\nspec:\n  limits:\n  - {{name: total, ports: [{}], requestsPerSecond: {}, burst: {}}}\n",
            http.address.port(),
            settings.limit,
            settings.burst
        ),
    )?;
    wait_until_limited(pair.entry.http1).await?;
    // Long enough for the bucket to fill again.
    let refill = Duration::from_secs_f64(f64::from(settings.burst) / f64::from(settings.limit));
    tokio::time::sleep(refill + Duration::from_millis(500)).await;
    measure(pair.entry.http1, settings).await
}

/// Calls until the proxy answers 429: the policy has arrived.
async fn wait_until_limited(entry: std::net::SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = Http1Client::connect(entry)
        .await
        .map_err(|e| BenchError::failed("connect to the client proxy", e))?;
    while Instant::now() < deadline {
        let answer = client
            .get("/")
            .await
            .map_err(|e| BenchError::failed("call through the pair", e))?;
        if answer.status == http::StatusCode::TOO_MANY_REQUESTS {
            return Ok(());
        }
    }
    Err(BenchError::failed(
        "apply the RateLimitPolicy",
        "no 429 within 20 s",
    ))
}

async fn measure(entry: std::net::SocketAddr, settings: Settings) -> Result<Figures> {
    let counts = Arc::new(Counts::default());
    let offered = f64::from(settings.limit) * f64::from(settings.overload);
    let interval = Duration::from_secs_f64(f64::from(settings.callers) / offered);
    let mut clients = Vec::new();
    for _ in 0..settings.callers {
        clients.push(
            Http1Client::connect(entry)
                .await
                .map_err(|e| BenchError::failed("connect to the client proxy", e))?,
        );
    }
    let started = Instant::now();
    let deadline = started + settings.duration;
    let callers: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(call_at_pace(client, interval, deadline, counts.clone())))
        .collect();
    for caller in callers {
        caller
            .await
            .map_err(|e| BenchError::failed("a caller task", e))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let admitted = counts.admitted.load(Ordering::Relaxed);
    let refused = counts.refused.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);
    let expected = f64::from(settings.burst) + f64::from(settings.limit) * seconds;
    Ok(Figures {
        limit_per_second: settings.limit,
        burst: settings.burst,
        callers: settings.callers,
        seconds,
        offered_per_second: (admitted + refused + failed) as f64 / seconds,
        admitted_per_second: admitted as f64 / seconds,
        expected_admitted: expected,
        admitted,
        refused,
        failed,
        error_percent: (admitted as f64 - expected) / expected * 100.0,
    })
}

/// One caller: a request every `interval` until `deadline` (a late tick is skipped, not
/// caught up in a burst).
async fn call_at_pace(
    mut client: Http1Client,
    interval: Duration,
    deadline: Instant,
    counts: Arc<Counts>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < deadline {
        ticks.tick().await;
        let counter = match client.get("/").await.map(|answer| answer.status) {
            Ok(http::StatusCode::OK) => &counts.admitted,
            Ok(http::StatusCode::TOO_MANY_REQUESTS) => &counts.refused,
            _ => &counts.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
