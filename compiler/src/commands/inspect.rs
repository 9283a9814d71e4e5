use std::fs;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use kiln_protocol::artifact::{ArtifactError, Envelope};
use kiln_protocol::keys::TrustedKeys;
use kiln_protocol::manifest::Manifest;
use serde_json::json;

use crate::exit::{coded, Code};
use crate::fleet::keyfile;
use crate::text::human_size;

const AFTER_HELP: &str = "\
With --trust, the exit code is non-zero unless the signature and payload verify.

Examples:
  kiln inspect app.kiln
  kiln inspect app.kiln --trust fleet.pub
  kiln inspect app.kiln --trust fleet.pub --json | jq .manifest.target";

/// Show an artifact's manifest and whether its signature is valid
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct InspectCommand {
    /// Artifact to inspect
    #[arg(value_name = "ARTIFACT")]
    pub artifact: PathBuf,

    /// Public key(s) or the fleet's root document to check the signature against
    /// (repeatable)
    #[arg(long, value_name = "KEY.pub|FLEET.root")]
    pub trust: Vec<PathBuf>,

    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

impl InspectCommand {
    pub fn execute(self) -> Result<()> {
        let file = self.artifact.display().to_string();
        let bytes = fs::read(&self.artifact)
            .with_context(|| format!("cannot read `{file}`"))
            .map_err(|e| coded(Code::NoInput, e))?;
        let mut keys = Vec::new();
        for path in &self.trust {
            if path.extension().is_some_and(|e| e == "root") {
                // A root document stands for its release keys, as on a device.
                keys.extend(
                    crate::fleet::trust::read_root(path)?
                        .root()
                        .release
                        .public_keys(),
                );
            } else {
                keys.push(keyfile::read_public(path).map_err(|e| coded(Code::Key, e))?);
            }
        }
        let envelope = Envelope::parse(&bytes).map_err(|e| {
            coded(
                Code::InvalidInput,
                anyhow!(e).context(format!("artifact `{file}`")),
            )
        })?;
        // Without --trust this is a look at unverified data, and says so.
        let (manifest, check): (Manifest, Option<Result<(), ArtifactError>>) = if keys.is_empty() {
            let manifest = envelope.manifest_unverified().map_err(|e| {
                coded(
                    Code::InvalidInput,
                    anyhow!(e).context(format!("artifact `{file}`")),
                )
            })?;
            // Unsigned or not, a file whose payload is not what its manifest says
            // (cut short in a copy, or grown) is no artifact any device will load.
            let have = envelope.payload_len();
            if have != manifest.payload.len {
                let why = if have < manifest.payload.len {
                    "truncated"
                } else {
                    "too long"
                };
                return Err(coded(
                    Code::InvalidInput,
                    anyhow!(
                        "artifact `{file}` is {why}: its payload is {have} bytes, its manifest says {}",
                        manifest.payload.len
                    ),
                ));
            }
            let payload = &bytes[bytes.len() - have as usize..];
            if kiln_protocol::transfer::sha256(payload) != manifest.payload.sha256 {
                return Err(coded(
                    Code::InvalidInput,
                    anyhow!(
                        "artifact `{file}`: its payload does not match the sha256 its manifest names (corrupted)"
                    ),
                ));
            }
            (manifest, None)
        } else {
            let trust = TrustedKeys::new(keys);
            match envelope.verify(&trust) {
                Ok(v) => (v.manifest, Some(Ok(()))),
                Err(e) => match envelope.manifest_unverified() {
                    Ok(m) => (m, Some(Err(e))),
                    Err(_) => {
                        return Err(coded(
                            verify_code(&e),
                            anyhow!(e).context(format!("artifact `{file}`")),
                        ))
                    }
                },
            }
        };
        let signature = match &check {
            None => "not checked (pass --trust KEY.pub)".to_string(),
            Some(Ok(())) => format!("valid, key {}", envelope.key_id),
            Some(Err(e)) => format!("INVALID: {e}"),
        };
        if self.json {
            println!(
                "{}",
                report_json(&file, bytes.len(), &envelope, &manifest, &check)
            );
        } else {
            print_text(&file, bytes.len(), &envelope, &manifest, &signature);
        }
        match check {
            Some(Err(e)) => Err(coded(
                verify_code(&e),
                anyhow!(e).context(format!("artifact `{file}`")),
            )),
            _ => Ok(()),
        }
    }
}

fn verify_code(e: &ArtifactError) -> Code {
    match e {
        ArtifactError::UntrustedSigner { .. } | ArtifactError::BadSignature { .. } => Code::Key,
        _ => Code::InvalidInput,
    }
}

fn print_text(file: &str, size: usize, envelope: &Envelope, m: &Manifest, signature: &str) {
    let row = |k: &str, v: &str| println!("{k:<11} {v}");
    row("artifact", &format!("{file} ({})", human_size(size as u64)));
    row("name", &m.name);
    row("version", &m.version.to_string());
    let profile = m
        .target
        .profile
        .as_deref()
        .map(|p| format!(" (profile {p})"))
        .unwrap_or_default();
    row("target", &format!("{}{profile}", m.target.triple));
    row(
        "cpu",
        &if m.target.cpu_features.is_empty() {
            "baseline".into()
        } else {
            m.target.cpu_features.join(", ")
        },
    );
    row(
        "engine",
        &format!("wasmer {}, kiln ABI {}", m.engine.wasmer, m.engine.kiln_abi),
    );
    row(
        "kind",
        if m.is_command() {
            "WASI command (_start)"
        } else {
            "library/reactor"
        },
    );
    row(
        "source",
        &format!(
            "sha256 {} ({} wasm)",
            m.source.hex(),
            human_size(m.source.len)
        ),
    );
    row(
        "payload",
        &format!(
            "sha256 {} ({} native)",
            m.payload.hex(),
            human_size(m.payload.len)
        ),
    );
    row(
        "metering",
        &m.settings
            .metering
            .map_or("off".into(), |f| format!("{f} fuel")),
    );
    row(
        "memory cap",
        &m.settings
            .memory_limit_pages
            .map_or("module default".into(), |p| {
                format!("{p} pages ({})", human_size(u64::from(p) * 65536))
            }),
    );
    let mut by_interface: Vec<(&str, usize)> = Vec::new();
    for import in &m.imports {
        match by_interface
            .iter_mut()
            .find(|(i, _)| *i == import.interface())
        {
            Some((_, n)) => *n += 1,
            None => by_interface.push((import.interface(), 1)),
        }
    }
    let imports = by_interface
        .iter()
        .map(|(i, n)| format!("{i} ({n})"))
        .collect::<Vec<_>>()
        .join(", ");
    row(
        "imports",
        if imports.is_empty() { "none" } else { &imports },
    );
    row("exports", &m.exports.join(", "));
    row(
        "created",
        &m.created_at
            .map_or("not recorded".into(), |t| format!("{t} (unix seconds)")),
    );
    row("producer", &m.producer);
    row("signer", &format!("key {}", envelope.key_id));
    row("signature", signature);
}

fn report_json(
    file: &str,
    size: usize,
    envelope: &Envelope,
    m: &Manifest,
    check: &Option<Result<(), ArtifactError>>,
) -> serde_json::Value {
    let (status, error) = match check {
        None => ("unchecked", None),
        Some(Ok(())) => ("valid", None),
        Some(Err(e)) => ("invalid", Some(e.to_string())),
    };
    json!({
        "file": file,
        "size": size,
        "payload_bytes_present": envelope.payload_len(),
        "manifest": {
            "name": m.name,
            "version": m.version,
            "target": { "triple": m.target.triple, "cpu_features": m.target.cpu_features, "profile": m.target.profile },
            "engine": { "wasmer": m.engine.wasmer, "kiln_abi": m.engine.kiln_abi },
            "source": { "sha256": m.source.hex(), "len": m.source.len },
            "payload": { "sha256": m.payload.hex(), "len": m.payload.len },
            "settings": { "metering": m.settings.metering, "memory_limit_pages": m.settings.memory_limit_pages },
            "imports": m.imports.iter().map(|i| json!({"module": i.module, "name": i.name, "kind": format!("{:?}", i.kind).to_lowercase()})).collect::<Vec<_>>(),
            "exports": m.exports,
            "created_at": m.created_at,
            "producer": m.producer,
        },
        "signer": envelope.key_id.to_string(),
        "signature": status,
        "error": error,
    })
}
