//! The open-loop generator: requests are due at fixed times (`rate` per second), and
//! each one's latency is measured from the time it was *due*, not the time it was
//! finally sent. When the path stalls, requests queue here and the wait counts — so
//! coordinated omission cannot hide a stall the way a closed loop (which simply stops
//! sending) does. Latencies go into an HDR histogram (3 significant digits).
//!
//! A dedicated thread releases requests at their due times (sleep, then spin the last
//! stretch: tokio's timer only has millisecond resolution); a fixed set of workers, one
//! per in-flight slot, takes them from a queue and sends them on their connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

use crate::error::{BenchError, Result};
use crate::load::echo::echo_once;
use crate::load::http_client::Sender;
use crate::load::{HttpRequest, Latency, LoadResult};

pub const NAME: &str = "tessera-benches open-loop (hdrhistogram, latency from intended send time)";

/// Largest latency recorded, ns; longer ones are clamped.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// Sleep until this close to a due time, then spin.
const SPIN: Duration = Duration::from_micros(80);

/// What each request is.
#[derive(Debug, Clone)]
pub enum Target {
    Http(HttpRequest),
    /// Write `payload_bytes`, read them back, on a kept-open TCP connection.
    Echo {
        address: std::net::SocketAddr,
        payload_bytes: usize,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub rate_per_second: u32,
    pub duration: Duration,
    /// TCP connections opened before the first request.
    pub connections: usize,
    /// Requests in flight per connection (HTTP/2 only; 1 otherwise).
    pub streams_per_connection: usize,
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Self::Http(request) => {
                format!("{:?} {}{}", request.version, request.address, request.path)
            }
            Self::Echo { address, .. } => format!("echo at {address}"),
        }
    }
}

/// One worker's connection.
enum Connection {
    Http(Sender, Arc<HttpRequest>),
    Echo(TcpStream, Vec<u8>),
}

impl Connection {
    /// Opens a connection and sends one request on it, so that the path behind it (a
    /// proxy's upstream connection, its handshake) is in place before timing starts.
    async fn open(target: &Target) -> Result<Self> {
        let mut connection = Self::connect(target).await?;
        if connection.call().await {
            Ok(connection)
        } else {
            Err(BenchError::failed(
                "open-loop warm-up request",
                target.describe(),
            ))
        }
    }

    async fn connect(target: &Target) -> Result<Self> {
        match target {
            Target::Http(request) => Ok(Self::Http(
                Sender::connect(request).await?,
                Arc::new(request.clone()),
            )),
            Target::Echo {
                address,
                payload_bytes,
            } => {
                let stream = TcpStream::connect(address)
                    .await
                    .map_err(BenchError::io(format!("connect to {address}")))?;
                let _ = stream.set_nodelay(true);
                Ok(Self::Echo(stream, vec![0x5a; *payload_bytes]))
            }
        }
    }

    async fn call(&mut self) -> bool {
        match self {
            Self::Http(sender, request) => sender.send(request).await,
            Self::Echo(stream, payload) => echo_once(stream, payload).await.is_ok(),
        }
    }
}

/// Runs the schedule; fails only when connections cannot be opened at all.
pub async fn run(target: &Target, settings: Settings) -> Result<LoadResult> {
    let connections = open_connections(target, settings).await?;
    let total = (f64::from(settings.rate_per_second) * settings.duration.as_secs_f64()) as u64;
    let (due_times, queue) = mpsc::unbounded_channel::<Instant>();
    let queue = Arc::new(Mutex::new(queue));
    let workers: Vec<_> = connections
        .into_iter()
        .map(|connection| tokio::spawn(worker(connection, target.clone(), queue.clone())))
        .collect();
    let interval = Duration::from_secs_f64(1.0 / f64::from(settings.rate_per_second.max(1)));
    let start = Instant::now() + Duration::from_millis(5);
    let pacer = std::thread::spawn(move || pace(start, interval, total, due_times));
    let mut histogram = new_histogram();
    let (mut completed, mut errors) = (0, 0);
    for worker in workers {
        let tally = worker
            .await
            .map_err(|e| BenchError::failed("open-loop worker", e))?;
        let _ = histogram.add(&tally.histogram);
        completed += tally.completed;
        errors += tally.errors;
    }
    let _ = pacer.join();
    Ok(LoadResult {
        generator: format!(
            "{NAME}: {} req/s, {} connection(s) × {} in flight",
            settings.rate_per_second, settings.connections, settings.streams_per_connection
        ),
        completed,
        errors,
        elapsed: start.elapsed(),
        latency: Some(percentiles(&histogram)),
    })
}

/// One worker per in-flight slot; HTTP/2 workers share their connection.
async fn open_connections(target: &Target, settings: Settings) -> Result<Vec<Connection>> {
    let mut slots = Vec::new();
    for _ in 0..settings.connections {
        let connection = Connection::open(target).await?;
        if let Connection::Http(sender, request) = &connection {
            for _ in 1..settings.streams_per_connection.max(1) {
                if let Some(stream) = sender.another_stream() {
                    slots.push(Connection::Http(stream, request.clone()));
                }
            }
        }
        slots.push(connection);
    }
    Ok(slots)
}

/// Releases `total` due times, `interval` apart, each at its time.
fn pace(start: Instant, interval: Duration, total: u64, due_times: mpsc::UnboundedSender<Instant>) {
    for index in 0..total {
        let due = start + interval.mul_f64(index as f64);
        wait_until(due);
        if due_times.send(due).is_err() {
            return;
        }
    }
}

fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

struct Tally {
    histogram: Histogram<u64>,
    completed: u64,
    errors: u64,
}

async fn worker(
    mut connection: Connection,
    target: Target,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
) -> Tally {
    let mut tally = Tally {
        histogram: new_histogram(),
        completed: 0,
        errors: 0,
    };
    loop {
        let Some(due) = queue.lock().await.recv().await else {
            return tally;
        };
        if connection.call().await {
            tally.completed += 1;
            let latency = due.elapsed().as_nanos() as u64;
            tally
                .histogram
                .saturating_record(latency.min(MAX_LATENCY_NS));
        } else {
            tally.errors += 1;
            // A failed call may have broken the connection: start again on a new one.
            if let Ok(fresh) = Connection::open(&target).await {
                connection = fresh;
            }
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant histogram bounds are valid")
}

fn percentiles(histogram: &Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1_000.0;
    Latency {
        p50_us: us(histogram.value_at_quantile(0.50)),
        p99_us: us(histogram.value_at_quantile(0.99)),
        p999_us: us(histogram.value_at_quantile(0.999)),
        max_us: us(histogram.max()),
    }
}
