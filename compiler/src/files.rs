//! Small file-system helpers shared by the subcommands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The files in `dir` ending in `.ext`, sorted, so every listing is in a stable order.
pub fn with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory `{}`", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    Ok(files)
}

/// Writes `bytes` to `path` atomically (a temp file in the same directory, renamed)
/// with mode 0644 whatever the umask: for what is signed, not secret (artifacts,
/// release files, root documents, desired states), so a service user can read what an
/// operator wrote. Secret keys go through [`crate::fleet::keyfile`] (0600).
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}
