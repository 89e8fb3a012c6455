//! The CA in force, and a plug-in CA re-read when its files change.
//!
//! [`CurrentCa`] holds the signing authority and the trust bundle behind an atomic
//! pointer: the identity API reads it without a lock, and whoever publishes the bundle
//! (the trust bundle file, the gRPC server's client verification, the root ConfigMaps)
//! is told of each change.
//!
//! [`Reloader`] polls the plug-in directory's content (a SHA-256 of its files): a
//! Kubernetes Secret volume is updated by swapping a `..data` link, which inotify on the
//! files would miss, and a poll every few seconds costs nothing. A new set that does not
//! load (half-written, a key that is not the certificate's, a chain to no root) is
//! refused with one warning and the CA in force is kept.
//!
//! A new intermediate under a root already trusted signs at once. A new root is
//! announced first: it joins the trust bundle at once, but signs only after one
//! certificate lifetime, when every proxy has renewed and so holds it (proxies take the
//! bundle from each certificate response). A root that leaves the files stays in the
//! bundle for two certificate lifetimes (or until it expires), so certificates it signed
//! keep verifying until they have been replaced.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use tessera_mesh::tls;
use tokio::sync::watch;
use tracing::{info, warn};

use super::CertificateAuthority;
use super::layout::{PluginFiles, sha256_fingerprint};

/// The environment variable that sets how often the plug-in directory is polled
/// (humantime, e.g. `500ms`); meant for tests, the default suits a cluster.
pub const POLL_INTERVAL_ENV: &str = "TESSERA_PLUGIN_CA_POLL_INTERVAL";
/// How often the plug-in directory is read when the environment does not say.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(15);

/// The authority that signs, and every root the mesh trusts now.
pub struct ActiveCa {
    authority: Arc<CertificateAuthority>,
    trust_bundle: Vec<CertificateDer<'static>>,
}

impl ActiveCa {
    fn new(
        authority: Arc<CertificateAuthority>,
        trust_bundle: Vec<CertificateDer<'static>>,
    ) -> Self {
        Self {
            authority,
            trust_bundle,
        }
    }

    /// Signs certificates.
    pub fn authority(&self) -> &Arc<CertificateAuthority> {
        &self.authority
    }

    /// The authority's roots, then roots announced or retired (see the module comment).
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.trust_bundle
    }

    /// The bundle as PEM, for files and ConfigMaps.
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle
            .iter()
            .map(|root| tls::der_to_pem(root))
            .collect()
    }
}

/// The CA in force, swapped atomically.
pub struct CurrentCa {
    active: ArcSwap<ActiveCa>,
    changed: watch::Sender<()>,
}

impl CurrentCa {
    /// A CA that trusts its own roots.
    pub fn new(authority: CertificateAuthority) -> Arc<Self> {
        let roots = authority.trust_bundle().to_vec();
        Arc::new(Self {
            active: ArcSwap::from_pointee(ActiveCa::new(Arc::new(authority), roots)),
            changed: watch::Sender::new(()),
        })
    }

    /// What signs and what is trusted, read together.
    pub fn load(&self) -> Arc<ActiveCa> {
        self.active.load_full()
    }

    /// Marked changed whenever the authority or the bundle changes.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    fn store(&self, active: ActiveCa) {
        self.active.store(Arc::new(active));
        self.changed.send_replace(());
    }
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    Unchanged,
    /// A new authority signs from now on.
    Activated,
    /// A new root joined the bundle; its authority signs from `at`.
    Announced {
        at: SystemTime,
    },
    /// The files do not make a usable CA; the one in force is kept.
    Refused(String),
    /// Only the bundle changed (a retired root left it).
    BundleChanged,
}

/// A root in the bundle, and since when.
struct Announced {
    root: CertificateDer<'static>,
    since: SystemTime,
}

/// A root no longer in the files, kept trusted until `until`.
struct Retired {
    root: CertificateDer<'static>,
    until: SystemTime,
}

/// An authority under a new root, waiting for the root to reach every proxy.
struct Pending {
    authority: Arc<CertificateAuthority>,
    at: SystemTime,
}

/// Re-reads a plug-in CA directory; see the module comment.
pub struct Reloader {
    dir: PathBuf,
    current: Arc<CurrentCa>,
    certificate_ttl: Duration,
    /// The fingerprint of the files last accepted (in force or pending).
    accepted: [u8; 32],
    /// The last refusal, so that one bad set is warned about once, not at every poll.
    last_refusal: Option<String>,
    announced: Vec<Announced>,
    pending: Option<Pending>,
    retired: Vec<Retired>,
}

impl Reloader {
    /// Follows `dir`, whose `files` made `authority` (in force from now). A new root
    /// signs one `certificate_ttl` after it was announced; a retired one stays trusted
    /// for two.
    pub fn new(
        dir: PathBuf,
        files: &PluginFiles,
        authority: CertificateAuthority,
        certificate_ttl: Duration,
    ) -> (Self, Arc<CurrentCa>) {
        let announced = authority
            .trust_bundle()
            .iter()
            .map(|root| Announced {
                root: root.clone(),
                since: SystemTime::UNIX_EPOCH,
            })
            .collect();
        let current = CurrentCa::new(authority);
        let reloader = Self {
            dir,
            current: current.clone(),
            certificate_ttl,
            accepted: files.fingerprint(),
            last_refusal: None,
            announced,
            pending: None,
            retired: Vec::new(),
        };
        (reloader, current)
    }

    /// Reads the directory once and applies what changed, with `now` the wall-clock time.
    pub fn poll(&mut self, now: SystemTime) -> Polled {
        let mut polled = match self.read() {
            Ok(None) => {
                // Back to the set in force: a later refusal is news again.
                self.last_refusal = None;
                Polled::Unchanged
            }
            Ok(Some((files, authority))) => {
                self.accepted = files.fingerprint();
                self.last_refusal = None;
                self.accept(Arc::new(authority), &files, now)
            }
            Err(reason) => {
                if self.last_refusal.as_ref() != Some(&reason) {
                    warn!(
                        event = "plug-in CA not reloaded",
                        path = %self.dir.display(),
                        error = %reason,
                        "the new CA files do not make a usable CA; the current CA keeps signing",
                    );
                    self.last_refusal = Some(reason.clone());
                }
                Polled::Refused(reason)
            }
        };
        if let Some(pending) = self.pending.take_if(|pending| pending.at <= now) {
            info!(
                event = "plug-in CA reloaded",
                signer_sha256 = %sha256_fingerprint(pending.authority.signer()),
                "the intermediate under the new root signs from now",
            );
            self.activate(pending.authority, now);
            polled = Polled::Activated;
        }
        let before = self.retired.len();
        self.retired.retain(|retired| retired.until > now);
        if self.retired.len() != before {
            self.publish(self.current.load().authority.clone());
            info!(event = "retired root removed from the trust bundle");
            if polled == Polled::Unchanged {
                polled = Polled::BundleChanged;
            }
        }
        polled
    }

    /// The files and the CA they make, when they changed since last accepted.
    fn read(&self) -> Result<Option<(PluginFiles, CertificateAuthority)>, String> {
        let files = PluginFiles::read(&self.dir).map_err(|e| e.to_string())?;
        if files.fingerprint() == self.accepted {
            return Ok(None);
        }
        let authority = files.load().map_err(|e| e.to_string())?;
        Ok(Some((files, authority)))
    }

    fn accept(
        &mut self,
        authority: Arc<CertificateAuthority>,
        files: &PluginFiles,
        now: SystemTime,
    ) -> Polled {
        // Every root of the new files is announced from now if it was not before; the
        // new authority may sign once the roots it chains to have been announced for a
        // certificate lifetime (Istio's staged rotation: the new root first added to
        // root-cert.pem under the old intermediate, then the new intermediate, signs at
        // once if that was a lifetime ago).
        for root in authority.trust_bundle() {
            if !self.announced.iter().any(|a| a.root == *root) {
                self.announced.push(Announced {
                    root: root.clone(),
                    since: now,
                });
            }
        }
        let mut ready_at = SystemTime::UNIX_EPOCH;
        for anchor in authority.anchors() {
            let since = self
                .announced
                .iter()
                .find(|a| a.root == anchor)
                .map_or(now, |a| a.since);
            ready_at = ready_at.max(since + self.certificate_ttl);
        }
        self.retired
            .retain(|retired| !authority.trust_bundle().contains(&retired.root));
        let signer = sha256_fingerprint(authority.signer());
        if ready_at <= now {
            info!(
                event = "plug-in CA reloaded",
                layout = %files.layout,
                path = %files.read_from.display(),
                signer_sha256 = %signer,
                signer_not_after = %authority.signer_not_after(),
            );
            self.pending = None;
            self.activate(authority, now);
            return Polled::Activated;
        }
        // Signing must not outlast the authority in force.
        let in_force = self.current.load().authority.signer_not_after();
        let at = ready_at.min(SystemTime::from(in_force));
        info!(
            event = "new root announced",
            layout = %files.layout,
            path = %files.read_from.display(),
            signer_sha256 = %signer,
            signs_from = %humantime::format_rfc3339_seconds(at),
            "the new root is in the trust bundle now; its intermediate signs once every proxy has renewed with it",
        );
        self.pending = Some(Pending { authority, at });
        self.publish(self.current.load().authority.clone());
        Polled::Announced { at }
    }

    /// Makes `authority` sign; roots no longer in its bundle are retired.
    fn activate(&mut self, authority: Arc<CertificateAuthority>, now: SystemTime) {
        let keep = authority.trust_bundle();
        let pending_roots = self
            .pending
            .as_ref()
            .map(|p| p.authority.trust_bundle().to_vec())
            .unwrap_or_default();
        for announced in &self.announced {
            let root = &announced.root;
            if keep.contains(root)
                || pending_roots.contains(root)
                || self.retired.iter().any(|r| r.root == *root)
            {
                continue;
            }
            let until =
                not_after(root).map_or(now, |expiry| expiry.min(now + self.certificate_ttl * 2));
            self.retired.push(Retired {
                root: root.clone(),
                until,
            });
        }
        self.publish(authority);
    }

    /// Stores `authority` with the bundle: its roots, a pending authority's, retired ones.
    fn publish(&mut self, authority: Arc<CertificateAuthority>) {
        let mut bundle = authority.trust_bundle().to_vec();
        let pending = self.pending.iter().flat_map(|p| p.authority.trust_bundle());
        let retired = self.retired.iter().map(|r| &r.root);
        for root in pending.chain(retired) {
            if !bundle.contains(root) {
                bundle.push(root.clone());
            }
        }
        self.announced.retain(|a| bundle.contains(&a.root));
        self.current.store(ActiveCa::new(authority, bundle));
    }
}

fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    super::not_after(cert).map(SystemTime::from)
}

/// The poll interval: [`POLL_INTERVAL_ENV`] when set and valid, else the default.
pub fn poll_interval() -> Duration {
    parse_poll_interval(std::env::var(POLL_INTERVAL_ENV).ok())
}

fn parse_poll_interval(setting: Option<String>) -> Duration {
    match setting {
        Some(text) => match humantime::parse_duration(&text) {
            Ok(interval) if !interval.is_zero() => interval,
            _ => {
                warn!(
                    event = "ignored environment variable",
                    variable = POLL_INTERVAL_ENV,
                    value = %text,
                    "not a duration above zero; polling every {}",
                    humantime::format_duration(DEFAULT_POLL_INTERVAL),
                );
                DEFAULT_POLL_INTERVAL
            }
        },
        None => DEFAULT_POLL_INTERVAL,
    }
}

/// Polls forever, every `interval`.
pub async fn follow(mut reloader: Reloader, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the files were just read.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        // A few small files every few seconds: read in place rather than on a blocking
        // thread, which would need the reloader moved back and forth.
        reloader.poll(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::create::tests::TestPki;
    use crate::ca::layout::tests::secret_volume;

    const TTL: Duration = Duration::from_secs(3600);

    fn cert_manager_files(pki: &TestPki, key: &str) -> [(&'static str, String); 3] {
        [
            ("tls.crt", pki.intermediate_pem()),
            ("tls.key", key.to_string()),
            ("ca.crt", pki.root_pem()),
        ]
    }

    fn lay_out(dir: &std::path::Path, version: &str, files: &[(&'static str, String)]) {
        let borrowed: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
        secret_volume(dir, version, &borrowed);
    }

    fn start(dir: &std::path::Path) -> (Reloader, Arc<CurrentCa>) {
        let files = PluginFiles::read(dir).unwrap();
        let authority = files.load().unwrap();
        Reloader::new(dir.to_path_buf(), &files, authority, TTL)
    }

    /// The intermediate renewed by cert-manager signs after the next poll; a broken set
    /// written after it is kept out, with the renewed one still signing.
    #[tokio::test(start_paused = true)]
    async fn a_renewed_intermediate_signs_after_the_next_poll_and_a_broken_one_never() {
        let pki = TestPki::new();
        let dir = pki.scratch("reload");
        lay_out(
            &dir,
            "..2026_12_05_01_02_03.123",
            &cert_manager_files(&pki, &pki.intermediate_key_sec1()),
        );
        let (reloader, current) = start(&dir);
        let mut changes = current.changes();
        changes.mark_unchanged();
        let task = tokio::spawn(follow(reloader, Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(1)).await;

        let renewed = pki.renew();
        assert_ne!(renewed.intermediate, pki.intermediate);
        lay_out(
            &dir,
            "..2026_12_05_02_00_00.456",
            &cert_manager_files(&renewed, &renewed.intermediate_key_sec1()),
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(current.load().authority().signer(), &pki.intermediate);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(current.load().authority().signer(), &renewed.intermediate);
        assert!(changes.has_changed().unwrap());
        // Same root: the bundle is unchanged.
        assert_eq!(
            current.load().trust_bundle(),
            std::slice::from_ref(&pki.root)
        );
        changes.mark_unchanged();

        // A key that is not the certificate's, then a half-written set (empty key).
        let other = TestPki::new();
        for (version, key) in [
            ("..2026_12_05_03_00_00.1", other.intermediate_key_pkcs8()),
            ("..2026_12_05_03_00_00.2", String::new()),
        ] {
            let mut files = cert_manager_files(&other, &key);
            files[0].1 = pki.renew().intermediate_pem();
            lay_out(&dir, version, &files);
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert_eq!(current.load().authority().signer(), &renewed.intermediate);
            assert!(!changes.has_changed().unwrap());
        }
        task.abort();
    }

    /// Istio's layout, with `roots` in root-cert.pem.
    fn istio_files(signer: &TestPki, roots: &[&TestPki]) -> [(&'static str, String); 4] {
        [
            ("ca-cert.pem", signer.intermediate_pem()),
            ("ca-key.pem", signer.intermediate_key_pkcs8()),
            (
                "cert-chain.pem",
                signer.intermediate_pem() + &signer.root_pem(),
            ),
            (
                "root-cert.pem",
                roots.iter().map(|r| r.root_pem()).collect(),
            ),
        ]
    }

    /// Istio's staged rotation: the new root added to root-cert.pem first (the old
    /// intermediate keeps signing, at once), then the new intermediate, which signs a
    /// certificate lifetime after its root was first trusted.
    #[test]
    fn a_root_announced_beforehand_lets_its_intermediate_sign_on_time() {
        let old = TestPki::new();
        let new = TestPki::new();
        let dir = old.scratch("staged");
        lay_out(&dir, "..v1", &istio_files(&old, &[&old]));
        let (mut reloader, current) = start(&dir);
        let start = SystemTime::now();
        lay_out(&dir, "..v2", &istio_files(&old, &[&old, &new]));
        assert_eq!(reloader.poll(start), Polled::Activated);
        assert_eq!(current.load().authority().signer(), &old.intermediate);
        assert_eq!(
            current.load().trust_bundle(),
            [old.root.clone(), new.root.clone()]
        );
        lay_out(&dir, "..v3", &istio_files(&new, &[&old, &new]));
        assert_eq!(
            reloader.poll(start + TTL / 2),
            Polled::Announced { at: start + TTL }
        );
        assert_eq!(current.load().authority().signer(), &old.intermediate);
        assert_eq!(reloader.poll(start + TTL), Polled::Activated);
        assert_eq!(current.load().authority().signer(), &new.intermediate);
        // The old root is still in the files: still trusted.
        assert_eq!(reloader.poll(start + TTL * 10), Polled::Unchanged);
        assert_eq!(current.load().trust_bundle().len(), 2);
    }

    #[test]
    fn the_poll_interval_is_the_environments_when_it_is_a_duration() {
        let parse = |text: &str| parse_poll_interval(Some(text.to_string()));
        assert_eq!(parse("300ms"), Duration::from_millis(300));
        assert_eq!(parse("30s"), Duration::from_secs(30));
        for bad in ["0s", "soon", ""] {
            assert_eq!(parse(bad), DEFAULT_POLL_INTERVAL, "{bad}");
        }
        assert_eq!(parse_poll_interval(None), DEFAULT_POLL_INTERVAL);
    }

    #[test]
    fn a_refused_set_is_reported_and_a_repaired_one_loads() {
        let pki = TestPki::new();
        let dir = pki.scratch("refused");
        lay_out(
            &dir,
            "..v1",
            &cert_manager_files(&pki, &pki.intermediate_key_pkcs8()),
        );
        let (mut reloader, current) = start(&dir);
        let now = SystemTime::now();
        assert_eq!(reloader.poll(now), Polled::Unchanged);
        let renewed = pki.renew();
        // The certificate renewed, the key not yet written (the old one).
        let mut files = cert_manager_files(&renewed, &pki.intermediate_key_pkcs8());
        lay_out(&dir, "..v2", &files);
        let polled = reloader.poll(now);
        assert!(
            matches!(&polled, Polled::Refused(reason) if reason.contains("tls.key is not the key of tls.crt")),
            "{polled:?}"
        );
        assert_eq!(current.load().authority().signer(), &pki.intermediate);
        files[1].1 = renewed.intermediate_key_pkcs8();
        lay_out(&dir, "..v3", &files);
        assert_eq!(reloader.poll(now), Polled::Activated);
        assert_eq!(current.load().authority().signer(), &renewed.intermediate);
    }

    /// A new root joins the bundle at once, signs after a certificate lifetime, and the
    /// old root leaves the bundle two lifetimes after that.
    #[test]
    fn a_new_root_is_announced_then_signs_and_the_old_one_leaves() {
        let old = TestPki::new();
        let new = TestPki::new();
        let dir = old.scratch("roots");
        lay_out(
            &dir,
            "..v1",
            &cert_manager_files(&old, &old.intermediate_key_pkcs8()),
        );
        let (mut reloader, current) = start(&dir);
        let start = SystemTime::now();
        lay_out(
            &dir,
            "..v2",
            &cert_manager_files(&new, &new.intermediate_key_pkcs8()),
        );
        assert_eq!(reloader.poll(start), Polled::Announced { at: start + TTL });
        let active = current.load();
        assert_eq!(active.authority().signer(), &old.intermediate);
        assert_eq!(active.trust_bundle(), [old.root.clone(), new.root.clone()]);
        assert_eq!(active.trust_bundle_pem(), old.root_pem() + &new.root_pem());

        assert_eq!(reloader.poll(start + TTL / 2), Polled::Unchanged);
        assert_eq!(reloader.poll(start + TTL), Polled::Activated);
        let active = current.load();
        assert_eq!(active.authority().signer(), &new.intermediate);
        assert_eq!(active.trust_bundle(), [new.root.clone(), old.root.clone()]);

        assert_eq!(reloader.poll(start + TTL * 2), Polled::Unchanged);
        assert_eq!(reloader.poll(start + TTL * 3), Polled::BundleChanged);
        assert_eq!(
            current.load().trust_bundle(),
            std::slice::from_ref(&new.root)
        );
        assert_eq!(current.load().authority().signer(), &new.intermediate);
    }
}
