use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::Parser;
use kiln_protocol::atomic::write_atomically;
use kiln_protocol::fleet::SignedDesired;

use crate::exit::{coded, Code};
use crate::keyfile;
use crate::trust::{describe_state, encode_state, read_state, RootArgs};

const AFTER_HELP: &str = "\
Signs a desired state that `kiln push --unsigned` wrote, on a machine that has the
release key and no broker credentials. Each signer adds a signature; when the
threshold of the root's release role is met, `kiln push FILE` publishes it.

Examples:
  kiln sign lab.kilnstate --key release.key
  kiln sign lab.kilnstate --key alice.key --root fleet.root      # says how many more are needed";

/// Add a release key's signature to a desired-state file
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct SignCommand {
    /// The desired-state file (signed in place)
    pub file: PathBuf,
    /// Release keys to sign with (repeatable)
    #[arg(long, value_name = "KEY", required = true)]
    pub key: Vec<PathBuf>,
    #[command(flatten)]
    pub root: RootArgs,
}

impl SignCommand {
    pub fn execute(self) -> Result<()> {
        let file = self.file.display();
        let mut signed = read_state(&self.file)?;
        let desired = SignedDesired::peek(&signed)
            .map_err(|e| coded(Code::InvalidInput, anyhow!("`{file}`: {e}")))?;
        eprintln!("signing {}", describe_state(&desired));
        for path in &self.key {
            let key = keyfile::read_secret(path).map_err(|e| coded(Code::Key, e))?;
            signed = SignedDesired::add_signature(&signed, &key)
                .map_err(|e| coded(Code::InvalidInput, anyhow!("`{file}`: {e}")))?;
        }
        write_atomically(&self.file, &encode_state(&signed))
            .map_err(|e| coded(Code::CannotWrite, anyhow!("cannot write `{file}`: {e}")))?;
        let signers: Vec<String> = SignedDesired::signers(&signed)
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect();
        eprintln!("{file}: signed by {}", signers.join(", "));
        if let Some(path) = self.root.path(self.key.first().map(PathBuf::as_path)) {
            let chain = crate::trust::read_root(&path)?;
            match SignedDesired::open(&signed, chain.root()) {
                Ok(_) => eprintln!("{file}: ready: `kiln push {file}`"),
                Err(e) => eprintln!("{file}: not yet: {e}"),
            }
        }
        Ok(())
    }
}
