//! Embeds `targets/*.toml` so `kiln` knows the stock profiles wherever it is installed.
//! Adding a board is adding a file there (or pointing `--targets-dir` at a folder).

use std::{env, fs, path::PathBuf};

fn main() {
    let dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("../targets");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("targets/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    entries.sort();
    let mut code = String::from("pub const BUILTIN_PROFILES: &[(&str, &str)] = &[\n");
    for path in entries {
        println!("cargo:rerun-if-changed={}", path.display());
        let stem = path.file_stem().expect("file stem").to_string_lossy();
        let abs = path.canonicalize().expect("canonical path");
        code.push_str(&format!(
            "    ({stem:?}, include_str!({:?})),\n",
            abs.display().to_string()
        ));
    }
    code.push_str("];\n");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it")).join("profiles.rs");
    fs::write(out, code).expect("write profiles.rs");
}
