//! The two ways a plug-in CA's files are laid out in `pluginCertsDir`, told apart by
//! the files present:
//!
//! - Istio's: `ca-cert.pem` (the intermediate that signs), `ca-key.pem`,
//!   `cert-chain.pem` (towards a root), `root-cert.pem` (every trusted root). What
//!   `tessera ca create` writes.
//! - A cert-manager `kubernetes.io/tls` Secret: `tls.crt` (the intermediate, maybe
//!   followed by its chain), `tls.key` (PKCS#8, PKCS#1 or SEC1 depending on the
//!   Certificate's `privateKey.encoding`), `ca.crt` (the root).
//!
//! The files are read once into [`PluginFiles`]: what the CA is loaded from is exactly
//! what the reloader hashes to notice a change. A Secret volume is read through its
//! `..data` link, resolved once, so a set is never mixed from two versions while the
//! kubelet swaps the link.

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use rustls_pki_types::CertificateDer;
use tessera_mesh::tls;

use super::{CaError, CertificateAuthority, file_error};

/// A CA file larger than this is refused unread: a chain of a few certificates is a few
/// KiB, and the files are read again at every poll.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Which files a plug-in CA came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`.
    Istio,
    /// `tls.crt`, `tls.key`, `ca.crt`.
    CertManager,
}

/// The names of a CA's files, for errors that name the file to fix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FileNames {
    pub cert: &'static str,
    pub key: &'static str,
    /// Certificates leading from the signer to a root; may be the `cert` file itself.
    pub chain: &'static str,
    pub roots: &'static str,
}

impl FileNames {
    /// The development root in the state directory: it signs and is the root.
    pub(crate) const DEV_ROOT: Self = Self {
        cert: "ca-cert.pem",
        key: "ca-key.pem",
        chain: "ca-cert.pem",
        roots: "ca-cert.pem",
    };
}

impl Layout {
    /// The files of this layout: certificate, key, chain, roots.
    pub(crate) fn names(self) -> FileNames {
        match self {
            Layout::Istio => FileNames {
                cert: "ca-cert.pem",
                key: "ca-key.pem",
                chain: "cert-chain.pem",
                roots: "root-cert.pem",
            },
            Layout::CertManager => FileNames {
                cert: "tls.crt",
                key: "tls.key",
                chain: "tls.crt",
                roots: "ca.crt",
            },
        }
    }

    /// The distinct files to read, key included.
    fn files(self) -> &'static [&'static str] {
        match self {
            Layout::Istio => &[
                "ca-cert.pem",
                "ca-key.pem",
                "cert-chain.pem",
                "root-cert.pem",
            ],
            Layout::CertManager => &["tls.crt", "tls.key", "ca.crt"],
        }
    }

    /// Tells the layout from the files present: the certificate file of either, not both.
    pub fn detect(dir: &Path) -> Result<Self, CaError> {
        let istio = dir.join("ca-cert.pem").exists();
        let cert_manager = dir.join("tls.crt").exists();
        match (istio, cert_manager) {
            (true, false) => Ok(Layout::Istio),
            (false, true) => Ok(Layout::CertManager),
            (true, true) => Err(file_error(
                dir,
                "holds both ca-cert.pem (Istio's layout) and tls.crt (a cert-manager Secret's); keep one set so the CA is not ambiguous",
            )),
            (false, false) => Err(file_error(
                dir,
                "no plug-in CA here: expected ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem (tessera ca create), or tls.crt, tls.key and ca.crt (a cert-manager Secret)",
            )),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Istio => "ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem",
            Layout::CertManager => "cert-manager Secret: tls.crt, tls.key, ca.crt",
        })
    }
}

/// One consistent read of a plug-in CA's files.
pub struct PluginFiles {
    pub layout: Layout,
    /// Where they were read: the directory, or the version `..data` pointed to then.
    pub read_from: PathBuf,
    contents: Vec<(&'static str, String)>,
}

impl PluginFiles {
    /// Reads every file of the layout found in `dir`. The key must not be readable by
    /// every user (see `state::read_private`): mount a Secret with `defaultMode: 0400`
    /// (or 0440 with an fsGroup).
    pub fn read(dir: &Path) -> Result<Self, CaError> {
        let layout = Layout::detect(dir)?;
        // Kubernetes' atomic writer: `..data` links to the current timestamped directory
        // and each file links through it. Resolving the link once reads one version.
        let read_from = match std::fs::canonicalize(dir.join("..data")) {
            Ok(version) if version.is_dir() => version,
            _ => dir.to_path_buf(),
        };
        let names = layout.names();
        let mut contents = Vec::with_capacity(4);
        for name in layout.files() {
            let path = read_from.join(name);
            let size = std::fs::metadata(&path)
                .map_err(|e| file_error(&path, e))?
                .len();
            if size > MAX_FILE_BYTES {
                return Err(file_error(
                    &path,
                    format!("{size} bytes, more than a CA file holds (limit {MAX_FILE_BYTES})"),
                ));
            }
            let text = if *name == names.key {
                crate::state::read_private(&path)?
            } else {
                std::fs::read_to_string(&path).map_err(|e| file_error(&path, e))?
            };
            contents.push((*name, text));
        }
        Ok(Self {
            layout,
            read_from,
            contents,
        })
    }

    /// A SHA-256 over every file's name and content: equal when nothing changed.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut context = digest::Context::new(&digest::SHA256);
        for (name, text) in &self.contents {
            context.update(name.as_bytes());
            context.update(&(text.len() as u64).to_be_bytes());
            context.update(text.as_bytes());
        }
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(context.finish().as_ref());
        fingerprint
    }

    fn text(&self, name: &str) -> &str {
        self.contents
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, text)| text.as_str())
    }

    fn certs(&self, name: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
        tls::certs_from_pem(self.text(name).as_bytes())
            .map_err(|e| file_error(&self.read_from.join(name), e))
    }

    /// The CA these files make, checked (key matches, a CA certificate, what it signs
    /// verifies against the roots).
    pub fn load(&self) -> Result<CertificateAuthority, CaError> {
        let names = self.layout.names();
        let mut signing = self.certs(names.cert)?;
        let signer = signing.remove(0);
        let chain = if names.chain == names.cert {
            signing
        } else {
            self.certs(names.chain)?
        };
        let roots = self.certs(names.roots)?;
        let intermediates = chain
            .into_iter()
            .filter(|cert| *cert != signer && !roots.contains(cert))
            .collect();
        CertificateAuthority::from_parts(signer, self.text(names.key), intermediates, roots, names)
            .map_err(|error| match error {
                CaError::Material(reason) => {
                    CaError::Material(format!("{}: {reason}", self.read_from.display()))
                }
                other => other,
            })
    }
}

/// The SHA-256 fingerprint of a certificate, as `openssl x509 -fingerprint -sha256`
/// prints it (upper-case hex pairs joined by colons).
pub fn sha256_fingerprint(cert: &CertificateDer<'_>) -> String {
    digest::digest(&digest::SHA256, cert)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ca::create::tests::TestPki;
    use std::os::unix::fs::PermissionsExt;

    /// Lays out `files` as the kubelet does for a Secret volume: a timestamped version
    /// directory, `..data` linking to it, and each key a link through `..data`.
    pub(crate) fn secret_volume(dir: &Path, version: &str, files: &[(&str, &str)]) {
        let versioned = dir.join(version);
        std::fs::create_dir_all(&versioned).unwrap();
        for (name, text) in files {
            let path = versioned.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        let staged = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(version, &staged).unwrap();
        std::fs::rename(&staged, dir.join("..data")).unwrap();
        for (name, _) in files {
            let link = dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
            }
        }
    }

    #[test]
    fn a_cert_manager_secret_loads_with_either_key_encoding() {
        let pki = TestPki::new();
        for (encoding, key) in [
            ("PKCS#8", pki.intermediate_key_pkcs8()),
            ("SEC1", pki.intermediate_key_sec1()),
        ] {
            assert!(
                key.starts_with(if encoding == "SEC1" {
                    "-----BEGIN EC PRIVATE KEY-----"
                } else {
                    "-----BEGIN PRIVATE KEY-----"
                }),
                "{key}"
            );
            let dir = pki.scratch(encoding);
            // tls.crt holds the intermediate followed by its chain (the root), as
            // cert-manager writes it when the issuer's chain is known.
            let tls_crt = format!("{}{}", pki.intermediate_pem(), pki.root_pem());
            secret_volume(
                &dir,
                "..2026_12_05_01_02_03.123",
                &[
                    ("tls.crt", &tls_crt),
                    ("tls.key", &key),
                    ("ca.crt", &pki.root_pem()),
                ],
            );
            let files = PluginFiles::read(&dir).unwrap();
            assert_eq!(files.layout, Layout::CertManager);
            assert!(files.read_from.ends_with("..2026_12_05_01_02_03.123"));
            let ca = files.load().unwrap_or_else(|e| panic!("{encoding}: {e}"));
            assert_eq!(ca.trust_bundle(), std::slice::from_ref(&pki.root));
            assert_eq!(ca.signer(), &pki.intermediate);
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let pki = TestPki::new();
        let other = TestPki::new();
        let dir = pki.scratch("mismatch");
        secret_volume(
            &dir,
            "..2026_12_05_01_02_03.123",
            &[
                ("tls.crt", &pki.intermediate_pem()),
                ("tls.key", &other.intermediate_key_pkcs8()),
                ("ca.crt", &pki.root_pem()),
            ],
        );
        let error = PluginFiles::read(&dir)
            .unwrap()
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tls.key is not the key of tls.crt"),
            "{error}"
        );
    }

    #[test]
    fn an_intermediate_of_another_root_is_refused() {
        let pki = TestPki::new();
        let other = TestPki::new();
        let dir = pki.scratch("foreign");
        secret_volume(
            &dir,
            "..2026_12_05_01_02_03.123",
            &[
                ("tls.crt", &pki.intermediate_pem()),
                ("tls.key", &pki.intermediate_key_pkcs8()),
                ("ca.crt", &other.root_pem()),
            ],
        );
        let error = PluginFiles::read(&dir)
            .unwrap()
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("do not verify against the trust bundle"),
            "{error}"
        );
    }

    #[test]
    fn the_layout_is_told_from_the_files_present() {
        let pki = TestPki::new();
        let dir = pki.scratch("layouts");
        let error = Layout::detect(&dir).unwrap_err().to_string();
        assert!(error.contains("no plug-in CA here"), "{error}");
        std::fs::write(dir.join("tls.crt"), pki.intermediate_pem()).unwrap();
        assert_eq!(Layout::detect(&dir).unwrap(), Layout::CertManager);
        // A missing file is named.
        let error = PluginFiles::read(&dir).err().unwrap().to_string();
        assert!(error.contains("tls.key"), "{error}");
        std::fs::write(dir.join("ca-cert.pem"), pki.intermediate_pem()).unwrap();
        let error = Layout::detect(&dir).unwrap_err().to_string();
        assert!(error.contains("both"), "{error}");
    }

    #[test]
    fn an_oversized_file_is_refused_unread() {
        let pki = TestPki::new();
        let dir = pki.scratch("oversized");
        let huge = "x".repeat(MAX_FILE_BYTES as usize + 1);
        secret_volume(
            &dir,
            "..2026_12_05_01_02_03.123",
            &[
                ("tls.crt", &pki.intermediate_pem()),
                ("tls.key", &pki.intermediate_key_pkcs8()),
                ("ca.crt", &huge),
            ],
        );
        let error = PluginFiles::read(&dir).err().unwrap().to_string();
        assert!(
            error.contains("ca.crt") && error.contains("limit 1048576"),
            "{error}"
        );
    }

    #[test]
    fn a_secret_key_readable_by_everyone_is_refused() {
        let pki = TestPki::new();
        let dir = pki.scratch("readable");
        secret_volume(
            &dir,
            "..2026_12_05_01_02_03.123",
            &[
                ("tls.crt", &pki.intermediate_pem()),
                ("tls.key", &pki.intermediate_key_pkcs8()),
                ("ca.crt", &pki.root_pem()),
            ],
        );
        // A Secret volume's default mode is 0644.
        let key = dir.join("..2026_12_05_01_02_03.123/tls.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = PluginFiles::read(&dir).err().unwrap().to_string();
        assert!(error.contains("chmod 600"), "{error}");
    }
}
