//! The development root, kept in a Secret so every replica signs with the same CA.
//!
//! Without a plug-in CA, the first replica to start creates the root and stores it in the
//! immutable Secret [`SECRET`] of its own namespace; the others (and later restarts) use
//! that one. Two replicas starting together both try to create it: the API server
//! accepts one, and the loser takes the winner's. The key is written only to the Secret
//! and to the state directory (0600), never logged.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::info;

use crate::ca::CertificateAuthority;

/// The Secret holding the development root (`ca-cert.pem`, `ca-key.pem`).
pub const SECRET: &str = "tessera-ca-dev-root";
const FILES: [&str; 2] = ["ca-cert.pem", "ca-key.pem"];

/// The development root shared through [`SECRET`] in `namespace`, created if absent.
pub async fn shared_dev_root(
    client: Client,
    namespace: &str,
    state_dir: &Path,
    trust_domain: &str,
) -> anyhow::Result<CertificateAuthority> {
    let secrets = Api::<Secret>::namespaced(client, namespace);
    let context = || format!("Secret {namespace}/{SECRET}");
    let data = match secrets.get_opt(SECRET).await.with_context(context)? {
        Some(secret) => secret.data.unwrap_or_default(),
        None => {
            let candidate = new_root(state_dir, trust_domain)?;
            match secrets
                .create(&PostParams::default(), &secret(candidate.clone()))
                .await
            {
                Ok(_) => {
                    info!(event = "development root stored", secret = %format!("{namespace}/{SECRET}"));
                    candidate
                }
                Err(kube::Error::Api(refusal)) if refusal.code == 409 => {
                    // Another replica stored its root first: use that one.
                    let winner = secrets.get(SECRET).await.with_context(context)?;
                    winner.data.unwrap_or_default()
                }
                Err(error) => return Err(error).with_context(context),
            }
        }
    };
    for file in FILES {
        let contents = data
            .get(file)
            .with_context(|| format!("{} has no {file}", context()))?;
        let path = state_dir.join(file);
        match file {
            "ca-key.pem" => crate::state::write_private(&path, &contents.0)?,
            _ => crate::state::write_public(&path, &contents.0)?,
        }
    }
    CertificateAuthority::dev_root(state_dir, trust_domain)
        .with_context(|| format!("the development root of {}", context()))
}

/// A fresh root, made in a scratch directory beside the state.
fn new_root(state_dir: &Path, trust_domain: &str) -> anyhow::Result<BTreeMap<String, ByteString>> {
    let scratch = state_dir.join("dev-root-candidate");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    CertificateAuthority::dev_root(&scratch, trust_domain).context("development root")?;
    let mut data = BTreeMap::new();
    for file in FILES {
        let path = scratch.join(file);
        let contents =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        data.insert(file.to_string(), ByteString(contents));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(data)
}

fn secret(data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "tessera".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        immutable: Some(true),
        data: Some(data),
        ..Secret::default()
    }
}
