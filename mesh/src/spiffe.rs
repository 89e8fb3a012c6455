//! SPIFFE identities as Tessera uses them: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//!
//! A [`SpiffeId`] can only hold a valid identity, so code that has one never re-checks it.

use std::fmt;
use std::str::FromStr;

/// Default trust domain, as in Kubernetes clusters.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: trust domain, namespace and service account.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte ranges of the three parts inside `uri`.
    trust_domain_end: usize,
    namespace: (usize, usize),
    service_account_start: usize,
}

/// Why a string is not a Tessera SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error(
        "SPIFFE ID {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error(
        "invalid namespace {0:?}: must be a DNS label (lowercase letters, digits and '-', at most 63)"
    )]
    Namespace(String),
    #[error(
        "invalid service account {0:?}: must be a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253)"
    )]
    ServiceAccount(String),
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_namespace(namespace)?;
        validate_service_account(service_account)?;
        let uri = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        let trust_domain_end = "spiffe://".len() + trust_domain.len();
        let ns_start = trust_domain_end + "/ns/".len();
        let ns_end = ns_start + namespace.len();
        Ok(Self {
            service_account_start: ns_end + "/sa/".len(),
            uri,
            trust_domain_end,
            namespace: (ns_start, ns_end),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.trust_domain_end]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace.0..self.namespace.1]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account_start..]
    }

    /// The control plane's own identity in a trust domain.
    pub fn control_plane(trust_domain: &str) -> Result<Self, SpiffeIdError> {
        Self::new(trust_domain, "tessera-system", "tessera-control-plane")
    }

    /// The full URI, as it appears in the certificate's URI SAN.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(uri.to_string()))?;
        let shape = || SpiffeIdError::Shape(uri.to_string());
        let (trust_domain, path) = rest.split_once('/').ok_or_else(shape)?;
        let path = path.strip_prefix("ns/").ok_or_else(shape)?;
        let (namespace, path) = path.split_once('/').ok_or_else(shape)?;
        let service_account = path.strip_prefix("sa/").ok_or_else(shape)?;
        Self::new(trust_domain, namespace, service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let uri = String::deserialize(deserializer)?;
        uri.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a trust domain name (SPIFFE: lowercase letters, digits, '.', '-', '_').
pub fn validate_trust_domain(name: &str) -> Result<(), SpiffeIdError> {
    let valid = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    valid
        .then_some(())
        .ok_or_else(|| SpiffeIdError::TrustDomain(name.to_string()))
}

/// Checks a Kubernetes namespace name (RFC 1123 label).
pub fn validate_namespace(name: &str) -> Result<(), SpiffeIdError> {
    is_dns_label(name)
        .then_some(())
        .ok_or_else(|| SpiffeIdError::Namespace(name.to_string()))
}

/// Checks a Kubernetes service account name (RFC 1123 subdomain).
pub fn validate_service_account(name: &str) -> Result<(), SpiffeIdError> {
    let valid = !name.is_empty() && name.len() <= 253 && name.split('.').all(is_dns_label);
    valid
        .then_some(())
        .ok_or_else(|| SpiffeIdError::ServiceAccount(name.to_string()))
}

fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_exposes_parts() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/frontend"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "frontend");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/frontend");
        assert_eq!(
            SpiffeId::new("cluster.local", "shop", "frontend").unwrap(),
            id
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/-a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn service_account_may_be_a_subdomain() {
        let id: SpiffeId = "spiffe://td/ns/a/sa/b.c-d".parse().unwrap();
        assert_eq!(id.service_account(), "b.c-d");
    }
}
