//! MQTT session options both sides build the same way (feature `mqtt`): the broker URL,
//! TLS with a CA and an optional client certificate (feature `tls`), credentials, and a
//! packet limit that fits a chunk (rumqttc's default of 10 KiB would not).

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::MqttOptions;

use crate::fleet::{parse_brokers, BrokerUrl, BrokerUrlError};

pub mod failover;

/// Largest packet kiln sends: a chunk of up to 1 MiB plus its framing, and the bound
/// every telemetry batch is sealed under.
pub const MAX_PACKET: usize = 2 * 1024 * 1024;

/// What a QoS 1 PUBLISH adds to its payload: fixed header (type, up to 4 length
/// bytes), the topic (MQTT bounds it by a u16 length) and the packet id.
pub const PUBLISH_OVERHEAD: usize = 5 + 2 + u16::MAX as usize + 2;

// Every sealed telemetry batch fits a packet the link will send, whatever the topic.
const _: () = assert!(crate::telemetry::MAX_BATCH + PUBLISH_OVERHEAD <= MAX_PACKET);

/// Largest packet kiln receives. Above what any kiln message may be (`MAX_PACKET`), so
/// an oversized retained message up to this size is received, refused by the agent
/// with an event, and the connection stays up. A larger one makes rumqttc drop the
/// connection before anything can look at it: set the broker's message size limit
/// (mosquitto `message_size_limit`) at or below this so the broker refuses it instead.
pub const MAX_INCOMING: usize = 8 * 1024 * 1024;

/// Largest packet the fleet tool receives: MQTT's own limit (a remaining length of
/// 268,435,455 bytes plus the fixed header). On the host nothing on the broker can be
/// larger, so no retained message, however large a device or anyone made it, can drop
/// kiln's session in the middle of a read (which it would do again at every retry);
/// what kiln reads is then bounded per kind before it is decoded (`MAX_REPORT`,
/// `MAX_DESIRED`, ...), and the oversized message is skipped and named.
pub const HOST_MAX_INCOMING: usize = 268_435_455 + 5;

/// How to reach the broker.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`, or a list of them separated by
    /// commas (the nodes of a cluster), tried in turn ([`failover`]).
    pub broker: String,
    /// PEM CA certificate(s) the broker's certificate must chain to (`mqtts://`).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that require one.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Connect {
    /// The builder both sides start from: the broker, then [`Connect::tls`] and
    /// [`Connect::credentials`] as configured (each `None` when not given).
    pub fn to(broker: impl Into<String>) -> Self {
        Self {
            broker: broker.into(),
            ..Self::default()
        }
    }

    /// The CA the broker's certificate must chain to, and a client certificate.
    pub fn tls(
        mut self,
        ca: Option<PathBuf>,
        client_cert: Option<PathBuf>,
        client_key: Option<PathBuf>,
    ) -> Self {
        self.ca = ca;
        self.client_cert = client_cert;
        self.client_key = client_key;
        self
    }

    pub fn credentials(mut self, username: Option<String>, password: Option<String>) -> Self {
        self.username = username;
        self.password = password;
        self
    }

    pub fn options(
        &self,
        client_id: &str,
        keep_alive: Duration,
    ) -> Result<MqttOptions, ConnectError> {
        self.options_receiving(client_id, keep_alive, MAX_INCOMING)
    }

    /// [`Connect::options`] with another bound on what is received (the fleet tool's
    /// is [`HOST_MAX_INCOMING`]; a device's stays [`MAX_INCOMING`]).
    pub fn options_receiving(
        &self,
        client_id: &str,
        keep_alive: Duration,
        max_incoming: usize,
    ) -> Result<MqttOptions, ConnectError> {
        let mut all = self.all_options(client_id, keep_alive, max_incoming)?;
        Ok(all.swap_remove(0).1)
    }

    /// Options for each broker of the list, in its order, with the broker's URL: each
    /// checked as a single broker would be, so one bad entry refuses the list.
    pub fn all_options(
        &self,
        client_id: &str,
        keep_alive: Duration,
        max_incoming: usize,
    ) -> Result<Vec<(String, MqttOptions)>, ConnectError> {
        parse_brokers(&self.broker)?
            .into_iter()
            .map(|(text, url)| {
                let options = self.options_at(&text, url, client_id, keep_alive, max_incoming)?;
                Ok((text, options))
            })
            .collect()
    }

    fn options_at(
        &self,
        broker: &str,
        url: BrokerUrl,
        client_id: &str,
        keep_alive: Duration,
        max_incoming: usize,
    ) -> Result<MqttOptions, ConnectError> {
        let mut options = MqttOptions::new(client_id, url.host, url.port);
        options
            .set_keep_alive(keep_alive)
            .set_max_packet_size(max_incoming, MAX_PACKET);
        // A username alone is enough where the broker authenticates by certificate or
        // not at all, and ACLs key on it (`kiln acl`).
        if let Some(user) = &self.username {
            options.set_credentials(user, self.password.as_deref().unwrap_or(""));
        }
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| {
                ConnectError::Read(format!("cannot read {what} `{}`: {e}", p.display()))
            })
        };
        match (url.tls, &self.ca) {
            (true, Some(ca)) => {
                let client_auth = match (&self.client_cert, &self.client_key) {
                    (Some(c), Some(k)) => {
                        Some((read(c, "client certificate")?, read(k, "client key")?))
                    }
                    (None, None) => None,
                    _ => return Err(ConnectError::ClientPair),
                };
                let ca_bytes = read(ca, "CA certificate")?;
                check_pem(&ca_bytes, client_auth.as_ref()).map_err(|e| {
                    let (what, path) = match e {
                        PemProblem::Ca(_) => ("CA certificate", ca),
                        PemProblem::ClientCert(_) => (
                            "client certificate",
                            self.client_cert.as_ref().unwrap_or(ca),
                        ),
                        PemProblem::ClientKey(_) => {
                            ("client key", self.client_key.as_ref().unwrap_or(ca))
                        }
                    };
                    ConnectError::BadFile(format!("{what} `{}`: {}", path.display(), e.why()))
                })?;
                tls(&mut options, ca_bytes, client_auth, broker).map_err(ConnectError::Tls)?;
            }
            (true, None) => return Err(ConnectError::NoCa(broker.to_string())),
            (false, _) if self.ca.is_some() || self.client_cert.is_some() => {
                return Err(ConnectError::NotTls(broker.to_string()))
            }
            (false, _) => {}
        }
        Ok(options)
    }
}

/// Why session options cannot be built from a [`Connect`]: checked before any
/// connection, so `kilnd check` and `kilnd serve` refuse the same configs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Broker(#[from] BrokerUrlError),
    /// A TLS file cannot be read.
    #[error("{0}")]
    Read(String),
    #[error("a client certificate needs both a certificate and a key")]
    ClientPair,
    /// A TLS file does not hold what it should.
    #[error("{0}")]
    BadFile(String),
    #[error("broker `{0}` uses TLS: give the CA certificate")]
    NoCa(String),
    #[error("a CA or client certificate was given, but broker `{0}` is not mqtts://")]
    NotTls(String),
    /// TLS cannot be set up (or this build has none).
    #[error("{0}")]
    Tls(String),
}

impl From<ConnectError> for String {
    fn from(e: ConnectError) -> Self {
        e.to_string()
    }
}

/// Which TLS file is wrong, and why.
#[derive(Debug)]
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
enum PemProblem {
    Ca(String),
    ClientCert(String),
    ClientKey(String),
}

impl PemProblem {
    fn why(&self) -> &str {
        match self {
            PemProblem::Ca(w) | PemProblem::ClientCert(w) | PemProblem::ClientKey(w) => w,
        }
    }
}

/// The TLS files hold what they should (a CA certificate that parses as a trust
/// anchor, a client certificate and a private key), checked when the options are
/// built: `kilnd check` and `kilnd serve` then refuse the same configs, and neither
/// retries forever against a file that can never work.
#[cfg(feature = "tls")]
fn check_pem(ca: &[u8], client: Option<&(Vec<u8>, Vec<u8>)>) -> Result<(), PemProblem> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = |bytes: &[u8]| -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate ({e:?})"))?;
        if certs.is_empty() {
            return Err("holds no PEM certificate".into());
        }
        Ok(certs)
    };
    let anchors = certs(ca).map_err(PemProblem::Ca)?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(anchors);
    if added == 0 {
        return Err(PemProblem::Ca("no certificate in it parses".into()));
    }
    if let Some((cert, key)) = client {
        certs(cert).map_err(PemProblem::ClientCert)?;
        PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| PemProblem::ClientKey(format!("not a PEM private key ({e:?})")))?;
    }
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn check_pem(_: &[u8], _: Option<&(Vec<u8>, Vec<u8>)>) -> Result<(), PemProblem> {
    Ok(())
}

#[cfg(feature = "tls")]
fn tls(
    options: &mut MqttOptions,
    ca: Vec<u8>,
    client_auth: Option<(Vec<u8>, Vec<u8>)>,
    _broker: &str,
) -> Result<(), String> {
    use rumqttc::{TlsConfiguration, Transport};
    // One process-wide crypto provider; a second install is a no-op error.
    let _ = rustls::crypto::ring::default_provider().install_default();
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    }));
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn tls(
    _: &mut MqttOptions,
    _: Vec<u8>,
    _: Option<(Vec<u8>, Vec<u8>)>,
    broker: &str,
) -> Result<(), String> {
    Err(format!(
        "broker `{broker}` uses TLS, but this build has no TLS (built without feature `tls`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_sets_what_it_is_given() {
        let c = Connect::to("mqtt://b:1883")
            .tls(Some("ca.pem".into()), None, Some("k.pem".into()))
            .credentials(Some("dev".into()), None);
        assert_eq!(c.broker, "mqtt://b:1883");
        assert_eq!(c.ca, Some(PathBuf::from("ca.pem")));
        assert_eq!((c.client_cert, c.client_key), (None, Some("k.pem".into())));
        assert_eq!((c.username, c.password), (Some("dev".into()), None));
    }

    #[test]
    fn a_list_gives_options_per_broker_in_order_and_one_bad_entry_refuses_it() {
        let keep_alive = Duration::from_secs(30);
        let all = Connect::to("mqtt://a:1883, mqtt://b:1884")
            .all_options("dev", keep_alive, MAX_INCOMING)
            .unwrap();
        let shown: Vec<(&str, (String, u16))> = all
            .iter()
            .map(|(t, o)| (t.as_str(), o.broker_address()))
            .collect();
        assert_eq!(
            shown,
            [
                ("mqtt://a:1883", ("a".to_string(), 1883)),
                ("mqtt://b:1884", ("b".to_string(), 1884))
            ]
        );
        // The TLS node of a list without a CA is named, like a single broker.
        let e = Connect::to("mqtt://a,mqtts://b")
            .all_options("dev", keep_alive, MAX_INCOMING)
            .unwrap_err();
        assert_eq!(e, ConnectError::NoCa("mqtts://b".into()));
        let first = Connect::to("mqtt://a,mqtt://b")
            .options("dev", keep_alive)
            .unwrap();
        assert_eq!(first.broker_address(), ("a".to_string(), 1883));
    }
}
