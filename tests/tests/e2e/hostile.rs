//! The hostile-peer suite: a real proxy pair attacked on loopback from raw HTTP/2 and
//! HTTP/1.1 frames (`tests/hostile/attack.py`), as a local application on the client
//! proxy's plaintext outbound listener and as a mesh peer with a valid certificate on
//! the server proxy's inbound mTLS port.
//!
//! Each attack asserts three things of both proxies: resident memory stays within
//! [`PEAK_BUDGET`] of what it was before; a well-behaved caller's requests (HTTP/1.1
//! and HTTP/2 alternately, through both proxies) keep succeeding while the attack runs;
//! and afterwards requests succeed, memory is back within [`AFTER_BUDGET`] and open
//! descriptors within [`FD_SLACK`] of before. Where the proxy is meant to notice the
//! attack (a header block that never ends, a head or body that never arrives, streams
//! beyond the limit it advertised), that is asserted too. Every figure is printed.

use std::time::Duration;

use Surface::{Inbound, Outbound};
use serde_json::Value;
use tessera_tests::hostile::{
    Attack, HostileMesh, LIMITS, Legit, MIB, RssSampler, Surface, attacker_available, open_fds,
    rss, rss_by_kind,
};

/// How far above its baseline a proxy's RSS may go during an attack. The baseline is
/// ~25 MiB (debug build); a bounded proxy holds per attacking connection at most its HTTP/2 windows
/// (1 MiB per connection, 256 KiB per stream) and per-stream state for the streams it
/// allows, and the attackers here use at most a few connections (or 5,000 idle ones at
/// ~8 KiB each, nginx's order of magnitude). The unbounded proxy of issue 21 grew by
/// 108 MiB on one connection's 3,000 streams.
const PEAK_BUDGET: u64 = 40 * MIB;
/// How far above its baseline RSS may remain once the attacker is gone (its connections
/// closed, the caller's recovery requests served): freed memory may stay in the
/// allocator's caches, but not most of what the attack took.
const AFTER_BUDGET: u64 = 24 * MIB;
/// Open descriptors allowed above the baseline after the attack (pooled connections the
/// well-behaved caller's recovery requests may have added).
const FD_SLACK: usize = 16;

/// The mesh, or `None` (and a message) when the attacker cannot run outside CI.
async fn mesh() -> Option<HostileMesh> {
    if !attacker_available() {
        return None;
    }
    Some(HostileMesh::start().await)
}

/// One proxy's readings.
struct Readings {
    name: &'static str,
    pid: u32,
    baseline_rss: u64,
    baseline_fds: usize,
}

/// Runs the attacks `launch` starts while the well-behaved caller runs, then checks the
/// three properties of both proxies; returns the attackers' reports.
async fn siege(
    mesh: &HostileMesh,
    name: &str,
    min_success: f64,
    launch: impl FnOnce(&HostileMesh) -> Vec<Attack>,
) -> Vec<Value> {
    // Warm-up: the pooled connections later requests reuse exist before the baseline.
    let warm = Legit::burst(mesh.entry(), 20).await;
    assert_eq!(
        warm.failed, 0,
        "{name}: before the attack: {:?}",
        warm.errors
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proxies: Vec<Readings> = [("client", &mesh.client), ("server", &mesh.server)]
        .into_iter()
        .map(|(name, proxy)| {
            let pid = proxy.process.pid();
            Readings {
                name,
                pid,
                baseline_rss: rss(pid),
                baseline_fds: open_fds(pid),
            }
        })
        .collect();
    let samplers: Vec<RssSampler> = proxies.iter().map(|p| RssSampler::start(p.pid)).collect();
    let backend_before = mesh.backend.requests();

    let legit = Legit::start(mesh.entry());
    let attacks = launch(mesh);
    let mut reports = Vec::new();
    for attack in attacks {
        let label = attack.label.clone();
        let report = attack.finish().await;
        eprintln!("{name}: {label}: {report}");
        reports.push(report);
    }
    let during = legit.finish().await;
    let mut peaks = Vec::new();
    for sampler in samplers {
        peaks.push(sampler.finish().await);
    }
    let backend_during = mesh.backend.requests() - backend_before;

    // Recovery: the attacker's connections are gone; descriptors come back as the proxy
    // notices, then new requests are served.
    for proxy in &proxies {
        tessera_tests::eventually(Duration::from_secs(10), || {
            open_fds(proxy.pid) <= proxy.baseline_fds + FD_SLACK
        })
        .await;
    }
    let after = Legit::burst(mesh.entry(), 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    eprintln!(
        "{name}: well-behaved caller during the attack: {}/{} ok ({:.1} %), {:?}; application saw {backend_during} requests",
        during.ok,
        during.total(),
        100.0 * during.success_ratio(),
        during.errors
    );
    if during.failed > 0 {
        // What the proxies said about it: the last warnings of each.
        for (label, proxy) in [("client", &mesh.client), ("server", &mesh.server)] {
            let warnings = proxy.process.logs.matching(&["WARN"]);
            for line in warnings.iter().rev().take(8).rev() {
                eprintln!("{name}: {label} proxy: {line}");
            }
        }
    }
    let mut failures = Vec::new();
    // A panic under attack is a bug of its own, and it would otherwise read as memory
    // growth: with RUST_BACKTRACE set, printing its backtrace maps and parses the debug
    // build's DWARF, +130 MiB of RSS that stays (measured with a binary of this size).
    for (label, proxy) in [("client", &mesh.client), ("server", &mesh.server)] {
        for panic in proxy.process.logs.panics() {
            failures.push(format!("{label} proxy panicked: {panic}"));
        }
    }
    for (proxy, peak) in proxies.iter().zip(peaks) {
        // Memory freed by closed connections goes back to the kernel within seconds (the
        // proxy trims after a fall in open connections, checked once a second).
        tessera_tests::eventually(Duration::from_secs(5), || {
            rss(proxy.pid) <= proxy.baseline_rss + AFTER_BUDGET
        })
        .await;
        let (after_rss, after_fds) = (rss(proxy.pid), open_fds(proxy.pid));
        let (anon, file) = rss_by_kind(proxy.pid);
        eprintln!(
            "{name}: {} proxy RSS baseline {:.1} MiB, peak {:.1} MiB (+{:.1}), after {:.1} MiB (+{:.1}; anonymous {:.1}, file-backed {:.1}); fds {} -> {}",
            proxy.name,
            mib(proxy.baseline_rss),
            mib(peak),
            mib(peak.saturating_sub(proxy.baseline_rss)),
            mib(after_rss),
            mib(after_rss.saturating_sub(proxy.baseline_rss)),
            mib(anon),
            mib(file),
            proxy.baseline_fds,
            after_fds,
        );
        if peak > proxy.baseline_rss + PEAK_BUDGET {
            failures.push(format!(
                "{} proxy RSS peaked at {:.1} MiB, more than {:.0} MiB above its baseline {:.1} MiB",
                proxy.name,
                mib(peak),
                mib(PEAK_BUDGET),
                mib(proxy.baseline_rss)
            ));
        }
        if after_rss > proxy.baseline_rss + AFTER_BUDGET {
            failures.push(format!(
                "{} proxy RSS after the attack {:.1} MiB, more than {:.0} MiB above its baseline {:.1} MiB",
                proxy.name,
                mib(after_rss),
                mib(AFTER_BUDGET),
                mib(proxy.baseline_rss)
            ));
        }
        if after_fds > proxy.baseline_fds + FD_SLACK {
            failures.push(format!(
                "{} proxy holds {after_fds} descriptors after the attack, {} before",
                proxy.name, proxy.baseline_fds
            ));
        }
    }
    if during.total() < 20 || during.success_ratio() < min_success {
        failures.push(format!(
            "well-behaved caller during the attack: {} of {} succeeded, {:.0} % required: {:?}",
            during.ok,
            during.total(),
            100.0 * min_success,
            during.errors
        ));
    }
    if after.failed > 0 {
        failures.push(format!(
            "well-behaved caller after the attack: {} of {} failed: {:?}",
            after.failed,
            after.total(),
            after.errors
        ));
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
    reports
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// Both sides at once: the local application's listener and the mesh peer's port.
fn both(mesh: &HostileMesh, attack: &str, args: &[&str]) -> Vec<Attack> {
    vec![
        mesh.attack(Outbound, attack, args),
        mesh.attack(Inbound, attack, args),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn rapid_reset_leaves_other_callers_unharmed() {
    let Some(mesh) = mesh().await else { return };
    // 100 HEADERS + RST_STREAM pairs per write; every tenth batch 20 requests the proxy
    // has forwarded (a slow answer, a 1 MiB answer) reset after it took them.
    siege(&mesh, "rapid reset", 1.0, |mesh| {
        both(
            mesh,
            "rapid-reset",
            &["--duration", "10", "--count", "50000"],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn continuation_flood_is_cut_off() {
    let Some(mesh) = mesh().await else { return };
    let reports = siege(&mesh, "CONTINUATION flood", 1.0, |mesh| {
        both(
            mesh,
            "continuation",
            &["--duration", "10", "--count", "200000"],
        )
    })
    .await;
    for report in reports {
        // A header block past the 64 KiB header limit is never held to its end.
        assert_eq!(report["full"]["cut_off"], true, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hpack_bomb_is_refused() {
    let Some(mesh) = mesh().await else { return };
    let reports = siege(&mesh, "HPACK bomb", 1.0, |mesh| {
        both(mesh, "hpack-bomb", &["--duration", "8", "--count", "50"])
    })
    .await;
    for report in reports {
        // The first request on each connection is a legitimate one; no bomb (a header
        // list decoding to ~190 MB) is forwarded.
        let forwarded = report["statuses"]["200"].as_u64().unwrap_or(0);
        let connections = report["connections"].as_u64().unwrap_or(0);
        assert!(forwarded <= connections, "bombs answered 200: {report}");
        assert!(report["totals"]["bombs"].as_u64() > Some(0), "{report}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_window_streams_stay_bounded() {
    let Some(mesh) = mesh().await else { return };
    // 4 connections, each with as many 1 MiB downloads as the proxy allows (at most
    // 500) and a window of 0 that never opens. They take every stream the server proxy
    // allows on the pooled connection between the proxies, and their unread answers its
    // connection-level window; shedding stalled answers frees only a few streams' worth
    // a check, so a request sharing that connection may wait until the proxy ends the
    // attacker's streams (the test proxies' streamIdleTimeout, under the well-behaved
    // caller's 5 s), and a few are reset with them: 95 %.
    siege(&mesh, "zero-window streams", 0.95, |mesh| {
        both(
            mesh,
            "zero-window",
            &["--duration", "10", "--count", "500", "--connections", "4"],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_few_zero_window_streams_are_shed() {
    if !attacker_available() {
        return;
    }
    // No timeout ends the stalled streams here (the default streamIdleTimeout, 5 min).
    let limits = LIMITS.replace("streamIdleTimeout: 2s", "streamIdleTimeout: 5m");
    let mesh = HostileMesh::start_with(&limits).await;
    // Four 1 MiB downloads never read: their answers fill the pooled connection's
    // window (4 streams of 256 KiB), and every request sharing that connection would
    // wait for its data for those 5 minutes. The proxies shed the stalled answers
    // within two stall checks (2 s), under the well-behaved caller's 5 s.
    siege(&mesh, "a few zero-window streams", 1.0, |mesh| {
        both(
            mesh,
            "zero-window",
            &["--duration", "10", "--count", "4", "--connections", "1"],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_flood_stays_bounded() {
    let Some(mesh) = mesh().await else { return };
    siege(&mesh, "SETTINGS flood", 1.0, |mesh| {
        both(
            mesh,
            "settings-flood",
            &["--duration", "8", "--count", "1000000"],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_flood_stays_bounded() {
    let Some(mesh) = mesh().await else { return };
    siege(&mesh, "PING flood", 1.0, |mesh| {
        both(
            mesh,
            "ping-flood",
            &["--duration", "8", "--count", "1000000"],
        )
    })
    .await;
}

/// Every connection of a slowloris report was closed by the proxy, within `seconds`.
fn assert_all_closed(report: &Value, seconds: f64) {
    let connections = report["connections"].as_u64().unwrap_or(0);
    assert!(connections > 0, "{report}");
    assert_eq!(
        report["closed_by_proxy"].as_u64(),
        Some(connections),
        "connections left open: {report}"
    );
    let last = report["last_closed_at"].as_f64().unwrap_or(f64::MAX);
    assert!(last <= seconds, "last closed after {last} s: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_heads_are_closed() {
    let Some(mesh) = mesh().await else { return };
    // Heads that never complete: HTTP/1.1 one byte every 200 ms (200 connections), and
    // HTTP/2 HEADERS without END_HEADERS on both sides (50 connections each). The test
    // proxies' headerReadTimeout is 2 s.
    let reports = siege(&mesh, "slowloris heads", 1.0, |mesh| {
        vec![
            mesh.attack(
                Outbound,
                "slow-head-http1",
                &[
                    "--duration",
                    "12",
                    "--connections",
                    "200",
                    "--interval",
                    "0.2",
                ],
            ),
            mesh.attack(
                Outbound,
                "slow-head-h2",
                &[
                    "--duration",
                    "12",
                    "--connections",
                    "50",
                    "--interval",
                    "0.2",
                ],
            ),
            mesh.attack(
                Inbound,
                "slow-head-h2",
                &[
                    "--duration",
                    "12",
                    "--connections",
                    "50",
                    "--interval",
                    "0.2",
                ],
            ),
        ]
    })
    .await;
    for report in &reports {
        assert_all_closed(report, 8.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_bodies_are_closed() {
    let Some(mesh) = mesh().await else { return };
    // Request bodies dripped one byte a second (issue 21's case, still open at 150 s)
    // and one byte every 3 s (silent past the 2 s requestBodyTimeout of the test
    // proxies), over HTTP/1.1 and HTTP/2 on both sides. HTTP/1.1 reaches the inbound
    // side as a mesh peer's `http/1.1` connection (what a PERMISSIVE port's plaintext
    // callers get too): there the proxy's own HTTP/1.1 server times the body.
    let reports = siege(&mesh, "slowloris bodies", 1.0, |mesh| {
        let mut attacks = Vec::new();
        for interval in ["1", "3"] {
            let args = [
                "--duration",
                "14",
                "--connections",
                "50",
                "--interval",
                interval,
            ];
            attacks.push(mesh.attack(Outbound, "slow-body-http1", &args));
            attacks.push(mesh.attack(Outbound, "slow-body-h2", &args));
            attacks.push(mesh.attack(Inbound, "slow-body-h2", &args));
            let http1 = [&args[..], &["--alpn", "http/1.1"]].concat();
            attacks.push(mesh.attack(Inbound, "slow-body-http1", &http1));
        }
        attacks
    })
    .await;
    for report in &reports {
        assert_all_closed(report, 12.0);
    }
    // The proxy's own answer, not the application's: the inbound HTTP/1.1 bodies end
    // in 408 at the first 2 s window.
    for report in reports.iter().filter(|r| r["attack"] == "slow-body-http1") {
        let answers = report["answers"].as_object().expect("answers");
        assert!(
            answers.keys().any(|line| line.contains(" 408 ")),
            "no 408 among {report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn five_thousand_idle_connections() {
    let Some(mesh) = mesh().await else { return };
    let connections = 5_000;
    // The proxy needs a descriptor per connection besides its own.
    raise_nofile(mesh.client.process.pid(), connections + 1024);
    // HTTP/2 preface and SETTINGS, then silence (issue 21: 2,000 still open after 80 s),
    // held 22 s. The test proxies' connectionIdleTimeout is 5 s: a connection idle for
    // 8 s is overdue. (A debug-build proxy on a busy machine accepts a few hundred
    // connections a second, so the last ones open late; `open_at_once` says how many
    // were open together.)
    let reports = siege(&mesh, "5,000 idle connections", 0.95, |mesh| {
        let connections = connections.to_string();
        vec![mesh.attack(
            Outbound,
            "idle",
            &[
                "--duration",
                "22",
                "--connections",
                &connections,
                "--grace",
                "8",
            ],
        )]
    })
    .await;
    let report = &reports[0];
    assert_eq!(
        report["connections"].as_u64(),
        Some(connections as u64),
        "{report}"
    );
    assert_eq!(
        report["overdue"].as_u64(),
        Some(0),
        "idle connections left open: {report}"
    );
    assert!(report["closed_by_proxy"].as_u64() > Some(0), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_per_connection_are_capped() {
    let Some(mesh) = mesh().await else { return };
    // One connection opens the limit the proxy advertises plus 200 uploads whose body
    // never comes, with a window of 0; held 6 s.
    let reports = siege(&mesh, "many streams on one connection", 0.95, |mesh| {
        both(mesh, "many-streams", &["--duration", "6", "--count", "200"])
    })
    .await;
    for report in reports {
        let advertised = report["max_concurrent_streams"].as_u64();
        assert!(
            advertised.is_some_and(|limit| limit <= 1000),
            "SETTINGS_MAX_CONCURRENT_STREAMS {advertised:?}, at most 1000 expected: {report}"
        );
        // Every stream beyond it is refused, or the connection is ended.
        let refused = report["refused_beyond_limit"].as_u64();
        assert!(
            refused == report["beyond_limit"].as_u64() || !report["goaway"].is_null(),
            "streams beyond the limit not refused: {report}"
        );
    }
}

/// Issue 21 item 7: a flood of connections took every descriptor, and the admin port
/// (`/live`, `/ready`, what the kubelet asks) could no longer accept. A client proxy
/// under a 256-file limit it cannot raise is held 300 connections: those landing in
/// the reserve are closed at once and counted, the admin port answers throughout, and
/// once the flood ends the mesh carries connections again.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_port_answers_when_descriptors_run_out() {
    use tessera_tests::{ControlPlane, EchoServer, Upstream, echo_roundtrip, spiffe};
    tessera_tests::init();
    let control_plane = ControlPlane::start("1h", "").await;
    let echo = EchoServer::start().await;
    let server = control_plane.proxy("server", Some(echo.address), &[]);
    let upstream = Upstream::fixed(server.inbound(), spiffe("server"));
    let client = control_plane.proxy_with_nofile("client", None, &[upstream], Some(256));
    for proxy in [&server, &client] {
        proxy.wait_ready(Duration::from_secs(20)).await.unwrap();
    }
    let mut flood = Vec::new();
    for _ in 0..300 {
        match tokio::net::TcpStream::connect(client.outbound(0)).await {
            Ok(stream) => flood.push(stream),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in ["/live", "/ready"] {
        let answer = tokio::time::timeout(Duration::from_secs(5), client.admin(path)).await;
        let status = answer.map(|answer| answer.map(|(status, _)| status));
        assert!(
            matches!(status, Ok(Ok(200))),
            "{path} under descriptor pressure: {status:?}"
        );
    }
    let (_, metrics) = client.admin("/metrics").await.unwrap();
    let refused: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("tessera_accept_errors_total{kind=\"reserve\"}"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        refused > 0.0,
        "no connection refused into the reserve:\n{metrics}"
    );
    drop(flood);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let echoed = echo_roundtrip(client.outbound(0), b"after the flood")
        .await
        .unwrap();
    assert_eq!(echoed, b"after the flood");
}

/// Raises a process's open-file limit to at least `wanted` (the attack needs the
/// proxy to have room for its connections; what is measured is the proxy, not the
/// machine's default limit).
fn raise_nofile(pid: u32, wanted: usize) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<usize>().ok())
        .unwrap_or(0);
    if soft >= wanted {
        return;
    }
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={wanted}:{wanted}"))
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "the proxy may open {soft} files, {wanted} needed: run the tests with `ulimit -n {wanted}` (or as root, with prlimit from util-linux)"
    );
}
