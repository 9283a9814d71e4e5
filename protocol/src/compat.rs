//! Can this device run that artifact? Wasmer does not check the architecture of a
//! serialized module (an riscv64 artifact "loads" on aarch64 and crashes when called),
//! so kiln checks everything here, on the verified manifest, before deserializing.

use std::collections::BTreeSet;
use std::str::FromStr;

use target_lexicon::Triple;

use crate::manifest::Manifest;

/// What the running device is and supports.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub triple: String,
    pub cpu_features: BTreeSet<String>,
    pub wasmer: String,
    pub kiln_abi: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Incompatible {
    #[error("built for {artifact}, but this device is {host}")]
    Target { artifact: String, host: String },
    #[error("needs CPU feature{} {} that this {host} CPU lacks", plural(.missing), .missing.join(", "))]
    CpuFeatures { missing: Vec<String>, host: String },
    #[error("serialized by wasmer {artifact}, but this kilnd embeds wasmer {host}; recompile it with a matching kiln")]
    Wasmer { artifact: String, host: String },
    #[error("needs kiln ABI {artifact}, but this kilnd provides ABI {host}; update kilnd")]
    Abi { artifact: u32, host: u32 },
}

fn plural(v: &[String]) -> &'static str {
    if v.len() == 1 {
        ""
    } else {
        "s"
    }
}

/// Same architecture, OS, ABI environment and object format; the vendor field is
/// cosmetic (`x86_64-pc-linux-gnu` runs `x86_64-unknown-linux-gnu` code), and so is
/// the C library: compiled wasm calls no libc (only the runtime's own functions, by
/// pointer), and glibc and musl share the calling convention and float ABI of each
/// architecture, so a static musl kilnd runs the artifacts compiled for `-gnu`. Other
/// environments (`gnueabi` against `gnueabihf`, say) must match.
pub fn same_target(a: &str, b: &str) -> bool {
    use target_lexicon::Environment::{Gnu, Musl};
    let libc_only = |a, b| matches!((a, b), (Gnu, Musl) | (Musl, Gnu));
    match (Triple::from_str(a), Triple::from_str(b)) {
        (Ok(a), Ok(b)) => {
            a.architecture == b.architecture
                && a.operating_system == b.operating_system
                && (a.environment == b.environment || libc_only(a.environment, b.environment))
                && a.binary_format == b.binary_format
        }
        _ => a == b,
    }
}

pub fn check(manifest: &Manifest, host: &HostFacts) -> Result<(), Incompatible> {
    if !same_target(&manifest.target.triple, &host.triple) {
        return Err(Incompatible::Target {
            artifact: manifest.target.triple.clone(),
            host: host.triple.clone(),
        });
    }
    let missing: Vec<String> = manifest
        .target
        .cpu_features
        .iter()
        .filter(|f| !host.cpu_features.contains(*f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Incompatible::CpuFeatures {
            missing,
            host: host.triple.clone(),
        });
    }
    if manifest.engine.wasmer != host.wasmer {
        return Err(Incompatible::Wasmer {
            artifact: manifest.engine.wasmer.clone(),
            host: host.wasmer.clone(),
        });
    }
    if manifest.engine.kiln_abi > host.kiln_abi {
        return Err(Incompatible::Abi {
            artifact: manifest.engine.kiln_abi,
            host: host.kiln_abi,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(triple: &str, features: &[&str]) -> HostFacts {
        HostFacts {
            triple: triple.into(),
            cpu_features: features.iter().map(|s| s.to_string()).collect(),
            wasmer: "7.4.2".into(),
            kiln_abi: crate::KILN_ABI_VERSION,
        }
    }

    #[test]
    fn riscv_artifact_on_aarch64_names_both_targets() {
        let mut m = Manifest::example(b"");
        m.target.triple = "riscv64gc-unknown-linux-gnu".into();
        m.target.cpu_features.clear();
        let err = check(&m, &host("aarch64-unknown-linux-gnu", &["neon"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("riscv64gc-unknown-linux-gnu"), "{text}");
        assert!(text.contains("aarch64-unknown-linux-gnu"), "{text}");
    }

    #[test]
    fn missing_features_are_listed() {
        let mut m = Manifest::example(b"");
        m.target.triple = "x86_64-unknown-linux-gnu".into();
        m.target.cpu_features = vec!["sse2".into(), "avx2".into(), "bmi2".into()];
        let err = check(&m, &host("x86_64-unknown-linux-gnu", &["sse2"])).unwrap_err();
        assert_eq!(
            err,
            Incompatible::CpuFeatures {
                missing: vec!["avx2".into(), "bmi2".into()],
                host: "x86_64-unknown-linux-gnu".into()
            }
        );
    }

    #[test]
    fn vendor_and_c_library_do_not_matter_but_the_abi_does() {
        assert!(same_target(
            "x86_64-pc-linux-gnu",
            "x86_64-unknown-linux-gnu"
        ));
        assert!(same_target(
            "aarch64-unknown-linux-musl",
            "aarch64-unknown-linux-gnu"
        ));
        assert!(!same_target(
            "armv7-unknown-linux-gnueabi",
            "armv7-unknown-linux-gnueabihf"
        ));
        assert!(!same_target(
            "x86_64-unknown-linux-gnux32",
            "x86_64-unknown-linux-gnu"
        ));
        assert!(!same_target(
            "aarch64-unknown-linux-musl",
            "x86_64-unknown-linux-musl"
        ));
    }

    #[test]
    fn other_wasmer_and_newer_abi_are_refused() {
        let mut m = Manifest::example(b"");
        m.engine.wasmer = "7.5.0".into();
        let h = host("aarch64-unknown-linux-gnu", &["neon"]);
        assert!(matches!(check(&m, &h), Err(Incompatible::Wasmer { .. })));
        m.engine.wasmer = "7.4.2".into();
        m.engine.kiln_abi = crate::KILN_ABI_VERSION + 1;
        assert!(matches!(check(&m, &h), Err(Incompatible::Abi { .. })));
        m.engine.kiln_abi = crate::KILN_ABI_VERSION;
        assert_eq!(check(&m, &h), Ok(()));
    }
}
