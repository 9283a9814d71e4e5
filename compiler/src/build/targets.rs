//! Target profiles: the stock ones built into `kiln`, or a folder of `.toml` files.

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result};
use kiln_protocol::target::TargetProfile;

use crate::files;
use wasmer::sys::{CpuFeature, Triple};
use wasmer_types::target::Target;

include!(concat!(env!("OUT_DIR"), "/profiles.rs"));

/// Loads the profiles from `dir`, or the built-in ones.
pub fn load(dir: Option<&Path>) -> Result<Vec<TargetProfile>> {
    let mut profiles = Vec::new();
    match dir {
        None => {
            for (stem, text) in BUILTIN_PROFILES {
                profiles.push(
                    TargetProfile::parse(stem, text)
                        .with_context(|| format!("built-in profile `{stem}`"))?,
                );
            }
        }
        Some(dir) => {
            for path in files::with_extension(dir, "toml")? {
                let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read `{}`", path.display()))?;
                profiles.push(
                    TargetProfile::parse(&stem, &text)
                        .with_context(|| format!("invalid target profile `{}`", path.display()))?,
                );
            }
        }
    }
    Ok(profiles)
}

/// A compile target with everything parsed: triple, CPU features, where it came from.
#[derive(Debug, Clone)]
pub struct ResolvedTarget {
    pub triple: Triple,
    pub cpu_features: Vec<CpuFeature>,
    pub profile: Option<String>,
}

/// Kiln devices are Linux on one of the architectures kilnd is built for.
fn is_supported(triple: &Triple) -> bool {
    use wasmer::sys::{Architecture, OperatingSystem};
    matches!(
        triple.architecture,
        Architecture::X86_64 | Architecture::Aarch64(_) | Architecture::Riscv64(_)
    ) && triple.operating_system == OperatingSystem::Linux
}

impl ResolvedTarget {
    /// `spec` is a profile name or a raw triple; `extra` adds CPU features on top of
    /// the profile's baseline. The host CPU is never consulted.
    pub fn resolve(spec: &str, extra: &[String], profiles: &[TargetProfile]) -> Result<Self> {
        let names_of = || {
            profiles
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (triple, mut names, profile) = match profiles.iter().find(|p| p.name == spec) {
            Some(p) => (
                p.triple.clone(),
                p.cpu_features.clone(),
                Some(p.name.clone()),
            ),
            None => (spec.to_string(), Vec::new(), None),
        };
        let triple = Triple::from_str(&triple)
            .ok()
            .filter(is_supported)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown target `{spec}`: not a profile ({}) and not a supported Linux triple (x86_64, aarch64 or riscv64)",
                    names_of()
                )
            })?;
        names.extend(extra.iter().cloned());
        let mut cpu_features = Vec::new();
        for name in &names {
            let feature = CpuFeature::from_str(name)
                .map_err(|_| anyhow::anyhow!("unknown CPU feature `{name}` for {triple}"))?;
            if !cpu_features.contains(&feature) {
                cpu_features.push(feature);
            }
        }
        if triple.architecture == wasmer::sys::Architecture::X86_64
            && !cpu_features.contains(&CpuFeature::SSE2)
        {
            cpu_features.push(CpuFeature::SSE2);
        }
        cpu_features.sort_by_key(|f| *f as u32);
        Ok(Self {
            triple,
            cpu_features,
            profile,
        })
    }

    /// What to compile for a device that reports `triple` and `cpu_features`: the
    /// profile of that triple whose baseline the device has, with the most features;
    /// or the bare triple.
    pub fn for_device(
        triple: &str,
        cpu_features: &[String],
        profiles: &[TargetProfile],
    ) -> Result<Self> {
        // On a tie, the first profile (the generic one sorts before a board's).
        let best = profiles
            .iter()
            .rev()
            .filter(|p| kiln_protocol::compat::same_target(&p.triple, triple))
            .filter(|p| p.cpu_features.iter().all(|f| cpu_features.contains(f)))
            .max_by_key(|p| p.cpu_features.len());
        match best {
            Some(p) => Self::resolve(&p.name, &[], profiles),
            None => Self::resolve(triple, &[], profiles),
        }
    }

    pub fn wasmer_target(&self) -> Target {
        Target::new(
            self.triple.clone(),
            self.cpu_features.iter().copied().collect(),
        )
    }

    pub fn feature_names(&self) -> Vec<String> {
        self.cpu_features.iter().map(ToString::to_string).collect()
    }

    pub fn label(&self) -> String {
        match &self.profile {
            Some(p) => format!("{p} ({})", self.triple),
            None => self.triple.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_gets_the_profile_with_the_most_features_it_has_the_generic_one_on_a_tie() {
        let profiles = load(None).unwrap();
        let pick = |triple: &str, features: &[&str]| {
            let f: Vec<String> = features.iter().map(|s| s.to_string()).collect();
            ResolvedTarget::for_device(triple, &f, &profiles)
                .unwrap()
                .label()
        };
        let x86 = ["sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"];
        let mut v3 = x86.to_vec();
        v3.extend(["avx", "avx2", "bmi", "bmi2", "fma", "lzcnt", "avx512f"]);
        assert!(pick("x86_64-unknown-linux-gnu", &v3).starts_with("x86_64-v3-linux "));
        assert!(pick("x86_64-unknown-linux-musl", &x86).starts_with("x86_64-linux "));
        assert!(pick("aarch64-unknown-linux-gnu", &["neon", "crc"]).starts_with("aarch64-linux "));
        assert!(pick("riscv64gc-unknown-linux-gnu", &[]).starts_with("riscv64-linux "));
        // No profile's baseline: the bare triple.
        assert_eq!(
            pick("aarch64-unknown-linux-gnu", &[]),
            "aarch64-unknown-linux-gnu"
        );
    }

    #[test]
    fn builtin_profiles_cover_the_three_architectures_and_a_board() {
        let profiles = load(None).unwrap();
        for name in [
            "x86_64-linux",
            "aarch64-linux",
            "riscv64-linux",
            "x86_64-v3-linux",
        ] {
            assert!(profiles.iter().any(|p| p.name == name), "missing {name}");
        }
    }

    #[test]
    fn profile_and_raw_triple_resolve() {
        let profiles = load(None).unwrap();
        let t = ResolvedTarget::resolve("aarch64-linux", &[], &profiles).unwrap();
        assert_eq!(t.triple.to_string(), "aarch64-unknown-linux-gnu");
        assert_eq!(t.feature_names(), vec!["neon"]);
        let t = ResolvedTarget::resolve("riscv64gc-unknown-linux-gnu", &[], &profiles).unwrap();
        assert!(t.profile.is_none());
        let err = ResolvedTarget::resolve("arm-board", &[], &profiles).unwrap_err();
        assert!(err.to_string().contains("aarch64-linux"), "{err}");
        let err = ResolvedTarget::resolve("x86_64-linux", &["avx9".into()], &profiles).unwrap_err();
        assert!(err.to_string().contains("avx9"), "{err}");
    }
}
