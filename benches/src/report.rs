//! The results of one run: what was measured ([`Report`]), printed as tables — the
//! issue's targets beside Tessera's and HAProxy's figures first — and written as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::control_plane::{CertifyFigures, PushFigures};
use crate::load::LoadResult;
use crate::proc_stats::Memory;
use crate::topology::PathKind;

/// What a measurement drove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// HTTP/1.1 GET of a small nginx response.
    Http1Small,
    /// gRPC unary calls over HTTP/2 (tonic server).
    GrpcUnary,
    /// HTTP/1.1 GET of a 64 KiB nginx file.
    Http1Body64k,
    /// 64-byte echo round trips over opaque TCP.
    TcpEcho,
}

impl Workload {
    pub const ALL: [Self; 4] = [
        Self::Http1Small,
        Self::GrpcUnary,
        Self::Http1Body64k,
        Self::TcpEcho,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Http1Small => "HTTP/1.1 small",
            Self::GrpcUnary => "HTTP/2 gRPC unary",
            Self::Http1Body64k => "HTTP/1.1 64 KiB",
            Self::TcpEcho => "TCP echo 64 B",
        }
    }
}

/// How the load was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    ClosedLoop,
    OpenLoop,
    /// Connect → echo → close: every request is a new connection.
    NewConnections,
}

/// CPU a proxy process used during one measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCpu {
    pub side: &'static str,
    pub cpu_seconds: f64,
    pub us_per_request: f64,
    pub seconds_per_10k_requests: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub path: PathKind,
    pub workload: Workload,
    pub mode: Mode,
    pub load: LoadResult,
    /// One entry per proxy process; empty for the direct path.
    pub cpu: Vec<ProcessCpu>,
}

impl Measurement {
    /// Both proxies' CPU per request, µs; `None` for the direct path.
    pub fn pair_us_per_request(&self) -> Option<f64> {
        (!self.cpu.is_empty()).then(|| self.cpu.iter().map(|c| c.us_per_request).sum())
    }

    /// Served requests are too few, or failures too many (over 1 %).
    pub fn failed(&self) -> bool {
        let total = self.load.completed + self.load.errors;
        self.load.completed == 0 || self.load.errors * 100 > total
    }
}

/// Memory of one proxy process over the run.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyMemory {
    pub path: PathKind,
    pub side: &'static str,
    /// Started, certified and configured, before any load.
    pub idle: Memory,
    /// VmHWM after every load run (before the idle-connections test).
    pub peak_rss_under_load: u64,
    /// With the idle connections open (client-side proxy's listener).
    pub with_idle_connections: Option<Memory>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleConnectionsFigure {
    pub path: PathKind,
    pub requested: usize,
    pub open: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub profile: String,
    pub notes: Vec<String>,
    pub skipped: Vec<String>,
    pub measurements: Vec<Measurement>,
    pub memory: Vec<ProxyMemory>,
    pub idle_connections: Vec<IdleConnectionsFigure>,
    pub certify: Option<CertifyFigures>,
    pub config_push: Option<PushFigures>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Report {
    pub fn find(&self, path: PathKind, workload: Workload, mode: Mode) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|m| m.path == path && m.workload == workload && m.mode == mode)
    }

    /// Every table, as printed.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        for skipped in &self.skipped {
            let _ = writeln!(out, "skipped: {skipped}");
        }
        self.render_targets(&mut out);
        self.render_throughput(&mut out);
        self.render_latency(&mut out);
        self.render_connections(&mut out);
        self.render_memory(&mut out);
        self.render_control_plane(&mut out);
        out
    }

    fn render_targets(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n== Targets (issue 7) vs this run: Tessera, and HAProxy as the same-run baseline =="
        );
        let _ = writeln!(
            out,
            "{:<46} {:>14} {:>16} {:>16}",
            "figure", "target", "tessera", "haproxy"
        );
        let pair = |path, workload, mode| {
            self.find(path, workload, mode)
                .and_then(Measurement::pair_us_per_request)
        };
        let cpu_rows = [
            (
                "CPU/request, HTTP/1.1, 64 connections",
                Workload::Http1Small,
                Mode::ClosedLoop,
                30.0,
            ),
            (
                "CPU/request, HTTP/2, 16 conns × 10 streams",
                Workload::GrpcUnary,
                Mode::ClosedLoop,
                20.0,
            ),
            (
                "CPU/request at a fixed rate (HTTP/1.1)",
                Workload::Http1Small,
                Mode::OpenLoop,
                120.0,
            ),
            (
                "CPU per new mTLS connection",
                Workload::TcpEcho,
                Mode::NewConnections,
                120.0,
            ),
        ];
        for (label, workload, mode, target) in cpu_rows {
            let value =
                |path| pair(path, workload, mode).map_or("-".into(), |v| format!("{v:.1} µs"));
            let _ = writeln!(
                out,
                "{label:<46} {:>14} {:>16} {:>16}",
                format!("≤ {target} µs"),
                value(PathKind::Tessera),
                value(PathKind::Haproxy)
            );
        }
        let added = |path| {
            self.added_latency(path, Workload::Http1Small)
                .map_or("-".into(), |(p50, p99)| format!("{p50:+.3}/{p99:+.3} ms"))
        };
        let _ = writeln!(
            out,
            "{:<46} {:>14} {:>16} {:>16}",
            "added p50 / p99 at a fixed rate (HTTP/1.1)",
            "≤ +0.2/+0.4 ms",
            added(PathKind::Tessera),
            added(PathKind::Haproxy)
        );
        let rss = |path| {
            let sides: Vec<&ProxyMemory> = self.memory.iter().filter(|m| m.path == path).collect();
            if sides.is_empty() {
                return "-".to_string();
            }
            let idle = sides.iter().map(|m| m.idle.rss).max().unwrap_or(0) as f64 / MIB;
            let peak = sides
                .iter()
                .map(|m| m.peak_rss_under_load)
                .max()
                .unwrap_or(0) as f64
                / MIB;
            format!("{idle:.1}/{peak:.1} MiB")
        };
        let _ = writeln!(
            out,
            "{:<46} {:>14} {:>16} {:>16}",
            "RSS per proxy (larger side), idle / peak",
            "≤ 8/≤ 20 MiB",
            rss(PathKind::Tessera),
            rss(PathKind::Haproxy)
        );
        let _ = writeln!(
            out,
            "(CPU figures add both proxy processes of the pair; 1 µs/request = 0.01 CPU s per 10,000 requests)"
        );
    }

    /// Added (p50, p99) over direct for the open-loop run, ms.
    pub fn added_latency(&self, path: PathKind, workload: Workload) -> Option<(f64, f64)> {
        let of = |p| self.find(p, workload, Mode::OpenLoop)?.load.latency;
        let (direct, through) = (of(PathKind::Direct)?, of(path)?);
        Some((
            (through.p50_us - direct.p50_us) / 1e3,
            (through.p99_us - direct.p99_us) / 1e3,
        ))
    }

    fn render_throughput(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n== Throughput, closed loop (CPU per request: client-side + server-side = pair) =="
        );
        let _ = writeln!(
            out,
            "{:<18} {:<8} {:>10} {:>7} {:>26} {:>11}  generator",
            "workload", "path", "req/s", "errors", "CPU µs/req cli+srv=pair", "pair s/10k"
        );
        for m in self
            .measurements
            .iter()
            .filter(|m| m.mode == Mode::ClosedLoop)
        {
            let _ = writeln!(
                out,
                "{:<18} {:<8} {:>10.0} {:>7} {:>26} {:>11}  {}",
                m.workload.label(),
                m.path.name(),
                m.load.per_second(),
                m.load.errors,
                cpu_split(m),
                m.pair_us_per_request()
                    .map_or("-".into(), |v| format!("{:.3}", v / 100.0)),
                m.load.generator
            );
        }
    }

    fn render_latency(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n== Latency, open loop at a fixed rate (from each request's intended send time) =="
        );
        let _ = writeln!(
            out,
            "{:<18} {:<8} {:>8} {:>8} {:>8} {:>8} {:>17} {:>26}  generator",
            "workload",
            "path",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "added p50/p99 ms",
            "CPU µs/req cli+srv=pair"
        );
        for m in self
            .measurements
            .iter()
            .filter(|m| m.mode == Mode::OpenLoop)
        {
            let Some(latency) = m.load.latency else {
                continue;
            };
            let added = self
                .added_latency(m.path, m.workload)
                .filter(|_| m.path != PathKind::Direct)
                .map_or("-".into(), |(p50, p99)| format!("{p50:+.3}/{p99:+.3}"));
            let _ = writeln!(
                out,
                "{:<18} {:<8} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>17} {:>26}  {} ({} ok, {} errors)",
                m.workload.label(),
                m.path.name(),
                latency.p50_us / 1e3,
                latency.p99_us / 1e3,
                latency.p999_us / 1e3,
                latency.max_us / 1e3,
                added,
                cpu_split(m),
                m.load.generator,
                m.load.completed,
                m.load.errors
            );
        }
    }

    fn render_connections(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n== New connections (opaque TCP connect → echo → close; through HAProxy each is a new mTLS handshake, through Tessera a new stream on its pooled mTLS connection) =="
        );
        let _ = writeln!(
            out,
            "{:<8} {:>10} {:>7} {:>30}  generator",
            "path", "conn/s", "errors", "CPU µs/conn cli+srv=pair"
        );
        for m in self
            .measurements
            .iter()
            .filter(|m| m.mode == Mode::NewConnections)
        {
            let _ = writeln!(
                out,
                "{:<8} {:>10.0} {:>7} {:>30}  {}",
                m.path.name(),
                m.load.per_second(),
                m.load.errors,
                cpu_split(m),
                m.load.generator
            );
        }
    }

    fn render_memory(&self, out: &mut String) {
        let _ = writeln!(out, "\n== Memory per proxy process (MiB) ==");
        let _ = writeln!(
            out,
            "{:<8} {:<12} {:>9} {:>16} {:>24}",
            "path", "side", "idle RSS", "peak RSS (HWM)", "RSS, idle conns open"
        );
        for m in &self.memory {
            let idle_connections = self.idle_connections.iter().find(|c| c.path == m.path);
            let with_idle = match (m.with_idle_connections, idle_connections) {
                (Some(memory), Some(count)) => {
                    format!("{:.1} ({} open)", memory.rss as f64 / MIB, count.open)
                }
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "{:<8} {:<12} {:>9.1} {:>16.1} {:>24}",
                m.path.name(),
                m.side,
                m.idle.rss as f64 / MIB,
                m.peak_rss_under_load as f64 / MIB,
                with_idle
            );
        }
    }

    fn render_control_plane(&self, out: &mut String) {
        let _ = writeln!(out, "\n== Control plane ==");
        if let Some(certify) = &self.certify {
            let _ = writeln!(
                out,
                "certificates signed: {:.0}/s ({} in total, {} errors), control-plane CPU {:.0} µs per certificate  [{}]",
                certify.per_second,
                certify.certificates,
                certify.errors,
                certify.cpu_us_per_certificate,
                certify.generator
            );
        }
        if let Some(push) = &self.config_push {
            let _ = writeln!(
                out,
                "config file change → last of {} discovery streams has the change: {:.1} ms (median stream {:.1} ms)",
                push.streams, push.last_stream_ms, push.median_stream_ms
            );
            let _ = writeln!(
                out,
                "control-plane memory per connected proxy: {:.1} KiB (RSS {:.1} → {:.1} MiB with {} streams, one mTLS connection each)",
                push.rss_bytes_per_stream / 1024.0,
                push.control_plane_rss_before as f64 / MIB,
                push.control_plane_rss_after as f64 / MIB,
                push.streams
            );
        }
    }
}

/// "12.3+10.1=22.4" µs per request, or "-" without proxies.
fn cpu_split(m: &Measurement) -> String {
    match m.cpu.as_slice() {
        [] => "-".into(),
        sides => {
            let parts: Vec<String> = sides
                .iter()
                .map(|c| format!("{:.1}", c.us_per_request))
                .collect();
            format!(
                "{}={:.1}",
                parts.join("+"),
                m.pair_us_per_request().unwrap_or_default()
            )
        }
    }
}
