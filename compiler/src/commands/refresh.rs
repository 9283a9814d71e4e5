use anyhow::{anyhow, bail, Result};
use clap::Parser;
use kiln_protocol::fleet::Scope;
use kiln_protocol::names::Kind;

use crate::exit::{coded, Code};
use crate::fleet::broker::{BrokerArgs, Session};
use crate::fleet::desired::prepare_desired;
use crate::fleet::registry::publish_registry;
use crate::fleet::trust::{describe_state, Opened, Signing, SigningArgs};
use crate::names::valid_name;
use kiln_protocol::fleet::Topics;

const AFTER_HELP: &str = "\
Devices refuse expired desired states and report `stale` when the states they follow
are older than their bound (stale_after_s, 7 days by default): a broker that keeps
serving an old state cannot hide a newer one for longer. So a fleet re-signs its
states more often than that, from a timer, with the release key: the modules stay as
they are, and the serial, issue time and expiry are new.

After a rotation, what verifies only under an older root (its signers were rotated
out: possibly the leaked key's work) is not re-signed: refresh names each such state
and the registry, re-signs the rest, and exits 77. Review what it shows, then
`--adopt` re-signs them with today's keys.

Examples:
  kiln refresh --all --sign fleet.key                 # e.g. weekly, from a systemd timer
  kiln refresh --group lab --sign fleet.key --expires-in 7d
  kiln refresh --all --sign new.key --adopt           # after `kiln root rotate`, reviewed";

/// Re-sign desired states as they are, with a new issue time and expiry
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct RefreshCommand {
    /// The device whose own desired state to re-sign
    #[arg(long, conflicts_with_all = ["group", "all"])]
    pub device: Option<String>,
    /// The group whose desired state to re-sign
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
        // States that verify only under an older root: never re-signed unless adopted.
        let mut revoked = Vec::new();
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
                    match signing.fleet.open_desired(&bytes) {
                        Ok(Opened::Trusted(d)) => scopes.push(d.scope),
                        Ok(Opened::Revoked { doc, root }) if signing.adopt => {
                            eprintln!(
                                "adopting {topic}, signed under root v{root} (keys since rotated out): {}",
                                describe_state(&doc)
                            );
                            scopes.push(doc.scope)
                        }
                        Ok(Opened::Revoked { doc, root }) => {
                            revoked.push(format!(
                                "{topic} (signed under root v{root} by keys since rotated out: {})",
                                describe_state(&doc)
                            ));
                        }
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
            let next = match prepare_desired(&mut session, &signing, &topics, &scope, |_| {}) {
                Ok(next) => next,
                // One state signed by a revoked key does not stop the others' refresh.
                Err(e) if self.all && crate::exit::code_of(&e) == Code::Key => {
                    revoked.push(crate::exit::one_line(&e));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (serial, expires) = (next.desired.serial, next.desired.expires_ms);
            let topic = next.topic.clone();
            next.publish(&mut session)?;
            println!(
                "{topic}: serial {serial}, valid until {}",
                kiln_protocol::fleet::utc(expires)
            );
        }
        if self.all {
            if let Err(e) = resign_registry(&mut session, &topics, &signing) {
                if crate::exit::code_of(&e) != Code::Key {
                    return Err(e);
                }
                revoked.push(crate::exit::one_line(&e));
            }
        }
        session.disconnect();
        if !revoked.is_empty() {
            for r in &revoked {
                eprintln!("not re-signed: {r}");
            }
            bail!(coded(
                Code::Key,
                anyhow!(
                    "{} item(s) not re-signed: they verify only under an older root, so a rotated-out key wrote them; review them above and run `kiln refresh --all --adopt` to re-sign them with today's keys",
                    revoked.len()
                )
            ));
        }
        Ok(())
    }
}

/// The registry, signed again by today's keys (after a rotation it may be signed by a
/// key since rotated out), if the keys at hand hold its role.
fn resign_registry(session: &mut Session, topics: &Topics, signing: &Signing) -> Result<()> {
    let mut registry = signing.fleet.registry(session, topics, signing.adopt)?;
    if registry.serial == 0 {
        return Ok(()); // nothing enrolled yet
    }
    let keys = &signing.keys;
    match publish_registry(session, topics, &signing.fleet, keys, &mut registry) {
        Ok(()) => {}
        Err(e @ crate::fleet::Error::Broker(_)) => return Err(e.into()),
        Err(e) => {
            eprintln!("registry left as it is: {e}");
            return Ok(());
        }
    }
    println!("registry: serial {}", registry.serial);
    Ok(())
}
