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
