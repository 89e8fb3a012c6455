//! Control-plane figures, through its real gRPC APIs over mTLS, the way proxies call
//! them (the connection code is the proxy's own, `tessera_proxy::control_plane`):
//! certificates signed per second (`Certify` with a join token, concurrent clients),
//! the time from a configuration file change to the last of many connected discovery
//! streams receiving the new snapshot, and the control plane's memory per stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tessera_mesh::SpiffeId;
use tessera_mesh::tls::{self, CurrentCert, Trust, TrustBundle};
use tessera_proto::api::discovery::discovery_client::DiscoveryClient;
use tessera_proto::api::discovery::{Snapshot, WatchRequest};
use tessera_proto::api::identity::CertifyRequest;
use tessera_proto::api::identity::identity_client::IdentityClient;
use tessera_proxy::control_plane::ControlPlane as Endpoint;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::error::{BenchError, Result};
use crate::proc_stats;
use crate::topology::tessera::{ControlPlane, NAMESPACE, TRUST_DOMAIN};

/// The identity the simulated proxies certify as.
const SERVICE_ACCOUNT: &str = "bench-simulated";
/// Distinct CSRs signed over and over: generating keys is the client's cost, not the CA's.
const CSR_POOL: usize = 32;
/// Discovery streams opened at once while building up.
const CONNECT_BATCH: usize = 50;
const PUSH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize)]
pub struct CertifyFigures {
    pub generator: String,
    pub certificates: u64,
    pub errors: u64,
    pub per_second: f64,
    /// Control-plane CPU per certificate, microseconds.
    pub cpu_us_per_certificate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushFigures {
    pub streams: usize,
    /// Config file renamed into place → the last stream has the new snapshot.
    pub last_stream_ms: f64,
    pub median_stream_ms: f64,
    /// Control-plane RSS growth while the streams connected, divided by their number.
    pub rss_bytes_per_stream: f64,
    pub control_plane_rss_before: u64,
    pub control_plane_rss_after: u64,
}

/// Clients of one control plane, as a proxy of the bench namespace.
pub struct Harness<'a> {
    control_plane: &'a ControlPlane,
    endpoint: Endpoint,
    trust: Arc<Trust>,
    identity: SpiffeId,
    token: String,
}

impl<'a> Harness<'a> {
    pub fn new(control_plane: &'a ControlPlane) -> Result<Self> {
        let bundle_file = control_plane.trust_bundle_file();
        let pem = std::fs::read(&bundle_file)
            .map_err(BenchError::io(format!("read {}", bundle_file.display())))?;
        let bundle =
            TrustBundle::from_pem(&pem).map_err(|e| BenchError::failed("trust bundle", e))?;
        let spiffe = |id: Result<SpiffeId, _>| id.map_err(|e| BenchError::failed("SPIFFE ID", e));
        Ok(Self {
            control_plane,
            endpoint: Endpoint {
                address: control_plane.address.to_string(),
                identity: spiffe(SpiffeId::control_plane(TRUST_DOMAIN))?,
            },
            trust: Trust::new(TRUST_DOMAIN, bundle),
            identity: spiffe(
                format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}").parse(),
            )?,
            // Every Certify call presents it; single-use would allow one.
            token: control_plane.reusable_token(SERVICE_ACCOUNT)?,
        })
    }

    async fn channel(&self, cert: Option<Arc<CurrentCert>>) -> Result<Channel> {
        self.endpoint
            .connect(self.trust.clone(), cert)
            .await
            .map_err(|e| BenchError::failed("connect to the control plane", e))
    }

    /// `clients` concurrent callers of `Certify`, each on its own connection, for
    /// `duration`.
    pub async fn certify_rate(&self, clients: usize, duration: Duration) -> Result<CertifyFigures> {
        let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..CSR_POOL)
                .map(|_| self.csr().map(|(_, csr)| csr))
                .collect::<Result<_>>()?,
        );
        let mut callers = Vec::with_capacity(clients);
        for _ in 0..clients {
            callers.push(IdentityClient::new(self.channel(None).await?));
        }
        let pid = self.control_plane.process.pid();
        let cpu_before = proc_stats::cpu_time(pid)?;
        let start = Instant::now();
        let deadline = start + duration;
        let tasks: Vec<_> = callers
            .into_iter()
            .enumerate()
            .map(|(index, mut client)| {
                let (csrs, token) = (csrs.clone(), self.token.clone());
                tokio::spawn(async move {
                    let (mut signed, mut errors) = (0u64, 0u64);
                    let mut next = index;
                    while Instant::now() < deadline {
                        let request = CertifyRequest {
                            csr_der: csrs[next % csrs.len()].clone(),
                            join_token: token.clone(),
                            ..Default::default()
                        };
                        next += clients;
                        match client.certify(request).await {
                            Ok(_) => signed += 1,
                            Err(_) => errors += 1,
                        }
                    }
                    (signed, errors)
                })
            })
            .collect();
        let (mut certificates, mut errors) = (0, 0);
        for task in tasks {
            let (signed, failed) = task
                .await
                .map_err(|e| BenchError::failed("Certify caller", e))?;
            certificates += signed;
            errors += failed;
        }
        let elapsed = start.elapsed();
        let cpu = proc_stats::cpu_time(pid)?.saturating_sub(cpu_before);
        Ok(CertifyFigures {
            generator: format!(
                "tessera-benches Certify callers: {clients} concurrent, gRPC over TLS, join token"
            ),
            certificates,
            errors,
            per_second: certificates as f64 / elapsed.as_secs_f64(),
            cpu_us_per_certificate: cpu.as_secs_f64() * 1e6 / certificates.max(1) as f64,
        })
    }

    /// Connects `streams` discovery watchers (one mTLS connection each, all with one
    /// workload certificate), then changes the configuration and times the push.
    pub async fn config_push(&self, streams: usize) -> Result<PushFigures> {
        let cert = self.workload_cert().await?;
        let pid = self.control_plane.process.pid();
        let rss_before = proc_stats::memory(pid)?.rss;
        let mut watchers = Vec::with_capacity(streams);
        while watchers.len() < streams {
            let batch = CONNECT_BATCH.min(streams - watchers.len());
            let opened = try_join_all((0..batch).map(|_| self.watch(cert.clone()))).await?;
            watchers.extend(opened);
        }
        // Let allocations settle before reading memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_after = proc_stats::memory(pid)?.rss;
        let (arrivals, changed_at) = self.time_push(watchers).await?;
        let mut delays: Vec<f64> = arrivals
            .iter()
            .map(|arrival| arrival.saturating_duration_since(changed_at).as_secs_f64() * 1e3)
            .collect();
        delays.sort_by(f64::total_cmp);
        Ok(PushFigures {
            streams,
            last_stream_ms: delays.last().copied().unwrap_or_default(),
            median_stream_ms: delays.get(delays.len() / 2).copied().unwrap_or_default(),
            rss_bytes_per_stream: rss_after.saturating_sub(rss_before) as f64 / streams as f64,
            control_plane_rss_before: rss_before,
            control_plane_rss_after: rss_after,
        })
    }

    /// Writes a new Service and waits for every watcher to see a new version; returns
    /// when each did, and when the file was renamed into place.
    async fn time_push(&self, watchers: Vec<Watcher>) -> Result<(Vec<Instant>, Instant)> {
        let waiting: Vec<_> = watchers
            .into_iter()
            .map(|watcher| tokio::spawn(watcher.next_version()))
            .collect();
        let changed_at = Instant::now();
        self.control_plane.write_config(
            "bench-change.yaml",
            &format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: bench-change-{}, namespace: {NAMESPACE}}}\nspec:\n  ports: [{{port: 8080, protocol: http}}]\n",
                std::process::id()
            ),
        )?;
        let mut arrivals = Vec::with_capacity(waiting.len());
        for task in waiting {
            let arrival = tokio::time::timeout(PUSH_TIMEOUT, task)
                .await
                .map_err(|_| {
                    BenchError::failed("configuration push", "a stream got nothing within 60 s")
                })?
                .map_err(|e| BenchError::failed("configuration push", e))??;
            arrivals.push(arrival);
        }
        Ok((arrivals, changed_at))
    }

    async fn watch(&self, cert: Arc<CurrentCert>) -> Result<Watcher> {
        let channel = self.channel(Some(cert)).await?;
        let mut stream = DiscoveryClient::new(channel.clone())
            .watch(WatchRequest::default())
            .await
            .map_err(|status| BenchError::failed("Watch", status))?
            .into_inner();
        let first = next_snapshot(&mut stream).await?;
        Ok(Watcher {
            _channel: channel,
            stream,
            version: first.version,
        })
    }

    /// A workload certificate from `Certify`, as a proxy would hold it.
    async fn workload_cert(&self) -> Result<Arc<CurrentCert>> {
        let (key, csr) = self.csr()?;
        let response = IdentityClient::new(self.channel(None).await?)
            .certify(CertifyRequest {
                csr_der: csr,
                join_token: self.token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|status| BenchError::failed("Certify", status))?
            .into_inner();
        let chain = response
            .cert_chain_der
            .into_iter()
            .map(Into::into)
            .collect();
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(chain, private_key, &tls::crypto_provider())
            .map_err(|e| BenchError::failed("load the workload certificate", e))?;
        let current = CurrentCert::new();
        current.set(certified);
        Ok(current)
    }

    /// A fresh P-256 key and a CSR for this harness's identity.
    fn csr(&self) -> Result<(KeyPair, Vec<u8>)> {
        let failed = |e: rcgen::Error| BenchError::failed("make a CSR", e);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(failed)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            self.identity.as_str().try_into().map_err(failed)?,
        )];
        let csr = params.serialize_request(&key).map_err(failed)?;
        Ok((key, csr.der().to_vec()))
    }
}

/// One simulated proxy's discovery stream.
struct Watcher {
    _channel: Channel,
    stream: Streaming<Snapshot>,
    version: String,
}

impl Watcher {
    /// When a snapshot with another version arrived.
    async fn next_version(mut self) -> Result<Instant> {
        loop {
            let snapshot = next_snapshot(&mut self.stream).await?;
            if snapshot.version != self.version {
                return Ok(Instant::now());
            }
        }
    }
}

async fn next_snapshot(stream: &mut Streaming<Snapshot>) -> Result<Snapshot> {
    stream
        .message()
        .await
        .map_err(|status| BenchError::failed("discovery stream", status))?
        .ok_or_else(|| BenchError::failed("discovery stream", "closed by the control plane"))
}
