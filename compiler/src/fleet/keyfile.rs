//! Key files on disk: secret keys are written 0600 and refused when others can read them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_protocol::keys::{PublicKey, SecretKey};

/// Reads a secret key, checking in the order that gives the right advice: a path that
/// is not a file (a directory, a FIFO) is named as such, a public key or a root
/// document given where a secret key belongs is named as such, and only a real secret
/// key file that others can read is told to `chmod 600`.
/// Every key file of `paths` (`--sign`, repeatable), an unusable one failing with the
/// key exit code.
pub fn read_secrets(paths: &[std::path::PathBuf]) -> Result<Vec<SecretKey>> {
    paths
        .iter()
        .map(|p| read_secret(p).map_err(|e| crate::fleet::Error::trust(e).into()))
        .collect()
}

pub fn read_secret(path: &Path) -> Result<SecretKey> {
    let file = path.display();
    let meta = fs::metadata(path).with_context(|| format!("cannot read signing key `{file}`"))?;
    if meta.is_dir() {
        bail!("signing key `{file}` is a directory; --sign takes a key file from `kiln keygen` (fleet.key)");
    }
    if !meta.is_file() {
        bail!("signing key `{file}` is not a regular file");
    }
    // Refused before it is read: a key file is a few hundred bytes.
    if meta.len() > 64 * 1024 {
        bail!(
            "signing key `{file}` is {} bytes, not a key file",
            meta.len()
        );
    }
    let bytes = fs::read(path).with_context(|| format!("cannot read signing key `{file}`"))?;
    let text = String::from_utf8_lossy(&bytes);
    if PublicKey::from_text(&text).is_ok() || text.contains("BEGIN PUBLIC KEY") {
        bail!(
            "`{file}` is a public key; --sign takes the secret key beside it ({})",
            path.with_extension("key").display()
        );
    }
    if kiln_protocol::trust::SignedRoot::peek(&bytes).is_ok() {
        bail!("`{file}` is a root document, not a key; --sign takes a secret key file");
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "signing key `{file}` is readable by others (mode {mode:04o}); run `chmod 600 {file}`"
        );
    }
    SecretKey::from_text(&text).with_context(|| format!("invalid signing key `{file}`"))
}

pub fn read_public(path: &Path) -> Result<PublicKey> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read public key `{}`", path.display()))?;
    PublicKey::from_text(&text).with_context(|| format!("invalid public key `{}`", path.display()))
}

/// Writes `text` to a new file with `mode`; never overwrites an existing key.
pub fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    write_new_bytes(path, text.as_bytes(), mode)
}

/// Writes `bytes` to a new file with `mode`; never overwrites an existing file.
pub fn write_new_bytes(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create key file `{}`", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write key file `{}`", path.display()))
}
