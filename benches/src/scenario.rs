//! What a run measures, in which order: start every path, then for each workload drive
//! every path in turn (closed loop, then open loop), then new connections, memory with
//! idle connections, and the control plane. Paths take turns within each workload so a
//! noisy neighbour on the machine hurts them alike.

use std::time::Duration;

use crate::control_plane::Harness;
use crate::error::Result;
use crate::load::{HttpRequest, LoadResult, echo, h2load, idle::IdleConnections, open_loop, wrk};
use crate::proc_stats;
use crate::process::system_tool;
use crate::report::{
    IdleConnectionsFigure, Measurement, Mode, ProcessCpu, ProxyMemory, Report, Workload,
};
use crate::topology::backends::Backends;
use crate::topology::haproxy::HaproxyPair;
use crate::topology::tessera::TesseraPair;
use crate::topology::{Path, PathKind};

/// How long and how hard each measurement runs.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub name: &'static str,
    pub closed_loop: Duration,
    pub open_loop: Duration,
    pub new_connections: Duration,
    pub rate_per_second: u32,
    pub idle_connections: usize,
    pub discovery_streams: usize,
    pub certify: Duration,
    /// Runs of each load measurement; the one with the median figure is reported.
    pub repeat: usize,
}

impl Plan {
    /// The full run: ~5 s per measurement.
    pub fn all() -> Self {
        Self {
            name: "all",
            closed_loop: Duration::from_secs(5),
            open_loop: Duration::from_secs(5),
            new_connections: Duration::from_secs(5),
            rate_per_second: 1_000,
            idle_connections: 1_000,
            discovery_streams: 1_000,
            certify: Duration::from_secs(5),
            repeat: 1,
        }
    }

    /// Just enough to show every path serves every workload (CI): no timing asserted.
    pub fn smoke() -> Self {
        Self {
            name: "smoke",
            closed_loop: Duration::from_secs(1),
            open_loop: Duration::from_millis(300),
            new_connections: Duration::from_millis(300),
            rate_per_second: 200,
            idle_connections: 50,
            discovery_streams: 50,
            certify: Duration::from_millis(500),
            repeat: 1,
        }
    }
}

/// Fixed concurrency of the closed-loop runs (the issue's).
const HTTP1_CONNECTIONS: usize = 64;
const H2_CONNECTIONS: usize = 16;
const H2_STREAMS: usize = 10;
const ECHO_CONNECTIONS: usize = 64;
/// Connect-echo-close loops in parallel.
const NEW_CONNECTION_LOOPS: usize = 16;
/// Open loop: connections, and streams per HTTP/2 connection.
const OPEN_LOOP_CONNECTIONS: usize = 32;
const OPEN_LOOP_H2_CONNECTIONS: usize = 4;
const OPEN_LOOP_H2_STREAMS: usize = 8;
const CERTIFY_CLIENTS: usize = 8;

/// The tools a run needs from the system, and whether each is there.
struct Tools {
    nginx: bool,
    haproxy: bool,
    wrk: bool,
    h2load: bool,
}

impl Tools {
    fn detect() -> Self {
        Self {
            nginx: system_tool("nginx").is_some(),
            haproxy: system_tool("haproxy").is_some(),
            wrk: system_tool("wrk").is_some(),
            h2load: system_tool("h2load").is_some(),
        }
    }

    fn missing(&self) -> Vec<String> {
        [
            (self.nginx, "nginx (HTTP/1.1 workloads)"),
            (self.haproxy, "haproxy (the HAProxy path)"),
            (self.wrk, "wrk (HTTP/1.1 closed loop)"),
            (
                self.h2load,
                "h2load from nghttp2-client (HTTP/2 closed loop)",
            ),
        ]
        .into_iter()
        .filter(|(present, _)| !present)
        .map(|(_, what)| format!("{what}: not installed"))
        .collect()
    }
}

pub async fn run(plan: Plan) -> Result<Report> {
    let tools = Tools::detect();
    let mut report = Report {
        profile: plan.name.to_string(),
        notes: notes(plan),
        skipped: tools.missing(),
        ..Report::default()
    };
    let topology = Topology::start(&tools).await?;
    let paths = &topology.paths;
    let idle_memory = read_memory(paths)?;
    for workload in Workload::ALL {
        if tools.nginx || !matches!(workload, Workload::Http1Small | Workload::Http1Body64k) {
            measure_workload(paths, workload, plan, &tools, &mut report).await?;
        }
    }
    measure_rounds(paths, plan, &mut report, |index| async move {
        let path = &paths[index];
        let measurement = measure(path, Workload::TcpEcho, Mode::NewConnections, || {
            echo::connection_rate(path.entry.tcp, NEW_CONNECTION_LOOPS, plan.new_connections)
        })
        .await?;
        Ok(Some(measurement))
    })
    .await?;
    let peak_memory = read_memory(paths)?;
    let with_idle = if tools.nginx {
        measure_idle_connections(paths, plan, &mut report).await?
    } else {
        Vec::new()
    };
    report.memory = merge_memory(idle_memory, peak_memory, with_idle);
    let harness = Harness::new(&topology.tessera.control_plane)?;
    report.certify = Some(harness.certify_rate(CERTIFY_CLIENTS, plan.certify).await?);
    report.config_push = Some(harness.config_push(plan.discovery_streams).await?);
    Ok(report)
}

/// Closed loop on every path, then open loop on every path, for one workload.
async fn measure_workload(
    paths: &[Path],
    workload: Workload,
    plan: Plan,
    tools: &Tools,
    report: &mut Report,
) -> Result<()> {
    measure_rounds(paths, plan, report, |index| {
        closed_loop(&paths[index], workload, plan, tools)
    })
    .await?;
    measure_rounds(paths, plan, report, |index| async move {
        open_loop(&paths[index], workload, plan).await.map(Some)
    })
    .await
}

/// Runs `run` (given a path's index) `plan.repeat` times on every path, the paths taking
/// turns so a noisy moment hits them alike, and records each path's median run.
async fn measure_rounds<F, Fut>(
    paths: &[Path],
    plan: Plan,
    report: &mut Report,
    run: F,
) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Measurement>>>,
{
    let mut runs: Vec<Vec<Measurement>> = paths.iter().map(|_| Vec::new()).collect();
    for _ in 0..plan.repeat.max(1) {
        for (index, path_runs) in runs.iter_mut().enumerate() {
            if let Some(measurement) = run(index).await? {
                path_runs.push(measurement);
            }
        }
    }
    for path_runs in runs {
        if let Some(measurement) = median(path_runs) {
            record(report, measurement);
        }
    }
    Ok(())
}

/// The run with the median figure: CPU per request for a proxied path, else the
/// direct path's p50 latency (open loop) or throughput (closed loop).
fn median(mut runs: Vec<Measurement>) -> Option<Measurement> {
    let figure = |m: &Measurement| {
        m.pair_us_per_request()
            .unwrap_or_else(|| match &m.load.latency {
                Some(latency) => latency.p50_us,
                None => m.load.per_second(),
            })
    };
    runs.sort_by(|a, b| figure(a).total_cmp(&figure(b)));
    let middle = runs.len() / 2;
    (!runs.is_empty()).then(|| runs.swap_remove(middle))
}

/// Memory of each pair while `plan.idle_connections` HTTP/1.1 connections are held
/// open through its client-side proxy.
async fn measure_idle_connections(
    paths: &[Path],
    plan: Plan,
    report: &mut Report,
) -> Result<MemoryReadings> {
    let mut readings = Vec::new();
    for path in paths.iter().filter(|p| !p.proxies.is_empty()) {
        let connections =
            IdleConnections::open(path.entry.http1, "/small", plan.idle_connections).await?;
        // Let the proxies settle what each connection keeps.
        tokio::time::sleep(Duration::from_secs(1)).await;
        readings.extend(read_memory(std::slice::from_ref(path))?);
        report.idle_connections.push(IdleConnectionsFigure {
            path: path.kind,
            requested: plan.idle_connections,
            open: connections.open_count(),
        });
    }
    Ok(readings)
}

fn record(report: &mut Report, measurement: Measurement) {
    eprintln!("{}", progress(&measurement));
    report.measurements.push(measurement);
}

/// Every path, started; dropping this stops every process.
pub struct Topology {
    pub paths: Vec<Path>,
    pub tessera: TesseraPair,
    _haproxy: Option<HaproxyPair>,
    _backends: Backends,
}

impl Topology {
    async fn start(tools: &Tools) -> Result<Self> {
        let backends = Backends::start(tools.nginx).await?;
        let tessera = TesseraPair::start(backends.entry).await?;
        let haproxy = if tools.haproxy {
            Some(HaproxyPair::start(backends.entry).await?)
        } else {
            None
        };
        let direct = Path {
            kind: PathKind::Direct,
            entry: backends.entry,
            proxies: Vec::new(),
        };
        let paths = [
            Some(direct),
            Some(tessera.path()),
            haproxy.as_ref().map(HaproxyPair::path),
        ]
        .into_iter()
        .flatten()
        .collect();
        Ok(Self {
            paths,
            tessera,
            _haproxy: haproxy,
            _backends: backends,
        })
    }
}

/// Starts every path and keeps it up until Ctrl-C, printing where each workload
/// enters and the proxies' pids: for profiling a proxy under load by hand.
pub async fn hold() -> Result<()> {
    let tools = Tools::detect();
    let topology = Topology::start(&tools).await?;
    for path in &topology.paths {
        println!(
            "{:<8} http1 {}  grpc {}  tcp {}",
            path.kind.name(),
            path.entry.http1,
            path.entry.grpc,
            path.entry.tcp
        );
        for proxy in &path.proxies {
            println!("         {} pid {}", proxy.side, proxy.pid);
        }
    }
    println!("up; Ctrl-C stops everything");
    tokio::signal::ctrl_c()
        .await
        .map_err(crate::error::BenchError::io("wait for Ctrl-C"))
}

fn notes(plan: Plan) -> Vec<String> {
    let workers =
        std::env::var("TESSERA_PROXY_WORKERS").unwrap_or_else(|_| "the proxy's default".into());
    let binary = crate::topology::tessera::proxy_binary()
        .map_or_else(|e| e.to_string(), |path| path.display().to_string());
    vec![
        format!("tessera-proxy measured: {binary} (TESSERA_BENCH_PROXY names another build)"),
        format!("tessera-proxy worker threads: {workers} (set TESSERA_PROXY_WORKERS to compare)"),
        format!("profile {}: closed loop {:?}, open loop {:?} at {} req/s per run", plan.name, plan.closed_loop, plan.open_loop, plan.rate_per_second),
        format!("each load figure: the median of {} run(s), by pair CPU per request (direct path: by p50 or throughput)", plan.repeat.max(1)),
        "absolute numbers on a shared 2-core VM are noisy (load generators, servers and proxies share the cores); the same-run comparison is what counts".into(),
        "CPU: utime+stime of each proxy process from /proc/<pid>/stat before and after each run, divided by the requests served".into(),
        "Tessera between proxies: one pooled HTTP/2 mTLS connection carrying HTTP requests and opaque TCP connections (CONNECT streams); HAProxy between proxies: HTTP/1.1 for HTTP/1.1, h2 for gRPC, one connection per TCP connection; both TLS 1.3, client certificates verified, no session resumption".into(),
    ]
}

async fn closed_loop(
    path: &Path,
    workload: Workload,
    plan: Plan,
    tools: &Tools,
) -> Result<Option<Measurement>> {
    let duration = plan.closed_loop;
    let entry = path.entry;
    let measurement = match workload {
        Workload::Http1Small | Workload::Http1Body64k if tools.wrk => {
            let target = if workload == Workload::Http1Small {
                "/small"
            } else {
                "/64k"
            };
            measure(path, workload, Mode::ClosedLoop, || {
                wrk::run(entry.http1, target, HTTP1_CONNECTIONS, duration)
            })
            .await?
        }
        Workload::GrpcUnary if tools.h2load => {
            let request = HttpRequest::grpc_unary(entry.grpc);
            measure(path, workload, Mode::ClosedLoop, || {
                h2load::run(&request, H2_CONNECTIONS, H2_STREAMS, duration)
            })
            .await?
        }
        Workload::TcpEcho => {
            measure(path, workload, Mode::ClosedLoop, || {
                echo::closed_loop(entry.tcp, ECHO_CONNECTIONS, duration)
            })
            .await?
        }
        _ => return Ok(None),
    };
    Ok(Some(measurement))
}

async fn open_loop(path: &Path, workload: Workload, plan: Plan) -> Result<Measurement> {
    let entry = path.entry;
    let (target, connections, streams) = match workload {
        Workload::Http1Small => (
            open_loop::Target::Http(HttpRequest::get(entry.http1, "/small")),
            OPEN_LOOP_CONNECTIONS,
            1,
        ),
        Workload::Http1Body64k => (
            open_loop::Target::Http(HttpRequest::get(entry.http1, "/64k")),
            OPEN_LOOP_CONNECTIONS,
            1,
        ),
        Workload::GrpcUnary => (
            open_loop::Target::Http(HttpRequest::grpc_unary(entry.grpc)),
            OPEN_LOOP_H2_CONNECTIONS,
            OPEN_LOOP_H2_STREAMS,
        ),
        Workload::TcpEcho => (
            open_loop::Target::Echo {
                address: entry.tcp,
                payload_bytes: echo::PAYLOAD_BYTES,
            },
            OPEN_LOOP_CONNECTIONS,
            1,
        ),
    };
    let settings = open_loop::Settings {
        rate_per_second: plan.rate_per_second,
        duration: plan.open_loop,
        connections,
        streams_per_connection: streams,
    };
    measure(path, workload, Mode::OpenLoop, || {
        open_loop::run(&target, settings)
    })
    .await
}

/// Runs `load` and reads each proxy's CPU time around it.
async fn measure<F, Fut>(
    path: &Path,
    workload: Workload,
    mode: Mode,
    load: F,
) -> Result<Measurement>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<LoadResult>>,
{
    let before = cpu_times(path)?;
    let load = load().await?;
    let after = cpu_times(path)?;
    let requests = load.completed.max(1) as f64;
    let cpu = path
        .proxies
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(proxy, (before, after))| {
            let seconds = after.saturating_sub(*before).as_secs_f64();
            ProcessCpu {
                side: proxy.side,
                cpu_seconds: seconds,
                us_per_request: seconds * 1e6 / requests,
                seconds_per_10k_requests: seconds * 10_000.0 / requests,
            }
        })
        .collect();
    Ok(Measurement {
        path: path.kind,
        workload,
        mode,
        load,
        cpu,
    })
}

fn cpu_times(path: &Path) -> Result<Vec<Duration>> {
    path.proxies
        .iter()
        .map(|p| proc_stats::cpu_time(p.pid))
        .collect()
}

/// (path, side, memory) of every proxy process of `paths`.
fn read_memory(paths: &[Path]) -> Result<Vec<(PathKind, &'static str, proc_stats::Memory)>> {
    let mut all = Vec::new();
    for path in paths {
        for proxy in &path.proxies {
            all.push((path.kind, proxy.side, proc_stats::memory(proxy.pid)?));
        }
    }
    Ok(all)
}

type MemoryReadings = Vec<(PathKind, &'static str, proc_stats::Memory)>;

fn merge_memory(
    idle: MemoryReadings,
    peak: MemoryReadings,
    with_idle: MemoryReadings,
) -> Vec<ProxyMemory> {
    idle.into_iter()
        .map(|(path, side, idle)| {
            let find = |readings: &MemoryReadings| {
                readings
                    .iter()
                    .find(|(p, s, _)| *p == path && *s == side)
                    .map(|(_, _, memory)| *memory)
            };
            ProxyMemory {
                path,
                side,
                idle,
                peak_rss_under_load: find(&peak).map_or(0, |m| m.peak_rss),
                with_idle_connections: find(&with_idle),
            }
        })
        .collect()
}

fn progress(m: &Measurement) -> String {
    format!(
        "  {:<18} {:<8} {:<16} {:>9.0}/s  {} errors  pair CPU {}",
        m.workload.label(),
        m.path.name(),
        format!("{:?}", m.mode),
        m.load.per_second(),
        m.load.errors,
        m.pair_us_per_request()
            .map_or("-".into(), |v| format!("{v:.1} µs/req"))
    )
}

/// Shared by the binary: measurements that did not serve.
pub fn failures(report: &Report) -> Vec<String> {
    report
        .measurements
        .iter()
        .filter(|m| m.failed())
        .map(|m| {
            format!(
                "{} via {} ({:?}): {} served, {} errors",
                m.workload.label(),
                m.path.name(),
                m.mode,
                m.load.completed,
                m.load.errors
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ProcessCpu;

    fn run(path: PathKind, cpu_us: Option<f64>, per_second: u64) -> Measurement {
        Measurement {
            path,
            workload: Workload::TcpEcho,
            mode: Mode::ClosedLoop,
            load: LoadResult {
                generator: String::new(),
                completed: per_second,
                errors: 0,
                elapsed: Duration::from_secs(1),
                latency: None,
            },
            cpu: cpu_us
                .map(|us| ProcessCpu {
                    side: "client-side",
                    cpu_seconds: 0.0,
                    us_per_request: us,
                    seconds_per_10k_requests: 0.0,
                })
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn the_median_run_is_reported() {
        let runs = vec![
            run(PathKind::Tessera, Some(50.0), 10),
            run(PathKind::Tessera, Some(30.0), 20),
            run(PathKind::Tessera, Some(40.0), 30),
        ];
        assert_eq!(median(runs).unwrap().pair_us_per_request(), Some(40.0));
        let direct = vec![
            run(PathKind::Direct, None, 900),
            run(PathKind::Direct, None, 100),
            run(PathKind::Direct, None, 500),
        ];
        assert_eq!(median(direct).unwrap().load.completed, 500);
        assert!(median(Vec::new()).is_none());
    }
}
