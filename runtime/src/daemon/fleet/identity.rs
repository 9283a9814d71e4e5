//! The device's own ed25519 key: created on first start in the data dir (mode 0600,
//! never overwritten), it signs everything the device says (status, reported state,
//! events), so the fleet tool can tell a device's report from a forged one once the
//! key is enrolled (`kiln enroll`).

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use kiln_protocol::keys::SecretKey;

const FILE: &str = "identity.key";

/// Why the device has no identity key to sign with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The key file cannot be read.
    #[error("{0}")]
    Read(String),
    /// The key file is there but is not used: readable by others, or not a key.
    #[error("{0}")]
    Refused(String),
    /// No key file, and none can be made.
    #[error("{0}")]
    Create(String),
}

/// The key in `{data_dir}/identity.key`, created if there is none. A key file others
/// can read is refused rather than used: it would not identify this device.
pub fn load_or_create(data_dir: &Path) -> Result<SecretKey, IdentityError> {
    let path = data_dir.join(FILE);
    let shown = path.display();
    match std::fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Refused(format!(
                    "`{shown}` is readable by others (mode {mode:04o}); run `chmod 600 {shown}`"
                )));
            }
            if meta.len() > 4096 {
                return Err(IdentityError::Refused(format!(
                    "`{shown}` is {} bytes, not a key",
                    meta.len()
                )));
            }
            let text = std::fs::read_to_string(&path)
                .map_err(|e| IdentityError::Read(format!("cannot read `{shown}`: {e}")))?;
            SecretKey::from_text(&text)
                .map_err(|e| IdentityError::Refused(format!("`{shown}`: {e}")))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(data_dir, &path),
        Err(e) => Err(IdentityError::Read(format!("cannot read `{shown}`: {e}"))),
    }
}

fn create(data_dir: &Path, path: &Path) -> Result<SecretKey, IdentityError> {
    let shown = path.display();
    std::fs::create_dir_all(data_dir).map_err(|e| {
        IdentityError::Create(format!("cannot create `{}`: {e}", data_dir.display()))
    })?;
    let key = SecretKey::generate().map_err(|e| IdentityError::Create(e.to_string()))?;
    // Written under a temporary name and linked into place, so a crash never leaves
    // a half-written key, and two starts racing keep one key.
    let tmp = data_dir.join(format!(".{FILE}.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(key.to_text().as_bytes())?;
            f.sync_all()
        });
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(dir) = std::fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            tracing::info!(key = %key.public().id(), file = %shown, "created the device identity key");
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load_or_create(data_dir),
        Err(e) => Err(IdentityError::Create(format!(
            "cannot create `{shown}`: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let meta = std::fs::metadata(dir.path().join(FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(first.public(), again.public());
        std::fs::set_permissions(
            dir.path().join(FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Refused(_)), "{err}");
        assert!(err.to_string().contains("readable by others"), "{err}");
    }
}
