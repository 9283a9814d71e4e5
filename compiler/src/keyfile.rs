//! Key files on disk: secret keys are written 0600 and refused when others can read them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_protocol::keys::{PublicKey, SecretKey};

pub fn read_secret(path: &Path) -> Result<SecretKey> {
    let meta = fs::metadata(path)
        .with_context(|| format!("cannot read signing key `{}`", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "signing key `{}` is readable by others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read signing key `{}`", path.display()))?;
    SecretKey::from_text(&text).with_context(|| format!("invalid signing key `{}`", path.display()))
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
