//! Root certificate publishing: the mesh's root, where pods and the API server need it.
//!
//! Every meshed namespace (labelled `tessera.dev/inject: enabled`) gets the
//! `tessera-ca-root-cert` ConfigMap, which injected sidecars mount to trust the control
//! plane; it is written when a namespace becomes meshed, rewritten when changed and
//! recreated when deleted. The sidecar injector's webhook configuration gets the same
//! root as its `caBundle`, so the API server trusts the webhook's certificate. Writes are
//! server-side applies and patches that change nothing when all is in step: the watch
//! events they cause end there. When the trust bundle changes (a plug-in CA re-read with
//! a new root, see `ca::reload`), every meshed namespace and the webhook get the new one.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt as _};
use serde_json::json;
use tokio_stream::StreamExt as _;
use tracing::{info, warn};

use crate::inject::annotations::INJECT;

/// The ConfigMap every meshed namespace gets, and its key.
pub const CONFIG_MAP: &str = crate::inject::sidecar::CA_ROOT_CONFIG_MAP;
pub const CONFIG_MAP_KEY: &str = "root-cert.pem";

/// The injector's MutatingWebhookConfiguration (the Helm chart's `templates/webhook.yaml`).
pub const WEBHOOK_CONFIGURATION: &str = "tessera-sidecar-injector";

/// Namespaces whose pods are injected carry the injection label with this value (the
/// webhook configuration's `namespaceSelector`).
pub const MESHED_VALUE: &str = "enabled";

/// Who owns the fields the control plane writes (server-side apply).
const FIELD_MANAGER: &str = "tessera-control-plane";

/// What changed, from one of the three watches.
enum Change {
    Meshed(Namespace),
    ConfigMap(ConfigMap),
    ConfigMapDeleted(ConfigMap),
    Webhook(MutatingWebhookConfiguration),
}

/// Keeps the root published until the process ends. `root_pem`: the trust bundle, as it
/// changes.
pub async fn publish(client: Client, mut root_pem: tokio::sync::watch::Receiver<String>) {
    let mut publisher = Publisher {
        client: client.clone(),
        root_pem: root_pem.borrow_and_update().clone(),
    };
    let named = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default().labels(&format!("{INJECT}={MESHED_VALUE}")),
    )
    .default_backoff()
    .filter_map(|event| applied(event).map(|e| e.map(Change::Meshed)));
    let config_maps = watcher(Api::<ConfigMap>::all(client.clone()), named(CONFIG_MAP))
        .default_backoff()
        .filter_map(|event| match event {
            Ok(Event::Delete(map)) => Some(Ok(Change::ConfigMapDeleted(map))),
            other => applied(other).map(|e| e.map(Change::ConfigMap)),
        });
    let webhooks = watcher(
        Api::<MutatingWebhookConfiguration>::all(client),
        named(WEBHOOK_CONFIGURATION),
    )
    .default_backoff()
    .filter_map(|event| applied(event).map(|e| e.map(Change::Webhook)));
    let mut changes = std::pin::pin!(namespaces.merge(config_maps).merge(webhooks));
    loop {
        let outcome = tokio::select! {
            change = changes.next() => match change {
                Some(Ok(change)) => publisher.reconcile(change).await,
                Some(Err(error)) => Err(anyhow::Error::from(error)),
                None => break,
            },
            Ok(()) = root_pem.changed() => {
                publisher.root_pem = root_pem.borrow_and_update().clone();
                publisher.republish().await
            }
        };
        if let Err(error) = outcome {
            warn!(
                event = "root certificate not published",
                error = format!("{error:#}")
            );
        }
    }
}

/// An object added, modified or listed; `None` for other events.
fn applied<K>(event: Result<Event<K>, watcher::Error>) -> Option<Result<K, watcher::Error>> {
    match event {
        Ok(Event::Apply(object) | Event::InitApply(object)) => Some(Ok(object)),
        Ok(_) => None,
        Err(error) => Some(Err(error)),
    }
}

struct Publisher {
    client: Client,
    root_pem: String,
}

impl Publisher {
    async fn reconcile(&self, change: Change) -> anyhow::Result<()> {
        match change {
            Change::Meshed(namespace) => self.apply_config_map(&namespace.name_any()).await,
            Change::ConfigMap(map) => {
                let current = map.data.as_ref().and_then(|data| data.get(CONFIG_MAP_KEY));
                match map.namespace() {
                    Some(namespace) if current != Some(&self.root_pem) => {
                        self.apply_if_meshed(&namespace).await
                    }
                    _ => Ok(()),
                }
            }
            Change::ConfigMapDeleted(map) => match map.namespace() {
                Some(namespace) => self.apply_if_meshed(&namespace).await,
                None => Ok(()),
            },
            Change::Webhook(configuration) => self.patch_ca_bundle(&configuration).await,
        }
    }

    /// Writes a new bundle everywhere: every meshed namespace and the webhook.
    async fn republish(&self) -> anyhow::Result<()> {
        let meshed = Api::<Namespace>::all(self.client.clone())
            .list(&kube::api::ListParams::default().labels(&format!("{INJECT}={MESHED_VALUE}")))
            .await?;
        for namespace in meshed.items {
            if namespace.metadata.deletion_timestamp.is_none() {
                self.apply_config_map(&namespace.name_any()).await?;
            }
        }
        // Listed by name rather than read: the shipped RBAC grants list and watch on
        // webhook configurations, not get.
        let webhooks = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .list(
                &kube::api::ListParams::default()
                    .fields(&format!("metadata.name={WEBHOOK_CONFIGURATION}")),
            )
            .await?;
        for configuration in webhooks.items {
            self.patch_ca_bundle(&configuration).await?;
        }
        Ok(())
    }

    async fn apply_if_meshed(&self, namespace: &str) -> anyhow::Result<()> {
        let Some(object) = Api::<Namespace>::all(self.client.clone())
            .get_opt(namespace)
            .await?
        else {
            return Ok(());
        };
        let meshed = object
            .labels()
            .get(INJECT)
            .is_some_and(|v| v == MESHED_VALUE);
        let deleting = object.metadata.deletion_timestamp.is_some();
        if meshed && !deleting {
            self.apply_config_map(namespace).await?;
        }
        Ok(())
    }

    async fn apply_config_map(&self, namespace: &str) -> anyhow::Result<()> {
        let map = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(CONFIG_MAP.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".into(),
                    FIELD_MANAGER.into(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                CONFIG_MAP_KEY.into(),
                self.root_pem.clone(),
            )])),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
            .patch(
                CONFIG_MAP,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&map),
            )
            .await?;
        info!(event = "root certificate published", namespace = %namespace);
        Ok(())
    }

    /// Sets every webhook's `caBundle` of the configuration to the root, where it differs.
    async fn patch_ca_bundle(
        &self,
        configuration: &MutatingWebhookConfiguration,
    ) -> anyhow::Result<()> {
        use base64::Engine as _;
        let bundle = base64::engine::general_purpose::STANDARD.encode(&self.root_pem);
        let operations: Vec<_> = configuration
            .webhooks
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, webhook)| {
                webhook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice())
                    != Some(self.root_pem.as_bytes())
            })
            .map(|(index, _)| {
                json!({ "op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": bundle })
            })
            .collect();
        if operations.is_empty() {
            return Ok(());
        }
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::Value::Array(operations))?;
        Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .patch(
                &configuration.name_any(),
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await?;
        info!(
            event = "webhook caBundle set",
            configuration = configuration.name_any()
        );
        Ok(())
    }
}
