use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::Parser;
use kiln_protocol::fleet::SignedDesired;

use crate::exit::{coded, Code};
use crate::fleet::keyfile;
use crate::fleet::trust::{describe_state_full, encode_state, read_state, RootArgs};

const AFTER_HELP: &str = "\
Signs a desired state that `kiln push --unsigned` wrote, on a machine that has the
release key and no broker credentials. Each signer adds a signature; when the
threshold of the root's release role is met, `kiln push FILE` publishes it.

A key in an HSM or a cloud KMS signs through --command: kiln runs it with `sh -c`,
gives it the message to sign on stdin and as the file $KILN_MESSAGE (for tools that
read a file), and takes the Ed25519 signature from its stdout (64 raw bytes, 128 hex
digits or base64). --public names the key's public half; the signature is checked
before it is added.

Examples:
  kiln sign lab.kilnstate --key release.key
  kiln sign lab.kilnstate --public release.pub --command 'openssl pkeyutl -sign -rawin -inkey release.key -in \"$KILN_MESSAGE\"'
  kiln sign lab.kilnstate --key alice.key --root fleet.root      # says how many more are needed";

/// Add a release key's signature to a desired-state file
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct SignCommand {
    /// The desired-state file (signed in place)
    pub file: PathBuf,
    /// Release keys to sign with (repeatable)
    #[arg(long, value_name = "KEY", required_unless_present = "command")]
    pub key: Vec<PathBuf>,
    /// A command that signs the message on its stdin (an HSM or KMS client)
    #[arg(long, value_name = "SHELL COMMAND", requires = "public")]
    pub command: Option<String>,
    /// The public key of the --command's signing key
    #[arg(long, value_name = "PUB")]
    pub public: Option<PathBuf>,
    #[command(flatten)]
    pub root: RootArgs,
}

impl SignCommand {
    pub fn execute(self) -> Result<()> {
        let file = self.file.display();
        let mut signed = read_state(&self.file)?;
        let desired = SignedDesired::peek(&signed)
            .map_err(|e| coded(Code::InvalidInput, anyhow!("`{file}`: {e}")))?;
        // Everything the signature commits to, on stdout, before anything is signed.
        let body = postcard::to_stdvec(&desired).unwrap_or_default();
        print!(
            "{}",
            describe_state_full(&desired, &kiln_protocol::fleet::sha256(&body))
        );
        for path in &self.key {
            let key = keyfile::read_secret(path).map_err(|e| coded(Code::Key, e))?;
            signed = SignedDesired::add_signature(&signed, &key)
                .map_err(|e| coded(Code::InvalidInput, anyhow!("`{file}`: {e}")))?;
        }
        if let (Some(command), Some(public)) = (&self.command, &self.public) {
            let key = keyfile::read_public(public).map_err(|e| coded(Code::Key, e))?;
            let message = SignedDesired::signing_message(&signed)
                .map_err(|e| coded(Code::InvalidInput, anyhow!("`{file}`: {e}")))?;
            let signature = run_signer(command, &message)?;
            signed = SignedDesired::add_raw_signature(&signed, &key, &signature)
                .map_err(|e| coded(Code::Key, anyhow!("the signature `{command}` made: {e}")))?;
        }
        crate::files::write_public(&self.file, &encode_state(&signed))
            .map_err(|e| coded(Code::CannotWrite, anyhow!("cannot write `{file}`: {e}")))?;
        let signers: Vec<String> = SignedDesired::signers(&signed)
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect();
        eprintln!("{file}: signed by {}", signers.join(", "));
        if let Some(path) = self.root.path(self.key.first().map(PathBuf::as_path)) {
            let chain = crate::fleet::trust::read_root(&path)?;
            match SignedDesired::open(&signed, chain.root()) {
                Ok(_) => eprintln!("{file}: ready: `kiln push {file}`"),
                Err(e) => eprintln!("{file}: not yet: {e}"),
            }
        }
        Ok(())
    }
}

/// Runs `command` with `message` on stdin and in the file `$KILN_MESSAGE`; its stdout
/// is the signature (raw, hex or base64), at most a few hundred bytes.
fn run_signer(command: &str, message: &[u8]) -> Result<[u8; 64]> {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let failed = |why: String| coded(Code::Key, anyhow!("signing command `{command}`: {why}"));
    let mut file = tempfile::NamedTempFile::new().map_err(|e| failed(e.to_string()))?;
    file.write_all(message)
        .and_then(|()| file.flush())
        .map_err(|e| failed(format!("cannot write the message: {e}")))?;
    let mut child = Command::new("sh")
        .args(["-c", command])
        .env("KILN_MESSAGE", file.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that reads $KILN_MESSAGE may exit without reading stdin: a broken
        // pipe is its choice, not a failure (what it printed decides).
        match stdin.write_all(message) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(failed(format!("cannot write the message: {e}")));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        stdout
            .take(1024)
            .read_to_end(&mut out)
            .map_err(|e| failed(e.to_string()))?;
    }
    let status = child.wait().map_err(|e| failed(e.to_string()))?;
    if !status.success() {
        return Err(failed(format!("exited with {status}")));
    }
    decode_signature(&out).ok_or_else(|| {
        failed(format!(
            "printed {} bytes, not a signature (64 raw bytes, 128 hex digits or base64)",
            out.len()
        ))
    })
}

fn decode_signature(out: &[u8]) -> Option<[u8; 64]> {
    use base64::Engine;
    if let Ok(raw) = <[u8; 64]>::try_from(out) {
        return Some(raw);
    }
    let text = std::str::from_utf8(out).ok()?.trim();
    let bytes = hex::decode(text)
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(text).ok())?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_read_raw_hex_or_base64() {
        let raw = [7u8; 64];
        assert_eq!(decode_signature(&raw), Some(raw));
        assert_eq!(
            decode_signature(format!("{}\n", hex::encode(raw)).as_bytes()),
            Some(raw)
        );
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, raw);
        assert_eq!(decode_signature(b64.as_bytes()), Some(raw));
        assert_eq!(decode_signature(b"nonsense"), None);
        assert_eq!(decode_signature(&[1; 63]), None);
    }
}
