//! Configuration from a directory of resource files (local mode), watched for changes.
//!
//! Every change is parsed and checked whole; a good one becomes the next snapshot and
//! reaches the proxies that follow what it changed, a bad one is refused with file, line
//! and reason and the last good snapshot stays in force. "Good" includes every resource
//! fitting in what proxies accept ([`tessera_mesh::discovery::MAX_RESOURCE_BYTES`]), so
//! a configuration never cuts them off.
//!
//! Files are read on a blocking thread under a timeout, and only regular files inside the
//! directory are read: a worker of the async runtime stuck on a FIFO would stall
//! readiness, certificate signing and every later update.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tessera_mesh::resources::{self, ConfigError, ParsedFiles};
use tessera_mesh::snapshot::MeshSnapshot;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::catalog::Catalog;
use crate::kubernetes::acceptance;
use crate::kubernetes::objects::ClusterObjects;

/// Editors write a file in several steps; wait for them to settle.
const SETTLE: Duration = Duration::from_millis(100);
/// A JWKS is a few KiB; anything past this is a mistake (or `/dev/zero`).
pub(crate) const MAX_JWKS_FILE_BYTES: u64 = 1024 * 1024;
/// A Rego module is a few KiB too.
const MAX_REGO_FILE_BYTES: u64 = 1024 * 1024;
/// Local files are read in milliseconds; this only ends a read that hangs (a dead
/// network filesystem), which no check on the file can rule out.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the directory into a mesh snapshot, with `cluster`'s objects (cluster mode)
/// besides the files': each object the checks refuse is set back to its last accepted
/// version (see [`acceptance`]). Refused files are told all at once, not only the first
/// mistake the checks meet. Blocks: the server goes through [`Loader`].
pub(crate) fn load_snapshot(
    dir: &Path,
    trust_domain: &str,
    cluster: Option<&ClusterObjects>,
) -> Result<MeshSnapshot, ConfigError> {
    load_snapshot_with(dir, trust_domain, cluster, &mut ParsedFiles::default())
}

/// [`load_snapshot`], parsing only the files that changed since `parsed` saw them.
fn load_snapshot_with(
    dir: &Path,
    trust_domain: &str,
    cluster: Option<&ClusterObjects>,
    parsed: &mut ParsedFiles,
) -> Result<MeshSnapshot, ConfigError> {
    build_snapshot(dir, trust_domain, cluster, parsed)
        .map_err(|first| ConfigError::all(problems(dir)).unwrap_or(first))
}

fn build_snapshot(
    dir: &Path,
    trust_domain: &str,
    cluster: Option<&ClusterObjects>,
    parsed: &mut ParsedFiles,
) -> Result<MeshSnapshot, ConfigError> {
    let mut files = resources::load_dir_with(dir, parsed)?;
    inline_files(dir, &mut files)?;
    let build = |resources: &[&resources::Resource]| {
        let snapshot = MeshSnapshot::from_resources(trust_domain, resources)?;
        check_size(dir, &snapshot)?;
        Ok(snapshot)
    };
    let Some(objects) = cluster else {
        return build(&files.iter().collect::<Vec<_>>());
    };
    let candidates = objects.candidates();
    let accepted = acceptance::accept(&files, &candidates, build)?;
    objects.settle(&candidates, &accepted);
    Ok(accepted.snapshot)
}

/// Everything wrong with the configuration in `dir`, checked as the control plane
/// checks it (`tessera check config`): each document that does not parse, and each
/// resource the checks refuse, the others checked without it.
pub(crate) fn problems(dir: &Path) -> Vec<ConfigError> {
    let (mut files, mut problems) = resources::load_dir_each(dir);
    if let Err(error) = inline_files(dir, &mut files) {
        problems.push(error);
        return problems;
    }
    let trust_domain = match resources::mesh_config(&files) {
        Ok(mesh) => mesh.trust_domain,
        Err(error) => {
            problems.push(error);
            return problems;
        }
    };
    let build = |resources: &[&resources::Resource]| {
        let snapshot = MeshSnapshot::from_resources(&trust_domain, resources)?;
        check_size(dir, &snapshot)?;
        Ok(snapshot)
    };
    problems.extend(each_refusal(&files, &build));
    problems.sort_by(|a, b| (&a.origin.file, a.origin.line).cmp(&(&b.origin.file, b.origin.line)));
    problems
}

/// Each resource the checks refuse, every other one checked without it (the isolation
/// cluster mode uses for its objects); an error no resource is to blame for on its own.
fn each_refusal(
    resources: &[resources::Resource],
    build: &impl Fn(&[&resources::Resource]) -> Result<MeshSnapshot, ConfigError>,
) -> Vec<ConfigError> {
    let candidates: Vec<acceptance::Candidate> = resources
        .iter()
        .map(|resource| acceptance::Candidate {
            key: resource.origin.to_string(),
            origin: resource.origin.clone(),
            current: Ok(Arc::new(resource.clone())),
            accepted: None,
            subject: None,
        })
        .collect();
    match acceptance::accept(&[], &candidates, build) {
        Ok(accepted) => candidates
            .iter()
            .filter_map(|candidate| {
                let reason = accepted.refused.get(&candidate.key)?;
                Some(ConfigError {
                    origin: candidate.origin.clone(),
                    reason: reason.clone(),
                })
            })
            .collect(),
        Err(error) => vec![error],
    }
}

/// Refuses a snapshot with a resource larger than proxies accept.
fn check_size(dir: &Path, snapshot: &MeshSnapshot) -> Result<(), ConfigError> {
    Catalog::check_sizes(snapshot)
        .map_err(|too_large| ConfigError::at(dir, 0, too_large.to_string()))
}

/// Reads the files resources name — `jwksFile`s, Rego modules' `file`s — into the
/// resources, so proxies receive key sets and policies inline and never need the files.
fn inline_files(dir: &Path, resources: &mut [resources::Resource]) -> Result<(), ConfigError> {
    for resource in resources {
        let origin = resource.origin.clone();
        let refused = |field: &str, file: &Path, reason: String| ConfigError {
            origin: origin.clone(),
            reason: format!("{field} {}: {reason}", file.display()),
        };
        match &mut resource.spec {
            resources::Spec::RequestAuthentication(spec) => {
                for rule in &mut spec.jwt_rules {
                    if let Some(file) = rule.jwks_file.take() {
                        let jwks = read_config_file(
                            dir,
                            &file,
                            MAX_JWKS_FILE_BYTES,
                            "a JWKS is a few KiB",
                        )
                        .map_err(|reason| refused("jwksFile", &file, reason))?;
                        rule.jwks = Some(jwks);
                    }
                }
            }
            resources::Spec::AuthorizationPolicy(spec) => {
                let modules = spec.provider.iter_mut().flat_map(|p| &mut p.rego.modules);
                for module in modules {
                    if let Some(file) = module.file.take() {
                        let source =
                            read_config_file(dir, &file, MAX_REGO_FILE_BYTES, "a policy module")
                                .map_err(|reason| refused("rego module file", &file, reason))?;
                        if module.name.is_empty() {
                            module.name = file.display().to_string();
                        }
                        module.source = Some(source);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Reads a file a resource names: a regular file of at most `max_bytes` inside the
/// configuration directory (its subdirectories included). Symlinks are followed while
/// they stay inside, which is how Kubernetes mounts a ConfigMap (`name -> ..data/name`).
fn read_config_file(
    dir: &Path,
    file: &Path,
    max_bytes: u64,
    typical: &str,
) -> Result<String, String> {
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("configuration directory {}: {e}", dir.display()))?;
    let path = dir.join(file);
    let path = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !path.starts_with(&dir) {
        return Err(format!(
            "{} is outside the configuration directory {}",
            path.display(),
            dir.display()
        ));
    }
    // Non-blocking, or opening a FIFO waits for a writer; no following a link swapped in
    // since the path was resolved. Type and size are then checked on what was opened,
    // not on the path, which could be swapped in between.
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let metadata = opened
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let too_large = || format!("larger than {max_bytes} bytes ({typical})");
    if metadata.len() > max_bytes {
        return Err(too_large());
    }
    // The file may grow after the check: read one byte past the cap at most.
    let mut text = String::new();
    opened
        .take(max_bytes + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > max_bytes {
        return Err(too_large());
    }
    Ok(text)
}

/// Loads the configuration directory off the async runtime, under a timeout.
pub(crate) struct Loader {
    dir: PathBuf,
    trust_domain: String,
    /// Cluster mode: the `tessera.dev` objects of the API server.
    cluster: Option<Arc<ClusterObjects>>,
    /// A load that timed out, perhaps still blocked in the kernel. No second one starts
    /// beside it, so a hung filesystem holds one blocking thread, not one per change.
    hung: Option<JoinHandle<Result<MeshSnapshot, ConfigError>>>,
    /// How long a load may take before it is taken for blocked.
    timeout: Duration,
    /// The files as last parsed. Locked by the load in progress, which may be hung.
    parsed: Arc<std::sync::Mutex<ParsedFiles>>,
}

impl Loader {
    pub(crate) fn new(dir: &Path, trust_domain: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            cluster: None,
            hung: None,
            timeout: LOAD_TIMEOUT,
            parsed: Arc::default(),
        }
    }

    /// Adds the cluster's objects to every load.
    pub(crate) fn with_cluster(mut self, objects: Arc<ClusterObjects>) -> Self {
        self.cluster = Some(objects);
        self
    }

    /// Reads and checks the whole directory (and the cluster's objects).
    pub(crate) async fn load(&mut self) -> Result<MeshSnapshot, ConfigError> {
        let (dir, trust_domain) = (self.dir.clone(), self.trust_domain.clone());
        let cluster = self.cluster.clone();
        let parsed = self.parsed.clone();
        self.run(move || {
            let mut parsed = parsed.lock().unwrap_or_else(PoisonError::into_inner);
            load_snapshot_with(&dir, &trust_domain, cluster.as_deref(), &mut parsed)
        })
        .await
    }

    async fn run(
        &mut self,
        load: impl FnOnce() -> Result<MeshSnapshot, ConfigError> + Send + 'static,
    ) -> Result<MeshSnapshot, ConfigError> {
        if self.hung.as_ref().is_some_and(|hung| !hung.is_finished()) {
            return Err(ConfigError::at(
                &self.dir,
                0,
                "an earlier read of the configuration is still blocked; not reading again until it returns",
            ));
        }
        self.hung = None;
        let mut loading = tokio::task::spawn_blocking(load);
        match tokio::time::timeout(self.timeout, &mut loading).await {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(failed)) => Err(ConfigError::at(
                &self.dir,
                0,
                format!("reading the configuration failed: {failed}"),
            )),
            Err(_) => {
                self.hung = Some(loading);
                Err(ConfigError::at(
                    &self.dir,
                    0,
                    format!(
                        "not read within {}: a file read is blocked (a hung filesystem?)",
                        humantime::format_duration(self.timeout)
                    ),
                ))
            }
        }
    }
}

/// A registered watch on the configuration directory.
pub(crate) struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
    changes: mpsc::Sender<()>,
    changed: mpsc::Receiver<()>,
}

impl ConfigWatch {
    /// Where another source (the cluster's watches) signals a change.
    pub(crate) fn changes(&self) -> &mpsc::Sender<()> {
        &self.changes
    }
}

/// Starts watching `dir`. Call before reading the first snapshot, so that no change
/// made after that read can be missed.
pub(crate) fn watch(dir: &Path) -> Result<ConfigWatch, notify::Error> {
    let (changes, changed) = mpsc::channel::<()>(1);
    let file_changes = changes.clone();
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
            let _ = file_changes.try_send(());
        }
    })?;
    notify::Watcher::watch(&mut watcher, dir, notify::RecursiveMode::NonRecursive)?;
    Ok(ConfigWatch {
        _watcher: watcher,
        changes,
        changed,
    })
}

/// The configuration in force and the channel that carries it to proxies.
pub(crate) struct Published {
    loader: Loader,
    current: MeshSnapshot,
    version: u64,
    catalogs: watch::Sender<Arc<Catalog>>,
}

impl Published {
    /// Loads the first configuration, version 1.
    pub(crate) async fn load(
        mut loader: Loader,
    ) -> Result<(Self, watch::Receiver<Arc<Catalog>>), ConfigError> {
        let current = loader.load().await?;
        let catalog = catalog_of(&loader.dir, &current, 1)?;
        let (catalogs, receiver) = watch::channel(Arc::new(catalog));
        let published = Self {
            loader,
            current,
            version: 1,
            catalogs,
        };
        Ok((published, receiver))
    }

    /// Reads the directory again and publishes what changed. A refusal changes nothing:
    /// the last good configuration stays in force.
    /// Returns the new version when one was published.
    async fn reload(&mut self) -> Result<Option<u64>, ConfigError> {
        let snapshot = self.loader.load().await?;
        if snapshot == self.current {
            return Ok(None);
        }
        let catalog = catalog_of(&self.loader.dir, &snapshot, self.version + 1)?;
        self.version += 1;
        self.catalogs.send_replace(Arc::new(catalog));
        self.current = snapshot;
        Ok(Some(self.version))
    }
}

fn catalog_of(dir: &Path, snapshot: &MeshSnapshot, version: u64) -> Result<Catalog, ConfigError> {
    let mut catalog = Catalog::build(snapshot)
        .map_err(|too_large| ConfigError::at(dir, 0, too_large.to_string()))?;
    catalog.generation = version;
    Ok(catalog)
}

/// Publishes every good change seen by `watch`. Runs until dropped.
pub(crate) async fn follow(
    mut watch: ConfigWatch,
    mut published: Published,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
) {
    // Whether the configuration on disk is refused: its repair is worth a line too.
    let mut refused = false;
    metrics.config_generation.set(published.version as i64);
    while watch.changed.recv().await.is_some() {
        let noticed = std::time::Instant::now();
        tokio::time::sleep(SETTLE).await;
        while watch.changed.try_recv().is_ok() {}
        let proxies = published.catalogs.receiver_count().saturating_sub(1);
        let reloaded = published.reload().await;
        let repaired = refused && reloaded.is_ok();
        refused = reloaded.is_err();
        match reloaded {
            Ok(None) if repaired => info!(
                event = "configuration accepted",
                version = published.version,
                "the refused change is gone; the configuration in force is unchanged"
            ),
            Ok(None) => {}
            Ok(Some(version)) => {
                metrics
                    .config_push_latency
                    .observe(noticed.elapsed().as_secs_f64());
                metrics.config_generation.set(version as i64);
                info!(
                    event = "configuration updated",
                    version,
                    services = published.current.services.len(),
                    proxies,
                );
            }
            Err(error) => {
                metrics.config_refusals.inc();
                warn!(
                    event = "configuration refused",
                    error = %error,
                    "keeping the last good configuration"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_mesh::discovery::MAX_RESOURCE_BYTES;

    use super::*;

    const TRUST_DOMAIN: &str = "cluster.local";
    const JWKS: &str = r#"{"keys": []}"#;

    /// A fresh configuration directory, removed when dropped.
    struct ConfigDir(PathBuf);

    impl ConfigDir {
        fn new() -> Self {
            let dir =
                std::env::temp_dir().join(format!("tessera-config-test-{}", rand::random::<u64>()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }

        /// A RequestAuthentication whose one rule reads `jwks_file`; its kind is on line 2.
        fn with_jwks_file(jwks_file: &str) -> Self {
            let dir = Self::new();
            dir.write(
                "auth.yaml",
                &format!(
                    "apiVersion: tessera.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n    jwksFile: {jwks_file:?}\n"
                ),
            );
            dir
        }
    }

    impl Drop for ConfigDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A RequestAuthentication whose inline key set is padded to about `size` bytes.
    fn padded_jwks(size: usize) -> String {
        let padding = "k".repeat(size);
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{{\"keys\": [], \"padding\": \"{padding}\"}}'\n"
        )
    }

    /// Loads off the test's runtime and gives up after a few seconds, so a read that
    /// blocks fails the test instead of hanging it.
    async fn load_within(dir: &Path, limit: Duration) -> Result<MeshSnapshot, ConfigError> {
        let dir = dir.to_path_buf();
        let loading = tokio::task::spawn_blocking(move || load_snapshot(&dir, TRUST_DOMAIN, None));
        match tokio::time::timeout(limit, loading).await {
            Ok(loaded) => loaded.unwrap(),
            Err(_) => panic!("loading the configuration hung for {limit:?}"),
        }
    }

    /// The refusal for the jwksFile of [`ConfigDir::with_jwks_file`], checked to point
    /// at the resource's line.
    async fn refusal(dir: &ConfigDir) -> String {
        let error = load_within(dir.path(), Duration::from_secs(30))
            .await
            .unwrap_err();
        let file = dir.path().join("auth.yaml");
        assert_eq!(error.origin.file, file, "{error}");
        assert_eq!(error.origin.line, 2, "{error}");
        error.to_string()
    }

    /// Every mistake at once: documents that do not parse and resources the checks
    /// refuse, each at its own file and line, the good rest checked without them.
    #[test]
    fn every_problem_of_a_directory_is_listed() {
        let dir = ConfigDir::new();
        let service = |name: &str| {
            format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{addresses: [10.96.0.1], ports: [{{port: 80, protocol: http}}]}}\n"
            )
        };
        dir.write(
            "a.yaml",
            &format!("{}---\n{}", service("orders"), service("billing")),
        );
        dir.write(
            "b.yaml",
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  action: MAYBE\n",
        );
        let problems: Vec<String> = problems(dir.path())
            .iter()
            .map(|problem| {
                let text = problem.to_string();
                text.replace(&format!("{}/", dir.path().display()), "")
            })
            .collect();
        assert_eq!(
            problems,
            [
                "a.yaml:7: address 10.96.0.1 of billing.shop already belongs to orders.shop (a.yaml:2)",
                "b.yaml:5: unknown variant `MAYBE`, expected one of ALLOW, DENY, AUDIT, CUSTOM",
            ]
            .map(|p| p.to_string()),
            "{problems:#?}"
        );
        // What the running control plane logs when it refuses names both as well.
        let refused = load_snapshot(dir.path(), TRUST_DOMAIN, None)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("b.yaml:5") && refused.contains("a.yaml:7"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_jwks_file_inside_the_directory_is_inlined() {
        let dir = ConfigDir::with_jwks_file("keys/issuer.json");
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        dir.write("keys/issuer.json", JWKS);
        let snapshot = load_within(dir.path(), Duration::from_secs(30))
            .await
            .unwrap();
        let rule = &snapshot.request_authentications[0].spec.jwt_rules[0];
        assert_eq!(rule.jwks.as_deref(), Some(JWKS));
        assert_eq!(rule.jwks_file, None);
    }

    /// A CUSTOM policy (its kind on line 2) whose one Rego module is `policies/authz.rego`.
    fn with_rego_file(source: &str) -> ConfigDir {
        let dir = ConfigDir::new();
        dir.write(
            "authz.yaml",
            "apiVersion: tessera.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: opa, namespace: shop}\nspec:\n  action: CUSTOM\n  rules: [{}]\n  provider:\n    rego:\n      query: data.shop.authz.allow\n      modules:\n      - file: policies/authz.rego\n",
        );
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        dir.write("policies/authz.rego", source);
        dir
    }

    #[tokio::test]
    async fn a_rego_module_file_is_inlined_under_its_name() {
        let source = "package shop.authz\nallow := true\n";
        let dir = with_rego_file(source);
        let snapshot = load_within(dir.path(), Duration::from_secs(30))
            .await
            .unwrap();
        let provider = snapshot.authorization_policies[0].spec.provider.as_ref();
        let module = &provider.expect("a provider").rego.modules[0];
        assert_eq!(module.source.as_deref(), Some(source));
        assert_eq!(
            (module.name.as_str(), module.file.as_ref()),
            ("policies/authz.rego", None)
        );
    }

    #[tokio::test]
    async fn a_rego_syntax_error_is_refused_at_the_policy_and_module_line() {
        let dir = with_rego_file("package shop.authz\n\nallow if {\n  input.x ==\n}\n");
        let error = load_within(dir.path(), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(error.origin.file, dir.path().join("authz.yaml"), "{error}");
        assert_eq!(error.origin.line, 2, "{error}");
        assert!(
            error.reason.contains(
                "spec.provider.rego: module \"policies/authz.rego\": policies/authz.rego:5:"
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_symlink_that_stays_inside_the_directory_is_followed() {
        // How Kubernetes mounts a ConfigMap: `name -> ..data/name`, `..data -> ..<ts>`.
        let dir = ConfigDir::with_jwks_file("jwks.json");
        std::fs::create_dir(dir.path().join("..2026_12_04")).unwrap();
        dir.write("..2026_12_04/jwks.json", JWKS);
        std::os::unix::fs::symlink("..2026_12_04", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/jwks.json", dir.path().join("jwks.json")).unwrap();
        let snapshot = load_within(dir.path(), Duration::from_secs(30))
            .await
            .unwrap();
        let rule = &snapshot.request_authentications[0].spec.jwt_rules[0];
        assert_eq!(rule.jwks.as_deref(), Some(JWKS));
    }

    #[tokio::test]
    async fn a_jwks_fifo_is_refused_without_blocking() {
        let dir = ConfigDir::with_jwks_file("jwks.fifo");
        let fifo = dir.path().join("jwks.fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", fifo.display());
        let loading = {
            let dir = dir.path().to_path_buf();
            tokio::task::spawn_blocking(move || load_snapshot(&dir, TRUST_DOMAIN, None))
        };
        let Ok(loaded) = tokio::time::timeout(Duration::from_secs(5), loading).await else {
            // Open the other end so the blocked reader, and with it the test, can finish.
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
            panic!("reading the jwksFile FIFO blocked");
        };
        let error = loaded.unwrap().unwrap_err();
        assert_eq!(error.origin.line, 2, "{error}");
        assert!(error.reason.contains("not a regular file"), "{error}");
    }

    #[tokio::test]
    async fn a_jwks_file_over_the_size_cap_is_refused() {
        // Sparse: 64 MiB of zeros that take no disk.
        let dir = ConfigDir::with_jwks_file("huge.json");
        let file = std::fs::File::create(dir.path().join("huge.json")).unwrap();
        file.set_len(64 << 20).unwrap();
        let error = refusal(&dir).await;
        assert!(error.contains("larger than 1048576 bytes"), "{error}");
    }

    #[tokio::test]
    async fn a_jwks_file_outside_the_directory_is_refused() {
        let elsewhere = ConfigDir::new();
        elsewhere.write("jwks.json", JWKS);
        let outside = elsewhere.path().join("jwks.json");
        let name = elsewhere.path().file_name().unwrap().to_str().unwrap();
        let relative = format!("../{name}/jwks.json");
        for path in [outside.to_str().unwrap(), &relative, "/dev/zero"] {
            let dir = ConfigDir::with_jwks_file(path);
            let error = refusal(&dir).await;
            assert!(
                error.contains("outside the configuration directory"),
                "{path}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn a_symlink_out_of_the_directory_is_refused() {
        let elsewhere = ConfigDir::new();
        elsewhere.write("jwks.json", JWKS);
        let dir = ConfigDir::with_jwks_file("jwks.json");
        std::os::unix::fs::symlink(
            elsewhere.path().join("jwks.json"),
            dir.path().join("jwks.json"),
        )
        .unwrap();
        let error = refusal(&dir).await;
        assert!(
            error.contains("outside the configuration directory"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_jwks_directory_is_refused() {
        let dir = ConfigDir::with_jwks_file("keys");
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let error = refusal(&dir).await;
        assert!(error.contains("not a regular file"), "{error}");
    }

    #[tokio::test]
    async fn a_resource_larger_than_proxies_accept_is_refused() {
        let dir = ConfigDir::new();
        dir.write("auth.yaml", &padded_jwks(17 << 20));
        let started = std::time::Instant::now();
        let error = load_within(dir.path(), Duration::from_secs(60))
            .await
            .unwrap_err();
        println!("refused in {:?}", started.elapsed());
        assert_eq!(error.origin.file, dir.path(), "{error}");
        assert!(
            error.to_string().ends_with(&format!(
                "bytes, over the {MAX_RESOURCE_BYTES} proxies accept"
            )),
            "{error}"
        );
        assert!(
            error.reason.contains("the policies of namespace"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_refused_reload_keeps_the_published_configuration() {
        let dir = ConfigDir::new();
        dir.write(
            "mesh.yaml",
            "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {name: orders, namespace: shop}\n",
        );
        let mut loader = Loader::new(dir.path(), TRUST_DOMAIN);
        // Parsing 17 MiB in a debug build on a busy machine can take longer than the
        // blocked-read timeout; what is tested here is the size limit.
        loader.timeout = Duration::from_secs(120);
        let (mut published, mut proxies) = Published::load(loader).await.unwrap();
        proxies.mark_unchanged();

        dir.write("big.yaml", &padded_jwks(17 << 20));
        let error = published.reload().await.unwrap_err();
        assert!(error.reason.contains("proxies accept"), "{error}");
        assert!(!proxies.has_changed().unwrap(), "nothing sent to proxies");
        assert_eq!(proxies.borrow().service_count(), 1);
        assert_eq!(proxies.borrow().generation, 1);
        assert_eq!(published.current.services.len(), 1);

        // Back under the limit: the next good change is published as usual.
        std::fs::remove_file(dir.path().join("big.yaml")).unwrap();
        dir.write(
            "more.yaml",
            "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {name: payments, namespace: shop}\n",
        );
        assert_eq!(published.reload().await.unwrap(), Some(2));
        assert_eq!(proxies.borrow().service_count(), 2);
        assert_eq!(proxies.borrow_and_update().generation, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_that_hangs_is_abandoned_and_not_repeated() {
        let dir = ConfigDir::new();
        let mut loader = Loader::new(dir.path(), TRUST_DOMAIN);
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let run = loader.run(move || {
            // Stands in for a read from a filesystem that stopped answering.
            let _ = blocked.recv();
            Ok(MeshSnapshot::default())
        });
        // Paused time does not move by itself while a blocking task runs: move it.
        let (outcome, ()) = tokio::join!(run, tokio::time::advance(LOAD_TIMEOUT));
        let error = outcome.unwrap_err();
        assert!(error.reason.contains("not read within 10s"), "{error}");
        // While that read is still blocked, no second one is started.
        let error = loader.load().await.unwrap_err();
        assert!(error.reason.contains("still blocked"), "{error}");
        // Once it returns, loading works again.
        drop(release);
        while loader.hung.as_ref().is_some_and(|hung| !hung.is_finished()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(loader.load().await.is_ok());
    }
}
