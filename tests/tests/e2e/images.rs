//! The container images (deploy/images, built here by scripts/build-images.sh) run as a
//! node runs them (podman, runc, read-only root, no capabilities): the control-plane
//! image serves and certifies the proxy image, each as its non-root user; the proxy
//! image's `init` programs the capture in a pod's network namespace; neither image holds
//! anything but its binary, the libraries it links (and iptables for the proxy's `init`),
//! so there is no shell to start. See `tessera_tests::podman` for where the images come
//! from and what these tests need.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tessera_tests::podman::{self, Container, FileKind};
use tessera_tests::{NAMESPACE, TRUST_DOMAIN, TempDir, free_port, http_get, local, spiffe};

/// The users the images run as: the proxy's, which the capture rules exempt, and the
/// control plane's (deploy/kubernetes runs it as this one).
const PROXY_UID: u32 = 1337;
const CONTROL_PLANE_UID: u32 = 65532;

#[tokio::test]
async fn images_hold_their_binary_and_its_libraries_and_no_shell() {
    let Some(images) = podman::images() else {
        return;
    };
    let proxy = podman::image_files(&images.proxy).expect("list the proxy image");
    assert_minimal(&images.proxy, &proxy, "/usr/local/bin/tessera-proxy", true);
    let tessera = podman::image_files(&images.tessera).expect("list the tessera image");
    assert_minimal(&images.tessera, &tessera, "/usr/local/bin/tessera", false);

    for image in [&images.proxy, &images.tessera] {
        let shell = podman::run(
            image,
            &["--network=none", "--entrypoint=/bin/sh"],
            &["-c", "echo a shell ran"],
        )
        .expect("run podman");
        assert!(
            !shell.status.success(),
            "{image} started /bin/sh: {}",
            String::from_utf8_lossy(&shell.stdout)
        );
    }
}

/// Only the binary, shared libraries with the loader, and for the proxy iptables' multi-call
/// binary with its names and extensions; no shell, no /etc, no /bin.
fn assert_minimal(image: &str, files: &[(String, FileKind)], binary: &str, iptables: bool) {
    let listing = || format!("{files:#?}");
    let is_library = |path: &str| {
        let name = path.rsplit('/').next().unwrap_or_default();
        (path.starts_with("/lib/") || path.starts_with("/usr/lib/"))
            && name.starts_with("lib")
            && name.contains(".so")
    };
    let iptables_names = [
        "iptables",
        "iptables-restore",
        "iptables-save",
        "ip6tables",
        "ip6tables-restore",
        "ip6tables-save",
    ];
    for (path, kind) in files {
        let allowed = match kind {
            FileKind::Directory => true,
            FileKind::File => {
                path == binary
                    || is_library(path)
                    || path.starts_with("/lib64/ld-linux")
                    || (iptables && path == "/usr/sbin/xtables-nft-multi")
            }
            FileKind::Symlink => {
                iptables
                    && path
                        .strip_prefix("/usr/sbin/")
                        .is_some_and(|name| iptables_names.contains(&name))
            }
            FileKind::Other => false,
        };
        assert!(
            allowed,
            "{image} holds {path} ({kind:?}); all:\n{}",
            listing()
        );
        let name = path.rsplit('/').next().unwrap_or_default();
        assert!(
            !["sh", "bash", "dash", "ash", "busybox"].contains(&name),
            "{image} holds a shell: {path}"
        );
    }
    for needed in [
        binary,
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ] {
        assert!(
            files.iter().any(|(path, _)| path == needed),
            "{image} lacks {needed}; all:\n{}",
            listing()
        );
    }
    assert!(
        !files
            .iter()
            .any(|(path, _)| path == "/etc" || path == "/bin"),
        "{image} has /etc or /bin:\n{}",
        listing()
    );
}

#[tokio::test]
async fn control_plane_image_certifies_proxy_image_each_as_its_user_on_a_read_only_root() {
    let Some(images) = podman::images() else {
        return;
    };
    let dir = TempDir::new("images");
    // The control plane's configuration (read-only) and its state (a volume it owns).
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(
        config.join("mesh.yaml"),
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: {TRUST_DOMAIN}\n  certificateTtl: 1h\n"
        ),
    )
    .expect("write mesh.yaml");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(CONTROL_PLANE_UID), Some(CONTROL_PLANE_UID))
        .expect("chown the state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
        .expect("chmod the state dir");
    let config_volume = volume(&config, "/etc/tessera/config:ro");
    let state_volume = volume(&state, "/var/lib/tessera");

    let (grpc, admin, webhook) = (free_port(), free_port(), free_port());
    let control_plane = Container::start(
        "control-plane",
        &images.tessera,
        &["--network=host", &config_volume, &state_volume],
        &[],
        &[
            "control-plane",
            "--config=/etc/tessera/config",
            "--state-dir=/var/lib/tessera",
            &format!("--listen={}", local(grpc)),
            &format!("--admin={}", local(admin)),
            &format!("--webhook={}", local(webhook)),
        ],
    )
    .expect("start the control-plane image");
    wait_for_status(&control_plane, admin, "/ready", Duration::from_secs(30)).await;
    assert_runs_as(&control_plane, CONTROL_PLANE_UID);

    // A join token from the image's own CLI, with the control plane's state.
    let token = podman::run(
        &images.tessera,
        &["--network=none", &config_volume, &state_volume],
        &[
            "token",
            "create",
            "--config=/etc/tessera/config",
            "--state-dir=/var/lib/tessera",
            &format!("--namespace={NAMESPACE}"),
            "--service-account=orders",
            "--ttl=10m",
        ],
    )
    .expect("run tessera token create");
    assert!(
        token.status.success(),
        "token create in the image: {}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();

    // The proxy's configuration, and the trust bundle the control plane wrote.
    let proxy_dir = dir.path().join("proxy");
    std::fs::create_dir_all(&proxy_dir).expect("proxy dir");
    std::fs::copy(state.join("root-cert.pem"), proxy_dir.join("root-cert.pem"))
        .expect("the control plane wrote root-cert.pem");
    let proxy_admin = free_port();
    // The control plane by name, as sidecars reach it: glibc resolves it without an
    // /etc/nsswitch.conf or NSS modules in the image (files and DNS are built in).
    std::fs::write(
        proxy_dir.join("proxy.yaml"),
        format!(
            "identity:\n  trustDomain: {TRUST_DOMAIN}\n  namespace: {NAMESPACE}\n  serviceAccount: orders\ncontrolPlane:\n  address: localhost:{grpc}\n  trustBundleFile: /etc/tessera/proxy/root-cert.pem\nadmin: {}\n",
            local(proxy_admin)
        ),
    )
    .expect("write proxy.yaml");
    let proxy = Container::start(
        "proxy",
        &images.proxy,
        &[
            "--network=host",
            &volume(&proxy_dir, "/etc/tessera/proxy:ro"),
        ],
        &[("TESSERA_JOIN_TOKEN", &token)],
        &["run", "--config=/etc/tessera/proxy/proxy.yaml"],
    )
    .expect("start the proxy image");
    wait_for_status(&proxy, proxy_admin, "/live", Duration::from_secs(20)).await;
    assert_runs_as(&proxy, PROXY_UID);
    // Certified by the control-plane image over its gRPC port.
    wait_for_status(&proxy, proxy_admin, "/ready", Duration::from_secs(30)).await;
    let (_, certs) = http_get(local(proxy_admin), "/certs")
        .await
        .expect("GET /certs");
    assert!(
        certs.contains(&spiffe("orders")),
        "the proxy's certificate: {certs}"
    );
}

#[tokio::test]
async fn proxy_image_programs_the_capture_in_a_pod_network_namespace() {
    let Some(images) = podman::images() else {
        return;
    };
    let pod = PodNetwork::create();
    let network = format!("--network=ns:/run/netns/{}", pod.0);
    // As the injected tessera-init container runs: root, NET_ADMIN and NET_RAW only.
    let as_init = [
        network.as_str(),
        "--user=0",
        "--cap-add=NET_ADMIN",
        "--cap-add=NET_RAW",
    ];
    let init = podman::run(
        &images.proxy,
        &as_init,
        &[
            "init",
            &format!("--proxy-uid={PROXY_UID}"),
            "--inbound-port=15006",
            "--outbound-port=15001",
            "--exclude-inbound-ports=15020",
        ],
    )
    .expect("run tessera-proxy init");
    assert!(
        init.status.success(),
        "init in the proxy image: {}{}",
        String::from_utf8_lossy(&init.stdout),
        String::from_utf8_lossy(&init.stderr)
    );
    let mut saved_options = as_init.to_vec();
    saved_options.push("--entrypoint=/usr/sbin/iptables-save");
    let saved =
        podman::run(&images.proxy, &saved_options, &["-t", "nat"]).expect("run iptables-save");
    let rules = String::from_utf8_lossy(&saved.stdout);
    for rule in [
        "-A OUTPUT -p tcp -j TESSERA_OUTPUT",
        "-A TESSERA_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A TESSERA_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A TESSERA_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A TESSERA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ] {
        assert!(
            rules.contains(rule),
            "no {rule:?} in the pod's nat table:\n{rules}{}",
            String::from_utf8_lossy(&saved.stderr)
        );
    }
}

/// A network namespace of its own, as a pod has; deleted on drop.
struct PodNetwork(String);

impl PodNetwork {
    fn create() -> Self {
        let name = format!(
            "tessera-img-{}-{}",
            std::process::id(),
            rand::random::<u16>()
        );
        tessera_tests::netns::run("ip", &["netns", "add", &name]).expect("ip netns add");
        Self(name)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = tessera_tests::netns::run("ip", &["netns", "delete", &self.0]);
    }
}

fn volume(host: &Path, target: &str) -> String {
    format!("--volume={}:{target}", host.display())
}

/// Waits until the container's HTTP port answers `path` with 200.
async fn wait_for_status(container: &Container, port: u16, path: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((200, _)) = http_get(local(port), path).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not answer {path} with 200 within {timeout:?}; its log:\n{}",
            container.name,
            container.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The container's process runs as `uid` (and the same group), with its root filesystem
/// mounted read-only, as the host's /proc shows it.
fn assert_runs_as(container: &Container, uid: u32) {
    let pid = container.pid().expect("container pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let expected = uid.to_string();
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .map(|ids| ids.split_whitespace().collect())
            .unwrap_or_default();
        assert_eq!(
            ids,
            vec![expected.as_str(); 4],
            "{} {field} (real, effective, saved, filesystem)",
            container.name
        );
    }
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).expect("read mounts");
    // The last mount on / is the one the process sees.
    let root = mounts
        .lines()
        .rev()
        .find(|line| line.split_whitespace().nth(1) == Some("/"))
        .expect("a root mount");
    let options = root.split_whitespace().nth(3).unwrap_or_default();
    assert!(
        options.split(',').any(|option| option == "ro"),
        "{}'s root is writable: {root}",
        container.name
    );
}
