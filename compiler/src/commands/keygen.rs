use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use kiln_protocol::keys::SecretKey;

use crate::exit::{coded, Code};
use crate::keyfile;

const AFTER_HELP: &str = "\
Examples:
  kiln keygen -o fleet.key
      writes fleet.key (secret, mode 0600) and fleet.pub (give this one to devices)";

/// Create an ed25519 signing key pair for artifacts
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct KeygenCommand {
    /// Secret key file to create; the public key goes next to it with `.pub`
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

impl KeygenCommand {
    pub fn execute(self) -> Result<()> {
        let public_path = self.output.with_extension("pub");
        if public_path == self.output {
            return Err(coded(
                Code::Usage,
                anyhow::anyhow!(
                    "secret key file `{}` must not end in .pub",
                    self.output.display()
                ),
            ));
        }
        let key = SecretKey::generate().map_err(|e| coded(Code::Failure, e))?;
        keyfile::write_new(&self.output, &key.to_text(), 0o600)
            .map_err(|e| coded(Code::CannotWrite, e))?;
        keyfile::write_new(&public_path, &key.public().to_text(), 0o644)
            .map_err(|e| coded(Code::CannotWrite, e))?;
        eprintln!(
            "wrote {} (secret) and {} (public), key id {}",
            self.output.display(),
            public_path.display(),
            key.public().id()
        );
        Ok(())
    }
}
