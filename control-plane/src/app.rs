//! Wiring of the control plane: configuration, CA, token authority, the gRPC services
//! on 15012, the admin endpoint on 15014 and the injection webhook on 15017.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http::StatusCode;
use rcgen::KeyPair;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tessera_mesh::SpiffeId;
use tessera_mesh::process::admin::{self, Reply};
use tessera_mesh::resources::{self, MeshConfigSpec};
use tessera_mesh::tls::{self, ClientAuth, CurrentCert, Trust, TrustBundle};
use tessera_proto::api::discovery::discovery_server::DiscoveryServer;
use tessera_proto::api::identity::identity_server::IdentityServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::ca::reload::{self, CurrentCa, Reloader};
use crate::ca::{CertificateAuthority, Issued};
use crate::discovery_service::{ConnectedProxies, DiscoveryService};
use crate::identity_service::IdentityService;
use crate::kubernetes::lease;
use crate::kubernetes::objects::ClusterObjects;
use crate::kubernetes::status;
use crate::kubernetes::tokens::ServiceAccountTokens;
use crate::telemetry::Metrics;
use crate::token::{self, TokenAuthority};
use crate::webhook;

/// The control plane's own certificate lives this long and is renewed at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The first list of the cluster's objects, before any snapshot is served: a control
/// plane that cannot see the policies in force must not start without them.
const CLUSTER_LIST_TIMEOUT: Duration = Duration::from_secs(60);
/// The file proxies bootstrap trust from.
pub const TRUST_BUNDLE_FILE: &str = "root-cert.pem";

/// Where the control plane reads from, writes to and listens on.
#[derive(Debug, Clone)]
pub struct Options {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub webhook_listen: SocketAddr,
    /// What the webhook injects; its trust domain is always the MeshConfig's.
    pub inject: crate::inject::Options,
    /// Cluster mode: the Kubernetes API to verify pods' tokens with. None: local mode.
    pub cluster: Option<crate::kubernetes::ClusterMode>,
}

impl Options {
    /// The state directory when none is given: `<config>/.tessera-state`.
    pub fn default_state_dir(config_dir: &Path) -> PathBuf {
        config_dir.join(".tessera-state")
    }
}

/// A started control plane. Dropping it stops every task.
pub struct RunningControlPlane {
    pub grpc_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub webhook_address: SocketAddr,
    pub trust_domain: String,
    /// PEM file of the current trust bundle, for proxies to bootstrap from.
    pub trust_bundle_file: PathBuf,
    pub metrics: Arc<Metrics>,
    /// The proxies with an open discovery stream (what `/proxies` lists).
    pub(crate) proxies: Arc<ConnectedProxies>,
    tokens: Arc<TokenAuthority>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningControlPlane {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RunningControlPlane {
    /// A single-use join token for a workload of this mesh.
    pub fn create_token(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let identity = SpiffeId::new(&self.trust_domain, namespace, service_account)?;
        Ok(self
            .tokens
            .create(&identity, ttl, token::TokenUse::SingleUse))
    }
}

/// Reads the mesh settings from the configuration directory.
pub fn load_mesh_config(config_dir: &Path) -> anyhow::Result<MeshConfigSpec> {
    let resources = resources::load_dir(config_dir)?;
    Ok(resources::mesh_config(&resources)?)
}

/// Creates a join token from the state directory, as `tessera token create` does.
pub fn create_token(
    config_dir: &Path,
    state_dir: &Path,
    namespace: &str,
    service_account: &str,
    ttl: Duration,
    usage: token::TokenUse,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        ttl > Duration::ZERO && ttl <= token::MAX_TTL,
        "--ttl must be between 1s and 30 days"
    );
    let mesh = load_mesh_config(config_dir)?;
    let identity = SpiffeId::new(&mesh.trust_domain, namespace, service_account)?;
    Ok(token::create_in(state_dir, &identity, ttl, usage)?)
}

/// Starts the control plane; returns once it listens.
pub async fn start(options: Options) -> anyhow::Result<RunningControlPlane> {
    let mesh = load_mesh_config(&options.config_dir)?;
    crate::state::create_dir(&options.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            options.state_dir.display()
        )
    })?;
    let cluster = match &options.cluster {
        Some(cluster) => Some(crate::kubernetes::client(cluster.kubeconfig.as_deref()).await?),
        None => None,
    };
    let (ca, reloader) = certificate_authority(&options, &mesh, cluster.as_ref()).await?;
    let trust_bundle = TrustBundle::new(ca.load().trust_bundle().to_vec())?;
    let trust_bundle_file = options.state_dir.join(TRUST_BUNDLE_FILE);
    let trust_bundle_pem = trust_bundle.to_pem();
    crate::state::write_public(&trust_bundle_file, trust_bundle_pem.as_bytes())?;
    // The bundle as published to the cluster; follows the CA (see `follow_ca`).
    let (published_bundle, bundle_changes) = tokio::sync::watch::channel(trust_bundle_pem);
    let tokens = Arc::new(TokenAuthority::load_or_create(&options.state_dir)?);
    let metrics = Arc::new(Metrics::new());
    // Before the admin port serves; `telemetry::follow_ca` keeps it current afterwards.
    metrics.ca_in_force(&ca);

    let own_identity = SpiffeId::control_plane(&mesh.trust_domain)?;
    let serving_cert = CurrentCert::new();
    let issue_serving_cert = {
        let (ca, identity) = (ca.clone(), own_identity.clone());
        move || {
            let (issued, key) = ca
                .load()
                .authority()
                .issue_with_new_key(&identity, SERVING_CERT_TTL)?;
            certified_key(issued, &key)
        }
    };
    serving_cert.set(issue_serving_cert()?);
    let webhook_cert = CurrentCert::new();
    let issue_webhook_cert = {
        let ca = ca.clone();
        move || {
            let (issued, key) = ca.load().authority().issue_server_cert(
                &webhook::DNS_NAMES,
                &webhook::IP_ADDRESSES,
                SERVING_CERT_TTL,
            )?;
            certified_key(issued, &key)
        }
    };
    webhook_cert.set(issue_webhook_cert()?);
    let trust = Trust::new(mesh.trust_domain.clone(), trust_bundle);
    let server_config = tls::server_config(
        trust.clone(),
        serving_cert.clone(),
        ClientAuth::Optional,
        &[b"h2"],
    )?;

    let kubernetes = cluster.as_ref().map(|client| {
        Arc::new(ServiceAccountTokens::new(
            client.clone(),
            mesh.trust_domain.clone(),
        ))
    });
    let identity_service = IdentityService {
        ca: ca.clone(),
        tokens: tokens.clone(),
        trust_domain: mesh.trust_domain.clone(),
        certificate_ttl: mesh.certificate_ttl,
        metrics: metrics.clone(),
        kubernetes,
    };
    let config_watch = crate::config::watch(&options.config_dir)
        .with_context(|| format!("cannot watch {}", options.config_dir.display()))?;
    let mut loader = crate::config::Loader::new(&options.config_dir, &mesh.trust_domain);
    let mut watches = Vec::new();
    let mut cluster_objects = None;
    if let Some(client) = &cluster {
        let (objects, tasks) = ClusterObjects::watch(client, config_watch.changes());
        watches = tasks;
        tokio::time::timeout(CLUSTER_LIST_TIMEOUT, objects.ready())
            .await
            .context("the tessera.dev objects were not listed in time (are the CRDs applied?)")??;
        let objects = Arc::new(objects);
        loader = loader.with_cluster(objects.clone());
        cluster_objects = Some(objects);
    }
    let (published, catalogs) = crate::config::Published::load(loader).await?;
    let connected_proxies = Arc::new(ConnectedProxies::default());
    let discovery_service = DiscoveryService {
        catalogs,
        metrics: metrics.clone(),
        proxies: connected_proxies.clone(),
    };
    let router = tonic::transport::Server::builder()
        .add_service(
            IdentityServer::new(identity_service)
                .max_decoding_message_size(crate::grpc::MAX_REQUEST_BYTES),
        )
        .add_service(
            DiscoveryServer::new(discovery_service)
                .max_decoding_message_size(crate::grpc::MAX_REQUEST_BYTES)
                .max_encoding_message_size(tessera_mesh::discovery::MAX_MESSAGE_BYTES),
        );

    let grpc_listener = crate::grpc::listen(options.grpc_listen)
        .with_context(|| format!("cannot listen on {}", options.grpc_listen))?;
    let grpc_address = grpc_listener.local_addr()?;
    let admin_listener = TcpListener::bind(options.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.admin_listen))?;
    let admin_address = admin_listener.local_addr()?;
    let webhook_listener = TcpListener::bind(options.webhook_listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.webhook_listen))?;
    let webhook_address = webhook_listener.local_addr()?;
    let webhook_acceptor =
        TlsAcceptor::from(Arc::new(webhook::server_config(webhook_cert.clone())?));

    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let admin_metrics = metrics.clone();
    let admin_proxies = connected_proxies.clone();
    let mut tasks = vec![
        tokio::spawn(crate::grpc::serve(grpc_listener, acceptor, router)),
        tokio::spawn(admin::serve(admin_listener, move |path, headers| {
            std::future::ready(match path {
                "/live" | "/ready" => Reply::text(StatusCode::OK, "ok\n"),
                "/metrics" => Reply::metrics(admin_metrics.encode(), headers),
                // For `tessera stat --control-plane-admin`.
                "/proxies" => Reply::json(&admin_proxies.list()),
                _ => Reply::not_found(),
            })
        })),
        tokio::spawn(webhook::serve(
            webhook_listener,
            webhook_acceptor,
            Arc::new(crate::inject::Options {
                trust_domain: mesh.trust_domain.clone(),
                ..options.inject.clone()
            }),
        )),
        tokio::spawn(follow_ca(
            ca.clone(),
            ca.changes(),
            CaFollowers {
                trust,
                trust_bundle_file: trust_bundle_file.clone(),
                published_bundle,
                serving_cert: serving_cert.clone(),
                issue_serving_cert: Box::new(issue_serving_cert.clone()),
                webhook_cert: webhook_cert.clone(),
                issue_webhook_cert: Box::new(issue_webhook_cert.clone()),
            },
        )),
        tokio::spawn(crate::telemetry::follow_ca(metrics.clone(), ca.clone())),
        tokio::spawn(keep_fresh(serving_cert, issue_serving_cert, "gRPC")),
        tokio::spawn(keep_fresh(webhook_cert, issue_webhook_cert, "webhook")),
        tokio::spawn(crate::config::follow(
            config_watch,
            published,
            metrics.clone(),
        )),
    ];
    tasks.extend(watches);
    if let Some(reloader) = reloader {
        tasks.push(tokio::spawn(reload::follow(
            reloader,
            reload::poll_interval(),
        )));
    }
    if let (Some(client), Some(mode), Some(objects)) = (cluster, &options.cluster, cluster_objects)
    {
        let namespace = client.default_namespace().to_string();
        let replica = replica_name();
        let leading = lease::elect(
            client.clone(),
            &namespace,
            replica.clone(),
            mode.lease_duration,
        );
        // The writes to the API: the root where proxies and the webhook read it, and
        // what the last snapshot made of each object.
        tasks.push(tokio::spawn(lease::while_leading(leading, move || {
            let root =
                crate::kubernetes::root_cert::publish(client.clone(), bundle_changes.clone());
            let status = status::report(client.clone(), replica.clone(), objects.verdicts());
            async move {
                tokio::join!(root, status);
            }
        })));
    }
    info!(
        event = "control plane started",
        trust_domain = %mesh.trust_domain,
        grpc = %grpc_address,
        admin = %admin_address,
        webhook = %webhook_address,
        certificate_ttl = %humantime::format_duration(mesh.certificate_ttl),
        trust_bundle = %trust_bundle_file.display(),
    );
    Ok(RunningControlPlane {
        grpc_address,
        admin_address,
        webhook_address,
        trust_domain: mesh.trust_domain,
        trust_bundle_file,
        metrics,
        proxies: connected_proxies,
        tokens,
        tasks,
    })
}

/// This replica's name in the Lease: its pod's name (`HOSTNAME`) and a random suffix, so
/// a restarted container does not take itself for the holder.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "control-plane".to_string());
    format!("{host}-{:08x}", rand::random::<u32>())
}

/// The plug-in CA when configured, with the reloader that follows its files; else the
/// development root, which a cluster keeps in a Secret so that every replica signs with
/// the same one.
async fn certificate_authority(
    options: &Options,
    mesh: &MeshConfigSpec,
    cluster: Option<&kube::Client>,
) -> anyhow::Result<(Arc<CurrentCa>, Option<Reloader>)> {
    let authority = match (&mesh.plugin_ca_dir, cluster) {
        (Some(dir), _) => {
            let dir = options.config_dir.join(dir);
            let files = crate::ca::layout::PluginFiles::read(&dir).context("plug-in CA")?;
            let authority = files.load().context("plug-in CA")?;
            info!(
                event = "using plug-in CA",
                path = %dir.display(),
                layout = %files.layout,
                read_from = %files.read_from.display(),
                signer_sha256 = %crate::ca::layout::sha256_fingerprint(authority.signer()),
                signer_not_after = %authority.signer_not_after(),
                poll_interval = %humantime::format_duration(reload::poll_interval()),
            );
            let (reloader, current) = Reloader::new(dir, &files, authority, mesh.certificate_ttl);
            return Ok((current, Some(reloader)));
        }
        (None, Some(client)) => {
            let namespace = client.default_namespace().to_string();
            crate::kubernetes::ca_secret::shared_dev_root(
                client.clone(),
                &namespace,
                &options.state_dir,
                &mesh.trust_domain,
            )
            .await?
        }
        (None, None) => CertificateAuthority::dev_root(&options.state_dir, &mesh.trust_domain)
            .context("development CA")?,
    };
    Ok((CurrentCa::new(authority), None))
}

/// What follows the CA in force: the gRPC server's trust, the trust bundle file and the
/// cluster's copy, and the control plane's own certificates.
struct CaFollowers {
    trust: Arc<Trust>,
    trust_bundle_file: PathBuf,
    published_bundle: tokio::sync::watch::Sender<String>,
    serving_cert: Arc<CurrentCert>,
    issue_serving_cert: Box<dyn Fn() -> anyhow::Result<CertifiedKey> + Send + Sync>,
    webhook_cert: Arc<CurrentCert>,
    issue_webhook_cert: Box<dyn Fn() -> anyhow::Result<CertifiedKey> + Send + Sync>,
}

/// Applies each change of the CA: the bundle first, everywhere it is read, then (when
/// the signing authority changed) certificates from the new one for the control plane's
/// own endpoints. A new root reaches the signing authority only once proxies trust it
/// (see `ca::reload`), so a proxy always verifies the control plane it renews with.
async fn follow_ca(
    ca: Arc<CurrentCa>,
    mut changes: tokio::sync::watch::Receiver<()>,
    followers: CaFollowers,
) {
    let mut signing = ca.load().authority().clone();
    while changes.changed().await.is_ok() {
        let active = ca.load();
        let pem = active.trust_bundle_pem();
        if *followers.published_bundle.borrow() != pem {
            match TrustBundle::new(active.trust_bundle().to_vec()) {
                Ok(bundle) => followers.trust.replace_bundle(bundle),
                Err(error) => warn!(event = "trust bundle not applied", error = %error),
            }
            if let Err(error) =
                crate::state::write_public(&followers.trust_bundle_file, pem.as_bytes())
            {
                warn!(event = "trust bundle file not written", error = %error);
            }
            info!(
                event = "trust bundle updated",
                roots = active.trust_bundle().len(),
                path = %followers.trust_bundle_file.display(),
            );
            followers.published_bundle.send_replace(pem);
        }
        if Arc::ptr_eq(active.authority(), &signing) {
            continue;
        }
        signing = active.authority().clone();
        for (cert, issue, endpoint) in [
            (
                &followers.serving_cert,
                &followers.issue_serving_cert,
                "gRPC",
            ),
            (
                &followers.webhook_cert,
                &followers.issue_webhook_cert,
                "webhook",
            ),
        ] {
            match issue() {
                Ok(renewed) => cert.set(renewed),
                Err(error) => {
                    warn!(event = "control plane certificate renewal failed", endpoint, error = %error);
                }
            }
        }
    }
}

fn certified_key(issued: Issued, key: &KeyPair) -> anyhow::Result<CertifiedKey> {
    let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(CertifiedKey::from_der(
        issued.chain,
        private_key,
        &tls::crypto_provider(),
    )?)
}

/// Re-issues one of the control plane's own certificates at half its lifetime.
async fn keep_fresh(
    cert: Arc<CurrentCert>,
    issue: impl Fn() -> anyhow::Result<CertifiedKey>,
    endpoint: &'static str,
) {
    loop {
        tokio::time::sleep(SERVING_CERT_TTL / 2).await;
        match issue() {
            Ok(renewed) => cert.set(renewed),
            Err(error) => {
                warn!(event = "control plane certificate renewal failed", endpoint, error = %error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_mesh_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/mesh");
        let mesh = load_mesh_config(&dir).unwrap();
        assert_eq!(mesh.trust_domain, "cluster.local");
        assert_eq!(mesh.certificate_ttl, Duration::from_secs(24 * 3600));
        let snapshot = crate::config::load_snapshot(&dir, &mesh.trust_domain, None).unwrap();
        assert_eq!(snapshot.services[0].endpoints.len(), 1);
        assert!(snapshot.services[0].route.is_some());
        assert_eq!(snapshot.peer_authentications.len(), 1);
        assert_eq!(snapshot.authorization_policies.len(), 2);
    }
}
