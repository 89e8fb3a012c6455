//! The control plane's state directory: the development CA and the join-token key.
//! Secrets are written owner-only (0600) and atomically, so a crash never leaves a
//! half-written key behind; one every user may read is refused. The directory ignores
//! itself in git, so a state directory inside a checkout is never committed with its
//! keys.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::ca::{CaError, file_error};

/// Writes a secret, readable by the owner only.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_atomically(path, contents, 0o600)
}

/// Writes a file anyone may read (certificates, the trust bundle).
pub(crate) fn write_public(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_atomically(path, contents, 0o644)
}

/// Reads a secret, refusing one that every user of the host may read (it may have been
/// copied already: replace it rather than only `chmod` it).
pub(crate) fn read_private(path: &Path) -> Result<String, CaError> {
    let mode = std::fs::metadata(path)
        .map_err(|e| file_error(path, e))?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        return Err(file_error(
            path,
            format!(
                "a private key every user can read (mode {:o}); make it owner-only (chmod 600) and consider it leaked",
                mode & 0o777
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| file_error(path, e))
}

/// Creates the state directory, with a `.gitignore` that ignores all of it.
pub(crate) fn create_dir(dir: &Path) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let ignore = dir.join(".gitignore");
    if !ignore.exists() {
        let text = "# Tessera's state: private keys and tokens. Never commit it.\n*\n";
        write_atomically(&ignore, text.as_bytes(), 0o644)?;
    }
    Ok(())
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        create_dir(dir)?;
    }
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .map_err(|e| file_error(&temporary, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| file_error(&temporary, e))?;
    std::fs::rename(&temporary, path).map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tessera-state-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_new_state_directory_ignores_itself_in_git() {
        let state = dir().join("nested/.tessera-state");
        write_private(&state.join("join-token.key"), b"secret").unwrap();
        let ignore = std::fs::read_to_string(state.join(".gitignore")).unwrap();
        assert!(ignore.lines().any(|line| line == "*"), "{ignore}");
        // An operator's own ignore file is kept.
        std::fs::write(state.join(".gitignore"), "mine\n").unwrap();
        create_dir(&state).unwrap();
        assert_eq!(
            std::fs::read_to_string(state.join(".gitignore")).unwrap(),
            "mine\n"
        );
        std::fs::remove_dir_all(state.parent().unwrap().parent().unwrap()).unwrap();
    }

    #[test]
    fn a_key_every_user_can_read_is_refused() {
        let state = dir();
        let key = state.join("ca-key.pem");
        write_private(&key, b"key").unwrap();
        assert_eq!(read_private(&key).unwrap(), "key");
        // Group-readable is how Kubernetes mounts a Secret for an fsGroup: allowed.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read_private(&key).unwrap(), "key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = read_private(&key).unwrap_err().to_string();
        assert!(error.contains("ca-key.pem"), "{error}");
        assert!(
            error.contains("mode 644") && error.contains("chmod 600"),
            "{error}"
        );
        std::fs::remove_dir_all(&state).unwrap();
    }
}
