//! A broker of the harness's own on a free loopback port, for tests and the bench:
//! mosquitto, or aedes (the second implementation the fleet tests run against).

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
    /// CA, server certificate and key: a TLS listener that requires client certificates.
    tls: Option<[std::path::PathBuf; 3]>,
    /// More lines for mosquitto.conf (the soak's `autosave_interval`).
    pub extra_config: String,
    /// aedes (Node.js) instead of mosquitto: the second broker implementation.
    aedes: bool,
    /// aedes only: subscriptions to these filters are refused (SUBACK 0x80).
    pub deny_subscribe: Vec<String>,
}

impl Broker {
    pub fn start() -> Self {
        let port = crate::free_port();
        let dir = tempfile::tempdir().unwrap();
        // mosquitto started as root drops to its own user: let it write persistence.
        open_up(dir.path(), 0o777);
        let mut broker = Self {
            child: None,
            port,
            dir,
            tls: None,
            extra_config: String::new(),
            aedes: false,
            deny_subscribe: Vec::new(),
        };
        broker.restart();
        broker
    }

    /// aedes, installed by scripts/setup.sh into e2e/aedes: retained messages in
    /// memory (a restart forgets them), no configuration.
    pub fn start_aedes() -> Self {
        let mut broker = Self::start();
        broker.stop();
        broker.aedes = true;
        broker.restart();
        broker
    }

    /// A broker on TLS only, with the certificates from [`Pki`].
    pub fn start_tls(pki: &Pki) -> Self {
        let mut broker = Self::start();
        broker.tls = Some([
            pki.ca.clone(),
            pki.server_cert.clone(),
            pki.server_key.clone(),
        ]);
        broker.restart();
        broker
    }

    /// A gateway mosquitto bridged to `central`, as in a factory: devices connect to
    /// the gateway, the fleet tool to the central broker, and every kiln topic
    /// (`{prefix}/#`) crosses the bridge both ways at QoS 1, retained messages too.
    pub fn start_bridged(central: &Broker, prefix: &str) -> Self {
        let mut broker = Self::start();
        broker.extra_config = format!(
            "connection central\naddress 127.0.0.1:{}\ntopic {prefix}/# both 1\n\
             cleansession false\nnotifications false\ntry_private true\n\
             restart_timeout 1\nbridge_protocol_version mqttv311\n",
            central.port
        );
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

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a power cut would end it: what it had not saved yet is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts the broker as one without persistence would come back: with no
    /// retained messages at all.
    pub fn restart_forgetting(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.dir.path().join("mosquitto.db"));
        self.restart();
    }

    pub fn restart(&mut self) {
        self.stop();
        if self.aedes {
            let dir = crate::repo().join("e2e/aedes");
            assert!(
                dir.join("node_modules/aedes").exists(),
                "aedes is installed by scripts/setup.sh"
            );
            let child = Command::new("node")
                .arg(dir.join("server.cjs"))
                .arg(self.port.to_string())
                .env("AEDES_DENY_SUBSCRIBE", self.deny_subscribe.join(","))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start aedes");
            self.child = Some(child);
            self.wait_listening();
            return;
        }
        let conf = self.dir.path().join("mosquitto.conf");
        let mut text = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n",
            self.port,
            path_str(self.dir.path())
        );
        text += &self.extra_config;
        if let Some([ca, cert, key]) = &self.tls {
            text += &format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                path_str(ca),
                path_str(cert),
                path_str(key)
            );
        }
        std::fs::write(&conf, text).unwrap();
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
        self.wait_listening();
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "the broker did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Publishes one retained message (as a misbehaving fleet tool or attacker would).
    pub fn publish_retained(&self, topic: &str, payload: Vec<u8>) {
        self.publish_retained_as(None, topic, payload);
    }

    /// The same as MQTT user `user`; returns once the broker acknowledged it (a broker
    /// whose ACL refuses it acknowledges and drops it).
    pub fn publish_retained_as(&self, user: Option<&str>, topic: &str, payload: Vec<u8>) {
        let mut options = MqttOptions::new("test-publisher", "127.0.0.1", self.port);
        options.set_max_packet_size(16 << 20, 16 << 20);
        if let Some(user) = user {
            options.set_credentials(user, "");
        }
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

/// A throwaway PKI made with the openssl command: a CA, a server certificate for
/// 127.0.0.1 and one client certificate.
pub struct Pki {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Pki {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=kiln test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        std::fs::write(d.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &pem,
            ]);
        }
        // Throwaway keys, readable by the mosquitto user the broker drops to.
        open_up(d, 0o755);
        for f in ["server.key", "client.key"] {
            open_up(&d.join(f), 0o644);
        }
        Self {
            ca: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
            _dir: dir,
        }
    }
}

fn open_up(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
