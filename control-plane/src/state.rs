//! The control plane's state directory: the development CA and the join-token key.
//! Secrets are written owner-only (0600) and atomically, so a crash never leaves a
//! half-written key behind.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
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

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
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
