//! The fleet figures as text: one column per run (the baseline first), the issue's
//! targets beside the rows they apply to.

use std::fmt::Write as _;

use super::proxy::ProxyFigures;
use super::proxy::transparent::Outcome;
use super::{ChangeFigures, FleetFigures, Source};

const KIB: f64 = 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

/// The table of every run, then the real proxy's figures when measured.
pub fn render(runs: &[FleetFigures], proxy: Option<&ProxyFigures>) -> String {
    let mut out = String::new();
    if !runs.is_empty() {
        render_streams(&mut out, runs);
    }
    if let Some(proxy) = proxy {
        render_proxy(&mut out, proxy);
    }
    out
}

fn render_streams(out: &mut String, runs: &[FleetFigures]) {
    let cluster = runs.iter().any(|r| r.source == Source::Cluster);
    out.push_str(if cluster {
        "== Fleet, cluster mode (kube-apiserver + etcd): control plane and simulated proxies ==\n"
    } else {
        "== Fleet: control plane and simulated proxies ==\n"
    });
    let row =
        |out: &mut String, label: &str, cell: &dyn Fn(&FleetFigures) -> String, target: &str| {
            let _ = write!(out, "{label:<58}");
            for run in runs {
                let _ = write!(out, " {:>26}", cell(run));
            }
            let _ = writeln!(out, "  {target}");
        };
    row(
        out,
        "services / endpoints",
        &|r| format!("{} / {}", r.services, r.endpoints),
        "",
    );
    row(
        out,
        "discovery streams (one mTLS connection each)",
        &|r| r.streams.to_string(),
        "",
    );
    if cluster {
        row(
            out,
            "API objects created before the start (writers), s",
            &|r| match &r.api_objects {
                Some(created) => format!(
                    "{} in {:.1} ({})",
                    created.objects, created.seconds, created.writers
                ),
                None => String::new(),
            },
            "",
        );
    }
    row(
        out,
        "control plane start → serving, ms",
        &|r| format!("{:.0}", r.load_ms),
        "",
    );
    row(
        out,
        "all streams connected and synced, s",
        &|r| format!("{:.1}", r.connect.seconds),
        "",
    );
    row(
        out,
        "control-plane RSS per connected proxy, KiB",
        &|r| format!("{:.1}", r.connect.rss_bytes_per_stream / KIB),
        "target ≤ 16",
    );
    row(
        out,
        "control-plane RSS before → after, MiB",
        &|r| {
            format!(
                "{:.0} → {:.0}",
                r.connect.control_plane_rss_before as f64 / MIB,
                r.connect.control_plane_rss_after as f64 / MIB
            )
        },
        "",
    );
    row(
        out,
        "control-plane CPU per proxy (connect+sync), µs",
        &|r| format!("{:.0}", r.connect.cpu_us_per_stream),
        "",
    );
    out.push_str(if cluster {
        "changes (API write sent → a stream has it):\n"
    } else {
        "changes (file renamed → a stream has it):\n"
    });
    for (title, change, target) in [
        (
            "all-watched service +1 endpoint",
            (|r: &FleetFigures| &r.endpoint_everyone_watches)
                as fn(&FleetFigures) -> &ChangeFigures,
            "target p99 < 1000 ms",
        ),
        (
            "mesh-wide policy edited",
            |r| &r.mesh_wide_policy,
            "target p99 < 1000 ms",
        ),
        (
            "least-watched service +1 endpoint",
            |r| &r.endpoint_few_watch,
            "",
        ),
    ] {
        row(
            out,
            &format!("  {title}: first/p50/p99/max, ms"),
            &|r| {
                let c = change(r);
                format!(
                    "{:.0} / {:.0} / {:.0} / {:.0}",
                    c.first_ms, c.p50_ms, c.p99_ms, c.max_ms
                )
            },
            target,
        );
        row(
            out,
            "    watchers / received it / streams messaged",
            &|r| {
                let c = change(r);
                format!("{} / {} / {}", c.watchers, c.received, c.streams_messaged)
            },
            "",
        );
    }
    row(
        out,
        "new subscription on an open stream → answer, p50/p99 ms",
        &|r| {
            let n = &r.new_subscription;
            format!("{:.2} / {:.2}", n.p50_ms, n.p99_ms)
        },
        "first request: target ≤ 5 added",
    );
    row(
        out,
        "restart: start → serving / all resumed, ms",
        &|r| {
            format!(
                "{:.0} / {:.0}",
                r.restart.serving_ms, r.restart.all_resumed_ms
            )
        },
        "",
    );
    row(
        out,
        "restart: resources resent (full resend)",
        &|r| format!("{} ({})", r.restart.resources_resent, r.restart.full_resend),
        "one edit made while down",
    );
}

fn render_proxy(out: &mut String, proxy: &ProxyFigures) {
    let _ = writeln!(
        out,
        "\n== Fleet: one real proxy, {} services used ==",
        proxy.services_used
    );
    let _ = writeln!(
        out,
        "client-side proxy RSS, {}-service mesh → {}-service mesh: {:.1} → {:.1} MiB ({:+.1} MiB; target ≤ +5)",
        proxy.small_mesh_services,
        proxy.large_mesh_services,
        proxy.rss_small_mesh as f64 / MIB,
        proxy.rss_large_mesh as f64 / MIB,
        (proxy.rss_large_mesh as f64 - proxy.rss_small_mesh as f64) / MIB,
    );
    let _ = writeln!(
        out,
        "request (connect, echo), µs p50/p99: service in use {:.0}/{:.0}; first to each of {} new services {:.0}/{:.0} (added p99 {:.2} ms; target ≤ 5)",
        proxy.known.p50_us,
        proxy.known.p99_us,
        proxy.new_services,
        proxy.first.p50_us,
        proxy.first.p99_us,
        (proxy.first.p99_us - proxy.known.p99_us) / 1e3,
    );
    render_transparent(out, proxy);
}

fn render_transparent(out: &mut String, proxy: &ProxyFigures) {
    let figures = match &proxy.transparent {
        Outcome::Measured(figures) => figures,
        Outcome::Skipped(reason) => {
            let _ = writeln!(out, "transparent mode skipped: {reason}");
            return;
        }
    };
    let _ = writeln!(
        out,
        "transparent mode (client-side proxy in a pod, {}-service mesh), connect to a virtual IP + echo, µs p50/p99:",
        figures.mesh_services,
    );
    let _ = writeln!(
        out,
        "  resolved {:.0}/{:.0}; first to each of {} never resolved {:.0}/{:.0}; first connections failed: {}",
        figures.known.p50_us,
        figures.known.p99_us,
        figures.new_services,
        figures.first.p50_us,
        figures.first.p99_us,
        figures.failed,
    );
    let added = |first: f64, known: f64| (first - known) / 1e3;
    let (p50, p99) = (
        added(figures.first.p50_us, figures.known.p50_us),
        added(figures.first.p99_us, figures.known.p99_us),
    );
    // A p99 less another p99 of 200 samples is noise; the split is read at p50.
    let _ = writeln!(
        out,
        "  added p50 {p50:.2} ms, p99 {p99:.2} ms (target ≤ 5 at p99); at p50, {:.2} ms of it is discovery, the rest a first connection (explicit mode's added)",
        p50 - added(proxy.first.p50_us, proxy.known.p50_us),
    );
    if let Some(failure) = &figures.first_failure {
        let _ = writeln!(out, "  first failure: {failure}");
    }
}
