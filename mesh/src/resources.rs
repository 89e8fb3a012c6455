//! Configuration resources: `tessera.dev/v1alpha1` YAML documents, read from a directory
//! of files (local mode).
//!
//! Every error names the file and line it comes from, so an operator can fix it without
//! guessing. A file is parsed whole or refused whole: the caller keeps its last good
//! configuration when anything is wrong.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::spiffe::{self, DEFAULT_TRUST_DOMAIN};

pub const API_VERSION: &str = "tessera.dev/v1alpha1";

/// Where a resource or an error comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: u64,
}

impl fmt::Display for Origin {
    /// `file:line`, or just the path when the whole file or directory is meant (line 0).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}", self.file.display()),
            line => write!(f, "{}:{line}", self.file.display()),
        }
    }
}

/// A configuration that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct ConfigError {
    pub origin: Origin,
    pub reason: String,
}

impl ConfigError {
    /// An error at `line` of `file`; line 0 for the whole file or directory.
    pub fn at(file: &Path, line: u64, reason: impl Into<String>) -> Self {
        Self {
            origin: Origin {
                file: file.to_path_buf(),
                line,
            },
            reason: reason.into(),
        }
    }

    /// Several errors told as one (one log line): the first's origin, then each other
    /// with its own. `None` when there is none.
    pub fn all(errors: Vec<ConfigError>) -> Option<Self> {
        let mut errors = errors.into_iter();
        let mut first = errors.next()?;
        for other in errors {
            first.reason.push_str(&format!("; {other}"));
        }
        Some(first)
    }
}

/// Common to all resources.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// One parsed resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub origin: Origin,
    pub metadata: Metadata,
    pub spec: Spec,
}

/// The kinds Tessera understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    MeshConfig(MeshConfigSpec),
    Service(ServiceSpec),
    Workload(WorkloadSpec),
    RoutePolicy(RoutePolicySpec),
    PeerAuthentication(crate::policy::PeerAuthenticationSpec),
    AuthorizationPolicy(crate::policy::AuthorizationPolicySpec),
    RequestAuthentication(crate::policy::RequestAuthenticationSpec),
    RateLimitPolicy(crate::rate_limit::RateLimitPolicySpec),
}

impl Spec {
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::MeshConfig(_) => "MeshConfig",
            Spec::Service(_) => "Service",
            Spec::Workload(_) => "Workload",
            Spec::RoutePolicy(_) => "RoutePolicy",
            Spec::PeerAuthentication(_) => "PeerAuthentication",
            Spec::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Spec::RequestAuthentication(_) => "RequestAuthentication",
            Spec::RateLimitPolicy(_) => "RateLimitPolicy",
        }
    }
}

/// How the proxy treats a port's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Sniff: HTTP/1.x, HTTP/2 prior knowledge, else opaque TCP.
    #[default]
    Detect,
    /// HTTP/1.x.
    Http,
    /// HTTP/2 with prior knowledge, which covers gRPC.
    #[serde(alias = "grpc")]
    Http2,
    /// Bytes, never parsed; no detection delay (server-speaks-first protocols).
    #[serde(alias = "tcp")]
    Opaque,
}

/// A service: a name that clients call and the ports it offers. Local mode only; in a
/// cluster this comes from Kubernetes Services.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Virtual IPs clients dial (a Kubernetes Service's cluster IPs): a transparent
    /// proxy routes a connection to one of these, on a declared port, to this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// One instance of a service: the address of its proxy's inbound (mTLS) port and the
/// service account it runs as. Local mode only; in a cluster these are Pods.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub service: String,
    pub service_account: String,
    /// `host:port` of the workload proxy's inbound listener.
    pub address: String,
    /// Where this workload serves a service port when not on the address's port
    /// (service port → workload port), as a Kubernetes Service's `targetPort`: a
    /// transparent client dials the workload at the port the service port maps to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[cfg_attr(feature = "schema", schemars(
        with = "BTreeMap<String, u16>",
        extend("x-kubernetes-validations" = [{
            "rule": PORT_KEYS_RULE,
            "message": "ports is keyed by service port numbers, 1 to 65535"
        }])
    ))]
    pub ports: BTreeMap<u16, u16>,
}

/// Timeouts, retries and outlier detection for calls to one service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutePolicySpec {
    /// The service this policy governs (same namespace).
    pub service: String,
    /// Whole request, retries included.
    #[serde(default, with = "optional_duration")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>", regex(pattern = DURATION_PATTERN)))]
    pub timeout: Option<Duration>,
    /// Each attempt.
    #[serde(default, with = "optional_duration")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<String>", regex(pattern = DURATION_PATTERN)))]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<RetrySpec>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts after the first.
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// Retry non-idempotent requests too (e.g. gRPC unary calls known to be safe).
    #[serde(default)]
    pub retryable: bool,
    #[serde(default)]
    pub budget: RetryBudgetSpec,
}

fn default_retry_attempts() -> u32 {
    2
}

/// Retries may add at most `ratio` of live traffic plus `minPerSecond`, so they can never
/// multiply an outage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSpec {
    pub ratio: f64,
    pub min_per_second: u32,
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_base_ejection", with = "duration")]
    #[cfg_attr(feature = "schema", schemars(with = "String", regex(pattern = DURATION_PATTERN)))]
    pub base_ejection_time: Duration,
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetectionSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}

fn default_base_ejection() -> Duration {
    Duration::from_secs(10)
}

fn default_max_ejection_percent() -> u32 {
    50
}

/// What a duration looks like ("10s", "1m 30s", "250ms"), for the CRD schema: the API
/// server refuses anything else before the control plane sees it.
#[cfg(feature = "schema")]
pub(crate) const DURATION_PATTERN: &str = r"^([0-9]+ ?[a-zA-Zµ]+ ?)+$";

/// A CEL rule for a map keyed by port numbers (YAML and JSON keys are strings).
#[cfg(feature = "schema")]
pub(crate) const PORT_KEYS_RULE: &str =
    "self.all(port, port.matches('^[0-9]{1,5}$') && int(port) >= 1 && int(port) <= 65535)";

/// Durations as "10s", "250ms" (serde `with`; the proxy's configuration uses it too).
pub mod duration {
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

pub(crate) mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => super::duration::serialize(d, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(deserializer)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Mesh-wide settings. At most one per mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfigSpec {
    pub trust_domain: String,
    pub certificate_ttl: Duration,
    /// Directory with a plug-in intermediate CA (`ca-cert.pem`, `ca-key.pem`,
    /// `cert-chain.pem`, `root-cert.pem`), relative to the configuration directory.
    /// Without it the control plane runs its own development root.
    pub plugin_ca_dir: Option<PathBuf>,
}

impl Default for MeshConfigSpec {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            certificate_ttl: Self::DEFAULT_CERTIFICATE_TTL,
            plugin_ca_dir: None,
        }
    }
}

impl MeshConfigSpec {
    pub const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);
    /// Shorter certificates would spend more time renewing than serving.
    pub const MIN_CERTIFICATE_TTL: Duration = Duration::from_secs(5);
    pub const MAX_CERTIFICATE_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document<S> {
    #[allow(dead_code)] // checked through `Header`
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Option<S>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MeshConfigYaml {
    trust_domain: Option<Spanned<String>>,
    certificate_ttl: Option<Spanned<String>>,
    certificate_authority: Option<CertificateAuthorityYaml>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CertificateAuthorityYaml {
    plugin_certs_dir: Option<PathBuf>,
}

/// Parses every document of one YAML file; every document's error.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<Resource>, ConfigError> {
    let (resources, errors) = parse_each(file, text);
    ConfigError::all(errors).map_or(Ok(resources), Err)
}

/// The documents of one file that parse, and the errors of those that do not.
fn parse_each(file: &Path, text: &str) -> (Vec<Resource>, Vec<ConfigError>) {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for (first_line, doc) in split_documents(text) {
        if is_blank(doc) {
            continue;
        }
        match parse_document(file, first_line, doc) {
            Ok(resource) => resources.push(resource),
            Err(error) => errors.push(error),
        }
    }
    (resources, errors)
}

/// Reads all `*.yaml` / `*.yml` files of a directory (not recursive; hidden files
/// skipped), in name order; the error names every document that is wrong.
pub fn load_dir(dir: &Path) -> Result<Vec<Resource>, ConfigError> {
    load_dir_with(dir, &mut ParsedFiles::default())
}

/// [`load_dir`], parsing only the files whose content changed since `parsed` saw them.
pub fn load_dir_with(dir: &Path, parsed: &mut ParsedFiles) -> Result<Vec<Resource>, ConfigError> {
    let (resources, errors) = load_dir_each_with(dir, parsed);
    ConfigError::all(errors).map_or(Ok(resources), Err)
}

/// [`load_dir`]'s resources that parse, and the error of each one that does not.
pub fn load_dir_each(dir: &Path) -> (Vec<Resource>, Vec<ConfigError>) {
    load_dir_each_with(dir, &mut ParsedFiles::default())
}

/// The files of a directory as last parsed, kept between loads: parsing is most of a
/// load's cost, and a change usually touches one file of many.
#[derive(Debug, Default)]
pub struct ParsedFiles {
    files: HashMap<PathBuf, ParsedFile>,
}

#[derive(Debug)]
struct ParsedFile {
    /// What was parsed: a file is parsed again only when its content differs.
    text: String,
    resources: Vec<Resource>,
    errors: Vec<ConfigError>,
}

fn load_dir_each_with(dir: &Path, parsed: &mut ParsedFiles) -> (Vec<Resource>, Vec<ConfigError>) {
    let unreadable = |e: std::io::Error| ConfigError::at(dir, 0, format!("cannot read: {e}"));
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => return (Vec::new(), vec![unreadable(error)]),
    };
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(error) => return (Vec::new(), vec![unreadable(error)]),
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if is_yaml && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    // Files gone since the last load are forgotten.
    parsed
        .files
        .retain(|path, _| files.binary_search(path).is_ok());
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                parsed.files.remove(&file);
                errors.push(ConfigError::at(&file, 0, format!("cannot read: {e}")));
                continue;
            }
        };
        let known = parsed
            .files
            .get(&file)
            .is_some_and(|known| known.text == text);
        if !known {
            let (parsed_resources, wrong) = parse_each(&file, &text);
            let parsed_file = ParsedFile {
                text,
                resources: parsed_resources,
                errors: wrong,
            };
            parsed.files.insert(file.clone(), parsed_file);
        }
        if let Some(known) = parsed.files.get(&file) {
            resources.extend(known.resources.iter().cloned());
            errors.extend(known.errors.iter().cloned());
        }
    }
    (resources, errors)
}

/// The mesh settings of a set of resources: the one `MeshConfig`, or defaults.
pub fn mesh_config(resources: &[Resource]) -> Result<MeshConfigSpec, ConfigError> {
    let mut found: Option<(&Origin, &MeshConfigSpec)> = None;
    for resource in resources {
        let Spec::MeshConfig(spec) = &resource.spec else {
            continue;
        };
        if let Some((first, _)) = found {
            return Err(ConfigError {
                origin: resource.origin.clone(),
                reason: format!("a second MeshConfig; the first is at {first}"),
            });
        }
        found = Some((&resource.origin, spec));
    }
    Ok(found.map(|(_, spec)| spec.clone()).unwrap_or_default())
}

/// Splits a YAML stream at `---` document markers, keeping each document's first line
/// number (1-based) so errors can point into the file.
fn split_documents(text: &str) -> Vec<(u64, &str)> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_number = index as u64 + 1;
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            documents.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = line_number + 1;
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    documents
}

fn is_blank(document: &str) -> bool {
    document
        .lines()
        .all(|line| line.trim().is_empty() || line.trim_start().starts_with('#'))
}

fn parse_document(file: &Path, first_line: u64, text: &str) -> Result<Resource, ConfigError> {
    let line_of = |location: Option<serde_saphyr::Location>| {
        first_line + location.map_or(0, |l| l.line().saturating_sub(1))
    };
    let yaml_error =
        |e: serde_saphyr::Error| ConfigError::at(file, line_of(e.location()), plain_message(&e));
    let header: Header = serde_saphyr::from_str(text).map_err(yaml_error)?;
    let api_version = header
        .api_version
        .ok_or_else(|| ConfigError::at(file, first_line, "missing apiVersion"))?;
    if api_version.value != API_VERSION {
        return Err(ConfigError::at(
            file,
            line_of(Some(api_version.referenced)),
            format!("apiVersion {:?} is not {API_VERSION:?}", api_version.value),
        ));
    }
    let kind = header
        .kind
        .ok_or_else(|| ConfigError::at(file, first_line, "missing kind"))?;
    let origin = Origin {
        file: file.to_path_buf(),
        line: line_of(Some(kind.referenced)),
    };
    match kind.value.as_str() {
        "MeshConfig" => {
            let document: Document<MeshConfigYaml> =
                serde_saphyr::from_str(text).map_err(yaml_error)?;
            let spec = mesh_config_spec(document.spec.unwrap_or_default())
                .map_err(|(location, reason)| ConfigError::at(file, line_of(location), reason))?;
            Ok(Resource {
                origin,
                metadata: document.metadata,
                spec: Spec::MeshConfig(spec),
            })
        }
        "Service" => typed(text, origin, Spec::Service).map_err(yaml_error),
        "Workload" => typed(text, origin, Spec::Workload).map_err(yaml_error),
        "RoutePolicy" => typed(text, origin, Spec::RoutePolicy).map_err(yaml_error),
        "PeerAuthentication" => typed(text, origin, Spec::PeerAuthentication).map_err(yaml_error),
        "AuthorizationPolicy" => typed(text, origin, Spec::AuthorizationPolicy).map_err(yaml_error),
        "RequestAuthentication" => {
            typed(text, origin, Spec::RequestAuthentication).map_err(yaml_error)
        }
        "RateLimitPolicy" => typed(text, origin, Spec::RateLimitPolicy).map_err(yaml_error),
        other => Err(ConfigError {
            origin,
            reason: format!(
                "unknown kind {other:?} (this version understands: MeshConfig, Service, Workload, RoutePolicy, PeerAuthentication, AuthorizationPolicy, RequestAuthentication, RateLimitPolicy)"
            ),
        }),
    }
}

/// Parses a document whose spec deserializes straight into its domain type.
fn typed<S: serde::de::DeserializeOwned + Default>(
    text: &str,
    origin: Origin,
    wrap: fn(S) -> Spec,
) -> Result<Resource, serde_saphyr::Error> {
    let document: Document<S> = serde_saphyr::from_str(text)?;
    Ok(Resource {
        origin,
        metadata: document.metadata,
        spec: wrap(document.spec.unwrap_or_default()),
    })
}

type FieldError = (Option<serde_saphyr::Location>, String);

fn mesh_config_spec(yaml: MeshConfigYaml) -> Result<MeshConfigSpec, FieldError> {
    let mut spec = MeshConfigSpec::default();
    if let Some(trust_domain) = yaml.trust_domain {
        spiffe::validate_trust_domain(&trust_domain.value)
            .map_err(|e| (Some(trust_domain.referenced), e.to_string()))?;
        spec.trust_domain = trust_domain.value;
    }
    if let Some(ttl) = yaml.certificate_ttl {
        let at = Some(ttl.referenced);
        let parsed = humantime::parse_duration(&ttl.value)
            .map_err(|e| (at, format!("certificateTtl {:?}: {e}", ttl.value)))?;
        let range = MeshConfigSpec::MIN_CERTIFICATE_TTL..=MeshConfigSpec::MAX_CERTIFICATE_TTL;
        if !range.contains(&parsed) {
            return Err((
                at,
                format!("certificateTtl {:?} is outside 5s..90d", ttl.value),
            ));
        }
        spec.certificate_ttl = parsed;
    }
    spec.plugin_ca_dir = yaml
        .certificate_authority
        .and_then(|ca| ca.plugin_certs_dir);
    Ok(spec)
}

/// The error text without serde-saphyr's own position and snippet: we print ours.
fn plain_message(error: &serde_saphyr::Error) -> String {
    let rendered = error.to_string();
    let first_line = rendered.lines().next().unwrap_or("invalid YAML");
    // The parser's position is within the document, not the file: our origin says where.
    let message = first_line.strip_prefix("error: ").unwrap_or(first_line);
    let message = strip_position(message).unwrap_or(message);
    match message.find(" at line ") {
        Some(cut) => message[..cut].to_string(),
        None => message.to_string(),
    }
}

/// `message` without a leading `line N column M: `.
fn strip_position(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("line ")?;
    let (line, rest) = rest.split_once(" column ")?;
    let (column, rest) = rest.split_once(": ")?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (numeric(line) && numeric(column)).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Resource>, ConfigError> {
        parse_file(Path::new("mesh.yaml"), text)
    }

    #[test]
    fn every_bad_document_is_named_at_its_file_line() {
        let service = "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {addresses: [10.96.0.1], ports: [{port: 80, protocol: http}]}\n";
        let text = format!(
            "{service}---\napiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w, namespace: shop}}\nspec:\n  service: web\n  adress: 10.0.0.1:80\n---\napiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  action: MAYBE\n"
        );
        let error = parse(&text).unwrap_err().to_string();
        assert_eq!(
            error,
            "mesh.yaml:11: unknown field `adress`, expected one of service, serviceAccount, address, ports; \
             mesh.yaml:17: unknown variant `MAYBE`, expected one of ALLOW, DENY, AUDIT, CUSTOM"
        );
    }

    #[test]
    fn parses_mesh_config() {
        let resources = parse(
            "# the mesh\n---\napiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: mesh\nspec:\n  trustDomain: example.org\n  certificateTtl: 10s\n",
        )
        .unwrap();
        assert_eq!(resources.len(), 1);
        assert_eq!(resources[0].origin.line, 4);
        let spec = mesh_config(&resources).unwrap();
        assert_eq!(spec.trust_domain, "example.org");
        assert_eq!(spec.certificate_ttl, Duration::from_secs(10));
    }

    #[test]
    fn defaults_without_mesh_config() {
        let spec = mesh_config(&[]).unwrap();
        assert_eq!(spec.trust_domain, "cluster.local");
        assert_eq!(spec.certificate_ttl, Duration::from_secs(86400));
    }

    #[test]
    fn errors_point_at_the_line() {
        let two_docs = "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: a\n---\napiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: b\nspec:\n  certificateTtl: 3s\n";
        let error = parse(two_docs).unwrap_err();
        assert_eq!(error.origin.line, 11, "{error}");
        assert!(error.reason.contains("outside"), "{error}");

        let unknown_field = "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: a\nspec:\n  trustDomian: x\n";
        let error = parse(unknown_field).unwrap_err();
        assert_eq!(error.origin.line, 6, "{error}");
        assert!(error.reason.contains("trustDomian"), "{error}");

        let bad_kind = "apiVersion: tessera.dev/v1alpha1\nkind: Gateway\nmetadata:\n  name: a\n";
        let error = parse(bad_kind).unwrap_err();
        assert_eq!(error.origin.line, 2);
        assert!(error.reason.contains("Gateway"));

        let bad_version = "\napiVersion: v1\nkind: MeshConfig\n";
        assert_eq!(parse(bad_version).unwrap_err().origin.line, 2);

        let bad_domain = "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: a\nspec:\n  trustDomain: Bad/Domain\n";
        assert_eq!(parse(bad_domain).unwrap_err().origin.line, 6);

        let broken_yaml = "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata: [\n";
        assert!(parse(broken_yaml).is_err());
    }

    #[test]
    fn refuses_two_mesh_configs() {
        let text = "apiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: a\n---\napiVersion: tessera.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: b\n";
        let error = mesh_config(&parse(text).unwrap()).unwrap_err();
        assert_eq!(error.origin.line, 7);
        assert!(error.reason.contains("mesh.yaml:2"), "{error}");
    }
}

#[cfg(test)]
mod parsed_files_tests {
    use super::*;

    fn service(name: &str) -> String {
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n"
        )
    }

    fn names(resources: &[Resource]) -> Vec<&str> {
        resources.iter().map(|r| r.metadata.name.as_str()).collect()
    }

    /// Loads that reuse earlier parses see exactly what a fresh load sees: a changed
    /// file's new content, a removed file's absence, a broken file's error and its repair.
    #[test]
    fn reused_parses_follow_every_change() {
        let dir = std::env::temp_dir().join(format!("tessera-parsed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |file: &str, text: &str| std::fs::write(dir.join(file), text).unwrap();
        let mut parsed = ParsedFiles::default();
        let mut load = || {
            let reused = load_dir_with(&dir, &mut parsed);
            assert_eq!(
                reused,
                load_dir(&dir),
                "a reused parse differs from a fresh one"
            );
            reused
        };
        write("a.yaml", &service("web"));
        write("b.yaml", &service("api"));
        assert_eq!(names(&load().unwrap()), ["web", "api"]);
        write("a.yaml", &service("shop-web"));
        assert_eq!(names(&load().unwrap()), ["shop-web", "api"]);
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        assert_eq!(names(&load().unwrap()), ["shop-web"]);
        write(
            "a.yaml",
            "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: [\n",
        );
        assert!(load().unwrap_err().to_string().contains("a.yaml"));
        write("a.yaml", &service("web"));
        assert_eq!(names(&load().unwrap()), ["web"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
