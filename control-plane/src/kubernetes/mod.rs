//! Cluster mode: the control plane as a client of the Kubernetes API.
//!
//! [`crds`] defines the `tessera.dev` kinds as custom resources; [`objects`] watches
//! them, and Kubernetes' Services, EndpointSlices and Pods ([`workloads`]), as
//! configuration, converting only what changed since the last load ([`conversions`]);
//! [`acceptance`] keeps a bad object from holding up the others and [`status`] tells its
//! author why; [`tokens`] verifies the service-account tokens injected sidecars
//! present; [`root_cert`] publishes the mesh root to meshed namespaces and the webhook;
//! [`ca_secret`] shares the development root between replicas; [`lease`] picks the one
//! replica that writes.

use std::path::{Path, PathBuf};

pub mod acceptance;
pub mod ca_secret;
pub mod conversions;
pub mod crds;
pub mod lease;
pub mod objects;
pub mod root_cert;
pub mod status;
pub mod tokens;
pub mod workloads;

/// `tessera control-plane --kubernetes`: where the API server is.
#[derive(Debug, Clone)]
pub struct ClusterMode {
    /// None: the in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// How long the replica writing to the API keeps that right without renewing it.
    pub lease_duration: std::time::Duration,
}

impl Default for ClusterMode {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            lease_duration: lease::DEFAULT_DURATION,
        }
    }
}

/// The Kubernetes API client: from `kubeconfig` when given, else the in-cluster
/// configuration (the pod's service account), else `$KUBECONFIG`/`~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration: not in a pod, and no kubeconfig")?,
    };
    kube::Client::try_from(config).context("cannot make a Kubernetes API client")
}
