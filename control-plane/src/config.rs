//! Configuration from a directory of resource files (local mode), watched for changes.
//!
//! Every change is parsed and checked whole; a good one becomes the next snapshot and
//! reaches every connected proxy, a bad one is refused with file, line and reason and the
//! last good snapshot stays in force.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_proto::api::discovery::Snapshot;
use tessera_proto::mesh::MeshSnapshot;
use tessera_proto::resources::{self, ConfigError};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Editors write a file in several steps; wait for them to settle.
const SETTLE: Duration = Duration::from_millis(100);

/// Reads the directory into a mesh snapshot.
pub fn load_snapshot(dir: &Path, trust_domain: &str) -> Result<MeshSnapshot, ConfigError> {
    let mut resources = resources::load_dir(dir)?;
    inline_jwks_files(dir, &mut resources)?;
    MeshSnapshot::from_resources(trust_domain, &resources)
}

/// Reads `jwksFile`s (relative to the configuration directory) into the resources, so
/// proxies receive key sets inline and never need the files.
fn inline_jwks_files(dir: &Path, resources: &mut [resources::Resource]) -> Result<(), ConfigError> {
    for resource in resources {
        let origin = resource.origin.clone();
        let resources::Spec::RequestAuthentication(spec) = &mut resource.spec else {
            continue;
        };
        for rule in &mut spec.jwt_rules {
            if let Some(file) = rule.jwks_file.take() {
                let path = dir.join(&file);
                let jwks = std::fs::read_to_string(&path).map_err(|e| ConfigError {
                    origin: origin.clone(),
                    reason: format!("jwksFile {}: {e}", path.display()),
                })?;
                rule.jwks = Some(jwks);
            }
        }
    }
    Ok(())
}

/// Wraps a mesh snapshot for the wire.
pub fn to_message(version: u64, snapshot: &MeshSnapshot) -> Snapshot {
    Snapshot {
        version: version.to_string(),
        // Serializing plain data structures cannot fail.
        mesh_json: serde_json::to_vec(snapshot).unwrap_or_default(),
    }
}

/// A registered watch on the configuration directory.
pub struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
    changed: mpsc::Receiver<()>,
}

/// Starts watching `dir`. Call before reading the first snapshot, so that no change
/// made after that read can be missed.
pub fn watch(dir: &Path) -> Result<ConfigWatch, notify::Error> {
    let (changes, changed) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the files ourselves raises access events: only changes count, or
        // every reload would trigger the next.
        let is_change = event.is_ok_and(|e| {
            use notify::EventKind::{Create, Modify, Remove};
            use notify::event::ModifyKind::Metadata;
            matches!(e.kind, Create(_) | Modify(_) | Remove(_))
                && !matches!(e.kind, Modify(Metadata(_)))
        });
        if is_change {
            // A full channel already means "reload pending": nothing is lost.
            let _ = changes.try_send(());
        }
    })?;
    notify::Watcher::watch(&mut watcher, dir, notify::RecursiveMode::NonRecursive)?;
    Ok(ConfigWatch {
        _watcher: watcher,
        changed,
    })
}

/// Publishes every good change seen by `watch` to `snapshots`. Runs until dropped.
pub async fn follow(
    mut watch: ConfigWatch,
    dir: PathBuf,
    trust_domain: String,
    mut current: MeshSnapshot,
    snapshots: watch::Sender<Snapshot>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
) {
    let mut version = 1;
    while watch.changed.recv().await.is_some() {
        let noticed = std::time::Instant::now();
        tokio::time::sleep(SETTLE).await;
        while watch.changed.try_recv().is_ok() {}
        match load_snapshot(&dir, &trust_domain) {
            Ok(snapshot) if snapshot == current => {}
            Ok(snapshot) => {
                version += 1;
                snapshots.send_replace(to_message(version, &snapshot));
                metrics
                    .config_push_latency
                    .observe(noticed.elapsed().as_secs_f64());
                info!(
                    event = "configuration updated",
                    version,
                    services = snapshot.services.len(),
                    proxies = snapshots.receiver_count().saturating_sub(1),
                );
                current = snapshot;
            }
            Err(error) => warn!(
                event = "configuration refused",
                error = %error,
                "keeping the last good configuration"
            ),
        }
    }
}
