//! Transparent sidecars in network-namespace pods: unmodified applications (curl, a
//! gRPC client, redis-cli) reach servers in other pods by name; iptables from
//! `tessera-proxy init` hands their traffic to the proxies. Needs root; says SKIPPED
//! otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, Output};
use std::time::Duration;

use tessera_tests::l7::resource;
use tessera_tests::netns::{self, Network, Pod};
use tessera_tests::{ControlPlane, Process, TempDir, binary, eventually, init};

/// The proxy's UID, exempt from capture.
const PROXY_UID: u32 = 1337;
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const GRPC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const REDIS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
// Payloads that must never cross the bridge in clear.
const WEB_SECRET: &str = "web-payload-4c1f9e";
const PATH_SECRET: &str = "path-secret-77ab01";
const GRPC_SECRET: &str = "grpc-payload-b2d8aa";
const REDIS_SECRET: &str = "redis-payload-0e93c1";
// A payload that must cross in clear (passthrough): proves the capture sees payloads.
const OUTSIDE_PAYLOAD: &str = "outside-payload-5d0a2b";

/// A pod's sidecar: `tessera-proxy init`, then the proxy as UID 1337.
struct Sidecar {
    _dir: TempDir,
    process: Process,
    pod: Pod,
}

impl Sidecar {
    fn start(
        network: &Network,
        control_plane: &ControlPlane,
        pod: &Pod,
        service_account: &str,
        app_probes: &str,
    ) -> Self {
        let init = network
            .command(pod, binary("tessera-proxy"))
            .args(["init", "--exclude-inbound-ports", "15020"])
            .output()
            .expect("run tessera-proxy init");
        assert_success("tessera-proxy init", &init);

        // Files the unprivileged proxy can read.
        let dir = TempDir::new(&format!("pod-{service_account}"));
        let bundle = dir.path().join("root-cert.pem");
        std::fs::copy(control_plane.trust_bundle_file(), &bundle).expect("copy bundle");
        let token = dir.path().join("token");
        std::fs::write(&token, control_plane.token(service_account, "10m")).expect("token");
        let config = format!(
            "identity:\n  namespace: shop\n  serviceAccount: {service_account}\n  joinTokenFile: {}\ncontrolPlane:\n  address: {}\n  trustBundleFile: {}\nadmin: 0.0.0.0:15020\ntransparent: {{}}\n{app_probes}",
            token.display(),
            control_plane.address(),
            bundle.display(),
        );
        let process = Process::spawn(
            &format!("sidecar-{}", pod.name),
            network
                .command_as(pod, PROXY_UID, binary("tessera-proxy"))
                .args(["--log-format", "json", "run"])
                .env("TESSERA_PROXY_CONFIG", config)
                .env_remove("TESSERA_JOIN_TOKEN"),
        );
        Self {
            _dir: dir,
            process,
            pod: pod.clone(),
        }
    }

    async fn wait_ready(&self) {
        let ready = SocketAddr::from((self.pod.ip, 15020));
        let became_ready = eventually(Duration::from_secs(20), || {
            std::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "1"])
                .arg(format!("http://{ready}/ready"))
                .output()
                .is_ok_and(|o| o.stdout == b"200")
        })
        .await;
        assert!(
            became_ready,
            "sidecar in {} never became ready: {:?}",
            self.pod.name,
            self.process.logs.lines()
        );
    }
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Services with VIPs, workloads at pod addresses, and a policy: only `client` may call web.
fn mesh_config(web: &Pod, grpc: &Pod, redis: &Pod) -> String {
    [
        resource(
            "Service",
            "web",
            &format!("  addresses: [{WEB_VIP}]\n  ports: [{{port: 8080, protocol: http}}]\n"),
        ),
        resource(
            "Service",
            "grpc",
            &format!("  addresses: [{GRPC_VIP}]\n  ports: [{{port: 50051, protocol: grpc}}]\n"),
        ),
        resource(
            "Service",
            "redis",
            &format!("  addresses: [{REDIS_VIP}]\n  ports: [{{port: 6379, protocol: opaque}}]\n"),
        ),
        resource(
            "Workload",
            "web-1",
            &format!("  service: web\n  serviceAccount: web\n  address: {}:8080\n", web.ip),
        ),
        resource(
            "Workload",
            "grpc-1",
            &format!("  service: grpc\n  serviceAccount: grpc\n  address: {}:50051\n", grpc.ip),
        ),
        resource(
            "Workload",
            "redis-1",
            &format!("  service: redis\n  serviceAccount: redis\n  address: {}:6379\n", redis.ip),
        ),
        resource(
            "AuthorizationPolicy",
            "web-callers",
            "  selector: {serviceAccount: web}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}}]\n",
        ),
    ]
    .join("---\n")
}

/// Captures the bridge's TCP traffic to a file until stopped.
pub(crate) struct Capture {
    process: Process,
    file: std::path::PathBuf,
}

impl Capture {
    pub(crate) async fn start(network: &Network, dir: &TempDir) -> Self {
        let file = dir.path().join("bridge.pcap");
        let process = Process::spawn(
            "tcpdump",
            Command::new("tcpdump")
                // Immediate mode: packets still in the kernel ring when tcpdump is
                // stopped would otherwise never reach the file.
                .args([
                    "--immediate-mode",
                    "-i",
                    network.bridge(),
                    "-U",
                    "-s",
                    "0",
                    "-n",
                    "-w",
                ])
                .arg(&file)
                .arg("tcp"),
        );
        process
            .logs
            .wait_for(&["listening on"], Duration::from_secs(10))
            .await
            .expect("tcpdump starts");
        Self { process, file }
    }

    pub(crate) async fn stop(mut self) -> Vec<u8> {
        let _ = Command::new("kill")
            .args(["-INT", &self.process.pid().to_string()])
            .status();
        let _ = self.process.wait_exit(Duration::from_secs(5)).await;
        std::fs::read(&self.file).expect("read capture")
    }
}

/// A server outside the mesh, in the root namespace on `gateway`, answering `payload`;
/// its port.
pub(crate) fn outside_server(gateway: IpAddr, payload: &str) -> (Process, u16) {
    let port = tessera_tests::free_port();
    let server = Process::spawn(
        "outside-app",
        Command::new(binary("tessera-test-app")).args([
            "http-server",
            &SocketAddr::new(gateway, port).to_string(),
            payload,
        ]),
    );
    (server, port)
}

/// The capture saw `clear` (a passthrough call: else it proves nothing), none of
/// `secrets`, and at least `records` TLS 1.3 application-data records.
pub(crate) fn assert_encrypted(packets: &[u8], clear: &str, secrets: &[&str], records: usize) {
    assert!(
        contains(packets, clear.as_bytes()),
        "the capture must see clear payloads (the passthrough call) — else it proves nothing ({} bytes captured)",
        packets.len()
    );
    for secret in secrets {
        assert!(
            !contains(packets, secret.as_bytes()),
            "{secret} crossed the bridge in clear"
        );
    }
    // Record type 23, legacy version 3.3.
    let seen = packets
        .windows(3)
        .filter(|w| *w == [0x17, 0x03, 0x03])
        .count();
    assert!(
        seen >= records,
        "expected TLS records on the wire, saw {seen}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn unmodified_apps_talk_through_transparent_sidecars() {
    init();
    for tool in ["tcpdump", "redis-server", "redis-cli", "curl", "setpriv"] {
        if netns::unavailable().is_none() && !netns::on_path(tool) {
            panic!("{tool} is not installed: scripts/test.sh installs it when run as root");
        }
    }
    let Some(mut network) = Network::create().expect("create network") else {
        return;
    };
    let control_plane = ControlPlane::start_on(IpAddr::V4(network.gateway()), "1h", "").await;

    let web = network.add_pod("web").unwrap();
    let grpc = network.add_pod("grpc").unwrap();
    let redis = network.add_pod("redis").unwrap();
    let client = network.add_pod("client").unwrap();
    let intruder = network.add_pod("intruder").unwrap();
    control_plane.write_config("mesh-services.yaml", &mesh_config(&web, &grpc, &redis));

    let gateway = IpAddr::V4(network.gateway());
    let names = [
        (
            IpAddr::V4(WEB_VIP),
            "web web.shop web.shop.svc.cluster.local",
        ),
        (
            IpAddr::V4(GRPC_VIP),
            "grpc grpc.shop grpc.shop.svc.cluster.local",
        ),
        (
            IpAddr::V4(REDIS_VIP),
            "redis redis.shop redis.shop.svc.cluster.local",
        ),
        (gateway, "outside.example"),
    ];
    for pod in [&web, &grpc, &redis, &client, &intruder] {
        network.set_hosts(pod, &names).unwrap();
    }

    // Unmodified servers, each on all addresses of its pod.
    let _web_app = Process::spawn(
        "web-app",
        network.command(&web, binary("tessera-test-app")).args([
            "http-server",
            "0.0.0.0:8080",
            WEB_SECRET,
        ]),
    );
    let _grpc_app = Process::spawn(
        "grpc-app",
        network
            .command(&grpc, binary("tessera-test-app"))
            .args(["grpc-server", "0.0.0.0:50051"]),
    );
    let mut redis_app = Process::spawn(
        "redis-server",
        network.command(&redis, "redis-server").args([
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ]),
    );
    let (_outside, outside_port) = outside_server(gateway, OUTSIDE_PAYLOAD);

    let web_probe =
        "appProbes:\n  /app-health/web/readyz: {port: 8080, path: /healthz, timeoutSeconds: 2}\n";
    let grpc_probe = "appProbes:\n  /app-health/grpc/livez: {port: 50051, scheme: GRPC}\n";
    let redis_probe = "appProbes:\n  /app-health/redis/livez: {port: 6379, scheme: TCP}\n";
    let sidecars = [
        Sidecar::start(&network, &control_plane, &web, "web", web_probe),
        Sidecar::start(&network, &control_plane, &grpc, "grpc", grpc_probe),
        Sidecar::start(&network, &control_plane, &redis, "redis", redis_probe),
        Sidecar::start(&network, &control_plane, &client, "client", ""),
        Sidecar::start(&network, &control_plane, &intruder, "intruder", ""),
    ];
    for sidecar in &sidecars {
        sidecar.wait_ready().await;
    }

    let dir = TempDir::new("capture");
    let capture = Capture::start(&network, &dir).await;

    // curl by name → VIP → client sidecar → mTLS → web sidecar → web app.
    let curl = network
        .command(&client, "curl")
        .args(["-sS", "-m", "10"])
        .arg(format!("http://web.shop:8080/{PATH_SECRET}"))
        .output()
        .unwrap();
    assert_success("curl web.shop", &curl);
    assert_eq!(stdout(&curl), WEB_SECRET);

    // gRPC by name.
    let grpc_call = network
        .command(&client, binary("tessera-test-app"))
        .args(["grpc-client", "http://grpc.shop:50051", GRPC_SECRET])
        .output()
        .unwrap();
    assert_success("grpc-client", &grpc_call);
    assert_eq!(stdout(&grpc_call), format!("echo: {GRPC_SECRET}"));

    // redis-cli by name (opaque TCP).
    let set = network
        .command(&client, "redis-cli")
        .args([
            "-h",
            "redis.shop",
            "-p",
            "6379",
            "SET",
            "greeting",
            REDIS_SECRET,
        ])
        .output()
        .unwrap();
    assert_success("redis-cli SET", &set);
    assert_eq!(stdout(&set), "OK");
    let get = network
        .command(&client, "redis-cli")
        .args(["-h", "redis.shop", "-p", "6379", "GET", "greeting"])
        .output()
        .unwrap();
    assert_eq!(stdout(&get), REDIS_SECRET);

    // Denied by policy on the transparent path too: intruder is not `client`.
    let denied = network
        .command(&intruder, "curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"])
        .arg(format!("http://web.shop:8080/{PATH_SECRET}"))
        .output()
        .unwrap();
    assert_eq!(stdout(&denied), "403", "intruder must be denied");

    // A pod calling its own service: its proxy's connection to its own pod address is
    // captured for its inbound side, so the inbound policy applies (web may not call
    // web) instead of TLS bytes landing on the application.
    let self_call = network
        .command(&web, "curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"])
        .arg("http://web.shop:8080/self")
        .output()
        .unwrap();
    assert_eq!(
        stdout(&self_call),
        "403",
        "a self-call must pass the inbound policy"
    );

    // A destination outside the mesh passes through.
    let outside = network
        .command(&client, "curl")
        .args(["-sS", "-m", "10"])
        .arg(format!("http://outside.example:{outside_port}/"))
        .output()
        .unwrap();
    assert_success("curl outside", &outside);
    assert_eq!(stdout(&outside), OUTSIDE_PAYLOAD);

    let packets = capture.stop().await;
    assert_encrypted(
        &packets,
        OUTSIDE_PAYLOAD,
        &[WEB_SECRET, PATH_SECRET, GRPC_SECRET, REDIS_SECRET],
        8,
    );

    // The kubelet's view of web: plaintext to the app port is refused (STRICT), the
    // rewritten probe on the admin port reaches the app through the proxy.
    let kubelet_direct = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
        .arg(format!("http://{}:8080/healthz", web.ip))
        .output()
        .unwrap();
    assert_ne!(
        stdout(&kubelet_direct),
        "200",
        "plaintext must not reach a STRICT port"
    );
    let probe = Command::new("curl")
        .args(["-s", "-w", " %{http_code}", "-m", "5"])
        .arg(format!("http://{}:15020/app-health/web/readyz", web.ip))
        .output()
        .unwrap();
    assert_eq!(stdout(&probe), "application answered 200 OK\n 200");

    // gRPC and TCP probes, as injection rewrites them: the proxy calls the app's health
    // service and connects to its port over loopback, outside the capture.
    let admin_probe = |pod: &Pod, path: &str| {
        let output = Command::new("curl")
            .args(["-s", "-w", " %{http_code}", "-m", "5"])
            .arg(format!("http://{}:15020{path}", pod.ip))
            .output()
            .unwrap();
        stdout(&output)
    };
    assert_eq!(
        admin_probe(&grpc, "/app-health/grpc/livez"),
        "application SERVING\n 200"
    );
    assert_eq!(
        admin_probe(&redis, "/app-health/redis/livez"),
        "application accepts connections\n 200"
    );
    // Redis stops: the kubelet's own TCP connect still succeeds (the capture hands it to
    // the proxy), the rewritten probe fails.
    redis_app.kill();
    let kubelet_connect = std::net::TcpStream::connect_timeout(
        &SocketAddr::from((redis.ip, 6379)),
        Duration::from_secs(5),
    );
    assert!(kubelet_connect.is_ok(), "{kubelet_connect:?}");
    assert_eq!(
        admin_probe(&redis, "/app-health/redis/livez"),
        "application unreachable: connection refused\n 503"
    );

    // The sidecars logged what they refused.
    let web_sidecar = &sidecars[0];
    assert!(
        web_sidecar
            .process
            .logs
            .count(&["request denied", "sa/intruder"])
            >= 1
    );
    assert!(
        web_sidecar
            .process
            .logs
            .count(&["request denied", "sa/web\"", "/self"])
            >= 1,
        "the self-call was not judged by the inbound policy"
    );
    assert!(
        web_sidecar
            .process
            .logs
            .count(&["inbound connection refused", "plaintext"])
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn init_is_idempotent_and_cleanup_removes_every_rule() {
    init();
    let Some(mut network) = Network::create().expect("create network") else {
        return;
    };
    let pod = network.add_pod("rules").unwrap();
    // Both families' rules, IPv6 ones marked.
    let saved = |network: &Network| {
        let mut rules = Vec::new();
        for (save, mark) in [("iptables-save", ""), ("ip6tables-save", "v6 ")] {
            let output = network
                .command(&pod, save)
                .args(["-t", "nat"])
                .output()
                .unwrap();
            rules.extend(
                stdout(&output)
                    .lines()
                    .filter(|line| line.contains("TESSERA"))
                    .map(|line| format!("{mark}{line}")),
            );
        }
        rules
    };
    let init_args = [
        "init",
        "--exclude-inbound-ports",
        "15020,22",
        "--exclude-outbound-cidrs",
        "10.96.0.0/12",
    ];
    let first = network
        .command(&pod, binary("tessera-proxy"))
        .args(init_args)
        .output()
        .unwrap();
    assert_success("first init", &first);
    assert!(
        stdout(&first).contains("-A TESSERA_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
        "init prints the rules it installs"
    );
    let after_first = saved(&network);
    assert!(after_first.iter().any(|l| l.contains("--to-ports 15006")));
    assert!(after_first.iter().any(|l| l.contains("--to-ports 15001")));
    assert!(
        after_first
            .iter()
            .any(|l| l == "-A PREROUTING -p tcp -j TESSERA_INBOUND")
    );

    let second = network
        .command(&pod, binary("tessera-proxy"))
        .args(init_args)
        .output()
        .unwrap();
    assert_success("second init", &second);
    assert_eq!(
        saved(&network),
        after_first,
        "a second run leaves one set of rules"
    );

    let cleanup = network
        .command(&pod, binary("tessera-proxy"))
        .args(["init", "--cleanup"])
        .output()
        .unwrap();
    assert_success("cleanup", &cleanup);
    assert_eq!(
        saved(&network),
        Vec::<String>::new(),
        "cleanup removes every rule and chain"
    );

    let bad = network
        .command(&pod, binary("tessera-proxy"))
        .args(["init", "--exclude-outbound-cidrs", "10.0.0.0/40"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--exclude-outbound-cidrs"));
    assert_eq!(
        saved(&network),
        Vec::<String>::new(),
        "a bad flag installs nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_pods_are_captured_and_routed_by_vip() {
    init();
    let Some(mut network) = Network::create().expect("create network") else {
        return;
    };
    let control_plane = ControlPlane::start_on(IpAddr::V4(network.gateway()), "1h", "").await;
    let server = network.add_pod("web6").unwrap();
    let client = network.add_pod("client6").unwrap();
    let vip = Ipv6Addr::new(0xfd96, 0, 0, 0, 0, 0, 0, 0x10);
    control_plane.write_config(
        "web6.yaml",
        &[
            resource(
                "Service",
                "web6",
                &format!("  addresses: [\"{vip}\"]\n  ports: [{{port: 8080, protocol: http}}]\n"),
            ),
            resource(
                "Workload",
                "web6-1",
                &format!(
                    "  service: web6\n  serviceAccount: web6\n  address: \"[{}]:8080\"\n",
                    server.ip6
                ),
            ),
        ]
        .join("---\n"),
    );
    for pod in [&server, &client] {
        network
            .set_hosts(pod, &[(IpAddr::V6(vip), "web6 web6.shop")])
            .unwrap();
    }
    let _app = Process::spawn(
        "web6-app",
        network.command(&server, binary("tessera-test-app")).args([
            "http-server",
            "[::]:8080",
            WEB_SECRET,
        ]),
    );
    let sidecars = [
        Sidecar::start(&network, &control_plane, &server, "web6", ""),
        Sidecar::start(&network, &control_plane, &client, "client6", ""),
    ];
    for sidecar in &sidecars {
        sidecar.wait_ready().await;
    }
    // The VIP has no route anywhere: only capture by the client's sidecar can answer.
    let curl = network
        .command(&client, "curl")
        .args(["-6", "-sS", "-m", "10", "http://web6.shop:8080/"])
        .output()
        .unwrap();
    if !curl.status.success() {
        for args in [
            &["ss", "-ltnp"][..],
            &["ip6tables-save", "-t", "nat"],
            &["ip", "-6", "addr"],
        ] {
            let out = network
                .command(&client, args[0])
                .args(&args[1..])
                .output()
                .unwrap();
            eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        }
        eprintln!("{:?}", sidecars[1].process.logs.lines());
    }
    assert_success("curl -6 web6.shop", &curl);
    assert_eq!(stdout(&curl), WEB_SECRET);
    // And it arrived over mTLS from the client's identity.
    let metrics = Command::new("curl")
        .args(["-sS", "-m", "5"])
        .arg(format!("http://{}:15020/metrics", server.ip))
        .output()
        .unwrap();
    let metrics = stdout(&metrics);
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("tessera_requests_total")
                && line.contains("direction=\"inbound\"")
                && line.contains("source_workload=\"client6\"")
                && line.contains("security=\"mtls\"")),
        "no inbound request from client6 in the server's metrics:\n{metrics}"
    );
}
