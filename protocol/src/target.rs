//! Device profiles are data: `targets/<name>.toml`, one file a board. Adding a board
//! is adding a file.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;

/// `program`, prefixed by `wrapper` (e.g. `qemu-riscv64 -L /usr/riscv64-linux-gnu`)
/// unless that is empty.
pub fn wrapped_command(wrapper: &[String], program: &Path) -> Command {
    match wrapper.split_first() {
        Some((runner, args)) => {
            let mut cmd = Command::new(runner);
            cmd.args(args).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// One device profile. Unknown keys are an error, so a typo never silently drops a
/// setting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetProfile {
    /// Profile name, equal to the file stem (`aarch64-linux`).
    pub name: String,
    /// Rust and wasmer target triple.
    pub triple: String,
    /// CPU features the artifact may assume (wasmer spelling). This is the baseline
    /// recorded in every artifact built for the profile; the host CPU is never probed.
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// C compiler used as linker to cross-build `kilnd`; absent for the host.
    pub linker: Option<String>,
    /// Command prefix that runs a binary of this target on an x86_64 Linux host
    /// (empty when it runs natively).
    #[serde(default)]
    pub qemu: Vec<String>,
    /// One line for `kiln targets`.
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("line {line}: {message}")]
    Toml { line: usize, message: String },
    #[error("profile name `{name}` does not match its file name `{file}`")]
    NameMismatch { name: String, file: String },
}

impl TargetProfile {
    /// Parses a profile; `stem` is the file name without `.toml`.
    pub fn parse(stem: &str, text: &str) -> Result<Self, ProfileError> {
        let profile: Self = toml::from_str(text).map_err(|e| ProfileError::Toml {
            line: e
                .span()
                .map_or(1, |span| text[..span.start].matches('\n').count() + 1),
            message: e.message().to_string(),
        })?;
        if profile.name != stem {
            return Err(ProfileError::NameMismatch {
                name: profile.name,
                file: stem.into(),
            });
        }
        Ok(profile)
    }

    /// A command running `program` (a binary built for this target) on this host:
    /// wrapped in the profile's qemu command, or directly when native.
    pub fn command(&self, program: &Path) -> Command {
        wrapped_command(&self.qemu, program)
    }

    /// Rust's name for the architecture (`aarch64`, `riscv64`, `x86_64`).
    pub fn arch(&self) -> &str {
        let arch = self.triple.split('-').next().unwrap_or_default();
        arch.strip_suffix("gc").unwrap_or(arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A72: &str = r#"
name = "rpi4"
triple = "aarch64-unknown-linux-gnu"
cpu_features = ["neon"]
linker = "aarch64-linux-gnu-gcc"
qemu = ["qemu-aarch64", "-cpu", "cortex-a72"]
description = "Raspberry Pi 4"
"#;

    #[test]
    fn parses_a_profile() {
        let p = TargetProfile::parse("rpi4", A72).unwrap();
        assert_eq!(p.cpu_features, vec!["neon"]);
        assert_eq!(p.qemu[0], "qemu-aarch64");
        assert_eq!(p.arch(), "aarch64");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let text = format!("{A72}cpu_featurs = [\"crc\"]\n");
        let err = TargetProfile::parse("rpi4", &text).unwrap_err().to_string();
        assert!(err.contains("cpu_featurs"), "{err}");
        assert!(err.starts_with("line 8: "), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn name_must_match_file() {
        assert!(matches!(
            TargetProfile::parse("rpi5", A72),
            Err(ProfileError::NameMismatch { .. })
        ));
    }
}
