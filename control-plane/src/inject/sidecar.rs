//! What injection adds to a pod: the `tessera-init` container that programs the
//! traffic capture, the `tessera-proxy` native sidecar, and their two volumes.
//!
//! Built with k8s-openapi's types so field names and shapes are the API's own, then
//! serialized into the user's object. The names, ports and paths here are the contract
//! with `tessera-proxy` (`init` flags, `run` reading `TESSERA_PROXY_CONFIG`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::annotations::{Exclusions, join};
use super::probes::{AppProbe, ProbeAction};
use super::{InjectError, Options};

pub const INIT_CONTAINER: &str = "tessera-init";
/// Also the marker of an injected pod: its presence makes injection a no-op.
pub const PROXY_CONTAINER: &str = "tessera-proxy";
pub const TOKEN_VOLUME: &str = "tessera-token";
pub const CA_ROOT_VOLUME: &str = "tessera-ca-root";
/// The ConfigMap holding the mesh's root certificate(s), published by the installer.
pub const CA_ROOT_CONFIG_MAP: &str = "tessera-ca-root-cert";
/// The audience the control plane demands of projected service-account tokens.
pub const TOKEN_AUDIENCE: &str = "tessera";

pub const PROXY_UID: i64 = 1337;
pub const ADMIN_PORT: u16 = 15020;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;

const TOKEN_DIR: &str = "/var/run/secrets/tessera/serviceaccount";
const CA_ROOT_DIR: &str = "/var/run/secrets/tessera/ca";
const TOKEN_LIFETIME_SECONDS: i64 = 3600;

/// Names injection reserves in a pod: a pod already using one is refused.
pub const RESERVED_CONTAINERS: [&str; 2] = [INIT_CONTAINER, PROXY_CONTAINER];
pub const RESERVED_VOLUMES: [&str; 2] = [TOKEN_VOLUME, CA_ROOT_VOLUME];

/// Programs iptables so the pod's traffic goes through the proxy, then exits.
pub fn init_container(options: &Options, exclusions: &Exclusions) -> Container {
    // The admin port is never captured: the kubelet probes it directly.
    let inbound = std::iter::once(ADMIN_PORT).chain(exclusions.inbound_ports.iter().copied());
    let mut args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--exclude-inbound-ports".into(),
        join(inbound),
    ];
    if let Some(ports) = &exclusions.outbound_ports {
        args.extend(["--exclude-outbound-ports".into(), join(ports)]);
    }
    if let Some(cidrs) = &exclusions.outbound_cidrs {
        args.extend(["--exclude-outbound-cidrs".into(), join(cidrs)]);
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(options.proxy_image.clone()),
        args: Some(args),
        resources: Some(resources("10m", "10Mi", "32Mi")),
        security_context: Some(SecurityContext {
            // iptables needs root and NET_ADMIN/NET_RAW, for the few milliseconds it runs.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..hardened()
        }),
        ..Container::default()
    }
}

/// The proxy, as a native sidecar (an init container with `restartPolicy: Always`): it
/// starts, and passes its startup probe, before the app's containers, and it does not
/// keep a Job's pod from completing.
pub fn proxy_container(
    options: &Options,
    labels: &BTreeMap<String, String>,
    app_probes: &BTreeMap<String, AppProbe>,
) -> Result<Container, InjectError> {
    let admin_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(ADMIN_PORT.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    Ok(Container {
        name: PROXY_CONTAINER.into(),
        image: Some(options.proxy_image.clone()),
        args: Some(vec!["run".into()]),
        restart_policy: Some("Always".into()),
        env: Some(vec![
            field_ref("POD_NAMESPACE", "metadata.namespace"),
            field_ref("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            // After the two above: `$(VAR)` only expands variables defined earlier.
            EnvVar {
                name: "TESSERA_PROXY_CONFIG".into(),
                value: Some(bootstrap_config(options, labels, app_probes)?),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("tessera-admin".into()),
            container_port: ADMIN_PORT.into(),
            ..ContainerPort::default()
        }]),
        // Up to 2 minutes to get a certificate before the kubelet restarts the proxy.
        startup_probe: Some(admin_probe("/ready", 1, 120)),
        readiness_probe: Some(admin_probe("/ready", 5, 3)),
        liveness_probe: Some(admin_probe("/live", 10, 3)),
        // No CPU limit: CFS throttling would stall the data path of every request.
        resources: Some(resources("10m", "20Mi", "64Mi")),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..hardened()
        }),
        volume_mounts: Some(vec![
            read_only_mount(TOKEN_VOLUME, TOKEN_DIR),
            read_only_mount(CA_ROOT_VOLUME, CA_ROOT_DIR),
        ]),
        ..Container::default()
    })
}

/// The proxy's credentials: a short-lived token the control plane verifies with a
/// TokenReview (audience `tessera`), and the mesh's root to trust the control plane.
pub fn volumes() -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_LIFETIME_SECONDS),
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: CA_ROOT_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: CA_ROOT_CONFIG_MAP.into(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}

/// `TESSERA_PROXY_CONFIG`: the proxy's configuration file, inline.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bootstrap {
    identity: BootstrapIdentity,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    control_plane: BootstrapControlPlane,
    admin: String,
    transparent: BootstrapTransparent,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    app_probes: BTreeMap<String, BootstrapProbe>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapIdentity {
    trust_domain: String,
    namespace: &'static str,
    service_account: &'static str,
    service_account_token_file: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapControlPlane {
    address: String,
    trust_bundle_file: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapTransparent {
    inbound_listen: String,
    outbound_listen: String,
}

/// The proxy's `AppProbe`: `scheme` says what it does (HTTP, GRPC or TCP).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapProbe {
    port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    scheme: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    timeout_seconds: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    http_headers: Vec<BootstrapHeader>,
}

#[derive(Serialize)]
struct BootstrapHeader {
    name: String,
    value: String,
}

fn bootstrap_config(
    options: &Options,
    labels: &BTreeMap<String, String>,
    app_probes: &BTreeMap<String, AppProbe>,
) -> Result<String, InjectError> {
    let bootstrap = Bootstrap {
        identity: BootstrapIdentity {
            trust_domain: escape_env(&options.trust_domain),
            namespace: "$(POD_NAMESPACE)",
            service_account: "$(POD_SERVICE_ACCOUNT)",
            service_account_token_file: format!("{TOKEN_DIR}/token"),
        },
        labels: labels
            .iter()
            .map(|(key, value)| (escape_env(key), escape_env(value)))
            .collect(),
        control_plane: BootstrapControlPlane {
            address: escape_env(&options.control_plane_address),
            trust_bundle_file: format!("{CA_ROOT_DIR}/root-cert.pem"),
        },
        // Dual-stack: the kubelet probes the pod IP, IPv4 or IPv6.
        admin: format!("[::]:{ADMIN_PORT}"),
        transparent: BootstrapTransparent {
            inbound_listen: format!("[::]:{INBOUND_PORT}"),
            outbound_listen: format!("[::]:{OUTBOUND_PORT}"),
        },
        app_probes: app_probes
            .iter()
            .map(|(admin_path, probe)| (escape_env(admin_path), bootstrap_probe(probe)))
            .collect(),
    };
    serde_saphyr::to_string(&bootstrap).map_err(|e| InjectError::Internal(e.to_string()))
}

fn bootstrap_probe(probe: &AppProbe) -> BootstrapProbe {
    let mut bootstrap = BootstrapProbe {
        port: probe.port,
        path: None,
        scheme: "HTTP",
        service: None,
        timeout_seconds: probe.timeout_seconds,
        http_headers: Vec::new(),
    };
    match &probe.action {
        ProbeAction::Http { path, http_headers } => {
            bootstrap.path = Some(escape_env(path));
            bootstrap.http_headers = http_headers
                .iter()
                .map(|(name, value)| BootstrapHeader {
                    name: escape_env(name),
                    value: escape_env(value),
                })
                .collect();
        }
        ProbeAction::Grpc { service } => {
            bootstrap.scheme = "GRPC";
            bootstrap.service = service.as_deref().map(escape_env);
        }
        ProbeAction::Tcp => bootstrap.scheme = "TCP",
    }
    bootstrap
}

/// Kubernetes expands `$(VAR)` in env values and turns `$$` into `$`: text copied from
/// the user's pod (a probe path `/a$(b)`) must not be expanded.
fn escape_env(text: &str) -> String {
    text.replace('$', "$$")
}

fn field_ref(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn read_only_mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn resources(cpu_request: &str, memory_request: &str, memory_limit: &str) -> ResourceRequirements {
    let quantity = |q: &str| Quantity(q.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), quantity(cpu_request)),
            ("memory".to_string(), quantity(memory_request)),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            quantity(memory_limit),
        )])),
        ..ResourceRequirements::default()
    }
}

/// The restrictions both containers share.
fn hardened() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of(container: &Container) -> String {
        container.env.as_ref().unwrap()[2].value.clone().unwrap()
    }

    #[test]
    fn bootstrap_config_escapes_user_text_but_not_our_variables() {
        let probes = BTreeMap::from([(
            "/app-health/web/livez".to_string(),
            AppProbe {
                port: 8080,
                timeout_seconds: 1,
                action: ProbeAction::Http {
                    path: "/health$(HOME)".into(),
                    http_headers: vec![],
                },
            },
        )]);
        let config =
            config_of(&proxy_container(&Options::default(), &BTreeMap::new(), &probes).unwrap());
        assert!(config.contains("$(POD_NAMESPACE)"), "{config}");
        assert!(config.contains("/health$$(HOME)"), "{config}");
        let parsed: serde_json::Value = serde_saphyr::from_str(&config).unwrap();
        assert_eq!(
            parsed["appProbes"]["/app-health/web/livez"]["port"],
            serde_json::json!(8080)
        );
        assert_eq!(
            parsed["controlPlane"]["address"],
            Options::default().control_plane_address
        );
    }

    #[test]
    fn no_probes_no_app_probes_section() {
        let config = config_of(
            &proxy_container(&Options::default(), &BTreeMap::new(), &BTreeMap::new()).unwrap(),
        );
        assert!(!config.contains("appProbes"), "{config}");
    }

    /// What the kubelet does to the env value: `$(VAR)` expanded, `$$` unescaped.
    fn expand(config: &str) -> String {
        config
            .replace("$(POD_NAMESPACE)", "shop")
            .replace("$(POD_SERVICE_ACCOUNT)", "orders")
            .replace("$$", "$")
    }

    /// The contract with the proxy: the injected configuration is one its own parser
    /// accepts, and it means what injection intended.
    #[test]
    fn the_proxy_accepts_the_injected_configuration() {
        let probes = BTreeMap::from([
            (
                "/app-health/orders/livez".to_string(),
                AppProbe {
                    port: 8080,
                    timeout_seconds: 3,
                    action: ProbeAction::Http {
                        path: "/healthz$(X)".into(),
                        http_headers: vec![("X-Probe".into(), "a: b".into())],
                    },
                },
            ),
            (
                "/app-health/orders/readyz".to_string(),
                AppProbe {
                    port: 9090,
                    timeout_seconds: 2,
                    action: ProbeAction::Grpc {
                        service: Some("orders$(X)".into()),
                    },
                },
            ),
            (
                "/app-health/orders/startupz".to_string(),
                AppProbe {
                    port: 5432,
                    timeout_seconds: 1,
                    action: ProbeAction::Tcp,
                },
            ),
        ]);
        let labels = BTreeMap::from([
            ("app".to_string(), "orders".to_string()),
            ("tessera.dev/tier".to_string(), "$(HOME)".to_string()),
        ]);
        let config = expand(&config_of(
            &proxy_container(&Options::default(), &labels, &probes).unwrap(),
        ));
        let parsed = tessera_proxy::ProxyConfig::parse(&config, std::path::Path::new("env"))
            .unwrap_or_else(|e| panic!("{e}\n{config}"));
        assert_eq!(parsed.labels, labels);
        assert_eq!(
            parsed.workload_identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/orders"
        );
        assert_eq!(
            parsed.control_plane.address,
            Options::default().control_plane_address
        );
        assert_eq!(parsed.admin.port(), ADMIN_PORT);
        let transparent = parsed.transparent.as_ref().unwrap();
        assert_eq!(transparent.inbound_listen.port(), INBOUND_PORT);
        assert_eq!(transparent.outbound_listen.port(), OUTBOUND_PORT);
        use tessera_proxy::config::ProbeScheme;
        let probe = &parsed.app_probes["/app-health/orders/livez"];
        assert_eq!(
            (probe.port, probe.scheme, probe.path.as_deref()),
            (8080, ProbeScheme::Http, Some("/healthz$(X)"))
        );
        assert_eq!(probe.timeout_seconds, 3);
        assert_eq!(probe.http_headers[0].value, "a: b");
        let grpc = &parsed.app_probes["/app-health/orders/readyz"];
        assert_eq!(
            (grpc.port, grpc.scheme, grpc.service.as_deref()),
            (9090, ProbeScheme::Grpc, Some("orders$(X)"))
        );
        assert_eq!(grpc.timeout_seconds, 2);
        let tcp = &parsed.app_probes["/app-health/orders/startupz"];
        assert_eq!((tcp.port, tcp.scheme), (5432, ProbeScheme::Tcp));
        assert_eq!((tcp.path.as_deref(), tcp.service.as_deref()), (None, None));
        let other_mesh = Options {
            trust_domain: "example.org".into(),
            ..Options::default()
        };
        let config = expand(&config_of(
            &proxy_container(&other_mesh, &BTreeMap::new(), &BTreeMap::new()).unwrap(),
        ));
        let other =
            tessera_proxy::ProxyConfig::parse(&config, std::path::Path::new("env")).unwrap();
        assert_eq!(
            other.workload_identity().unwrap().as_str(),
            "spiffe://example.org/ns/shop/sa/orders"
        );
        assert!(matches!(
            parsed.bootstrap().unwrap(),
            tessera_proxy::config::Bootstrap::KubernetesTokenFile(_)
        ));
    }
}
