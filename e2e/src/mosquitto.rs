//! A mosquitto of the harness's own on a free loopback port, for tests and the bench.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{Client, MqttOptions, Packet, QoS};

use crate::path_str;

/// A mosquitto with persistence so a restart keeps retained messages.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Self {
            child: None,
            port,
            dir,
        };
        broker.restart();
        broker
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: mosquitto saves its retained messages on the way out.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n",
                self.port,
                path_str(self.dir.path())
            ),
        )
        .unwrap();
        let mosquitto = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is installed by scripts/setup.sh");
        let child = Command::new(mosquitto)
            .args(["-c", path_str(&conf)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Publishes one retained message (as a misbehaving fleet tool or attacker would).
    pub fn publish_retained(&self, topic: &str, payload: Vec<u8>) {
        let mut options = MqttOptions::new("test-publisher", "127.0.0.1", self.port);
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(options, 10);
        client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .unwrap();
        for event in connection.iter() {
            if let Ok(rumqttc::Event::Incoming(Packet::PubAck(_))) = event {
                break;
            }
        }
        let _ = client.disconnect();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
