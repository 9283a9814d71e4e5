use anyhow::{anyhow, bail, Result};
use clap::Parser;
use kiln_protocol::fleet::Scope;
use kiln_protocol::names::Kind;

use crate::broker::{BrokerArgs, Session};
use crate::commands::push::prepare_desired;
use crate::commands::valid_name;
use crate::exit::{coded, Code};
use crate::trust::Signing;
use crate::trust::SigningArgs;
use kiln_protocol::fleet::Topics;
use kiln_protocol::trust::SignedRegistry;

const AFTER_HELP: &str = "\
Devices refuse expired desired states and report `stale` when the states they follow
are older than their bound (stale_after_s, 7 days by default): a broker that keeps
serving an old state cannot hide a newer one for longer. So a fleet re-signs its
states more often than that, from a timer, with the release key: the modules stay as
they are, and the serial, issue time and expiry are new.

Examples:
  kiln refresh --all --sign fleet.key                 # e.g. weekly, from a systemd timer
  kiln refresh --group lab --sign fleet.key --expires-in 7d";

/// Re-sign desired states as they are, with a new issue time and expiry
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct RefreshCommand {
    #[arg(long, conflicts_with_all = ["group", "all"])]
    pub device: Option<String>,
    #[arg(long, conflicts_with = "all")]
    pub group: Option<String>,
    /// Every desired state the broker retains
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub signing: SigningArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

impl RefreshCommand {
    pub fn execute(self) -> Result<()> {
        let topics = self.broker.topics();
        let unavailable = |e| coded(Code::Unavailable, e);
        let mut session = self.broker.connect().map_err(unavailable)?;
        if self.signing.sign.is_empty() {
            bail!(coded(Code::Usage, anyhow!("refresh signs: --sign KEY")));
        }
        let signing = self.signing.signing(&mut session, &topics)?;
        let scopes = match (&self.device, &self.group, self.all) {
            (Some(d), _, _) => {
                valid_name(Kind::Device, d)?;
                vec![Scope::Device(d.clone())]
            }
            (None, Some(g), _) => {
                valid_name(Kind::Group, g)?;
                vec![Scope::Group(g.clone())]
            }
            (None, None, true) => {
                let mut scopes = Vec::new();
                for (topic, bytes) in session.desired_states(&topics).map_err(unavailable)? {
                    match signing.fleet.verify_desired(&bytes) {
                        Ok((d, _)) => scopes.push(d.scope),
                        Err(e) => {
                            eprintln!("warning: {topic} is not trusted and stays as it is: {e}")
                        }
                    }
                }
                scopes
            }
            (None, None, false) => bail!(coded(
                Code::Usage,
                anyhow!("say which: --device ID, --group NAME or --all")
            )),
        };
        for scope in scopes {
            let next = prepare_desired(&mut session, &signing, &topics, &scope, |_| {})?;
            let (serial, expires) = (next.desired.serial, next.desired.expires_ms);
            let topic = next.topic.clone();
            next.publish(&mut session)?;
            eprintln!(
                "{topic}: serial {serial}, valid until {}",
                kiln_protocol::fleet::utc(expires)
            );
        }
        if self.all {
            resign_registry(&mut session, &topics, &signing)?;
        }
        session.disconnect();
        Ok(())
    }
}

/// The registry, signed again by today's keys (after a rotation it may be signed by a
/// key since rotated out), if the keys at hand hold its role.
fn resign_registry(session: &mut Session, topics: &Topics, signing: &Signing) -> Result<()> {
    let mut registry = signing.fleet.registry(session, topics)?;
    if registry.serial == 0 {
        return Ok(()); // nothing enrolled yet
    }
    registry.serial += 1;
    let keys: Vec<_> = signing.keys.iter().collect();
    let signed = registry
        .sign(&keys)
        .map_err(|e| coded(Code::InvalidInput, anyhow!(e)))?;
    if let Err(e) = SignedRegistry::open(&signed, signing.fleet.root()) {
        eprintln!("registry left as it is: {e}");
        return Ok(());
    }
    session
        .publish_all(vec![(topics.registry(), signed)], |_| {})
        .map_err(|e| coded(Code::Unavailable, e))?;
    eprintln!("registry: serial {}", registry.serial);
    Ok(())
}
