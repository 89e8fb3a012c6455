//! Fleet scale (`tessera-benches fleet`): a control plane serving a large simulated mesh
//! (`mesh`) to many simulated proxies — discovery streams in this process, one mTLS
//! connection each (`subscriber`) — measured against the same run on a small mesh with
//! fewer streams; and one real proxy in both meshes (`proxy`). The mesh is read from
//! files, or in cluster mode from a real Kubernetes API server (`cluster`).
//!
//! For each mesh: how long the control plane takes to load it; its memory and CPU per
//! connected proxy; how long a change takes to reach the last stream that watches it,
//! and how many streams receive it; how long a restart takes until every stream has
//! resumed, and how many resources it resends.

pub mod cluster;
mod mesh;
pub mod proxy;
mod render;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::control_plane::{Connector, Harness};
use crate::error::{BenchError, Result};
use crate::proc_stats;
use crate::process::ScratchDir;
use crate::subscriber::{Arrival, ArrivalLog, Known, Subscriber, Subscription};
use crate::topology::tessera::{ControlPlane, NAMESPACE};
use cluster::{ClusterMesh, ObjectsCreated};
use mesh::Change;

pub use mesh::MeshShape;
use mesh::ServiceIndex;
pub use render::render;

/// Streams connecting at once: a fleet's proxies do not all handshake in the same
/// millisecond, and this process shares two cores with the control plane.
const CONNECTS_IN_FLIGHT: usize = 128;
/// A control plane loading a large mesh takes its time.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a change may take to reach its watchers before the run fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Names one stream subscribes to, one at a time, for the round-trip figure.
const NEW_SUBSCRIPTIONS: usize = 200;
/// After the last watcher has a change: how long to wait for messages to streams that
/// do not watch it (there should be none).
const STRAY_GRACE: Duration = Duration::from_millis(500);

/// Where the control plane reads the mesh from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Source {
    /// Resource files in its configuration directory.
    Files,
    /// Objects of a Kubernetes API server it watches (`--kubernetes`).
    Cluster,
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub source: Source,
    pub mesh: MeshShape,
    pub streams: usize,
    pub baseline_mesh: MeshShape,
    pub baseline_streams: usize,
    /// Services each simulated proxy watches (one of them watched by every proxy).
    pub services_per_stream: usize,
    /// Measure the simulated streams.
    pub streams_run: bool,
    /// Measure a real proxy.
    pub proxy: bool,
}

/// The figures of one mesh and fleet.
#[derive(Debug, Clone, Serialize)]
pub struct FleetFigures {
    pub source: Source,
    /// Cluster mode: creating the mesh's objects through the API, before the control
    /// plane starts.
    pub api_objects: Option<ObjectsCreated>,
    pub services: usize,
    pub endpoints: usize,
    pub streams: usize,
    /// Control plane started → serving (the mesh loaded).
    pub load_ms: f64,
    pub connect: ConnectFigures,
    /// An endpoint added to the service every stream watches.
    pub endpoint_everyone_watches: ChangeFigures,
    /// The mesh-wide (root namespace) policy edited.
    pub mesh_wide_policy: ChangeFigures,
    /// An endpoint added to the least-watched service.
    pub endpoint_few_watch: ChangeFigures,
    /// One stream subscribing to names it did not follow, one at a time, while every
    /// stream is connected: the round trip a proxy's first request to a service it has
    /// not resolved yet waits for.
    pub new_subscription: RoundTripFigures,
    pub restart: RestartFigures,
}

/// Every stream connecting and receiving what it subscribed to.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectFigures {
    pub seconds: f64,
    pub control_plane_rss_before: u64,
    pub control_plane_rss_after: u64,
    /// RSS growth divided by the streams.
    pub rss_bytes_per_stream: f64,
    /// Control-plane CPU while they connected and synced, divided by the streams.
    pub cpu_us_per_stream: f64,
}

/// One change to the mesh, as the streams received it.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeFigures {
    /// Streams subscribed to what changed.
    pub watchers: usize,
    /// Streams that received it.
    pub received: usize,
    /// Streams that received any message after the change (the watchers, ideally).
    pub streams_messaged: usize,
    /// File renamed into place → a stream has it, over the streams that received it:
    /// the first stream (the control plane's reload and first send), then the rest
    /// (the fan-out).
    pub first_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Subscribe → answered, over [`NEW_SUBSCRIPTIONS`] names.
#[derive(Debug, Clone, Serialize)]
pub struct RoundTripFigures {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The control plane killed and started again on the same configuration and state,
/// with one watched service edited while it was down.
#[derive(Debug, Clone, Serialize)]
pub struct RestartFigures {
    /// Started → serving again.
    pub serving_ms: f64,
    /// Started → every stream reconnected and holding the edit.
    pub all_resumed_ms: f64,
    /// Resources sent to the resuming streams.
    pub resources_resent: usize,
    /// What resuming without versions would have sent: every subscription again.
    pub full_resend: usize,
}

/// The baseline (small mesh, fewer streams), then the fleet; then the real proxy.
pub async fn run(settings: Settings) -> Result<(Vec<FleetFigures>, Option<proxy::ProxyFigures>)> {
    raise_open_files_limit()?;
    let mut figures = Vec::new();
    let runs = [
        (settings.baseline_mesh, settings.baseline_streams),
        (settings.mesh, settings.streams),
    ];
    for (shape, streams) in runs.into_iter().filter(|_| settings.streams_run) {
        eprintln!(
            "fleet: {} services, {} endpoints, {streams} streams",
            shape.services,
            shape.endpoints()
        );
        figures.push(
            measure(
                settings.source,
                shape,
                streams,
                settings.services_per_stream,
            )
            .await?,
        );
    }
    let proxy = if settings.proxy {
        Some(proxy::measure(settings.mesh).await?)
    } else {
        None
    };
    Ok((figures, proxy))
}

/// One mesh, one fleet of streams, every measurement.
async fn measure(
    source: Source,
    shape: MeshShape,
    streams: usize,
    per_stream: usize,
) -> Result<FleetFigures> {
    let subscriptions = subscriptions(shape, streams, per_stream);
    let (rare, rare_watchers) = least_watched(&subscriptions, shape);
    let everyone = |revision| Change::EndpointAdded {
        service: ServiceIndex::EVERYONE,
        revision,
    };
    let rare_change = Change::EndpointAdded {
        service: rare,
        revision: 0,
    };
    let dir = ScratchDir::new("fleet")?;
    let mesh = LoadedMesh::load(
        source,
        &dir,
        shape,
        &[everyone(0), rare_change, everyone(1)],
    )
    .await?;
    let started = Instant::now();
    let mut control_plane = mesh.start_control_plane(&dir).await?;
    let load_ms = millis(started.elapsed());

    let connector = {
        let harness = Harness::new(&control_plane)?;
        harness.connector(Some(harness.workload_cert().await?))?
    };
    let fleet = Fleet {
        connector,
        log: Arc::new(ArrivalLog::default()),
        mesh,
    };
    eprintln!("fleet: mesh loaded in {load_ms:.0} ms; connecting {streams} streams");
    let (subscribers, connect) = fleet
        .connect_measured(&control_plane, subscriptions.clone())
        .await?;

    eprintln!(
        "fleet: connected in {:.1} s; timing changes",
        connect.seconds
    );
    let watchers = |change: Change| {
        let resource = change.resource();
        subscriptions
            .iter()
            .filter(|s| s.names.contains(&resource))
            .count()
    };
    let endpoint_everyone_watches = fleet
        .time_change(&control_plane, everyone(0), watchers(everyone(0)))
        .await?;
    let policy = Change::MeshWidePolicy { revision: 1 };
    let mesh_wide_policy = fleet
        .time_change(&control_plane, policy, watchers(policy))
        .await?;
    let endpoint_few_watch = fleet
        .time_change(&control_plane, rare_change, rare_watchers)
        .await?;

    let new_subscription = fleet
        .time_new_subscriptions(&subscribers, &subscriptions, shape)
        .await?;

    eprintln!("fleet: restarting the control plane");
    let restart = fleet
        .restart(&mut control_plane, subscribers, subscriptions, everyone(1))
        .await?;
    Ok(FleetFigures {
        source,
        api_objects: fleet.mesh.created(),
        services: shape.services,
        endpoints: shape.endpoints(),
        streams,
        load_ms,
        connect,
        endpoint_everyone_watches,
        mesh_wide_policy,
        endpoint_few_watch,
        new_subscription,
        restart,
    })
}

/// The mesh where the control plane reads it.
enum LoadedMesh {
    /// Written into the configuration directory.
    Files,
    Cluster(Box<ClusterMesh>),
}

impl LoadedMesh {
    /// Puts the mesh in place, and what `changes` will need (cluster mode: their pods).
    async fn load(
        source: Source,
        dir: &ScratchDir,
        shape: MeshShape,
        changes: &[Change],
    ) -> Result<Self> {
        match source {
            Source::Files => {
                mesh::write(&dir.path().join("config"), shape)?;
                Ok(Self::Files)
            }
            Source::Cluster => {
                let mesh = ClusterMesh::create(shape, changes).await?;
                eprintln!(
                    "fleet: {} API objects created in {:.1} s",
                    mesh.created.objects, mesh.created.seconds
                );
                Ok(Self::Cluster(Box::new(mesh)))
            }
        }
    }

    async fn start_control_plane(&self, dir: &ScratchDir) -> Result<ControlPlane> {
        let args = match self {
            Self::Files => Vec::new(),
            Self::Cluster(mesh) => mesh.control_plane_args(),
        };
        ControlPlane::start_with(dir, LOAD_TIMEOUT, args).await
    }

    /// Makes `change` where the control plane reads it (running or not).
    async fn apply(&self, control_plane: &ControlPlane, change: Change) -> Result<()> {
        match self {
            Self::Files => {
                let (file, yaml) = mesh::change_file(change);
                control_plane.write_config(&file, &yaml)
            }
            Self::Cluster(mesh) => mesh.apply(change).await,
        }
    }

    fn created(&self) -> Option<ObjectsCreated> {
        match self {
            Self::Files => None,
            Self::Cluster(mesh) => Some(mesh.created.clone()),
        }
    }
}

/// What each simulated proxy subscribes to: its policies and `per_stream` services.
fn subscriptions(shape: MeshShape, streams: usize, per_stream: usize) -> Vec<Subscription> {
    let mut rng = mesh::subscription_rng();
    (0..streams)
        .map(|stream| {
            let mut names = vec!["policies".to_string()];
            names.extend(
                mesh::watched_services(shape, per_stream, &mut rng)
                    .into_iter()
                    .map(ServiceIndex::resource),
            );
            Subscription::fresh(stream, names)
        })
        .collect()
}

/// The simulated proxies of one run: how they connect, and what they received.
struct Fleet {
    connector: Connector,
    log: Arc<ArrivalLog>,
    mesh: LoadedMesh,
}

impl Fleet {
    /// Connects every subscription; what that cost the control plane.
    async fn connect_measured(
        &self,
        control_plane: &ControlPlane,
        subscriptions: Vec<Subscription>,
    ) -> Result<(Vec<Subscriber>, ConnectFigures)> {
        let streams = subscriptions.len().max(1) as f64;
        let pid = control_plane.process.pid();
        let (rss_before, cpu_before) = (proc_stats::memory(pid)?.rss, proc_stats::cpu_time(pid)?);
        let started = Instant::now();
        let subscribers = self.connect(subscriptions).await?;
        let seconds = started.elapsed().as_secs_f64();
        let cpu = proc_stats::cpu_time(pid)?.saturating_sub(cpu_before);
        // Let allocations settle before reading memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = proc_stats::memory(pid)?.rss;
        let figures = ConnectFigures {
            seconds,
            control_plane_rss_before: rss_before,
            control_plane_rss_after: rss_after,
            rss_bytes_per_stream: rss_after.saturating_sub(rss_before) as f64 / streams,
            cpu_us_per_stream: cpu.as_secs_f64() * 1e6 / streams,
        };
        Ok((subscribers, figures))
    }

    /// Connects every subscription, [`CONNECTS_IN_FLIGHT`] at a time; returns once each
    /// stream is synced.
    async fn connect(&self, subscriptions: Vec<Subscription>) -> Result<Vec<Subscriber>> {
        let total = subscriptions.len();
        let mut connecting = futures_util::stream::iter(
            subscriptions
                .into_iter()
                .map(|s| Subscriber::connect(&self.connector, s, self.log.clone())),
        )
        .buffer_unordered(CONNECTS_IN_FLIGHT);
        let mut subscribers = Vec::with_capacity(total);
        while let Some(subscriber) = connecting.next().await {
            subscribers.push(subscriber?);
        }
        Ok(subscribers)
    }

    /// Makes `change` and waits until `watchers` streams received it, then a little
    /// longer for messages to anyone else.
    async fn time_change(
        &self,
        control_plane: &ControlPlane,
        change: Change,
        watchers: usize,
    ) -> Result<ChangeFigures> {
        self.log.take();
        let resource = change.resource();
        let changed_at = Instant::now();
        self.mesh.apply(control_plane, change).await?;
        self.wait_for(&resource, watchers, changed_at + CHANGE_TIMEOUT)
            .await?;
        tokio::time::sleep(STRAY_GRACE).await;
        let arrivals = self.log.take();
        let delays = arrivals
            .iter()
            .filter(|a| a.resources.contains(&resource))
            .map(|a| a.at.saturating_duration_since(changed_at));
        let histogram = micros(delays)?;
        let ms = |us: u64| us as f64 / 1e3;
        Ok(ChangeFigures {
            watchers,
            received: histogram.len() as usize,
            streams_messaged: distinct_streams(&arrivals),
            first_ms: ms(histogram.min()),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        })
    }

    async fn wait_for(&self, resource: &str, streams: usize, deadline: Instant) -> Result<()> {
        while self.log.answers(resource) < streams {
            if Instant::now() > deadline {
                return Err(BenchError::failed(
                    format!("waiting for {resource}"),
                    format!(
                        "{} of {streams} streams received it",
                        self.log.answers(resource)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// One stream subscribes to services it does not follow (the mesh's least popular;
    /// names of no service once the mesh has none left), one at a time.
    async fn time_new_subscriptions(
        &self,
        subscribers: &[Subscriber],
        subscriptions: &[Subscription],
        shape: MeshShape,
    ) -> Result<RoundTripFigures> {
        let Some(subscriber) = subscribers.first() else {
            return Ok(RoundTripFigures {
                p50_ms: 0.0,
                p99_ms: 0.0,
            });
        };
        let held = &subscriptions[subscriber.stream()].names;
        let names = (0..shape.services)
            .rev()
            .map(|index| ServiceIndex(index).resource())
            .filter(|name| !held.contains(name))
            .chain((0..).map(|i| format!("service/absent-{i}.{NAMESPACE}")))
            .take(NEW_SUBSCRIPTIONS);
        let mut round_trips = Vec::with_capacity(NEW_SUBSCRIPTIONS);
        for name in names {
            round_trips.push(subscriber.round_trip(&name, &self.log).await?);
        }
        self.log.take();
        let histogram = micros(round_trips.into_iter())?;
        Ok(RoundTripFigures {
            p50_ms: histogram.value_at_quantile(0.50) as f64 / 1e3,
            p99_ms: histogram.value_at_quantile(0.99) as f64 / 1e3,
        })
    }

    /// Kills the control plane, makes `change` (to the service every stream watches)
    /// while it is down, starts it again and reconnects every stream with the versions
    /// it held.
    async fn restart(
        &self,
        control_plane: &mut ControlPlane,
        subscribers: Vec<Subscriber>,
        subscriptions: Vec<Subscription>,
        change: Change,
    ) -> Result<RestartFigures> {
        control_plane.kill();
        let mut held = closed_streams(subscribers).await?;
        self.mesh.apply(control_plane, change).await?;
        let resuming: Vec<Subscription> = subscriptions
            .into_iter()
            .map(|subscription| {
                let known = held.remove(&subscription.stream).unwrap_or_default();
                Subscription {
                    known,
                    synced_when: [change.resource()].into(),
                    ..subscription
                }
            })
            .collect();
        let full_resend = resuming.iter().map(|s| s.names.len()).sum();
        self.log.take();
        let started = Instant::now();
        control_plane.restart(LOAD_TIMEOUT).await?;
        let serving_ms = millis(started.elapsed());
        let _subscribers = self.connect(resuming).await?;
        let all_resumed_ms = millis(started.elapsed());
        let resources_resent = self.log.take().iter().map(|a| a.resources.len()).sum();
        Ok(RestartFigures {
            serving_ms,
            all_resumed_ms,
            resources_resent,
            full_resend,
        })
    }
}

/// Waits for every stream to end; what each held, by stream number.
async fn closed_streams(subscribers: Vec<Subscriber>) -> Result<HashMap<usize, Known>> {
    let mut closing: FuturesUnordered<_> =
        subscribers.into_iter().map(Subscriber::closed).collect();
    let mut held = HashMap::with_capacity(closing.len());
    let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
    while let Some(known) = tokio::time::timeout_at(deadline, closing.next())
        .await
        .map_err(|_| BenchError::failed("control plane killed", "streams still open after 60 s"))?
    {
        let (stream, known) = known?;
        held.insert(stream, known);
    }
    Ok(held)
}

/// The service with the fewest watchers (at least one), and how many.
fn least_watched(subscriptions: &[Subscription], shape: MeshShape) -> (ServiceIndex, usize) {
    let mut counts = HashMap::<String, usize>::new();
    for name in subscriptions.iter().flat_map(|s| &s.names) {
        *counts.entry(name.clone()).or_default() += 1;
    }
    (0..shape.services)
        .rev()
        .map(ServiceIndex)
        .filter_map(|service| counts.get(&service.resource()).map(|&n| (service, n)))
        .min_by_key(|&(_, n)| n)
        .unwrap_or((ServiceIndex::EVERYONE, subscriptions.len()))
}

fn distinct_streams(arrivals: &[Arrival]) -> usize {
    let streams: HashSet<usize> = arrivals.iter().map(|a| a.stream).collect();
    streams.len()
}

/// `samples` in a histogram of microseconds.
fn micros(samples: impl Iterator<Item = Duration>) -> Result<Histogram<u64>> {
    let mut histogram =
        Histogram::<u64>::new(3).map_err(|e| BenchError::failed("create a histogram", e))?;
    for sample in samples {
        histogram
            .record(sample.as_micros().max(1) as u64)
            .map_err(|e| BenchError::failed("record a sample", e))?;
    }
    Ok(histogram)
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Raises this process's open-file limit to its hard limit (children — the control
/// plane — inherit it): ten thousand streams are ten thousand sockets on each side.
/// `prlimit` from util-linux does it, so that this crate needs no unsafe code.
fn raise_open_files_limit() -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits")
        .map_err(BenchError::io("read /proc/self/limits"))?;
    let hard = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(4))
        .ok_or_else(|| BenchError::failed("read the open-file limit", "no Max open files line"))?
        .to_string();
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .map_err(BenchError::io("run prlimit"))?;
    if !status.success() {
        return Err(BenchError::failed(
            "raise the open-file limit with prlimit",
            status,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_watched_service_has_a_watcher() {
        let shape = MeshShape {
            services: 4,
            endpoints_per_service: 1,
        };
        let watching = |stream, services: &[usize]| {
            let names = services
                .iter()
                .map(|&i| ServiceIndex(i).resource())
                .collect();
            Subscription::fresh(stream, names)
        };
        // Service 3 is watched by nobody, service 2 by one stream.
        let subscriptions = [
            watching(0, &[0, 1, 2]),
            watching(1, &[0, 1]),
            watching(2, &[0]),
        ];
        assert_eq!(least_watched(&subscriptions, shape), (ServiceIndex(2), 1));
    }

    #[test]
    fn samples_are_kept_in_microseconds() {
        let histogram = micros((1..=100).map(Duration::from_millis)).unwrap();
        assert_eq!(histogram.len(), 100);
        assert_eq!(histogram.min(), 1_000);
        assert!(histogram.value_at_quantile(0.99).abs_diff(99_000) < 100);
        assert!(histogram.max().abs_diff(100_000) < 100);
    }
}
