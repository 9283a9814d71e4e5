//! The device's one MQTT connection, shared by the fleet agent and the telemetry
//! pipeline: one rumqttc event loop polled by its own thread, which never blocks on
//! anything else. rumqttc reconnects by being polled again; kilnd waits in between and,
//! given a list of brokers (`broker = "mqtt://node1,mqtt://node2"`), moves on to the
//! next one, as [`Failover`] decides (random waits, so the devices of a node that dies
//! do not all reconnect at once). Subscriptions do not survive a reconnect with a clean session,
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

use rumqttc::{Client, ClientError, Event, EventLoop, LastWill, Outgoing, Packet, QoS, Request};

use kiln_protocol::mqtt::failover::Failover;
use kiln_protocol::mqtt::{MAX_INCOMING, MAX_PACKET, PUBLISH_OVERHEAD};

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
    /// The broker answered the subscription to `topic` with a failure code: its ACL
    /// does not let the device read it, or it is overloaded. Nothing would arrive.
    SubscribeRefused {
        topic: String,
    },
}

/// The publishing and subscribing side of the connection; cheap to clone.
#[derive(Clone)]
pub struct Link {
    client: Client,
    /// Tags of publishes handed to rumqttc whose packet id is not yet known.
    tags: Arc<Mutex<VecDeque<Option<u64>>>>,
    /// Topics of subscriptions handed to rumqttc whose packet id is not yet known:
    /// paired with theirs as they go out, as publishes are with their tags.
    subscribing: Arc<Mutex<VecDeque<String>>>,
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

    /// Whether a publish of `len` bytes on `topic` is within the packet limit rumqttc
    /// enforces: one over it would take the connection down, for everyone.
    pub fn fits(&self, topic: &str, len: usize) -> bool {
        // The overhead counts a topic at MQTT's longest.
        topic.len() <= usize::from(u16::MAX) && len + PUBLISH_OVERHEAD <= MAX_PACKET
    }

    /// Publishes with QoS 1 if rumqttc takes it at once, untracked; false if its queue
    /// is full (the broker is away and rumqttc holds all it may).
    pub fn publish_now(&self, topic: String, payload: Vec<u8>) -> bool {
        self.send_within(topic, false, payload, None, 1)
    }

    fn send(&self, topic: String, retain: bool, payload: Vec<u8>, tag: Option<u64>) -> bool {
        self.send_within(topic, retain, payload, tag, 400)
    }

    /// `attempts` tries, 5 ms apart.
    fn send_within(
        &self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
        tag: Option<u64>,
        attempts: usize,
    ) -> bool {
        // rumqttc answers an invalid topic like a full queue: never wait on one.
        if topic.contains(['+', '#']) || !self.fits(&topic, payload.len()) {
            tracing::error!(%topic, bytes = payload.len(), limit = MAX_PACKET, "not publishing a message over the packet limit");
            return false;
        }
        let mut request = (topic, payload);
        for _ in 0..attempts {
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
        self.subscribe_at(topic, QoS::AtLeastOnce)
    }

    /// Subscribes at `qos`: QoS 0 for what is retained and asked again if lost.
    pub fn subscribe_at(&self, topic: String, qos: QoS) {
        for _ in 0..400 {
            // Queued under the same lock as the request, as a publish's tag is, so the
            // event loop pairs each packet id with its topic; never held while waiting.
            let mut subscribing = lock(&self.subscribing);
            match self.client.try_subscribe(topic.clone(), qos) {
                Ok(()) => {
                    subscribing.push_back(topic);
                    return;
                }
                Err(ClientError::TryRequest(_)) => {
                    drop(subscribing);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return, // the event loop is gone
            }
        }
        tracing::error!(%topic, "could not queue a subscription: the link's queue stayed full");
    }

    pub fn unsubscribe(&self, topic: String) {
        let _ = self.client.unsubscribe(topic);
    }

    pub fn disconnect(&self) {
        let _ = self.client.disconnect();
    }
}

/// The link's event loop: rumqttc's, and what kilnd keeps between its events. kilnd
/// runs it on a thread of its own ([`connect`]); kilnd-sim polls thousands of them on
/// one tokio runtime ([`LinkLoop::run`]).
pub struct LinkLoop {
    pub eventloop: EventLoop,
    core: Core,
}

/// Everything but rumqttc's event loop: the brokers and the failover between them,
/// packet ids paired with tags and topics, and where events go.
struct Core {
    brokers: Vec<(String, rumqttc::MqttOptions)>,
    failover: Failover,
    pairing: Pairing,
    subscriptions: HashMap<u16, String>,
    tags: Arc<Mutex<VecDeque<Option<u64>>>>,
    subscribing: Arc<Mutex<VecDeque<String>>>,
    on_event: Box<dyn Fn(LinkEvent) -> bool + Send>,
    on_delivery: Box<dyn Fn(Delivery) + Send>,
}

/// Connects to the broker on a thread of the link's own.
pub fn connect(
    config: &MqttConfig,
    device: &str,
    will: (String, Vec<u8>),
    on_event: impl Fn(LinkEvent) -> bool + Send + 'static,
    on_delivery: impl Fn(Delivery) + Send + 'static,
) -> Result<Link, String> {
    let (link, looping) = open(config, device, will, on_event, on_delivery)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("no runtime for the broker connection: {e}"))?;
    std::thread::spawn(move || runtime.block_on(looping.run()));
    Ok(link)
}

/// The link and its event loop, not yet polled: the caller runs [`LinkLoop::run`].
pub fn open(
    config: &MqttConfig,
    device: &str,
    will: (String, Vec<u8>),
    on_event: impl Fn(LinkEvent) -> bool + Send + 'static,
    on_delivery: impl Fn(Delivery) + Send + 'static,
) -> Result<(Link, LinkLoop), String> {
    let keep_alive = Duration::from_secs(config.keep_alive_s.max(5));
    let mut brokers =
        config
            .connect()
            .all_options(&format!("kilnd-{device}"), keep_alive, MAX_INCOMING)?;
    for (_, options) in &mut brokers {
        options
            .set_clean_session(true)
            .set_inflight(INFLIGHT)
            .set_last_will(LastWill::new(
                will.0.clone(),
                will.1.clone(),
                QoS::AtLeastOnce,
                true,
            ));
    }
    let mut seed = [0u8; 8];
    getrandom::getrandom(&mut seed)
        .map_err(|e| format!("no randomness for the broker failover: {e}"))?;
    let failover = Failover::new(brokers.len(), u64::from_le_bytes(seed));
    // rumqttc's blocking client (what the agent and telemetry threads call) and its
    // event loop, without the runtime it would poll that on: the caller's polls it.
    let (client, connection) = Client::new(brokers[0].1.clone(), 256);
    let rumqttc::Connection { eventloop, .. } = connection;
    let link = Link {
        client,
        tags: Arc::default(),
        subscribing: Arc::default(),
    };
    let core = Core {
        brokers,
        failover,
        pairing: Pairing::default(),
        subscriptions: HashMap::new(),
        tags: link.tags.clone(),
        subscribing: link.subscribing.clone(),
        on_event: Box::new(on_event),
        on_delivery: Box::new(on_delivery),
    };
    Ok((link, LinkLoop { eventloop, core }))
}

impl LinkLoop {
    /// Polls the connection until every handle of the link is gone or nobody listens
    /// to its events any more; between brokers, waits as [`Failover`] says.
    pub async fn run(mut self) {
        loop {
            let alive = match self.eventloop.poll().await {
                Ok(event) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        self.core.failover.connected();
                    }
                    self.core.handle(event)
                }
                // Every handle of the link is gone.
                Err(rumqttc::ConnectionError::RequestsDone) => return,
                Err(e) => {
                    let (alive, wait) = self.core.failed(e, &mut self.eventloop);
                    tokio::time::sleep(wait).await;
                    alive
                }
            };
            if !alive {
                return;
            }
        }
    }
}

impl Core {
    fn broker(&self) -> &str {
        &self.brokers[self.failover.current()].0
    }

    /// One event as it came; false when nobody listens any more.
    fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                tracing::info!(broker = %self.broker(), "connected");
                (self.on_event)(LinkEvent::Connected)
            }
            Event::Incoming(Packet::Publish(p)) => (self.on_event)(LinkEvent::Message {
                topic: p.topic.clone(),
                payload: p.payload.to_vec(),
            }),
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                self.pairing.sent(pkid, &mut lock(&self.tags));
                true
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(tag) = self.pairing.acked(ack.pkid) {
                    (self.on_delivery)(Delivery::Acked(tag));
                }
                true
            }
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                if let Some(topic) = lock(&self.subscribing).pop_front() {
                    self.subscriptions.insert(pkid, topic);
                }
                true
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let topic = self.subscriptions.remove(&ack.pkid);
                let failed = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                match (failed, topic) {
                    // The agent logs it, and asks again.
                    (true, Some(topic)) => (self.on_event)(LinkEvent::SubscribeRefused { topic }),
                    _ => true,
                }
            }
            _ => true,
        }
    }

    /// The connection failed: what was in flight is written off, the next broker
    /// chosen. Whether anyone still listens, and how long to wait before polling again.
    fn failed(
        &mut self,
        e: rumqttc::ConnectionError,
        eventloop: &mut EventLoop,
    ) -> (bool, Duration) {
        let broker = self.broker().to_string();
        let (next, wait) = self.failover.failed();
        let next_broker = self.brokers[next].0.as_str();
        tracing::warn!(%broker, error = %e, next = %next_broker, retry_ms = wait.as_millis() as u64, "broker connection lost");
        let mut alive = true;
        if let rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
        )) = &e
        {
            let limit = kiln_protocol::mqtt::MAX_INCOMING;
            alive &= (self.on_event)(LinkEvent::Unreceivable {
                what: format!("a message of {n} bytes (limit {limit})"),
            });
        }
        // Events rumqttc queued before the write or flush that failed (the
        // `Outgoing::Publish` of the very publish it was writing, PUBACKs read in the
        // same batch) stay in its queue across the reconnect. Handled after it, a stale
        // packet id would take the tag of a later publish, and a PUBACK would remove
        // the wrong batch from the spool. They are handled now, before the in-flight
        // ones are written off.
        let stale = std::mem::take(&mut eventloop.state.events);
        for event in stale {
            alive &= self.handle(event);
        }
        // What rumqttc kept to resend: the unacknowledged publishes (with packet ids)
        // and the requests it had not sent yet (without).
        let dropped = std::mem::take(&mut eventloop.pending);
        let unsent = dropped
            .iter()
            .filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0 && p.qos != QoS::AtMostOnce))
            .count();
        let lost = self.pairing.disconnected(unsent, &mut lock(&self.tags));
        // Subscriptions: those sent are gone with the session (the agent subscribes
        // again on connecting); those rumqttc had taken but not sent are dropped here,
        // and are the oldest not yet paired.
        self.subscriptions.clear();
        let unsent_subscriptions = dropped
            .iter()
            .filter(|r| matches!(r, Request::Subscribe(_)))
            .count();
        let mut queue = lock(&self.subscribing);
        let n = unsent_subscriptions.min(queue.len());
        queue.drain(..n);
        drop(queue);
        for tag in lost {
            (self.on_delivery)(Delivery::Lost(tag));
        }
        // rumqttc connects with its options of the moment: the next broker's.
        eventloop.mqtt_options = self.brokers[next].1.clone();
        (alive, wait)
    }
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

    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, Clone)]
    enum Op {
        /// kilnd hands rumqttc a publish, tracked or not.
        Publish { tracked: bool },
        /// rumqttc takes the oldest request and writes it; the write may fail.
        Send { fail: bool },
        /// The broker acknowledges the n-th oldest publish in flight; the read of the
        /// PUBACK may be followed by a failure in the same poll.
        Ack { nth: usize, then_fail: bool },
        /// The connection drops.
        Drop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<bool>().prop_map(|tracked| Op::Publish { tracked }),
            4 => prop_oneof![5 => Just(false), 1 => Just(true)].prop_map(|fail| Op::Send { fail }),
            3 => (0usize..8, prop_oneof![5 => Just(false), 1 => Just(true)])
                .prop_map(|(nth, then_fail)| Op::Ack { nth, then_fail }),
            1 => Just(Op::Drop),
        ]
    }

    /// rumqttc as far as pairing goes: a request queue, publishes in flight by packet
    /// id, and the event queue that outlives a failed poll. The link's side is driven
    /// exactly as `connect` drives it.
    #[derive(Default)]
    struct Model {
        requests: VecDeque<Option<u64>>,
        in_flight: BTreeMap<u16, Option<u64>>,
        order: VecDeque<u16>,
        events: VecDeque<Event>,
        last_pkid: u16,
        // The link's side.
        tags: VecDeque<Option<u64>>,
        pairing: Pairing,
        acked: Vec<u64>,
        lost: Vec<u64>,
        // Truth.
        truly_acked: BTreeSet<u64>,
        truly_lost: BTreeSet<u64>,
    }

    impl Model {
        fn deliver(&mut self) {
            while let Some(event) = self.events.pop_front() {
                self.handle(event);
            }
        }

        fn handle(&mut self, event: Event) {
            match event {
                Event::Outgoing(Outgoing::Publish(pkid)) => self.pairing.sent(pkid, &mut self.tags),
                Event::Incoming(Packet::PubAck(ack)) => {
                    if let Some(tag) = self.pairing.acked(ack.pkid) {
                        self.acked.push(tag);
                    }
                }
                _ => {}
            }
        }

        /// What `connect` does on an error.
        fn failed(&mut self) {
            let stale = std::mem::take(&mut self.events);
            for event in stale {
                self.handle(event);
            }
            let unsent = self.requests.len();
            for tag in self.requests.drain(..).flatten() {
                self.truly_lost.insert(tag);
            }
            for (_, tag) in std::mem::take(&mut self.in_flight) {
                self.truly_lost.extend(tag);
            }
            self.order.clear();
            self.lost
                .extend(self.pairing.disconnected(unsent, &mut self.tags));
        }

        fn apply(&mut self, op: Op, next_tag: &mut u64) {
            match op {
                Op::Publish { tracked } => {
                    let tag = tracked.then(|| {
                        *next_tag += 1;
                        *next_tag
                    });
                    self.requests.push_back(tag);
                    self.tags.push_back(tag);
                }
                Op::Send { fail } => {
                    if self.in_flight.len() >= 20 {
                        return;
                    }
                    let Some(tag) = self.requests.pop_front() else {
                        return;
                    };
                    let mut pkid = self.last_pkid;
                    loop {
                        pkid = pkid % INFLIGHT + 1;
                        if !self.in_flight.contains_key(&pkid) {
                            break;
                        }
                    }
                    self.last_pkid = pkid;
                    self.in_flight.insert(pkid, tag);
                    self.order.push_back(pkid);
                    self.events
                        .push_back(Event::Outgoing(Outgoing::Publish(pkid)));
                    if fail {
                        self.failed();
                    } else {
                        self.deliver();
                    }
                }
                Op::Ack { nth, then_fail } => {
                    if self.order.is_empty() {
                        return;
                    }
                    let pkid = self.order.remove(nth % self.order.len()).unwrap();
                    if let Some(tag) = self.in_flight.remove(&pkid).flatten() {
                        self.truly_acked.insert(tag);
                    }
                    self.events
                        .push_back(Event::Incoming(Packet::PubAck(rumqttc::PubAck::new(pkid))));
                    if then_fail {
                        self.failed();
                    } else {
                        self.deliver();
                    }
                }
                Op::Drop => self.failed(),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the order of publishes, writes (failed or not), PUBACKs and drops:
        /// every PUBACK is paired with the tag of the publish it acknowledges, and each
        /// tracked publish ends acknowledged or lost, exactly once.
        #[test]
        fn pubacks_pair_with_their_own_publish(ops in prop::collection::vec(op(), 0..200)) {
            let mut m = Model::default();
            let mut next_tag = 0;
            for op in ops {
                m.apply(op, &mut next_tag);
                let acked: BTreeSet<u64> = m.acked.iter().copied().collect();
                prop_assert_eq!(acked.len(), m.acked.len(), "a tag acknowledged twice");
                prop_assert!(acked.is_subset(&m.truly_acked), "acked {:?}, truly {:?}", m.acked, m.truly_acked);
            }
            m.failed();
            let acked: BTreeSet<u64> = m.acked.iter().copied().collect();
            let lost: BTreeSet<u64> = m.lost.iter().copied().collect();
            prop_assert_eq!(lost.len(), m.lost.len(), "a tag lost twice");
            prop_assert_eq!(&acked, &m.truly_acked);
            prop_assert_eq!(&lost, &m.truly_lost);
            prop_assert!(acked.is_disjoint(&lost));
            prop_assert_eq!(acked.len() + lost.len(), next_tag as usize);
            prop_assert!(m.tags.is_empty(), "tags left over: {:?}", m.tags);
        }
    }
}
