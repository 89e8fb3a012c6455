//! `tessera ca create`: a root and an intermediate for a mesh whose operator has no PKI.
//!
//! The root (`root-cert.pem`, `root-key.pem`) goes to its own directory, meant to be
//! kept offline; the intermediate goes to the plug-in directory as the four files the
//! control plane reads (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`).
//! Run again with the same root directory and `--force`, it signs a new intermediate
//! with the existing root: that is how the intermediate is renewed before it expires.
//! Keys are written owner-only (0600), certificates 0644; nothing is overwritten unless
//! asked.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use tessera_mesh::tls;
use time::OffsetDateTime;

use super::layout::sha256_fingerprint;
use super::{BACKDATE, CaError, CertificateAuthority, file_error, random_serial};

/// The root's files in the root directory.
pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
/// The plug-in directory's files, as `CertificateAuthority::plugin` reads them.
pub const PLUGIN_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];

/// What to create and where.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The plug-in directory (the control plane's `pluginCertsDir`).
    pub out_dir: PathBuf,
    /// Where the root is kept: reused when it holds one, created there otherwise.
    pub root_dir: PathBuf,
    pub trust_domain: String,
    pub root_validity: Duration,
    pub intermediate_validity: Duration,
    /// Replace an intermediate already in `out_dir` (renewal).
    pub force: bool,
}

/// Why nothing (or not everything) was created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(
        "{} already holds {}; pass --force to replace them (renewing the intermediate)",
        .dir.display(),
        .files.join(", ")
    )]
    Exists {
        dir: PathBuf,
        files: Vec<&'static str>,
    },
    #[error(
        "{}: has {present} but not {missing}; restore the missing file or point --root-dir at an empty directory for a new root",
        .dir.display()
    )]
    RootIncomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error(
        "the root directory and the plug-in directory are the same ({}): keep the root key out of what the control plane mounts",
        .0.display()
    )]
    SameDirectory(PathBuf),
    #[error(
        "the intermediate would expire at {intermediate}, after the root ({root}): shorten --intermediate-validity or create a new root"
    )]
    OutlivesRoot { intermediate: String, root: String },
    #[error("{0} must be longer than zero")]
    ZeroValidity(&'static str),
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// A certificate as the operator is shown it.
#[derive(Debug, Clone)]
pub struct Summary {
    pub path: PathBuf,
    pub sha256: String,
    pub not_after: OffsetDateTime,
}

/// What `create` made.
#[derive(Debug, Clone)]
pub struct Created {
    pub root: Summary,
    /// False when an existing root signed the new intermediate.
    pub root_created: bool,
    pub intermediate: Summary,
    pub out_dir: PathBuf,
    pub root_dir: PathBuf,
}

impl fmt::Display for Created {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |f: &mut fmt::Formatter<'_>, what: &str, summary: &Summary| {
            writeln!(f, "{what}: {}", summary.path.display())?;
            writeln!(f, "  SHA-256 fingerprint: {}", summary.sha256)?;
            writeln!(f, "  expires: {}", rfc3339(summary.not_after))
        };
        let root = if self.root_created {
            "root (new)"
        } else {
            "root (existing)"
        };
        line(f, root, &self.root)?;
        line(f, "intermediate", &self.intermediate)?;
        writeln!(
            f,
            "\nThe control plane's plug-in CA: {} (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem).",
            self.out_dir.display()
        )?;
        writeln!(
            f,
            "Keep {} ({ROOT_KEY}) offline; renew the intermediate before it expires with the same\ncommand, --root-dir {} --force.",
            self.root_dir.display(),
            self.root_dir.display()
        )
    }
}

/// Creates (or reuses) the root and signs a new intermediate with it.
pub fn create(options: &CreateOptions) -> Result<Created, CreateError> {
    if options.root_validity.is_zero() {
        return Err(CreateError::ZeroValidity("--root-validity"));
    }
    if options.intermediate_validity.is_zero() {
        return Err(CreateError::ZeroValidity("--intermediate-validity"));
    }
    if same_directory(&options.out_dir, &options.root_dir) {
        return Err(CreateError::SameDirectory(options.out_dir.clone()));
    }
    let existing: Vec<&'static str> = PLUGIN_FILES
        .into_iter()
        .filter(|name| options.out_dir.join(name).exists())
        .collect();
    if !existing.is_empty() && !options.force {
        return Err(CreateError::Exists {
            dir: options.out_dir.clone(),
            files: existing,
        });
    }
    let now = OffsetDateTime::from(SystemTime::now());
    let new_root = !options.root_dir.join(ROOT_CERT).exists();
    if new_root && options.intermediate_validity > options.root_validity {
        return Err(CreateError::OutlivesRoot {
            intermediate: rfc3339(now + options.intermediate_validity),
            root: rfc3339(now + options.root_validity),
        });
    }
    let (root, root_created) = load_or_create_root(options, now)?;
    let intermediate_not_after = now + options.intermediate_validity;
    if intermediate_not_after > root.not_after {
        return Err(CreateError::OutlivesRoot {
            intermediate: rfc3339(intermediate_not_after),
            root: rfc3339(root.not_after),
        });
    }

    let material = |e: rcgen::Error| CaError::Material(e.to_string());
    let key = KeyPair::generate().map_err(material)?;
    let mut params = ca_params(&options.trust_domain, "Tessera intermediate CA", now);
    // It signs workload certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.not_after = intermediate_not_after;
    params.use_authority_key_identifier_extension = true;
    let intermediate = params.signed_by(&key, &root.issuer).map_err(material)?;

    let out = &options.out_dir;
    crate::state::create_dir(out)?;
    let root_pem = tls::der_to_pem(&root.cert);
    crate::state::write_private(&out.join("ca-key.pem"), key.serialize_pem().as_bytes())?;
    crate::state::write_public(&out.join("ca-cert.pem"), intermediate.pem().as_bytes())?;
    crate::state::write_public(
        &out.join("cert-chain.pem"),
        format!("{}{root_pem}", intermediate.pem()).as_bytes(),
    )?;
    crate::state::write_public(&out.join("root-cert.pem"), root_pem.as_bytes())?;
    // What the control plane will do with them, now rather than at its start.
    CertificateAuthority::plugin(out)?;

    Ok(Created {
        root: Summary {
            path: options.root_dir.join(ROOT_CERT),
            sha256: sha256_fingerprint(&root.cert),
            not_after: root.not_after,
        },
        root_created,
        intermediate: Summary {
            path: out.join("ca-cert.pem"),
            sha256: sha256_fingerprint(intermediate.der()),
            not_after: intermediate_not_after,
        },
        out_dir: out.clone(),
        root_dir: options.root_dir.clone(),
    })
}

/// A root able to sign.
struct Root {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

fn load_or_create_root(
    options: &CreateOptions,
    now: OffsetDateTime,
) -> Result<(Root, bool), CreateError> {
    let dir = &options.root_dir;
    let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
    let material = |e: rcgen::Error| CaError::Material(e.to_string());
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let cert_pem =
                std::fs::read_to_string(&cert_path).map_err(|e| file_error(&cert_path, e))?;
            let key_pem = crate::state::read_private(&key_path)?;
            let cert = tls::certs_from_pem(cert_pem.as_bytes())
                .map_err(|e| file_error(&cert_path, e))?
                .remove(0);
            let key = KeyPair::from_pem(&key_pem).map_err(|e| file_error(&key_path, e))?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
                .map_err(|_| file_error(&cert_path, "not a valid X.509 certificate"))?;
            if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(file_error(&key_path, format!("not the key of {ROOT_CERT}")).into());
            }
            let not_after = parsed.validity().not_after.to_datetime();
            let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(material)?;
            Ok((
                Root {
                    cert,
                    issuer,
                    not_after,
                },
                false,
            ))
        }
        (true, false) => Err(CreateError::RootIncomplete {
            dir: dir.clone(),
            present: ROOT_CERT,
            missing: ROOT_KEY,
        }),
        (false, true) => Err(CreateError::RootIncomplete {
            dir: dir.clone(),
            present: ROOT_KEY,
            missing: ROOT_CERT,
        }),
        (false, false) => {
            let key = KeyPair::generate().map_err(material)?;
            let mut params = ca_params(&options.trust_domain, "Tessera root CA", now);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.not_after = now + options.root_validity;
            let cert = params.self_signed(&key).map_err(material)?;
            crate::state::create_dir(dir)?;
            // The root key's directory is the owner's alone, like the key.
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(|e| file_error(dir, e))?;
            crate::state::write_private(&key_path, key.serialize_pem().as_bytes())?;
            crate::state::write_public(&cert_path, cert.pem().as_bytes())?;
            let not_after = params.not_after;
            Ok((
                Root {
                    cert: cert.der().clone(),
                    issuer: Issuer::new(params, key),
                    not_after,
                },
                true,
            ))
        }
    }
}

fn ca_params(trust_domain: &str, name: &str, now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params
}

fn same_directory(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    // Certificates hold whole seconds.
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use base64::Engine as _;

    use super::*;

    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    fn scratch(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tessera-ca-create-{what}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn options(base: &Path) -> CreateOptions {
        CreateOptions {
            out_dir: base.join("cacerts"),
            root_dir: base.join("root"),
            trust_domain: "cluster.local".into(),
            root_validity: 10 * YEAR,
            intermediate_validity: YEAR,
            force: false,
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A root and an intermediate made by `create`, with their keys, for tests of the
    /// layouts and of reloading.
    pub(crate) struct TestPki {
        pub root: CertificateDer<'static>,
        pub intermediate: CertificateDer<'static>,
        /// The intermediate's key as written (PKCS#8).
        key_pem: String,
        base: PathBuf,
    }

    impl TestPki {
        pub(crate) fn new() -> Self {
            let base = scratch("pki");
            create(&options(&base)).unwrap();
            Self::at(&base)
        }

        /// Another intermediate from the same root (a renewal).
        pub(crate) fn renew(&self) -> Self {
            self.renew_for(YEAR)
        }

        /// Another intermediate from the same root, valid for `validity`.
        pub(crate) fn renew_for(&self, validity: Duration) -> Self {
            let mut renewal = options(&self.base);
            renewal.force = true;
            renewal.intermediate_validity = validity;
            create(&renewal).unwrap();
            Self::at(&self.base)
        }

        fn at(base: &Path) -> Self {
            let cert = |path: PathBuf| {
                tls::certs_from_pem(&std::fs::read(path).unwrap())
                    .unwrap()
                    .remove(0)
            };
            Self {
                root: cert(base.join("root").join(ROOT_CERT)),
                intermediate: cert(base.join("cacerts/ca-cert.pem")),
                key_pem: std::fs::read_to_string(base.join("cacerts/ca-key.pem")).unwrap(),
                base: base.to_path_buf(),
            }
        }

        pub(crate) fn scratch(&self, what: &str) -> PathBuf {
            let dir = self.base.join(what).join(rand::random::<u32>().to_string());
            std::fs::create_dir_all(&dir).unwrap();
            dir
        }

        pub(crate) fn root_pem(&self) -> String {
            tls::der_to_pem(&self.root)
        }

        pub(crate) fn intermediate_pem(&self) -> String {
            tls::der_to_pem(&self.intermediate)
        }

        /// The intermediate's key as `tessera ca create` writes it (PKCS#8,
        /// "PRIVATE KEY"), which is cert-manager's `privateKey.encoding: PKCS8`.
        pub(crate) fn intermediate_key_pkcs8(&self) -> String {
            self.key_pem.clone()
        }

        /// The same key as SEC1 ("EC PRIVATE KEY"): cert-manager's default encoding
        /// (PKCS1) for an ECDSA key.
        pub(crate) fn intermediate_key_sec1(&self) -> String {
            use aws_lc_rs::encoding::AsDer;
            use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
            let pkcs8 = KeyPair::from_pem(&self.intermediate_key_pkcs8())
                .unwrap()
                .serialize_der();
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8).unwrap();
            let sec1 = pair.private_key().as_der().unwrap();
            let body = base64::engine::general_purpose::STANDARD.encode(sec1.as_ref());
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
                lines.join("\n")
            )
        }
    }

    #[test]
    fn creates_files_the_plugin_ca_loads() {
        let base = scratch("loads");
        let created = create(&options(&base)).unwrap();
        assert!(created.root_created);
        let out = base.join("cacerts");
        let ca = CertificateAuthority::plugin(&out).unwrap();
        let root =
            tls::certs_from_pem(&std::fs::read(base.join("root/root-cert.pem")).unwrap()).unwrap();
        assert_eq!(ca.trust_bundle(), root.as_slice());
        // Keys owner-only, certificates readable.
        assert_eq!(mode(&out.join("ca-key.pem")), 0o600);
        assert_eq!(mode(&base.join("root/root-key.pem")), 0o600);
        assert_eq!(mode(&base.join("root")), 0o700);
        assert_eq!(mode(&out.join("ca-cert.pem")), 0o644);
        // The intermediate signs leaves only, and lives a year, inside the root's 10.
        let (_, intermediate) = x509_parser::parse_x509_certificate(ca.signer()).unwrap();
        let constraints = intermediate.basic_constraints().unwrap().unwrap().value;
        assert!(constraints.ca && constraints.path_len_constraint == Some(0));
        let year_from_now = OffsetDateTime::now_utc() + YEAR;
        assert!(
            (created.intermediate.not_after - year_from_now).abs() < time::Duration::minutes(1)
        );
        assert_eq!(
            intermediate.validity().not_after.to_datetime(),
            ca.signer_not_after()
        );
        // The report names both certificates with their fingerprints and expiry.
        let report = created.to_string();
        assert!(report.contains(&sha256_fingerprint(&root[0])), "{report}");
        assert!(
            report.contains(&sha256_fingerprint(ca.signer())),
            "{report}"
        );
        assert!(report.contains("expires: "), "{report}");
        assert_eq!(created.intermediate.sha256.len(), 32 * 3 - 1);
    }

    #[test]
    fn refuses_to_overwrite_unless_forced_and_then_reuses_the_root() {
        let base = scratch("overwrite");
        let first = create(&options(&base)).unwrap();
        let key_before = std::fs::read(base.join("cacerts/ca-key.pem")).unwrap();
        let error = create(&options(&base)).unwrap_err();
        assert!(matches!(error, CreateError::Exists { .. }), "{error}");
        assert!(error.to_string().contains("--force"), "{error}");
        assert_eq!(
            std::fs::read(base.join("cacerts/ca-key.pem")).unwrap(),
            key_before
        );

        // Renewal: --force signs a new intermediate with the same root.
        let mut renewal = options(&base);
        renewal.force = true;
        let second = create(&renewal).unwrap();
        assert!(!second.root_created);
        assert_eq!(second.root.sha256, first.root.sha256);
        assert_ne!(second.intermediate.sha256, first.intermediate.sha256);
        CertificateAuthority::plugin(&base.join("cacerts")).unwrap();
    }

    #[test]
    fn refuses_what_would_not_work() {
        let base = scratch("refusals");
        let mut long = options(&base);
        long.intermediate_validity = 11 * YEAR;
        let error = create(&long).unwrap_err();
        assert!(matches!(error, CreateError::OutlivesRoot { .. }), "{error}");
        // Nothing written, not even the root.
        assert!(!base.join("cacerts/ca-cert.pem").exists());
        assert!(!base.join("root/root-key.pem").exists());

        let mut same = options(&base);
        same.root_dir = same.out_dir.clone();
        assert!(matches!(
            create(&same).unwrap_err(),
            CreateError::SameDirectory(_)
        ));

        let half = scratch("half");
        std::fs::write(half.join(ROOT_CERT), "x").unwrap();
        let mut incomplete = options(&base);
        incomplete.root_dir = half;
        let error = create(&incomplete).unwrap_err().to_string();
        assert!(error.contains("not root-key.pem"), "{error}");
    }
}
