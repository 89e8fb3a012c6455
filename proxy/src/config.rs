//! The proxy's configuration, read once at start from one YAML file.
//!
//! Explicit mode (no iptables, no root): each inbound port forwards mTLS traffic to a local
//! application port, and each outbound listener carries local plaintext to a remote
//! proxy, which must prove the SPIFFE ID configured for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_proto::SpiffeId;
use tessera_proto::resources::Protocol;
use tessera_proto::spiffe::DEFAULT_TRUST_DOMAIN;

/// Environment variable that carries the join token, instead of a file.
pub const JOIN_TOKEN_ENV: &str = "TESSERA_JOIN_TOKEN";
/// Environment variable holding the whole configuration (YAML) when no file is given:
/// how an injected sidecar is configured.
pub const CONFIG_ENV: &str = "TESSERA_PROXY_CONFIG";

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{0}")]
    Semantic(String),
}

/// Everything the proxy needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    pub identity: IdentityConfig,
    pub control_plane: ControlPlaneConfig,
    /// Admin endpoint: /live, /ready, /metrics, /certs, /config.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    #[serde(default)]
    pub inbound: Vec<InboundPort>,
    #[serde(default)]
    pub outbound: Vec<OutboundUpstream>,
    #[serde(default)]
    pub limits: Limits,
    /// Export spans to an OTLP collector; absent: no spans (trace headers pass through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<crate::trace::TracingConfig>,
    /// One JSON line per request on stdout.
    #[serde(default)]
    pub access_log: bool,
    /// Transparent mode: listeners for traffic that iptables (`tessera-proxy init`)
    /// redirects, each connection going where its original destination says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transparent: Option<TransparentConfig>,
    /// The application's HTTP probes, served on the admin port under
    /// `/app-health/...` and forwarded to the application (injection rewrites the
    /// pod's probes to these, so they work when the application port is STRICT).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app_probes: BTreeMap<String, AppProbe>,
}

/// The listeners iptables redirects to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransparentConfig {
    #[serde(default = "default_transparent_inbound")]
    pub inbound_listen: SocketAddr,
    #[serde(default = "default_transparent_outbound")]
    pub outbound_listen: SocketAddr,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        Self {
            inbound_listen: default_transparent_inbound(),
            outbound_listen: default_transparent_outbound(),
        }
    }
}

// Dual-stack ([::] also accepts IPv4 on Linux), so IPv6 pods are captured too.
fn default_transparent_inbound() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15006))
}

fn default_transparent_outbound() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15001))
}

/// One application probe: where the kubelet's request goes on the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    pub port: u16,
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// Only HTTP: an HTTPS probe is left alone by injection.
    #[serde(default = "default_probe_scheme")]
    pub scheme: String,
    #[serde(default = "default_probe_timeout")]
    pub timeout_seconds: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<ProbeHeader>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

/// Where application probes live on the admin port.
pub const APP_PROBE_PREFIX: &str = "/app-health/";

fn default_probe_path() -> String {
    "/".into()
}

fn default_probe_scheme() -> String {
    "HTTP".into()
}

fn default_probe_timeout() -> u32 {
    1
}

/// Who this proxy is, and how it proves it the first time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    /// File holding the join token (`tessera token create`). The token itself never
    /// appears in configuration, logs or the admin endpoint.
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// A projected Kubernetes service-account token (audience `tessera`), sent instead
    /// of a join token to authenticate the first certificate request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token_file: Option<PathBuf>,
}

/// Where the control plane is and how to recognise it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// `host:port`; a name is resolved on every connection attempt.
    pub address: String,
    /// The SPIFFE ID the control plane must present. Defaults to
    /// `spiffe://<trust-domain>/ns/tessera-system/sa/tessera-control-plane`.
    #[serde(default)]
    pub identity: Option<SpiffeId>,
    /// PEM roots to trust until the control plane sends the current bundle.
    pub trust_bundle_file: PathBuf,
}

/// One inbound port: mTLS in, plaintext to the local application.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPort {
    pub listen: SocketAddr,
    pub forward_to: SocketAddr,
}

/// One outbound listener: local plaintext in, mTLS to an upstream. The upstream is
/// either a named service resolved through discovery (`service`, optionally `port`), or
/// a fixed remote proxy (`address` + the `identity` it must prove).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundUpstream {
    pub listen: SocketAddr,
    /// `name.namespace` of a service known to discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The service port whose declared protocol applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// A fixed remote proxy's inbound address, `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The identity the fixed remote proxy must prove; anything else is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffeId>,
    /// Overrides the protocol (default: the service port's, else detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// Where an outbound listener sends its traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    Service { key: String, port: Option<u16> },
    Fixed { address: String, identity: SpiffeId },
}

impl OutboundUpstream {
    /// A fixed upstream.
    pub fn fixed(listen: SocketAddr, address: String, identity: SpiffeId) -> Self {
        Self {
            listen,
            service: None,
            port: None,
            address: Some(address),
            identity: Some(identity),
            protocol: None,
        }
    }

    /// An upstream service resolved through discovery.
    pub fn service(listen: SocketAddr, key: String) -> Self {
        Self {
            listen,
            service: Some(key),
            port: None,
            address: None,
            identity: None,
            protocol: None,
        }
    }

    pub fn target(&self) -> Result<UpstreamTarget, ConfigError> {
        match (&self.service, &self.address, &self.identity) {
            (Some(key), None, None)
                if key
                    .split_once('.')
                    .is_some_and(|(n, ns)| !n.is_empty() && !ns.is_empty()) =>
            {
                Ok(UpstreamTarget::Service {
                    key: key.clone(),
                    port: self.port,
                })
            }
            (Some(key), None, None) => Err(ConfigError::Semantic(format!(
                "outbound {}: service {key:?} must be name.namespace",
                self.listen
            ))),
            (None, Some(address), Some(identity)) => Ok(UpstreamTarget::Fixed {
                address: address.clone(),
                identity: identity.clone(),
            }),
            _ => Err(ConfigError::Semantic(format!(
                "outbound {}: set either service, or address and identity",
                self.listen
            ))),
        }
    }
}

/// Bounds on what a peer can make the proxy hold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections per listener; more wait in the kernel's accept queue.
    pub max_connections: usize,
    #[serde(with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// How long an outbound connection may stay silent before it is taken for a
    /// server-speaks-first protocol and proxied as opaque TCP.
    #[serde(with = "humantime_serde_compat")]
    pub detect_timeout: Duration,
    /// On SIGTERM, how long in-flight connections may take to finish.
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            detect_timeout: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// Durations as "10s", "1m30s" in YAML.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15020))
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

impl ProxyConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates YAML; `path` names where it came from in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = serde_saphyr::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: e.location().map_or(0, |l| l.line()),
            reason: e
                .to_string()
                .lines()
                .next()
                .unwrap_or("invalid YAML")
                .to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.workload_identity()?;
        let control_plane = self.control_plane_identity()?;
        if control_plane.trust_domain() != self.identity.trust_domain {
            return Err(ConfigError::Semantic(format!(
                "controlPlane.identity {control_plane} is outside trust domain {}",
                self.identity.trust_domain
            )));
        }
        for upstream in &self.outbound {
            if let UpstreamTarget::Fixed { identity, .. } = upstream.target()?
                && identity.trust_domain() != self.identity.trust_domain
            {
                return Err(ConfigError::Semantic(format!(
                    "outbound {}: identity {identity} is outside trust domain {}",
                    upstream.listen, self.identity.trust_domain
                )));
            }
        }
        for (path, probe) in &self.app_probes {
            if !path.starts_with(APP_PROBE_PREFIX) || !probe.path.starts_with('/') {
                return Err(ConfigError::Semantic(format!(
                    "appProbes {path:?}: must be under {APP_PROBE_PREFIX} and name an absolute path"
                )));
            }
            if !probe.scheme.eq_ignore_ascii_case("http") {
                return Err(ConfigError::Semantic(format!(
                    "appProbes {path:?}: scheme {} is not supported (HTTP only)",
                    probe.scheme
                )));
            }
        }
        if self.limits.max_connections == 0 {
            return Err(ConfigError::Semantic(
                "limits.maxConnections must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The SPIFFE ID this proxy works for.
    pub fn workload_identity(&self) -> Result<SpiffeId, ConfigError> {
        let id = &self.identity;
        SpiffeId::new(&id.trust_domain, &id.namespace, &id.service_account)
            .map_err(|e| ConfigError::Semantic(format!("identity: {e}")))
    }

    /// The SPIFFE ID the control plane must present.
    pub fn control_plane_identity(&self) -> Result<SpiffeId, ConfigError> {
        match &self.control_plane.identity {
            Some(id) => Ok(id.clone()),
            None => SpiffeId::control_plane(&self.identity.trust_domain)
                .map_err(|e| ConfigError::Semantic(format!("identity.trustDomain: {e}"))),
        }
    }

    /// The first-certificate credential: a join token if there is one, else the
    /// Kubernetes service-account token file.
    pub fn bootstrap(&self) -> Result<Option<Bootstrap>, ConfigError> {
        if let Some(token) = self.join_token()? {
            return Ok(Some(Bootstrap::JoinToken(token)));
        }
        Ok(self
            .identity
            .service_account_token_file
            .clone()
            .map(Bootstrap::KubernetesTokenFile))
    }

    /// The join token: `TESSERA_JOIN_TOKEN` if set, else the token file, else none.
    pub fn join_token(&self) -> Result<Option<JoinToken>, ConfigError> {
        if let Ok(token) = std::env::var(JOIN_TOKEN_ENV)
            && !token.trim().is_empty()
        {
            return Ok(Some(JoinToken(token.trim().to_string())));
        }
        let Some(path) = &self.identity.join_token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(Some(JoinToken(token.trim().to_string())))
    }
}

/// What authenticates the first certificate request.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    JoinToken(JoinToken),
    /// A projected Kubernetes service-account token, re-read at every use: the kubelet
    /// rotates the file.
    KubernetesTokenFile(PathBuf),
}

/// A join token. Never printed: `Debug` shows only that one is present.
#[derive(Clone)]
pub struct JoinToken(String);

impl JoinToken {
    pub fn new(token: String) -> Self {
        Self(token)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "identity:\n  namespace: shop\n  serviceAccount: web\ncontrolPlane:\n  address: 127.0.0.1:15012\n  trustBundleFile: root.pem\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let config: ProxyConfig = serde_saphyr::from_str(MINIMAL).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.workload_identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            config.control_plane_identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/tessera-system/sa/tessera-control-plane"
        );
        assert_eq!(config.admin.port(), 15020);
        assert_eq!(config.limits.handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn refuses_bad_values_with_reasons() {
        let bad_ns = MINIMAL.replace("shop", "Shop");
        let config: ProxyConfig = serde_saphyr::from_str(&bad_ns).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("Shop"));

        let foreign = format!(
            "{MINIMAL}outbound:\n  - listen: 127.0.0.1:1\n    address: x:1\n    identity: spiffe://other/ns/a/sa/b\n"
        );
        let config: ProxyConfig = serde_saphyr::from_str(&foreign).unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("outside trust domain")
        );

        let typo = MINIMAL.replace("address", "adress");
        assert!(serde_saphyr::from_str::<ProxyConfig>(&typo).is_err());
    }

    #[test]
    fn the_documented_example_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/proxy.yaml");
        let config = ProxyConfig::load(&example).unwrap();
        let UpstreamTarget::Fixed { identity, .. } = config.outbound[0].target().unwrap() else {
            panic!("fixed upstream expected");
        };
        assert_eq!(identity.service_account(), "payments");
        assert_eq!(
            config.outbound[1].target().unwrap(),
            UpstreamTarget::Service {
                key: "orders.shop".into(),
                port: None
            }
        );
        assert_eq!(config.inbound[0].listen.port(), 15006);
    }

    #[test]
    fn join_token_is_never_printed() {
        let token = JoinToken::new("secret-value".into());
        assert!(!format!("{token:?}").contains("secret"));
    }
}
