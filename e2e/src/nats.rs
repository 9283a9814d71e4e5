//! A nats-server cluster on loopback as Kiln's clustered broker: N nodes, each with
//! JetStream (where its MQTT side keeps retained messages, sessions and QoS 1
//! messages), an MQTT listener and routes to the others. docs/src/brokers.md says why
//! each setting is what it is.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

use crate::path_str;

/// Where Debian (and scripts/setup.sh) puts it, or on the PATH.
pub fn server_path() -> Option<PathBuf> {
    let known = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from);
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("nats-server"));
    known.chain(on_path).find(|p| p.is_file())
}

struct Node {
    child: Option<Child>,
    /// MQTT, NATS clients, cluster routes, HTTP monitoring.
    mqtt: u16,
    client: u16,
    route: u16,
    http: u16,
}

/// N nats-server nodes of one cluster, killed on drop.
pub struct Cluster {
    nodes: Vec<Node>,
    server: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes (3 for a quorum that survives one node) and returns once
    /// every node accepts MQTT and a retained message written through the first node
    /// reads back through every node. `None` if nats-server is not installed.
    pub fn start(n: usize) -> Option<Self> {
        let server = server_path()?;
        let nodes = (0..n)
            .map(|_| Node {
                child: None,
                mqtt: crate::free_port(),
                client: crate::free_port(),
                route: crate::free_port(),
                http: crate::free_port(),
            })
            .collect();
        let mut cluster = Self {
            nodes,
            server,
            dir: tempfile::tempdir().unwrap(),
        };
        for i in 0..n {
            cluster.write_config(i);
            cluster.spawn(i);
        }
        cluster.wait_formed(Duration::from_secs(60));
        Some(cluster)
    }

    /// `mqtt://127.0.0.1:P1,mqtt://127.0.0.1:P2,...`: the list kilnd and kiln take.
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The list starting at node `first` (the others after it, in order).
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|k| self.url((first + k) % n))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt)
    }

    pub fn mqtt_port(&self, i: usize) -> u16 {
        self.nodes[i].mqtt
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// SIGKILL to node `i`, as a crash or a power cut would end it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its ports and store (killing it first if it runs),
    /// and waits until the cluster has it back.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_formed(Duration::from_secs(60));
    }

    /// Starts node `i` again and returns once it listens on MQTT, without waiting for
    /// the cluster to take it back (a loaded cluster can take minutes): what a
    /// measurement under load does, where [`Cluster::restart`] would give up.
    pub fn start_again(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", self.nodes[i].mqtt)).is_err() {
            self.give_up_at(deadline, i, "does not listen on MQTT");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/varz` of node `i` (its counters: `in_msgs`, `out_bytes`, ...), if it answers.
    pub fn varz(&self, i: usize) -> Option<serde_json::Value> {
        self.monitor(i, "/varz")
    }

    /// Messages and bytes in and out of node `i` (`in_msgs`, `out_msgs`, `in_bytes`,
    /// `out_bytes`), while it runs: what its clients sent and received, and what it
    /// sent the other nodes and took from them (routes, JetStream replication).
    pub fn counters(&self, i: usize) -> Option<[u64; 4]> {
        let v = self.varz(i)?;
        let mut out = [0; 4];
        for (o, k) in out
            .iter_mut()
            .zip(["in_msgs", "out_msgs", "in_bytes", "out_bytes"])
        {
            *o = v[k].as_u64()?;
        }
        Some(out)
    }

    /// Each node's pid, `None` for a node that is killed.
    pub fn node_pids(&self) -> Vec<Option<u32>> {
        self.nodes
            .iter()
            .map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}"))
    }

    fn write_config(&self, i: usize) {
        let node = &self.nodes[i];
        let dir = self.node_dir(i);
        std::fs::create_dir_all(dir.join("store")).unwrap();
        let routes = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats-route://127.0.0.1:{}", n.route))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "server_name: kiln-n{i}\n\
             listen: 127.0.0.1:{client}\n\
             http: 127.0.0.1:{http}\n\
             max_payload: 4MB\n\
             max_pending: 256MB\n\
             max_connections: 100000\n\
             jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 1GB\n  max_file_store: 8GB\n}}\n\
             cluster {{\n  name: kiln\n  listen: 127.0.0.1:{route}\n  routes: [ {routes} ]\n}}\n\
             mqtt {{\n  listen: 127.0.0.1:{mqtt}\n  stream_replicas: 3\n  consumer_replicas: 1\n  consumer_memory_storage: true\n  max_ack_pending: 1024\n  ack_wait: \"30s\"\n}}\n",
            client = node.client,
            http = node.http,
            route = node.route,
            mqtt = node.mqtt,
            store = path_str(&dir.join("store")),
        );
        std::fs::write(dir.join("nats.conf"), text).unwrap();
    }

    fn spawn(&mut self, i: usize) {
        let dir = self.node_dir(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .unwrap();
        let child = Command::new(&self.server)
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.nodes[i].child = Some(child);
    }

    /// How many lines of every node's log (of all its lives) contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        (0..self.nodes.len())
            .map(|i| {
                std::fs::read_to_string(self.node_dir(i).join("log"))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }

    /// The last lines of node `i`'s log, for a failure message.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.node_dir(i).join("log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every running node listens on MQTT and sees the same JetStream meta leader,
    /// then a retained message written through the first running node reads back
    /// through each of them (the MQTT streams exist, replicated).
    fn wait_formed(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].child.is_some())
            .collect();
        for &i in &running {
            while TcpStream::connect(("127.0.0.1", self.nodes[i].mqtt)).is_err() {
                self.give_up_at(deadline, i, "does not listen on MQTT");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for &i in &running {
            loop {
                let leader = self
                    .monitor(i, "/jsz")
                    .and_then(|j| j["meta_cluster"]["leader"].as_str().map(String::from))
                    .filter(|l| !l.is_empty());
                if leader.is_some() {
                    break;
                }
                self.give_up_at(deadline, i, "has no JetStream meta leader");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let topic = format!("kiln-harness/ready/{}", std::process::id());
        let nonce = format!("{:?}", Instant::now());
        loop {
            let first = running[0];
            let written = publish_retained(self.nodes[first].mqtt, &topic, nonce.as_bytes());
            if written
                && running.iter().all(|&i| {
                    read_retained(self.nodes[i].mqtt, &topic).as_deref() == Some(nonce.as_bytes())
                })
            {
                return;
            }
            self.give_up_at(deadline, first, "does not keep a retained message yet");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    #[track_caller]
    fn give_up_at(&self, deadline: Instant, i: usize, what: &str) {
        assert!(
            Instant::now() < deadline,
            "nats-server node {i} {what}; its log ends:\n{}",
            self.log_tail(i, 20)
        );
    }

    /// A GET of the monitoring endpoint `path` of node `i`, as JSON.
    fn monitor(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let mut s = TcpStream::connect(("127.0.0.1", self.nodes[i].http)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let (_, json) = body.split_once("\r\n\r\n")?;
        serde_json::from_str(json).ok()
    }

    /// The store directory of node `i` (JetStream's files).
    pub fn store(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("store")
    }

    /// The directory holding each node's config, log and store.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        // A failed test or measurement keeps the nodes' logs and names them, with
        // their last warnings and errors.
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                let kept =
                    std::env::temp_dir().join(format!("kiln-nats-{}-n{i}.log", std::process::id()));
                let _ = std::fs::copy(self.node_dir(i).join("log"), &kept);
                let text = std::fs::read_to_string(&kept).unwrap_or_default();
                let worst: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("[WRN]") || l.contains("[ERR]"))
                    .collect();
                eprintln!(
                    "nats-server node {i} (log kept as {}), its last warnings:\n{}",
                    kept.display(),
                    worst[worst.len().saturating_sub(10)..].join("\n")
                );
            }
        }
    }
}

fn client(port: u16, id: &str) -> (Client, rumqttc::Connection) {
    let mut options = MqttOptions::new(
        format!("{id}-{}-{port}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_keep_alive(Duration::from_secs(5));
    Client::new(options, 10)
}

/// A retained QoS 1 publish, true once the node acknowledged it.
fn publish_retained(port: u16, topic: &str, payload: &[u8]) -> bool {
    let (c, mut connection) = client(port, "harness-pub");
    if c.publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
        .is_err()
    {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut acked = false;
    while let Ok(event) =
        connection.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        match event {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked = true;
                break;
            }
            Err(_) => break,
            _ => {}
        }
    }
    let _ = c.disconnect();
    acked
}

/// The retained payload on `topic` as node `port` has it.
fn read_retained(port: u16, topic: &str) -> Option<Vec<u8>> {
    let (c, mut connection) = client(port, "harness-read");
    c.subscribe(topic, QoS::AtLeastOnce).ok()?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut out = None;
    while let Ok(event) =
        connection.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) if p.retain => {
                out = Some(p.payload.to_vec());
                break;
            }
            Err(_) => break,
            _ => {}
        }
    }
    let _ = c.disconnect();
    out
}
