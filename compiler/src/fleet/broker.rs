//! The fleet tool's side of MQTT: short sessions that publish retained messages and
//! wait for the broker to acknowledge each, or collect what is retained under a topic
//! filter. One rumqttc event loop, polled here, never in the background.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use kiln_protocol::fleet::{Topics, DEFAULT_PREFIX};
use kiln_protocol::mqtt::Connect;
use rumqttc::{Client, Connection, Event, MqttOptions, Outgoing, Packet, QoS};

/// The broker flags every fleet command shares.
#[derive(Args, Debug, Clone)]
pub struct BrokerArgs {
    /// `mqtt://host[:port]`, or `mqtts://host[:port]` with --ca; or a cluster's nodes as
    /// URL,URL,... (the first that answers)
    #[arg(long, default_value = "mqtt://127.0.0.1:1883", env = "KILN_BROKER")]
    pub broker: String,
    /// Topic prefix the fleet uses
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// PEM CA certificate the broker's certificate must chain to
    #[arg(long, value_name = "FILE", env = "KILN_BROKER_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for brokers that require one (with --client-key)
    #[arg(long, value_name = "FILE")]
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM private key of --client-cert
    #[arg(long, value_name = "FILE")]
    pub client_key: Option<std::path::PathBuf>,
    /// User name for the broker; the password comes from --password-file or the
    /// KILN_BROKER_PASSWORD environment variable, never from the command line
    #[arg(long, env = "KILN_BROKER_USER")]
    pub username: Option<String>,
    /// File whose first line is the broker password (else KILN_BROKER_PASSWORD)
    #[arg(long, value_name = "FILE", env = "KILN_BROKER_PASSWORD_FILE")]
    pub password_file: Option<std::path::PathBuf>,
    /// From the environment (KILN_BROKER_PASSWORD) only, never from the command line
    #[arg(skip = std::env::var("KILN_BROKER_PASSWORD").ok())]
    pub password: Option<String>,
}

impl BrokerArgs {
    pub fn topics(&self) -> Topics {
        Topics::new(&self.prefix)
    }

    /// How to connect; the password is read from --password-file here (its first
    /// line, at most 4 KiB), so a missing file is an error before any connection.
    pub fn connect_options(&self) -> Result<Connect> {
        let password = match &self.password_file {
            Some(path) => Some(read_password(path)?),
            None => self.password.clone(),
        };
        Ok(Connect::to(self.broker.clone())
            .tls(
                self.ca.clone(),
                self.client_cert.clone(),
                self.client_key.clone(),
            )
            .credentials(self.username.clone(), password))
    }

    pub fn connect(&self) -> Result<Session> {
        Session::connect(&self.connect_options()?, &self.prefix)
    }
}

fn read_password(path: &std::path::Path) -> Result<String> {
    let bytes = kiln_protocol::files::read_bounded(path, 4096)
        .map_err(|e| anyhow!("cannot read password file `{}`: {e}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow!("password file `{}` is not UTF-8", path.display()))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        bail!("password file `{}` is empty", path.display());
    }
    Ok(line.to_string())
}

/// A connection error in one line a person can act on: rumqttc prints the packet it
/// got instead of a CONNACK as a Rust value, and a peer that is not an MQTT broker
/// (a web server on the port) gives exactly that.
pub fn describe_connection_error(broker: &str, e: &rumqttc::ConnectionError) -> String {
    use rumqttc::{ConnectionError, StateError};
    match e {
        ConnectionError::NotConnAck(_)
        | ConnectionError::MqttState(StateError::Deserialization(_)) => format!(
            "`{broker}` did not answer as an MQTT broker (its first reply was not a CONNACK); is that the broker's address and port?"
        ),
        ConnectionError::MqttState(StateError::ConnectionAborted) => format!(
            "`{broker}` closed the connection (not an MQTT broker, or it refused this client)"
        ),
        ConnectionError::MqttState(StateError::Io(io)) | ConnectionError::Io(io) => {
            format!("broker `{broker}`: {io}")
        }
        ConnectionError::ConnectionRefused(code) => {
            format!("broker `{broker}` refused the session: {code:?}")
        }
        other => format!("broker `{broker}`: {other}"),
    }
}

pub struct Session {
    client: Client,
    connection: Connection,
    broker: String,
    prefix: String,
    id: String,
    /// Messages on subscribed topics that arrived while the session waited for
    /// something else (an acknowledgement, a retained snapshot); `next_message` hands
    /// them out first, so a device's answer is never dropped on the floor.
    stash: VecDeque<(String, Vec<u8>)>,
    /// Filters given to `subscribe`, which `retained` must not unsubscribe from.
    subscribed: BTreeSet<String>,
    /// Retained reads so far, to name each one's marker topic.
    reads: u64,
    /// The brokers as given (`URL[,URL...]`), each with its options, and which one
    /// the session is on: to connect again.
    list: String,
    brokers: Vec<(String, MqttOptions)>,
    at: usize,
}

impl Session {
    /// Connects; `prefix` is the fleet's topic prefix (the session's own sync topic
    /// lives under it, so broker ACLs for the fleet cover it). Given a list (a
    /// cluster's nodes), the first that answers.
    pub fn connect(connect: &Connect, prefix: &str) -> Result<Self> {
        let id = format!("kiln-{}-{}", std::process::id(), now_ms() % 100_000);
        let brokers = connect
            .all_options(
                &id,
                Duration::from_secs(10),
                kiln_protocol::mqtt::HOST_MAX_INCOMING,
            )
            .map_err(|e| anyhow!(e))?;
        let (client, connection) = Client::new(brokers[0].1.clone(), 64);
        let mut session = Self {
            client,
            connection,
            broker: brokers[0].0.clone(),
            prefix: prefix.trim_end_matches('/').to_string(),
            id,
            stash: VecDeque::new(),
            subscribed: BTreeSet::new(),
            reads: 0,
            list: connect.broker.clone(),
            brokers,
            at: 0,
        };
        session.connect_from(0)?;
        Ok(session)
    }

    /// Connects to the brokers in turn from the `first`, until one answers. One
    /// broker's error is its own; a list's names each broker's.
    fn connect_from(&mut self, first: usize) -> Result<()> {
        let n = self.brokers.len();
        let mut failed = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let (client, connection) = Client::new(self.brokers[i].1.clone(), 64);
            self.client = client;
            self.connection = connection;
            self.broker = self.brokers[i].0.clone();
            self.subscribed.clear();
            let connected = self.until(Duration::from_secs(10), |e| {
                matches!(e, Event::Incoming(Packet::ConnAck(_)))
            });
            match connected {
                Ok(_) => {
                    self.at = i;
                    if !failed.is_empty() {
                        eprintln!("note: connected to {} ({})", self.broker, failed.join("; "));
                    }
                    return Ok(());
                }
                Err(e) if n == 1 => return Err(e),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        Err(anyhow!(
            "no broker of `{}` answered: {}",
            self.list,
            failed.join("; ")
        ))
    }

    /// Connects again after the connection dropped (a clean session: the caller
    /// subscribes again): to the same broker if it answers, else to the next of the
    /// list (a cluster's node died), and so on.
    pub fn reconnect(&mut self) -> Result<()> {
        self.connect_from(self.at)
    }

    /// The broker the session is connected to (one of the list).
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// Publishes retained QoS 1 messages and returns when the broker has acknowledged
    /// every one; `progress` is called with the count acknowledged so far.
    pub fn publish_all(
        &mut self,
        messages: Vec<(String, Vec<u8>)>,
        mut progress: impl FnMut(usize),
    ) -> Result<()> {
        let total = messages.len();
        let mut queued = messages.into_iter();
        let mut in_flight = 0usize;
        let mut acked = 0usize;
        // Keep a bounded window in flight so a large artifact never floods the queue.
        while acked < total {
            while in_flight < 16 {
                let Some((topic, payload)) = queued.next() else {
                    break;
                };
                self.client
                    .publish(topic, QoS::AtLeastOnce, true, payload)
                    .map_err(|e| anyhow!("cannot queue a publish: {e}"))?;
                in_flight += 1;
            }
            self.until(Duration::from_secs(30), |e| {
                matches!(e, Event::Incoming(Packet::PubAck(_)))
            })?;
            in_flight -= 1;
            acked += 1;
            progress(acked);
        }
        Ok(())
    }

    /// Publishes one message at QoS 1, not retained, and returns once the broker has
    /// acknowledged it. Messages on subscribed topics that arrive meanwhile are kept
    /// for [`Session::next_message`].
    pub fn publish_once(&mut self, topic: String, payload: Vec<u8>) -> Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| anyhow!("cannot queue a publish: {e}"))?;
        self.until(Duration::from_secs(30), |e| {
            matches!(e, Event::Incoming(Packet::PubAck(_)))
        })?;
        Ok(())
    }

    /// Everything retained under `filter`, by topic. MQTT has no "that was all"
    /// marker, so the session also subscribes to a topic of its own and, once the
    /// broker has acknowledged the subscription, publishes to it: the broker sends the
    /// retained messages of a subscription before anything published after it, so
    /// when that message comes back every retained message for `filter` has arrived.
    /// No guessing with a quiet period. Each read has a marker topic of its own: aedes
    /// was seen dropping the marker of a read whose topic the previous read had just
    /// unsubscribed from.
    /// Live messages on topics subscribed with [`Session::subscribe`] that arrive
    /// meanwhile are kept for [`Session::next_message`].
    pub fn retained(&mut self, filter: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        self.again_if_refused(|s| s.retained_once(filter))
    }

    /// `op` again, after a wait, while the broker refuses its subscription, at most
    /// [`REFUSED_WAITS`] times: a cluster's node refuses a subscription it cannot
    /// create yet (nats-server, while it elects leaders after losing a node, or
    /// under a burst of new subscriptions), and a refusal that stays is an ACL's.
    fn again_if_refused<T>(&mut self, mut op: impl FnMut(&mut Self) -> Result<T>) -> Result<T> {
        for wait in REFUSED_WAITS {
            match op(self) {
                Err(e) if e.downcast_ref::<Refused>().is_some() => std::thread::sleep(wait),
                done => return done,
            }
        }
        op(self)
    }

    fn retained_once(&mut self, filter: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        self.reads += 1;
        let sync = format!("{}/tools/{}/sync/{}", self.prefix, self.id, self.reads);
        // One SUBSCRIBE; the marker once it is acknowledged. Retained messages that
        // arrive before the SUBACK are collected too. At QoS 0, the snapshot and the
        // marker: a broker holds back QoS 1 messages past a window (mosquitto: 20 in
        // flight) and drops what its queue cannot take (mosquitto: 1,000 more), so a
        // snapshot of 10,000 devices' statuses came back as 1,020 of them, the marker
        // behind; QoS 0 messages go out in order, none held back, the marker last.
        // A filter already subscribed live keeps its QoS 1 (a second SUBSCRIBE of it
        // would change it).
        let qos = if self.subscribed.contains(filter) {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let filters = [(filter, qos), (sync.as_str(), qos)]
            .map(|(t, qos)| rumqttc::SubscribeFilter::new(t.to_string(), qos));
        self.client
            .subscribe_many(filters)
            .map_err(|e| anyhow!("cannot subscribe to `{filter}`: {e}"))?;
        let nonce = now_ms().to_le_bytes().to_vec();
        let mut sent = false;
        // The marker's own PUBACK must be in before the read ends, or the next
        // `publish_all` would count it as one of its own.
        let (mut back, mut acked) = (false, false);
        let mut out = BTreeMap::new();
        // Ten seconds without a message: a snapshot of 10,000 devices from a busy
        // broker takes longer than that in all, and goes on arriving.
        let mut deadline = Instant::now() + Duration::from_secs(10);
        // At QoS 0, a broker that streams retained messages after the SUBACK (aedes)
        // can deliver the marker before the last of them: once the marker is back,
        // the read ends after SETTLE without a message.
        let mut settling: Option<Instant> = None;
        loop {
            let left = settling
                .unwrap_or(deadline)
                .saturating_duration_since(Instant::now());
            match self.connection.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    deadline = Instant::now() + Duration::from_secs(10);
                    if p.topic == sync {
                        back |= p.payload.as_ref() == nonce.as_slice();
                        if back && acked {
                            if qos == QoS::AtLeastOnce {
                                break;
                            }
                            settling = Some(Instant::now() + SETTLE);
                        }
                        continue;
                    }
                    if settling.is_some() {
                        settling = Some(Instant::now() + SETTLE);
                    }
                    if !p.retain && self.is_subscribed(&p.topic) {
                        self.stash.push_back((p.topic.clone(), p.payload.to_vec()));
                    }
                    if !p.payload.is_empty() && rumqttc::matches(&p.topic, filter) {
                        out.insert(p.topic.clone(), p.payload.to_vec());
                    }
                }
                Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) if !sent => {
                    // A refused subscription would read as an empty snapshot (or a
                    // marker that never comes back): named instead.
                    if let Some(i) = refused(&ack) {
                        let which = if i == 0 { filter } else { sync.as_str() };
                        if !self.subscribed.contains(filter) {
                            let _ = self.client.unsubscribe(filter);
                        }
                        let _ = self.client.unsubscribe(&sync);
                        bail!(self.refusal(which));
                    }
                    sent = true;
                    // Published at the QoS of the read. At QoS 1 (a filter already
                    // subscribed live), a QoS 0 marker would overtake a snapshot held
                    // back by the broker's window. At QoS 0 the marker needs no store:
                    // on nats-server a QoS 1 publish is a JetStream write, and at
                    // 10,000 devices on a cluster those timed out and the node closed
                    // kiln's session (docs/src/measurements/cluster-2026-12-06.md).
                    // A QoS 0 marker the broker drops ends the read after 10 s of
                    // silence, with an error, never with a short snapshot.
                    self.client
                        .publish(&sync, qos, false, nonce.clone())
                        .map_err(|e| anyhow!("cannot publish to `{sync}`: {e}"))?;
                    // No PUBACK comes for a QoS 0 publish.
                    acked = qos == QoS::AtMostOnce;
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) if sent => {
                    acked = true;
                    if back {
                        if qos == QoS::AtLeastOnce {
                            break;
                        }
                        settling = Some(Instant::now() + SETTLE);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!(describe_connection_error(&self.broker, &e)),
                Err(_) if settling.is_some() => break,
                Err(_) => bail!(
                    "broker `{}` sent nothing for 10s while kiln read its retained messages",
                    self.broker
                ),
            }
        }
        if !self.subscribed.contains(filter) {
            let _ = self.client.unsubscribe(filter);
        }
        let _ = self.client.unsubscribe(&sync);
        Ok(out)
    }

    /// Every retained desired state, of devices and of groups, by topic.
    pub fn desired_states(&mut self, topics: &Topics) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut states = self.retained(&topics.all_devices("desired"))?;
        states.extend(self.retained(&topics.all_groups_desired())?);
        Ok(states)
    }

    /// Subscribes to `filter` for [`Session::next_message`].
    pub fn subscribe(&mut self, filter: &str) -> Result<()> {
        self.again_if_refused(|s| s.subscribe_once(filter))
    }

    fn subscribe_once(&mut self, filter: &str) -> Result<()> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .map_err(|e| anyhow!("cannot subscribe to `{filter}`: {e}"))?;
        self.subscribed.insert(filter.to_string());
        let ack = self.until(Duration::from_secs(10), |e| {
            matches!(e, Event::Incoming(Packet::SubAck(_)))
        })?;
        match ack {
            Event::Incoming(Packet::SubAck(ack)) if refused(&ack).is_some() => {
                self.subscribed.remove(filter);
                bail!(self.refusal(filter))
            }
            _ => Ok(()),
        }
    }

    /// A SUBACK's failure code, in a line an operator can act on.
    fn refusal(&self, filter: &str) -> Refused {
        Refused(format!(
            "broker `{}` refused the subscription to `{filter}` (SUBACK failure, {} times over {}s): its ACL does not let this user read it, or it is overloaded",
            self.broker,
            REFUSED_WAITS.len() + 1,
            REFUSED_WAITS.iter().sum::<Duration>().as_secs()
        ))
    }

    fn is_subscribed(&self, topic: &str) -> bool {
        self.subscribed
            .iter()
            .any(|filter| rumqttc::matches(topic, filter))
    }

    /// The next message on a subscribed topic, or `None` after `limit` without one.
    pub fn next_message(&mut self, limit: Duration) -> Result<Option<(String, Vec<u8>)>> {
        if let Some(message) = self.stash.pop_front() {
            return Ok(Some(message));
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.connection.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    return Ok(Some((p.topic.clone(), p.payload.to_vec())))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!(describe_connection_error(&self.broker, &e)),
                Err(_) => return Ok(None),
            }
        }
    }

    pub fn disconnect(mut self) {
        let _ = self.client.disconnect();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match self.connection.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads events until one `want`s it, and returns that one.
    fn until(&mut self, limit: Duration, want: impl Fn(&Event) -> bool) -> Result<Event> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("broker `{}` did not answer within {limit:?}", self.broker);
            }
            match self.connection.recv_timeout(left) {
                Ok(Ok(event)) if want(&event) => return Ok(event),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    self.stash.push_back((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!(describe_connection_error(&self.broker, &e)),
                Err(_) => bail!("broker `{}` did not answer within {limit:?}", self.broker),
            }
        }
    }
}

/// How long a QoS 0 retained read waits, after its marker, for a message still on its
/// way (see `retained_once`).
const SETTLE: Duration = Duration::from_millis(150);

/// How long a session waits before asking again for a subscription the broker
/// refused, each time; then the refusal is the command's error.
const REFUSED_WAITS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// A subscription the broker refused (a SUBACK failure code).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// The index of the first filter a SUBACK refused, if any.
pub fn refused(ack: &rumqttc::SubAck) -> Option<usize> {
    ack.return_codes
        .iter()
        .position(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
}

/// The one clock (`kiln_protocol::clock`).
pub use kiln_protocol::clock::now_ms;
