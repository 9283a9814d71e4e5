//! The device's one MQTT connection, shared by the fleet agent and the telemetry
//! pipeline: one rumqttc event loop polled by its own thread, which never blocks on
//! anything else. rumqttc reconnects by being polled again; kilnd waits with a growing
//! backoff in between. Subscriptions do not survive a reconnect with a clean session,
//! so the agent resubscribes on every [`LinkEvent::Connected`].
//!
//! Telemetry needs to know which batch the broker acknowledged, but rumqttc picks
//! packet ids itself and only reports them as each publish goes out. Every QoS 1
//! publish therefore goes through [`Link`], which notes an optional tag for it in the
//! order it hands publishes to rumqttc; rumqttc sends them in that order, so the
//! event loop pairs each packet id it sends with the next tag, and each PUBACK with
//! its tag.
//!
//! rumqttc keeps unacknowledged publishes across a reconnect only into a resumed
//! session, and silently drops them otherwise. kilnd does not leave that to chance: on
//! every disconnect it empties rumqttc's resend queue itself and reports each tracked
//! publish in it as lost, and telemetry sends those batches again from its spool.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{Client, ClientError, Event, LastWill, Outgoing, Packet, QoS, Request};

use crate::daemon::config::MqttConfig;

/// What the connection reports.
pub enum LinkEvent {
    Connected,
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// A message that could not be received: the connection dropped over it.
    Unreceivable {
        what: String,
    },
}

/// The publishing and subscribing side of the connection; cheap to clone.
#[derive(Clone)]
pub struct Link {
    client: Client,
    /// Tags of publishes handed to rumqttc whose packet id is not yet known.
    tags: Arc<Mutex<VecDeque<Option<u64>>>>,
}

impl Link {
    /// Publishes with QoS 1; rumqttc queues it while the broker is away.
    pub fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) {
        self.send(topic, retain, payload, None);
    }

    /// Publishes with QoS 1; `on_ack` gets `tag` when the broker has acknowledged it.
    /// False if rumqttc did not take it (its queue stayed full, or kilnd is stopping).
    pub fn publish_tracked(&self, topic: String, payload: Vec<u8>, tag: u64) -> bool {
        self.send(topic, false, payload, Some(tag))
    }

    fn send(&self, topic: String, retain: bool, payload: Vec<u8>, tag: Option<u64>) -> bool {
        // rumqttc answers an invalid topic like a full queue: never wait on one.
        if topic.contains(['+', '#']) || payload.len() > kiln_protocol::mqtt::MAX_PACKET {
            tracing::error!(%topic, bytes = payload.len(), "publish refused: invalid topic or too large");
            return false;
        }
        let mut request = (topic, payload);
        for _ in 0..400 {
            // The tag is queued under the same lock as the publish, so the event loop
            // (which takes this lock to pair packet ids) sees them in the same order.
            let mut tags = lock(&self.tags);
            match self
                .client
                .try_publish(request.0, QoS::AtLeastOnce, retain, request.1)
            {
                Ok(()) => {
                    tags.push_back(tag);
                    return true;
                }
                Err(ClientError::TryRequest(Request::Publish(p))) => {
                    drop(tags);
                    request = (p.topic, p.payload.to_vec());
                    // The request queue is full (or the event loop is gone): wait.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        false
    }

    pub fn subscribe(&self, topic: String) {
        let _ = self.client.subscribe(topic, QoS::AtLeastOnce);
    }

    pub fn unsubscribe(&self, topic: String) {
        let _ = self.client.unsubscribe(topic);
    }

    pub fn disconnect(&self) {
        let _ = self.client.disconnect();
    }
}

pub fn connect(
    config: &MqttConfig,
    device: &str,
    will: (String, Vec<u8>),
    on_event: impl Fn(LinkEvent) -> bool + Send + 'static,
    on_delivery: impl Fn(Delivery) + Send + 'static,
) -> Result<Link, String> {
    let keep_alive = Duration::from_secs(config.keep_alive_s.max(5));
    let mut options = config
        .connect()
        .options(&format!("kilnd-{device}"), keep_alive)?;
    options
        .set_clean_session(true)
        .set_inflight(INFLIGHT)
        .set_last_will(LastWill::new(will.0, will.1, QoS::AtLeastOnce, true));
    let (client, mut connection) = Client::new(options, 256);
    let link = Link {
        client,
        tags: Arc::default(),
    };
    let tags = link.tags.clone();
    let broker = config.broker.clone();
    std::thread::spawn(move || {
        let mut backoff = Duration::from_millis(200);
        let mut pairing = Pairing::default();
        loop {
            let Ok(event) = connection.recv() else {
                return; // every client handle is gone
            };
            let alive = match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(%broker, "connected");
                    backoff = Duration::from_millis(200);
                    on_event(LinkEvent::Connected)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_event(LinkEvent::Message {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                }),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                    pairing.sent(pkid, &mut lock(&tags));
                    true
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(tag) = pairing.acked(ack.pkid) {
                        on_delivery(Delivery::Acked(tag));
                    }
                    true
                }
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(%broker, error = %e, retry_ms = backoff.as_millis() as u64, "broker connection lost");
                    if let rumqttc::ConnectionError::MqttState(
                        rumqttc::StateError::Deserialization(
                            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
                        ),
                    ) = &e
                    {
                        let limit = kiln_protocol::mqtt::MAX_INCOMING;
                        on_event(LinkEvent::Unreceivable {
                            what: format!("a message of {n} bytes (limit {limit})"),
                        });
                    }
                    // What rumqttc kept to resend: the unacknowledged publishes (with
                    // packet ids) and the requests it had not sent yet (without).
                    let dropped = std::mem::take(&mut connection.eventloop.pending);
                    let unsent = dropped
                        .iter()
                        .filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0 && p.qos != QoS::AtMostOnce))
                        .count();
                    let lost = pairing.disconnected(unsent, &mut lock(&tags));
                    for tag in lost {
                        on_delivery(Delivery::Lost(tag));
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    true
                }
            };
            if !alive {
                return;
            }
        }
    });
    Ok(link)
}

/// Packet id -> tag of the publish it carries, from the moment rumqttc sends it
/// until its PUBACK.
#[derive(Default)]
struct Pairing {
    in_flight: HashMap<u16, Option<u64>>,
}

impl Pairing {
    /// rumqttc sent a publish with `pkid`: it is the oldest one not yet paired.
    fn sent(&mut self, pkid: u16, tags: &mut VecDeque<Option<u64>>) {
        if let Entry::Vacant(e) = self.in_flight.entry(pkid) {
            e.insert(tags.pop_front().flatten());
        }
    }

    fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.in_flight.remove(&pkid).flatten()
    }

    /// The connection dropped, and with it every publish in flight and the `unsent`
    /// oldest ones rumqttc had taken but not sent: their tags.
    fn disconnected(&mut self, unsent: usize, tags: &mut VecDeque<Option<u64>>) -> Vec<u64> {
        let mut lost: Vec<u64> = self.in_flight.drain().filter_map(|(_, t)| t).collect();
        let n = unsent.min(tags.len());
        lost.extend(tags.drain(..n).flatten());
        lost.sort_unstable();
        lost
    }
}

/// What became of a tracked publish.
pub enum Delivery {
    /// The broker acknowledged it.
    Acked(u64),
    /// The connection dropped before it was acknowledged; it must be sent again.
    Lost(u64),
}

/// Publishes rumqttc keeps in flight. Packet ids cycle through `1..=INFLIGHT`, and a
/// new publish never reuses the id of one still unacknowledged as long as fewer than
/// this many are outstanding; kilnd keeps far fewer (telemetry's window plus a few
/// fleet messages).
const INFLIGHT: u16 = 100;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_publishes_through_acks_and_disconnects() {
        let mut tags: VecDeque<Option<u64>> = [Some(10), None, Some(11), Some(12), Some(13)].into();
        let mut p = Pairing::default();
        p.sent(1, &mut tags);
        p.sent(2, &mut tags);
        assert_eq!(p.acked(2), None, "an untracked publish (fleet status)");
        assert_eq!(p.acked(1), Some(10));
        assert_eq!(p.acked(1), None, "a second PUBACK means nothing");
        p.sent(1, &mut tags); // packet ids are reused once acknowledged
        p.sent(1, &mut tags); // and sent again (retransmission) keeps its tag
        assert_eq!(tags.len(), 2);
        // 12 was taken by rumqttc but not sent; 13 is still in the request queue.
        assert_eq!(p.disconnected(1, &mut tags), vec![11, 12]);
        assert_eq!(tags, VecDeque::from([Some(13)]));
        p.sent(1, &mut tags);
        assert_eq!(p.acked(1), Some(13));
    }
}
