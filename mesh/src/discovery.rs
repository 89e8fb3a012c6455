//! What a proxy subscribes to through the discovery API, by name, and the limits both
//! sides hold the stream to.
//!
//! A proxy follows its own inbound [`PolicySet`] and the services it calls — each a
//! [`ServiceEntry`], named by key (`service/web.shop`) or, in transparent mode, by the
//! virtual IP a connection was made to (`address/10.96.0.10`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::policy::{
    AuthorizationPolicySpec, Named, PeerAuthenticationSpec, ROOT_NAMESPACE,
    RequestAuthenticationSpec,
};
use crate::rate_limit::RateLimitPolicySpec;
use crate::snapshot::MeshSnapshot;

/// The largest discovery message either side decodes, in bytes. The control plane
/// splits its answers so that none is larger, and refuses a configuration with a
/// single resource larger than [`MAX_RESOURCE_BYTES`].
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The largest request message the control plane decodes, on either API. Proxies send
/// a CSR (~500 bytes) with a join token or a Kubernetes service-account token (~1–2
/// KiB), or discovery subscriptions, which they split over several requests: 64 KiB is
/// ample, and keeps a hostile caller from making the control plane buffer tonic's
/// default of 4 MiB per message.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The largest body of one resource. A service of ~35,000 endpoints, or policies with
/// large inline key sets or Rego modules, still fit; the rest of the message is room
/// for the name and version.
pub const MAX_RESOURCE_BYTES: usize = MAX_MESSAGE_BYTES - 64 * 1024;

/// Names one stream may follow at once: a hostile caller cannot make the control plane
/// hold more, and no sidecar calls this many services.
pub const MAX_SUBSCRIPTIONS: usize = 16_384;

/// The longest resource name accepted (`service/` and a DNS name of 253 bytes fit).
pub const MAX_NAME_BYTES: usize = 300;

/// A discovery resource, as named on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceName {
    /// The caller's inbound policies.
    Policies,
    /// A service by key, `name.namespace`.
    Service(String),
    /// The service at a virtual IP.
    Address(IpAddr),
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Policies => f.write_str("policies"),
            Self::Service(key) => write!(f, "service/{key}"),
            Self::Address(ip) => write!(f, "address/{ip}"),
        }
    }
}

/// Why a resource name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("resource name longer than {MAX_NAME_BYTES} bytes")]
    TooLong,
    #[error("resource name {0:?} is none of policies, service/NAME.NAMESPACE, address/IP")]
    Unknown(String),
}

impl FromStr for ResourceName {
    type Err = NameError;

    fn from_str(name: &str) -> Result<Self, NameError> {
        if name.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong);
        }
        let unknown = || NameError::Unknown(name.to_string());
        if name == "policies" {
            return Ok(Self::Policies);
        }
        match name.split_once('/') {
            Some(("service", key)) if is_service_key(key) => Ok(Self::Service(key.to_string())),
            Some(("address", ip)) => ip.parse().map(Self::Address).map_err(|_| unknown()),
            _ => Err(unknown()),
        }
    }
}

/// `name.namespace`, both DNS labels.
fn is_service_key(key: &str) -> bool {
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    matches!(key.split_once('.'), Some((name, namespace)) if label(name) && label(namespace))
}

/// The policies a proxy enforces on its inbound side: those of its namespace and of the
/// root namespace (mesh-wide), which are the only ones that can select it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySet {
    pub trust_domain: String,
    #[serde(default)]
    pub peer_authentications: Vec<Named<PeerAuthenticationSpec>>,
    #[serde(default)]
    pub authorization_policies: Vec<Named<AuthorizationPolicySpec>>,
    #[serde(default)]
    pub request_authentications: Vec<Named<RequestAuthenticationSpec>>,
    #[serde(default)]
    pub rate_limit_policies: Vec<Named<RateLimitPolicySpec>>,
}

impl PolicySet {
    /// The policies of `snapshot` that can select a workload of `namespace`.
    pub fn for_namespace(snapshot: &MeshSnapshot, namespace: &str) -> Self {
        fn of<T: Clone>(policies: &[Named<T>], namespace: &str) -> Vec<Named<T>> {
            policies
                .iter()
                .filter(|p| p.namespace == namespace || p.namespace == ROOT_NAMESPACE)
                .cloned()
                .collect()
        }
        Self {
            trust_domain: snapshot.trust_domain.clone(),
            peer_authentications: of(&snapshot.peer_authentications, namespace),
            authorization_policies: of(&snapshot.authorization_policies, namespace),
            request_authentications: of(&snapshot.request_authentications, namespace),
            rate_limit_policies: of(&snapshot.rate_limit_policies, namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "policies",
            "service/web.shop",
            "address/10.96.0.10",
            "address/fd96::20",
        ] {
            let parsed: ResourceName = name.parse().unwrap();
            assert_eq!(parsed.to_string(), name);
        }
    }

    /// Whatever a caller sends is either one of the three forms or refused, naming it.
    #[test]
    fn hostile_names_are_refused() {
        for name in [
            "",
            "policies/x",
            "service/",
            "service/web",
            "service/web.",
            "service/.shop",
            "service/Web.shop",
            "service/web.shop.extra",
            "service/web.shop/x",
            "service/../etc",
            "address/",
            "address/10.0.0.300",
            "address/10.0.0.1:80",
            "cluster/x",
        ] {
            let error = name.parse::<ResourceName>().unwrap_err();
            assert_eq!(error, NameError::Unknown(name.to_string()), "{name}");
        }
        let long = format!("service/{}.shop", "a".repeat(400));
        assert_eq!(long.parse::<ResourceName>(), Err(NameError::TooLong));
        assert!(
            format!("service/{}.{}", "a".repeat(63), "b".repeat(63))
                .parse::<ResourceName>()
                .is_ok()
        );
    }

    #[test]
    fn a_namespace_gets_its_own_and_the_root_namespaces_policies() {
        let named = |namespace: &str, name: &str| Named {
            name: name.into(),
            namespace: namespace.into(),
            spec: AuthorizationPolicySpec::default(),
        };
        let snapshot = MeshSnapshot {
            trust_domain: "cluster.local".into(),
            authorization_policies: vec![
                named("shop", "shop-only"),
                named("billing", "billing-only"),
                named(ROOT_NAMESPACE, "mesh-wide"),
            ],
            ..MeshSnapshot::default()
        };
        let names = |namespace: &str| -> Vec<String> {
            PolicySet::for_namespace(&snapshot, namespace)
                .authorization_policies
                .into_iter()
                .map(|p| p.name)
                .collect()
        };
        assert_eq!(names("shop"), ["shop-only", "mesh-wide"]);
        assert_eq!(names("billing"), ["billing-only", "mesh-wide"]);
        assert_eq!(names("empty"), ["mesh-wide"]);
        assert_eq!(
            PolicySet::for_namespace(&snapshot, "x").trust_domain,
            "cluster.local"
        );
    }
}
