//! The control plane's own metrics, on its admin port (15014).

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ca::reload::CurrentCa;

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

/// Which of the CA's certificates an expiry is of.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) enum CaCertificate {
    Root,
    Intermediate,
}

impl EncodeLabelValue for CaCertificate {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let name = match self {
            CaCertificate::Root => "root",
            CaCertificate::Intermediate => "intermediate",
        };
        std::fmt::Write::write_str(encoder, name)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaCertificateLabels {
    certificate: CaCertificate,
}

/// Every metric the control plane exports.
pub struct Metrics {
    registry: Registry,
    issued: Counter,
    refused: Family<RefusalLabels, Counter>,
    pub discovery_streams: Gauge,
    /// Discovery messages sent to proxies (only to those following what changed).
    pub config_pushes: Counter,
    /// The configuration generation in force (proxies acknowledge it on `/proxies`).
    pub config_generation: Gauge,
    /// From a configuration change noticed to the new snapshot published.
    pub config_push_latency: Histogram,
    /// Configuration changes refused (the last good one kept).
    pub config_refusals: Counter,
    /// When the CA in force's root and intermediate expire (Unix seconds).
    ca_expiry: Family<CaCertificateLabels, Gauge>,
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
        let config_generation = Gauge::default();
        let config_push_latency =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]);
        let config_refusals = Counter::default();
        let ca_expiry = Family::default();
        registry.register(
            "ca_certificate_expiry_timestamp_seconds",
            "When the CA in force expires (Unix time): certificate=\"root\" is the earliest of the roots its certificates chain to, \"intermediate\" the earliest of its signing certificate and the intermediates above it (absent when a root signs)",
            ca_expiry.clone(),
        );
        registry.register(
            "config_refusals",
            "Configuration changes refused; the last good configuration stays in force",
            config_refusals.clone(),
        );
        registry.register(
            "config_pushes",
            "Discovery messages sent to proxies: each carries only what changed, to the proxies following it",
            config_pushes.clone(),
        );
        registry.register(
            "config_generation",
            "The configuration generation in force; /proxies shows the one each proxy has applied",
            config_generation.clone(),
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
            config_generation,
            config_push_latency,
            config_refusals,
            ca_expiry,
        }
    }

    /// Sets the CA expiry gauges from the CA in force.
    pub fn ca_in_force(&self, ca: &CurrentCa) {
        let expiry = ca.load().authority().expiry();
        self.ca_expiry
            .get_or_create(&CaCertificateLabels {
                certificate: CaCertificate::Root,
            })
            .set(expiry.root.unix_timestamp());
        let intermediate = CaCertificateLabels {
            certificate: CaCertificate::Intermediate,
        };
        match expiry.intermediate {
            Some(at) => {
                self.ca_expiry
                    .get_or_create(&intermediate)
                    .set(at.unix_timestamp());
            }
            None => {
                self.ca_expiry.remove(&intermediate);
            }
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

/// Keeps the CA expiry gauges on the CA in force: set now, and again at every change
/// (a reloaded plug-in CA, a new root that starts signing).
pub(crate) async fn follow_ca(metrics: Arc<Metrics>, ca: Arc<CurrentCa>) {
    let mut changes = ca.changes();
    loop {
        changes.mark_unchanged();
        metrics.ca_in_force(&ca);
        if changes.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::ca::CertificateAuthority;
    use crate::ca::create::tests::TestPki;
    use crate::ca::layout::PluginFiles;
    use crate::ca::layout::tests::secret_volume;
    use crate::ca::reload::{Polled, Reloader};

    /// The expiry series as exported: (certificate label, value), root first (a family
    /// encodes its series in no fixed order).
    fn expiry_series(metrics: &Metrics) -> Vec<(String, i64)> {
        let prefix = "tessera_ca_certificate_expiry_timestamp_seconds{certificate=\"";
        let mut series: Vec<(String, i64)> = metrics
            .encode()
            .lines()
            .filter_map(|line| line.strip_prefix(prefix))
            .map(|rest| {
                let (label, value) = rest.split_once("\"} ").unwrap();
                (label.to_string(), value.parse().unwrap())
            })
            .collect();
        series.sort_by_key(|(label, _)| label != "root");
        series
    }

    fn expires(cert: &rustls_pki_types::CertificateDer<'_>) -> i64 {
        crate::ca::not_after(cert).unwrap().unix_timestamp()
    }

    /// The development root signs itself: one series, the root's, and no intermediate.
    #[test]
    fn the_development_root_has_a_root_expiry_only() {
        let dir = std::env::temp_dir().join(format!("tessera-telemetry-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = CurrentCa::new(CertificateAuthority::dev_root(&dir, "cluster.local").unwrap());
        let metrics = Metrics::new();
        metrics.ca_in_force(&ca);
        let root = expires(&ca.load().trust_bundle()[0]);
        assert_eq!(expiry_series(&metrics), [("root".to_string(), root)]);
        // Ten years ahead, give or take the backdating.
        let ahead = root - time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((ahead - 10 * 365 * 24 * 3600).abs() < 120, "{ahead}");
    }

    /// A plug-in CA exports its root and its intermediate, and a reloaded intermediate
    /// (renewed with a shorter life) replaces the intermediate's expiry at once.
    #[tokio::test(start_paused = true)]
    async fn a_reloaded_intermediate_updates_the_expiry() {
        let pki = TestPki::new();
        let dir = pki.scratch("expiry");
        let files = |pki: &TestPki| {
            [
                ("tls.crt", pki.intermediate_pem()),
                ("tls.key", pki.intermediate_key_pkcs8()),
                ("ca.crt", pki.root_pem()),
            ]
        };
        let lay_out = |version: &str, files: &[(&str, String)]| {
            let borrowed: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
            secret_volume(&dir, version, &borrowed);
        };
        lay_out("..v1", &files(&pki));
        let plugin = PluginFiles::read(&dir).unwrap();
        let authority = plugin.load().unwrap();
        let (mut reloader, ca) =
            Reloader::new(dir.clone(), &plugin, authority, Duration::from_secs(3600));
        let metrics = Arc::new(Metrics::new());
        let task = tokio::spawn(follow_ca(metrics.clone(), ca.clone()));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let root = expires(&pki.root);
        assert_eq!(
            expiry_series(&metrics),
            [
                ("root".to_string(), root),
                ("intermediate".to_string(), expires(&pki.intermediate))
            ]
        );

        let renewed = pki.renew_for(Duration::from_secs(30 * 24 * 3600));
        lay_out("..v2", &files(&renewed));
        assert_eq!(reloader.poll(SystemTime::now()), Polled::Activated);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let intermediate = expires(&renewed.intermediate);
        assert!(intermediate < expires(&pki.intermediate) - 300 * 24 * 3600);
        assert_eq!(
            expiry_series(&metrics),
            [
                ("root".to_string(), root),
                ("intermediate".to_string(), intermediate)
            ]
        );
        task.abort();
    }
}
