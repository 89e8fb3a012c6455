//! Control-plane figures, through its real gRPC APIs over mTLS, the way proxies call
//! them (the TLS configuration is the proxy's own, `tessera_mesh::tls::client_config`):
//! certificates signed per second (`Certify` with a join token, concurrent clients),
//! the time from a configuration file change to the last of many connected discovery
//! streams (`subscriber`) receiving it, and the control plane's memory per stream.
//! `fleet` measures the same at fleet scale.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tessera_mesh::SpiffeId;
use tessera_mesh::tls::{self, CurrentCert, Trust, TrustBundle};
use tessera_proto::api::identity::CertifyRequest;
use tessera_proto::api::identity::identity_client::IdentityClient;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::error::{BenchError, Result};
use crate::proc_stats;
use crate::subscriber::{ArrivalLog, Subscriber, Subscription};
use crate::topology::tessera::{ControlPlane, NAMESPACE, TRUST_DOMAIN};

/// The identity the simulated proxies certify as.
const SERVICE_ACCOUNT: &str = "bench-simulated";
/// Distinct CSRs signed over and over: generating keys is the client's cost, not the CA's.
const CSR_POOL: usize = 32;
/// Discovery streams opened at once while building up.
const CONNECT_BATCH: usize = 50;
/// The service the configuration change creates, which every stream subscribes to.
const CHANGED_SERVICE: &str = "bench-change";
const PUSH_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Config file renamed into place → the last stream has the new service.
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
    trust: Arc<Trust>,
    identity: SpiffeId,
    token: String,
}

/// Opens gRPC connections to one control plane as a proxy does: TCP without Nagle,
/// TLS verifying the control plane's SPIFFE ID and presenting a workload certificate
/// (or none, to `Certify`).
#[derive(Clone)]
pub struct Connector {
    address: std::net::SocketAddr,
    tls: TlsConnector,
}

impl Connector {
    pub async fn channel(&self) -> Result<Channel> {
        let (address, tls) = (self.address, self.tls.clone());
        Endpoint::from_static("http://tessera-control-plane")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_| {
                let tls = tls.clone();
                async move {
                    let tcp = TcpStream::connect(address).await?;
                    tcp.set_nodelay(true)?;
                    let stream = tls.connect(tls::server_name_for(address), tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| {
                BenchError::failed(
                    format!("connect to the control plane at {address}"),
                    tessera_mesh::process::error_report(&e),
                )
            })
    }
}

impl<'a> Harness<'a> {
    pub fn new(control_plane: &'a ControlPlane) -> Result<Self> {
        let bundle_file = control_plane.trust_bundle_file();
        let pem = std::fs::read(&bundle_file)
            .map_err(BenchError::io(format!("read {}", bundle_file.display())))?;
        let bundle =
            TrustBundle::from_pem(&pem).map_err(|e| BenchError::failed("trust bundle", e))?;
        Ok(Self {
            control_plane,
            trust: Trust::new(TRUST_DOMAIN, bundle),
            identity: format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}")
                .parse()
                .map_err(|e| BenchError::failed("SPIFFE ID", e))?,
            // Every Certify call presents it; single-use would allow one.
            token: control_plane.reusable_token(SERVICE_ACCOUNT)?,
        })
    }

    /// How to connect to this control plane, presenting `cert`; it outlives the harness.
    pub fn connector(&self, cert: Option<Arc<CurrentCert>>) -> Result<Connector> {
        let control_plane = SpiffeId::control_plane(TRUST_DOMAIN)
            .map_err(|e| BenchError::failed("SPIFFE ID", e))?;
        let config = tls::client_config(self.trust.clone(), control_plane, cert, &[b"h2"])
            .map_err(|e| BenchError::failed("TLS client configuration", e))?;
        Ok(Connector {
            address: self.control_plane.address,
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    async fn channel(&self, cert: Option<Arc<CurrentCert>>) -> Result<Channel> {
        self.connector(cert)?.channel().await
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

    /// Connects `streams` discovery streams (one mTLS connection each, all with one
    /// workload certificate), each subscribed to its policies and to a service that does
    /// not exist yet, then creates that service and times its arrival.
    pub async fn config_push(&self, streams: usize) -> Result<PushFigures> {
        let connector = self.connector(Some(self.workload_cert().await?))?;
        let pid = self.control_plane.process.pid();
        let rss_before = proc_stats::memory(pid)?.rss;
        let log = Arc::new(ArrivalLog::default());
        let names = vec![
            "policies".to_string(),
            format!("service/{CHANGED_SERVICE}.{NAMESPACE}"),
        ];
        let mut subscribers = Vec::with_capacity(streams);
        while subscribers.len() < streams {
            let batch =
                (subscribers.len()..streams.min(subscribers.len() + CONNECT_BATCH)).map(|stream| {
                    let subscription = Subscription::fresh(stream, names.clone());
                    Subscriber::connect(&connector, subscription, log.clone())
                });
            subscribers.extend(try_join_all(batch).await?);
        }
        // Let allocations settle before reading memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_after = proc_stats::memory(pid)?.rss;
        let (arrivals, changed_at) = self.time_push(&log, &names[1], streams).await?;
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

    /// Writes the new Service and waits for every stream to receive `name`; returns
    /// when each did, and when the file was renamed into place.
    async fn time_push(
        &self,
        log: &ArrivalLog,
        name: &str,
        streams: usize,
    ) -> Result<(Vec<Instant>, Instant)> {
        log.take();
        let changed_at = Instant::now();
        self.control_plane.write_config(
            "bench-change.yaml",
            &format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: {CHANGED_SERVICE}, namespace: {NAMESPACE}}}\nspec:\n  ports: [{{port: 8080, protocol: http}}]\n"
            ),
        )?;
        let deadline = changed_at + PUSH_TIMEOUT;
        while log.answers(name) < streams {
            if Instant::now() > deadline {
                return Err(BenchError::failed(
                    "configuration push",
                    format!(
                        "{} of {streams} streams got it within 60 s",
                        log.answers(name)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let arrivals = log
            .take()
            .into_iter()
            .filter(|arrival| arrival.resources.iter().any(|n| n == name))
            .map(|arrival| arrival.at)
            .collect();
        Ok((arrivals, changed_at))
    }

    /// A workload certificate from `Certify`, as a proxy would hold it.
    pub async fn workload_cert(&self) -> Result<Arc<CurrentCert>> {
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
