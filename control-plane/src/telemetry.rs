//! The control plane's own metrics, on its admin port (15014).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Why a certificate request was refused; a closed set, so labels stay bounded.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RefusalReason {
    /// Join token malformed, forged, expired or foreign.
    Token,
    /// Neither token nor client certificate.
    Unauthenticated,
    /// CSR for another identity, a CA, extra SANs, or unparsable.
    Csr,
    /// The CA itself failed.
    Internal,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Token => "token",
            RefusalReason::Unauthenticated => "unauthenticated",
            RefusalReason::Csr => "csr",
            RefusalReason::Internal => "internal",
        }
    }
}

impl EncodeLabelValue for RefusalReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: RefusalReason,
}

/// Every metric the control plane exports.
pub struct Metrics {
    registry: Registry,
    issued: Counter,
    refused: Family<RefusalLabels, Counter>,
    pub discovery_streams: Gauge,
    /// Snapshots delivered to proxies (one per proxy per version).
    pub config_pushes: Counter,
    /// From a configuration change noticed to the new snapshot published.
    pub config_push_latency: Histogram,
    /// Configuration changes refused (the last good one kept).
    pub config_refusals: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let issued = Counter::default();
        let refused = Family::default();
        let discovery_streams = Gauge::default();
        let config_pushes = Counter::default();
        let config_push_latency =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]);
        let config_refusals = Counter::default();
        registry.register(
            "config_refusals",
            "Configuration changes refused; the last good configuration stays in force",
            config_refusals.clone(),
        );
        registry.register(
            "config_pushes",
            "Configuration snapshots delivered to proxies",
            config_pushes.clone(),
        );
        registry.register_with_unit(
            "config_push_latency",
            "From a configuration change noticed to the snapshot published",
            prometheus_client::registry::Unit::Seconds,
            config_push_latency.clone(),
        );
        registry.register(
            "ca_certificates_issued",
            "Workload certificates signed",
            issued.clone(),
        );
        registry.register(
            "ca_certificates_refused",
            "Certificate requests refused, by reason",
            refused.clone(),
        );
        registry.register(
            "accept_errors",
            "Connections a listener could not accept",
            tessera_mesh::process::accept::ACCEPT_ERRORS.clone(),
        );
        registry.register(
            "discovery_connected_proxies",
            "Proxies with an open discovery stream",
            discovery_streams.clone(),
        );
        Self {
            registry,
            issued,
            refused,
            discovery_streams,
            config_pushes,
            config_push_latency,
            config_refusals,
        }
    }

    pub fn issued(&self) {
        self.issued.inc();
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(2048);
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
