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
use tessera_mesh::SpiffeId;
use tessera_mesh::resources::Protocol;
use tessera_mesh::spiffe::DEFAULT_TRUST_DOMAIN;

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
    /// The workload's labels: policies whose `selector.matchLabels` they match apply to
    /// it. The injector sets a pod's, as the pod was created.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub control_plane: ControlPlaneConfig,
    /// Admin endpoint: /, /live, /ready, /metrics, /certs, /config, /migration.
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
    pub tracing: Option<TracingConfig>,
    /// One JSON line per request on stdout.
    #[serde(default)]
    pub access_log: bool,
    /// Transparent mode: listeners for traffic that iptables (`tessera-proxy init`)
    /// redirects, each connection going where its original destination says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transparent: Option<TransparentConfig>,
    /// The application's probes (HTTP, gRPC health, TCP), served on the admin port under
    /// `/app-health/...` and performed on the application (injection rewrites the
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
    /// How long a service or address no connection uses stays followed; then it is
    /// released, and its next use asks the control plane again.
    #[serde(
        default = "default_release_unused_after",
        with = "tessera_mesh::resources::duration"
    )]
    pub release_unused_after: Duration,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        Self {
            inbound_listen: default_transparent_inbound(),
            outbound_listen: default_transparent_outbound(),
            release_unused_after: default_release_unused_after(),
        }
    }
}

fn default_release_unused_after() -> Duration {
    crate::destinations::RELEASE_UNUSED_AFTER
}

// Dual-stack ([::] also accepts IPv4 on Linux), so IPv6 pods are captured too.
fn default_transparent_inbound() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15006))
}

fn default_transparent_outbound() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 15001))
}

/// One application probe: what the proxy does to the application's port (on loopback)
/// when the kubelet asks for it on the admin port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    pub port: u16,
    /// HTTP only; `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub scheme: ProbeScheme,
    /// GRPC only: the service whose health is asked; absent, the server as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default = "default_probe_timeout")]
    pub timeout_seconds: u32,
    /// HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<ProbeHeader>,
}

/// How an application probe is performed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProbeScheme {
    /// A GET of `path`: the application's status code is the answer. (HTTPS probes are
    /// left with the kubelet by injection.)
    #[default]
    #[serde(alias = "http")]
    Http,
    /// `grpc.health.v1.Health/Check` over plaintext HTTP/2: 200 when SERVING.
    #[serde(alias = "grpc")]
    Grpc,
    /// A TCP connect: 200 when the port accepts.
    #[serde(alias = "tcp")]
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

impl AppProbe {
    /// The fields that belong to another scheme are refused rather than ignored: a
    /// probe that says `path` but is performed as a TCP connect would mislead.
    fn check(&self) -> Result<(), String> {
        let scheme = self.scheme;
        if scheme != ProbeScheme::Http && (self.path.is_some() || !self.http_headers.is_empty()) {
            return Err("path and httpHeaders are for HTTP probes only".into());
        }
        if scheme != ProbeScheme::Grpc && self.service.is_some() {
            return Err("service is for GRPC probes only".into());
        }
        if self
            .path
            .as_ref()
            .is_some_and(|path| !path.starts_with('/'))
        {
            return Err("path must be absolute".into());
        }
        Ok(())
    }
}

/// Where application probes live on the admin port.
pub const APP_PROBE_PREFIX: &str = "/app-health/";

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
            // As the control plane will take it: a subscription it refuses would fail
            // the whole discovery stream.
            (Some(key), None, None)
                if format!("service/{key}")
                    .parse::<tessera_mesh::discovery::ResourceName>()
                    .is_ok() =>
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

/// Bounds on what a peer can make the proxy hold; each field's range is checked at
/// parse time ([`Limits::check`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections per listener; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Streams (requests and tunnelled connections) one HTTP/2 connection may hold open
    /// at once, on every HTTP/2 server the proxy runs. 100: the floor RFC 9113 §6.5.2
    /// recommends and Envoy's hardening guide sets. Applications and plaintext callers
    /// get this; an authenticated peer proxy gets
    /// [`max_concurrent_streams_per_peer_connection`](Self::max_concurrent_streams_per_peer_connection).
    pub max_concurrent_streams_per_connection: u32,
    /// Streams one HTTP/2 connection from an authenticated peer proxy (inbound mTLS) may
    /// hold open at once. A client proxy carries every caller's requests and every
    /// tunnelled TCP connection to this proxy on one pooled connection, so 100 would
    /// make the 101st long-lived tunnel wait for another to end. 250 (Go's default):
    /// each held stream may hold an application connection and its buffers (a hostile
    /// peer holding 1,000 uploads took a debug-build proxy to +170 MiB), so this stays
    /// in the low hundreds; more concurrent tunnels to one peer wait for a stream until
    /// the client side opens further connections per peer.
    pub max_concurrent_streams_per_peer_connection: u32,
    /// HTTP/2 requests and tunnels in flight in the whole proxy; beyond, a new stream is
    /// answered 503 (`tessera-proxy-error: proxy-overloaded`).
    pub max_requests_in_flight: usize,
    /// HTTP/1.1 connections to the application per application port; at the cap a
    /// request waits [`APP_CONNECTION_WAIT`](crate::inbound::app_pool::APP_CONNECTION_WAIT) for one
    /// to free up, then gets 503.
    pub max_app_connections: usize,
    #[serde(with = "tessera_mesh::resources::duration")]
    pub handshake_timeout: Duration,
    #[serde(with = "tessera_mesh::resources::duration")]
    pub connect_timeout: Duration,
    /// How long an outbound connection may stay silent before it is taken for a
    /// server-speaks-first protocol and proxied as opaque TCP.
    #[serde(with = "tessera_mesh::resources::duration")]
    pub detect_timeout: Duration,
    /// On SIGTERM, how long in-flight connections may take to finish.
    #[serde(with = "tessera_mesh::resources::duration")]
    pub drain_timeout: Duration,
    /// A request head must be complete this long after the caller starts waiting to
    /// send one: HTTP/1.1 between requests, HTTP/2 for the first request of a connection.
    #[serde(with = "tessera_mesh::resources::duration")]
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection with no stream open for this long is closed with GOAWAY.
    #[serde(with = "tessera_mesh::resources::duration")]
    pub connection_idle_timeout: Duration,
    /// A stream with no byte either way for this long is answered 408 (before the
    /// response) or reset (after).
    #[serde(with = "tessera_mesh::resources::duration")]
    pub stream_idle_timeout: Duration,
    /// A request body that sends nothing for this long, before the response has begun,
    /// is answered 408.
    #[serde(with = "tessera_mesh::resources::duration")]
    pub request_body_timeout: Duration,
    /// Bytes per second a request body must bring, on average over each
    /// `requestBodyTimeout` window, before the response has begun; slower is answered
    /// 408 (a body dripped a byte a second is a slowloris, not an upload). A window is
    /// held against the caller only if the proxy is waiting for its bytes when it ends,
    /// so an application slow to read the body does not make its caller too slow. HTTP/2
    /// request streams before their response, HTTP/1.1 bodies to their end
    /// ([`crate::limits::body_rate`]). 0 turns the rule off (silence alone is then bounded by
    /// `requestBodyTimeout`).
    pub request_body_min_rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_concurrent_streams_per_connection: 100,
            max_concurrent_streams_per_peer_connection: 250,
            max_requests_in_flight: 10_000,
            max_app_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            detect_timeout: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(20),
            header_read_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(5 * 60),
            stream_idle_timeout: Duration::from_secs(5 * 60),
            request_body_timeout: Duration::from_secs(60),
            // 32 B/s: ~2 KiB per default 60 s window. Apache's MinRate of 500 B/s would
            // cut a client-streaming RPC that sends a small message every few seconds
            // before its response begins; 32 B/s still ends a one-byte-a-second drip at
            // its first window.
            request_body_min_rate: 32,
        }
    }
}

/// A value outside the range its field allows: `field` is the YAML path
/// (`limits.maxConnections`), so the parser can say on which line it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfRange {
    pub field: String,
    pub reason: String,
}

/// Checks `value` lies in `min..=max`.
fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), OutOfRange> {
    if value < min || value > max {
        return Err(OutOfRange {
            field: field.to_string(),
            reason: format!("{field} is {value}, must be between {min} and {max}"),
        });
    }
    Ok(())
}

/// Checks a duration lies in `min..=max`.
fn duration_in_range(
    field: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), OutOfRange> {
    if value < min || value > max {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        return Err(OutOfRange {
            field: field.to_string(),
            reason: format!(
                "{field} is {}, must be between {} and {}",
                show(value),
                show(min),
                show(max)
            ),
        });
    }
    Ok(())
}

const MILLISECOND: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

impl Limits {
    /// Every bound in range. The upper bounds are what the runtime can hold (an HTTP/2
    /// setting is 31 bits, a tokio semaphore ~2^61 permits) or what no deployment
    /// needs; zero is refused wherever it would stop all traffic.
    pub fn check(&self) -> Result<(), OutOfRange> {
        in_range("limits.maxConnections", self.max_connections, 1, 1_000_000)?;
        in_range(
            "limits.maxConcurrentStreamsPerConnection",
            self.max_concurrent_streams_per_connection,
            1,
            10_000,
        )?;
        in_range(
            "limits.maxConcurrentStreamsPerPeerConnection",
            self.max_concurrent_streams_per_peer_connection,
            1,
            100_000,
        )?;
        in_range(
            "limits.maxRequestsInFlight",
            self.max_requests_in_flight,
            1,
            1_000_000,
        )?;
        in_range(
            "limits.maxAppConnections",
            self.max_app_connections,
            1,
            100_000,
        )?;
        duration_in_range(
            "limits.handshakeTimeout",
            self.handshake_timeout,
            MILLISECOND,
            HOUR,
        )?;
        duration_in_range(
            "limits.connectTimeout",
            self.connect_timeout,
            MILLISECOND,
            HOUR,
        )?;
        duration_in_range(
            "limits.detectTimeout",
            self.detect_timeout,
            MILLISECOND,
            Duration::from_secs(60),
        )?;
        duration_in_range(
            "limits.drainTimeout",
            self.drain_timeout,
            Duration::ZERO,
            HOUR,
        )?;
        duration_in_range(
            "limits.headerReadTimeout",
            self.header_read_timeout,
            MILLISECOND,
            HOUR,
        )?;
        duration_in_range(
            "limits.connectionIdleTimeout",
            self.connection_idle_timeout,
            SECOND,
            DAY,
        )?;
        duration_in_range(
            "limits.streamIdleTimeout",
            self.stream_idle_timeout,
            SECOND,
            DAY,
        )?;
        duration_in_range(
            "limits.requestBodyTimeout",
            self.request_body_timeout,
            SECOND,
            DAY,
        )?;
        in_range(
            "limits.requestBodyMinRate",
            self.request_body_min_rate,
            0,
            1 << 30,
        )?;
        Ok(())
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15020))
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

impl ProxyConfig {
    /// Reads and validates a configuration file. Relative file paths in it name files
    /// beside it, wherever the proxy is started from.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    /// Makes every relative file path in the configuration relative to `base` (the
    /// configuration file's directory). A configuration from the environment has no
    /// directory: its paths stay relative to the working directory.
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        resolve(&mut self.control_plane.trust_bundle_file);
        let identity = &mut self.identity;
        for path in [
            &mut identity.join_token_file,
            &mut identity.service_account_token_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(path);
        }
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
        if let Err(out) = config.check_numbers() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line: line_of(text, &out.field),
                reason: out.reason,
            });
        }
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
            probe
                .check()
                .map_err(|reason| ConfigError::Semantic(format!("appProbes {path:?}: {reason}")))?;
            if !path.starts_with(APP_PROBE_PREFIX) {
                return Err(ConfigError::Semantic(format!(
                    "appProbes {path:?}: must be under {APP_PROBE_PREFIX}"
                )));
            }
        }
        self.check_numbers()
            .map_err(|out| ConfigError::Semantic(out.reason))?;
        Ok(())
    }

    /// Every number in the configuration within the range its field allows.
    pub fn check_numbers(&self) -> Result<(), OutOfRange> {
        self.limits.check()?;
        if let Some(tracing) = &self.tracing {
            tracing.check()?;
        }
        for (index, port) in self.inbound.iter().enumerate() {
            in_range(
                &format!("inbound[{index}].forwardTo"),
                port.forward_to.port(),
                1,
                u16::MAX,
            )?;
        }
        for (index, upstream) in self.outbound.iter().enumerate() {
            if let Some(port) = upstream.port {
                in_range(&format!("outbound[{index}].port"), port, 1, u16::MAX)?;
            }
        }
        for (path, probe) in &self.app_probes {
            in_range(&format!("appProbes.{path}.port"), probe.port, 1, u16::MAX)?;
            in_range(
                &format!("appProbes.{path}.timeoutSeconds"),
                probe.timeout_seconds,
                1,
                3600,
            )?;
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
    /// Kubernetes service-account token file. Without either the proxy could never get
    /// a certificate: a configuration error, not a retry loop.
    pub fn bootstrap(&self) -> Result<Bootstrap, ConfigError> {
        if let Some(token) = self.join_token()? {
            return Ok(Bootstrap::JoinToken(token));
        }
        self.identity
            .service_account_token_file
            .clone()
            .map(Bootstrap::KubernetesTokenFile)
            .ok_or_else(|| {
                ConfigError::Semantic(format!(
                    "no credential for the first certificate: set {JOIN_TOKEN_ENV} (a token from `tessera token create`), identity.joinTokenFile or identity.serviceAccountTokenFile"
                ))
            })
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

/// The line (1-based) where `field` — a YAML path such as `limits.maxConnections`,
/// `inbound[1].forwardTo` or `appProbes./app-health/x.port` — is written in `text`;
/// 0 when it is not written (a default). Block-style YAML, as the proxy's
/// configuration is written; each step finds its key deeper than the one before.
fn line_of(text: &str, field: &str) -> u64 {
    let mut steps: Vec<(String, Option<usize>)> = Vec::new();
    let mut rest = field;
    // A probe path contains dots: it is the step between `appProbes.` and the last one.
    if let Some(probe) = rest.strip_prefix("appProbes.")
        && let Some((path, key)) = probe.rsplit_once('.')
    {
        steps.push(("appProbes".into(), None));
        steps.push((path.to_string(), None));
        rest = key;
        steps.push((rest.to_string(), None));
    } else {
        for step in rest.split('.') {
            match step.split_once('[') {
                Some((key, index)) => {
                    steps.push((key.to_string(), index.trim_end_matches(']').parse().ok()))
                }
                None => steps.push((step.to_string(), None)),
            }
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    // Where the search for the next step starts, how deep its key must be, and the
    // list item's dash line (whose first key sits on it, at the dash's indent).
    let (mut from, mut depth, mut item) = (0usize, None::<usize>, None::<usize>);
    let mut found = 0u64;
    for (key, index) in steps {
        let Some(at) = (from..lines.len()).find(|&n| {
            let line = lines[n];
            let body = line.trim_start().trim_start_matches("- ");
            (item == Some(n) || depth.is_none_or(|d| indent(line) > d))
                && (body.starts_with(&format!("{key}:"))
                    || body.starts_with(&format!("\"{key}\":")))
        }) else {
            return found;
        };
        found = at as u64 + 1;
        from = at + 1;
        depth = Some(indent(lines[at]));
        item = None;
        if let Some(index) = index {
            let owner = indent(lines[at]);
            let dashes = (from..lines.len())
                .take_while(|&n| {
                    let line = lines[n].trim_start();
                    line.is_empty()
                        || line.starts_with('#')
                        || indent(lines[n]) > owner
                        || line.starts_with("- ")
                })
                .filter(|&n| lines[n].trim_start().starts_with("- "));
            // Only the list's own items, not a list nested in one of them.
            let item_indent = dashes.clone().next().map(|n| indent(lines[n]));
            let Some(dash) = dashes
                .filter(|&n| Some(indent(lines[n])) == item_indent)
                .nth(index)
            else {
                return found;
            };
            found = dash as u64 + 1;
            from = dash;
            depth = Some(indent(lines[dash]));
            item = Some(dash);
        }
    }
    found
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

/// Tracing settings of a proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: String,
    /// Share of new traces sampled (callers' decisions are kept).
    #[serde(default = "default_ratio")]
    pub sample_ratio: f64,
    /// Spans waiting for export; more are dropped.
    #[serde(default = "default_queue")]
    pub max_queue: usize,
}

fn default_ratio() -> f64 {
    1.0
}

/// Most spans the export queue may hold: a million spans of a few hundred bytes each is
/// already more memory than a sidecar has, and tokio's channel panics above ~2^61.
pub const MAX_QUEUE: usize = 1_000_000;

impl TracingConfig {
    /// Numbers in range: the queue within `1..=MAX_QUEUE`, the ratio a share.
    pub fn check(&self) -> Result<(), OutOfRange> {
        let out = |field: &str, reason: String| OutOfRange {
            field: field.to_string(),
            reason,
        };
        if !(1..=MAX_QUEUE).contains(&self.max_queue) {
            return Err(out(
                "tracing.maxQueue",
                format!(
                    "tracing.maxQueue is {}, must be between 1 and {MAX_QUEUE}",
                    self.max_queue
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(out(
                "tracing.sampleRatio",
                format!(
                    "tracing.sampleRatio is {}, must be between 0 and 1",
                    self.sample_ratio
                ),
            ));
        }
        Ok(())
    }
}

fn default_queue() -> usize {
    2048
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

    /// Each scheme with its own fields; another scheme's field, or an unknown scheme
    /// (HTTPS is left with the kubelet by injection), is refused.
    #[test]
    fn app_probes_of_each_scheme() {
        let probes = |body: &str| format!("{MINIMAL}appProbes:\n  /app-health/web/livez: {body}\n");
        let config = ProxyConfig::parse(
            &format!(
                "{MINIMAL}appProbes:\n  /app-health/a/livez: {{port: 8080}}\n  /app-health/a/readyz: {{port: 9090, scheme: GRPC, service: orders}}\n  /app-health/a/startupz: {{port: 5432, scheme: tcp}}\n"
            ),
            Path::new("p.yaml"),
        )
        .unwrap();
        let schemes: Vec<_> = config.app_probes.values().map(|p| p.scheme).collect();
        assert_eq!(
            schemes,
            [ProbeScheme::Http, ProbeScheme::Grpc, ProbeScheme::Tcp]
        );
        assert_eq!(
            config.app_probes["/app-health/a/readyz"].service.as_deref(),
            Some("orders")
        );
        for (body, reason) in [
            (
                "{port: 1, scheme: TCP, path: /x}",
                "path and httpHeaders are for HTTP probes only",
            ),
            (
                "{port: 1, scheme: GRPC, httpHeaders: [{name: a, value: b}]}",
                "path and httpHeaders are for HTTP probes only",
            ),
            (
                "{port: 1, service: orders}",
                "service is for GRPC probes only",
            ),
            (
                "{port: 1, scheme: TCP, service: x}",
                "service is for GRPC probes only",
            ),
            ("{port: 1, path: healthz}", "path must be absolute"),
            ("{port: 1, scheme: HTTPS}", "unknown variant `HTTPS`"),
        ] {
            let error = ProxyConfig::parse(&probes(body), Path::new("p.yaml"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(reason), "{body}: {error}");
        }
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
        // Its trust bundle is the example control plane's (`--config deploy/local/mesh`),
        // named relative to the example itself.
        assert_eq!(
            config.control_plane.trust_bundle_file,
            example
                .parent()
                .unwrap()
                .join("mesh/.tessera-state/root-cert.pem"),
            "the example must name its trust bundle relative to deploy/local/"
        );
    }

    /// Relative paths name files beside the configuration file, not in the directory
    /// the proxy happens to start in; absolute ones are kept; and a missing file is
    /// told as missing.
    #[test]
    fn relative_paths_are_beside_the_configuration_file() {
        let dir = std::env::temp_dir().join(format!("tessera-proxy-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("secrets")).unwrap();
        let yaml = "identity:\n  namespace: shop\n  serviceAccount: web\n  joinTokenFile: secrets/token\n  serviceAccountTokenFile: /var/run/token\ncontrolPlane:\n  address: 127.0.0.1:15012\n  trustBundleFile: root.pem\n";
        std::fs::write(dir.join("proxy.yaml"), yaml).unwrap();
        let config = ProxyConfig::load(&dir.join("proxy.yaml")).unwrap();
        assert_eq!(config.control_plane.trust_bundle_file, dir.join("root.pem"));
        assert_eq!(
            config.identity.join_token_file.as_deref(),
            Some(dir.join("secrets/token").as_path())
        );
        assert_eq!(
            config.identity.service_account_token_file.as_deref(),
            Some(Path::new("/var/run/token"))
        );
        // The token file is missing: the error names it, resolved, and says so.
        let error = config.join_token().unwrap_err().to_string();
        assert!(
            error.starts_with(&format!(
                "{}: cannot read: ",
                dir.join("secrets/token").display()
            )) && error.contains("No such file"),
            "{error}"
        );
        // From the environment there is no file to be beside: the working directory.
        let from_env = ProxyConfig::parse(yaml, Path::new(CONFIG_ENV)).unwrap();
        assert_eq!(
            from_env.control_plane.trust_bundle_file,
            Path::new("root.pem")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Each out-of-range value is refused at parse time, naming the line it is on and
    /// the field's range.
    #[test]
    fn out_of_range_numbers_are_refused_with_their_line() {
        let limits = |line: &str| format!("{MINIMAL}limits:\n  {line}\n");
        let tracing = |line: &str| {
            format!("{MINIMAL}tracing:\n  otlpEndpoint: http://127.0.0.1:4317\n  {line}\n")
        };
        let cases: Vec<(String, u64, &str)> = vec![
            (limits("maxConnections: 0"), 8, "limits.maxConnections is 0"),
            (
                limits("maxConnections: 2000000"),
                8,
                "between 1 and 1000000",
            ),
            (
                limits("maxConcurrentStreamsPerPeerConnection: 0"),
                8,
                "limits.maxConcurrentStreamsPerPeerConnection is 0",
            ),
            (
                limits("requestBodyMinRate: 2000000000"),
                8,
                "limits.requestBodyMinRate is 2000000000",
            ),
            (
                limits("maxConcurrentStreamsPerConnection: 0"),
                8,
                "limits.maxConcurrentStreamsPerConnection is 0",
            ),
            (
                limits("maxConcurrentStreamsPerConnection: 4294967295"),
                8,
                "between 1 and 10000",
            ),
            (
                limits("maxRequestsInFlight: 0"),
                8,
                "limits.maxRequestsInFlight",
            ),
            (
                limits("maxRequestsInFlight: 18446744073709551615"),
                8,
                "limits.maxRequestsInFlight",
            ),
            (
                limits("maxAppConnections: 0"),
                8,
                "limits.maxAppConnections",
            ),
            (
                limits("handshakeTimeout: 0s"),
                8,
                "limits.handshakeTimeout is 0s",
            ),
            (limits("connectTimeout: 0s"), 8, "limits.connectTimeout"),
            (limits("detectTimeout: 2m"), 8, "limits.detectTimeout is 2m"),
            (limits("drainTimeout: 2h"), 8, "limits.drainTimeout"),
            (
                limits("headerReadTimeout: 0s"),
                8,
                "limits.headerReadTimeout",
            ),
            (
                limits("connectionIdleTimeout: 0s"),
                8,
                "limits.connectionIdleTimeout",
            ),
            (
                limits("streamIdleTimeout: 400days"),
                8,
                "limits.streamIdleTimeout",
            ),
            (
                limits("requestBodyTimeout: 10ms"),
                8,
                "limits.requestBodyTimeout",
            ),
            (
                tracing("maxQueue: 18446744073709551615"),
                9,
                "tracing.maxQueue is 18446744073709551615",
            ),
            (tracing("maxQueue: 0"), 9, "tracing.maxQueue is 0"),
            (tracing("sampleRatio: 1.5"), 9, "tracing.sampleRatio is 1.5"),
            (tracing("sampleRatio: -0.1"), 9, "tracing.sampleRatio"),
            (
                tracing("sampleRatio: .nan"),
                9,
                "tracing.sampleRatio is NaN",
            ),
            (
                format!(
                    "{MINIMAL}inbound:\n  - listen: 0.0.0.0:1\n    forwardTo: 127.0.0.1:8080\n  - listen: 0.0.0.0:2\n    forwardTo: 127.0.0.1:0\n"
                ),
                11,
                "inbound[1].forwardTo is 0",
            ),
            (
                format!(
                    "{MINIMAL}appProbes:\n  /app-health/web/livez:\n    port: 8080\n    timeoutSeconds: 0\n"
                ),
                10,
                "appProbes./app-health/web/livez.timeoutSeconds is 0",
            ),
        ];
        for (text, line, reason) in cases {
            let error = ProxyConfig::parse(&text, Path::new("proxy.yaml"))
                .err()
                .unwrap_or_else(|| panic!("accepted:\n{text}"))
                .to_string();
            assert!(
                error.starts_with(&format!("proxy.yaml:{line}: ")) && error.contains(reason),
                "for\n{text}\ngot: {error}\nwanted line {line} and {reason:?}"
            );
        }
    }

    #[test]
    fn values_at_the_edge_of_their_range_are_accepted() {
        let text = format!(
            "{MINIMAL}limits:\n  maxConnections: 1\n  maxConcurrentStreamsPerConnection: 10000\n  maxConcurrentStreamsPerPeerConnection: 100000\n  requestBodyMinRate: 0\n  drainTimeout: 0s\ntracing:\n  otlpEndpoint: http://127.0.0.1:4317\n  maxQueue: 1000000\n  sampleRatio: 0\n"
        );
        let config = ProxyConfig::parse(&text, Path::new("proxy.yaml")).unwrap();
        assert_eq!(config.limits.max_concurrent_streams_per_connection, 10_000);
        assert_eq!(
            config.limits.max_concurrent_streams_per_peer_connection,
            100_000
        );
        assert_eq!(config.limits.request_body_min_rate, 0);
        assert_eq!(config.limits.stream_idle_timeout, Duration::from_secs(300));
    }

    /// `tracing.maxQueue: 18446744073709551615` used to be accepted, and the proxy then
    /// panicked creating the span queue ("a semaphore may not have more than MAX_PERMITS
    /// permits"). Refused at parse time; a tracer built in code clamps it.
    #[tokio::test]
    async fn a_huge_span_queue_is_refused_and_never_panics() {
        let text = format!(
            "{MINIMAL}tracing:\n  otlpEndpoint: http://127.0.0.1:4317\n  maxQueue: 18446744073709551615\n"
        );
        let refused = ProxyConfig::parse(&text, Path::new("p.yaml")).err();
        assert!(
            refused.is_some_and(|e| e.to_string().starts_with("p.yaml:9: tracing.maxQueue")),
            "must be refused at parse time"
        );
        let config: ProxyConfig = serde_saphyr::from_str(&text).unwrap();
        let tracing = config.tracing.unwrap();
        let tracer = crate::trace::Tracer::start(
            &tracing,
            &"spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            prometheus_client::metrics::counter::Counter::default(),
        );
        assert!(tracer.enabled());
    }

    #[test]
    fn join_token_is_never_printed() {
        let token = JoinToken::new("secret-value".into());
        assert!(!format!("{token:?}").contains("secret"));
    }
}
