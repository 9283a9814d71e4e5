//! Commands from the fleet: opened under the release role of the root the device
//! follows, taken once while fresh and within the device's rate, handed to the module
//! (`Effect::Command`), and answered with a reply the device signs.

use kiln_protocol::command::{self, Device, Outcome, Reply, ReplyV1, Seen};
use kiln_protocol::fleet::EventKind;

use super::{Agent, Effect};

/// Commands a device takes in a burst, and how often one more is allowed after: a
/// sender with the release key still cannot keep a module's worker busy.
pub const BURST: u64 = 20;
pub const EVERY_MS: u64 = 100;

/// The ids taken and the rate's bucket.
#[derive(Debug)]
pub struct Commands {
    seen: Seen,
    /// Commands allowed now, and the time up to which refills were counted.
    tokens: u64,
    counted_ms: u64,
}

impl Default for Commands {
    fn default() -> Self {
        Self {
            seen: Seen::default(),
            tokens: BURST,
            counted_ms: 0,
        }
    }
}

impl Commands {
    fn take_token(&mut self, now_ms: u64) -> Result<(), String> {
        let refill = now_ms.saturating_sub(self.counted_ms) / EVERY_MS;
        self.tokens = self.tokens.saturating_add(refill).min(BURST);
        self.counted_ms += refill * EVERY_MS;
        if self.tokens == 0 {
            return Err(format!(
                "more than {BURST} commands at once and {} a second after; try again later",
                1000 / EVERY_MS
            ));
        }
        self.tokens -= 1;
        Ok(())
    }
}

impl Agent {
    pub(super) fn on_command(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let root = self.trust.chain.root();
        let (command, _) = match command::open(payload, &root.release) {
            Ok(c) => c,
            // Not from the fleet's release keys: no reply to an unknown sender, one
            // event per reason.
            Err(why) => {
                let reason = format!("command refused: {why}");
                return self.event_once("*", 0, EventKind::Rejected { reason });
            }
        };
        let fleet = root.fleet.clone();
        let device = Device {
            fleet: &fleet,
            device: &self.device,
            groups: &self.groups,
            started_ms: self.started_ms,
            now_ms: self.now_ms,
        };
        let now = self.now_ms;
        let taken = self
            .commands
            .take_token(now)
            .and_then(|()| self.commands.seen.admit(&command, &device));
        match taken {
            Ok(()) => {
                tracing::info!(module = %command.module, topic = %command.topic, id = format!("{:016x}", command.id), "command");
                self.out.push(Effect::Command(Box::new(command)));
            }
            Err(why) => {
                let reason = format!(
                    "command {:016x} for {} refused: {why}",
                    command.id, command.module
                );
                self.event_once(&command.module, 0, EventKind::Rejected { reason });
                if command.reply {
                    self.reply(command.id, Outcome::Refused(why));
                }
            }
        }
    }

    /// What became of a delivered command, for its sender if it waits.
    pub(super) fn on_answer(&mut self, id: u64, reply: bool, outcome: Outcome) {
        if reply {
            self.reply(id, outcome);
        }
    }

    fn reply(&mut self, id: u64, outcome: Outcome) {
        let reply = Reply::V1(ReplyV1 {
            device: self.device.clone(),
            id,
            at_ms: self.now_ms,
            outcome,
        });
        let topic = self.topics.replies(&self.device);
        self.publish(topic, false, &reply);
    }

    /// The command topics this device listens on.
    pub(super) fn command_topics(&self) -> Vec<String> {
        let mut topics = vec![self.topics.commands(&self.device)];
        topics.extend(self.groups.iter().map(|g| self.topics.group_commands(g)));
        topics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_ten_a_second() {
        let mut c = Commands::default();
        for _ in 0..BURST {
            c.take_token(1_000).unwrap();
        }
        assert!(c.take_token(1_000).unwrap_err().contains("try again later"));
        assert!(c.take_token(1_099).is_err());
        c.take_token(1_100).unwrap();
        assert!(c.take_token(1_150).is_err());
        // Idle for long, it holds a burst again, never more.
        for _ in 0..BURST {
            c.take_token(60_000).unwrap();
        }
        assert!(c.take_token(60_000).is_err());
    }
}
