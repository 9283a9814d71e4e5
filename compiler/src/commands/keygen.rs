use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use clap::Parser;
use kiln_protocol::keys::SecretKey;
use kiln_protocol::names::Kind;
use kiln_protocol::trust::{Role, Root};

use crate::exit::{coded, Code};
use crate::fleet::broker::now_ms;
use crate::fleet::keyfile;
use crate::names::valid_name;

const AFTER_HELP: &str = "\
Writes four files, so a fleet starts with a root of trust in one step:
  fleet.key       release key (secret, 0600): signs artifacts and desired states; CI may hold it
  fleet.pub       its public key (PKCS#8/SPKI PEM, which OpenSSL and KMS tools read)
  fleet-root.key  root key (secret, 0600): signs root documents only; keep it offline
  fleet.root      root document v1: the fleet id and which key holds which role;
                  provision devices with it (trust = [\"fleet.root\"])
Rotate or revoke a key later with `kiln root rotate`.

Examples:
  kiln keygen -o fleet.key
  kiln keygen -o prod.key --fleet prod
  kiln keygen -o ci.key --no-root        # another release key, to add with `kiln root rotate`";

/// Create the fleet's keys: a release key, and a root key with its root document
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct KeygenCommand {
    /// Release key file to create; the public key goes next to it with `.pub`
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// The fleet's id, which every desired state names (staging and production must
    /// differ) [default: fleet-<random>]
    #[arg(long)]
    pub fleet: Option<String>,
    /// Write only the key pair (a key to add to an existing root)
    #[arg(long)]
    pub no_root: bool,
    /// How long the root document is valid: devices and kiln say `stale` after it, so
    /// a withheld rotation is noticed; renew it with `kiln root rotate` before then
    #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = crate::fleet::trust::parse_duration)]
    pub root_expires_in: u64,
    /// A root document that never expires (for fleets with a kilnd from before root
    /// expiry, which cannot read a root that has one)
    #[arg(long, conflicts_with = "root_expires_in")]
    pub no_root_expiry: bool,
}

/// `fleet.key` -> `fleet-root.key`, `fleet.root`.
pub fn root_files(release: &Path) -> (PathBuf, PathBuf) {
    let stem = release
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "fleet".into());
    (
        release.with_file_name(format!("{stem}-root.key")),
        release.with_extension("root"),
    )
}

impl KeygenCommand {
    pub fn execute(self) -> Result<()> {
        let public_path = self.output.with_extension("pub");
        if public_path == self.output || self.output.extension().is_some_and(|e| e == "root") {
            return Err(coded(
                Code::Usage,
                anyhow!(
                    "secret key file `{}` must not end in .pub or .root",
                    self.output.display()
                ),
            ));
        }
        if let Some(f) = &self.fleet {
            valid_name(Kind::Fleet, f)?;
        }
        let (root_key_path, root_path) = root_files(&self.output);
        let mut files = vec![&self.output, &public_path];
        if !self.no_root {
            files.extend([&root_key_path, &root_path]);
        }
        // Checked first, so a half-made set of files is never left behind.
        if let Some(p) = files.iter().find(|p| p.exists()) {
            return Err(coded(
                Code::CannotWrite,
                anyhow!("`{}` exists; keygen never overwrites a key", p.display()),
            ));
        }
        // A second root document beside the fleet's would be taken for the fleet's
        // (it is found beside the key), and kiln would trust another fleet's root.
        if !self.no_root {
            let dir = match self.output.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if let Some(other) = crate::files::with_extension(&dir, "root")
                .unwrap_or_default()
                .first()
            {
                return Err(coded(
                    Code::CannotWrite,
                    anyhow!(
                        "`{}` already holds a fleet's root document ({}): a new fleet there would make kiln trust another root; for another release key of that fleet pass --no-root (then `kiln root rotate --release-key {}`), for a new fleet write into another directory",
                        dir.display(),
                        other.display(),
                        public_path.display()
                    ),
                ));
            }
        }
        let key = SecretKey::generate().map_err(|e| coded(Code::Failure, e))?;
        keyfile::write_new(&self.output, &key.to_text(), 0o600)
            .map_err(|e| coded(Code::CannotWrite, e))?;
        keyfile::write_new(&public_path, &key.public().to_text(), 0o644)
            .map_err(|e| coded(Code::CannotWrite, e))?;
        eprintln!(
            "wrote {} (release key, secret) and {} (public), key id {}",
            self.output.display(),
            public_path.display(),
            key.public().id()
        );
        if self.no_root {
            return Ok(());
        }
        let root_key = SecretKey::generate().map_err(|e| coded(Code::Failure, e))?;
        let fleet = match self.fleet {
            Some(f) => f,
            None => format!("fleet-{}", &root_key.public().id().to_string()[..8]),
        };
        let root = Root {
            fleet,
            version: 1,
            issued_ms: now_ms(),
            root: Role::new(&[root_key.public()], 1),
            release: Role::new(&[key.public()], 1),
            registry: None,
            expires_ms: (!self.no_root_expiry)
                .then(|| now_ms().saturating_add(self.root_expires_in)),
        };
        let doc = root
            .sign(&[&root_key])
            .map_err(|e| coded(Code::Failure, anyhow!(e)))?;
        keyfile::write_new(&root_key_path, &root_key.to_text(), 0o600)
            .map_err(|e| coded(Code::CannotWrite, e))?;
        keyfile::write_new_bytes(&root_path, &doc, 0o644)
            .map_err(|e| coded(Code::CannotWrite, e))?;
        eprintln!(
            "wrote {} (root key, secret: keep it offline) and {}: {}",
            root_key_path.display(),
            root_path.display(),
            root.describe()
        );
        Ok(())
    }
}
