//! The provisioning bundle: what `kiln provision` writes for one device and `kilnd
//! provision` installs into its `/etc/kiln`. Both sides name its files from here, and
//! the `kilnd.toml` in it is rendered here, so what the host writes is what the device
//! reads.
//!
//! ```text
//! DIR/NAME/kiln/            the bundle: copy it to the device's /etc/kiln, or to
//!   kilnd.toml              /boot/firmware/kiln for kilnd-provision.service
//!   trust/fleet.root
//!   ca.pem                  with --ca
//!   NAME.pem, NAME.key      with --client-certs
//! ```
//!
//! ```
//! use kiln_protocol::provision::{render, DeviceConfig};
//!
//! let text = render(&DeviceConfig {
//!     device: "pi-01".into(),
//!     broker: "mqtts://broker.lan:8883".into(),
//!     ca: Some("ca.pem".into()),
//!     groups: vec!["lab".into()],
//!     not_before: "2026-12-06T10:00:00Z".into(),
//!     ..DeviceConfig::default()
//! });
//! assert!(text.contains("device = \"pi-01\"\n"));
//! assert!(text.contains("groups = [\"lab\"]\n"));
//! ```

/// The bundle's config, installed as `/etc/kiln/kilnd.toml`.
pub const CONFIG: &str = "kilnd.toml";
/// The bundle's trust directory (`trust = ["trust"]`), installed as `/etc/kiln/trust`.
pub const TRUST_DIR: &str = "trust";
/// The broker's CA certificate (`ca = "ca.pem"`).
pub const CA: &str = "ca.pem";
/// Where `kilnd-provision.service` looks for a bundle at boot: the `kiln` folder of
/// the FAT boot partition, as Raspberry Pi OS and Debian's raspi images mount it.
pub const BOOT_BUNDLE: &str = "/boot/firmware/kiln";
/// Where kilnd keeps its config on a device, and where `kilnd provision` installs.
pub const ETC: &str = "/etc/kiln";
/// The data dir of the packaged service (`StateDirectory=kiln`).
pub const DATA_DIR: &str = "/var/lib/kiln";
/// The largest file of a bundle either side reads (a config, a root document, a
/// certificate or a key); module artifacts have their own bound.
pub const MAX_FILE: u64 = 1024 * 1024;

/// Everything one device's `kilnd.toml` says. Paths are relative to the config's
/// directory, as kilnd resolves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub device: String,
    pub data_dir: String,
    /// Entries of `trust`: files or directories.
    pub trust: Vec<String>,
    pub broker: String,
    /// The fleet's topic prefix, when it is not the default.
    pub prefix: Option<String>,
    pub ca: Option<String>,
    pub groups: Vec<String>,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub not_before: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            device: String::new(),
            data_dir: DATA_DIR.into(),
            trust: vec![TRUST_DIR.into()],
            broker: String::new(),
            prefix: None,
            ca: None,
            groups: Vec::new(),
            not_before: String::new(),
            username: None,
            password: None,
            client_cert: None,
            client_key: None,
        }
    }
}

impl DeviceConfig {
    /// Whether the rendered config holds a secret (a broker password).
    pub fn has_secret(&self) -> bool {
        self.password.is_some()
    }
}

/// A TOML basic string holding `s`, whatever it contains.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", items.join(", "))
}

/// The device's `kilnd.toml`: commented, and loadable by kilnd's own config parser.
pub fn render(c: &DeviceConfig) -> String {
    let mut s = format!(
        "# kilnd.toml of device {device}, written by `kiln provision`. Every setting is\n\
         # explained in the packaged default (man kilnd-serve, or the book's\n\
         # configuration page). Paths are relative to this file's directory.\n\
         device = {}\n\
         data_dir = {}\n\
         trust = {}\n\
         \n\
         [mqtt]\n\
         broker = {}\n",
        quoted(&c.device),
        quoted(&c.data_dir),
        list(&c.trust),
        quoted(&c.broker),
        device = c.device.escape_default(),
    );
    let mut line = |key: &str, value: &Option<String>| {
        if let Some(v) = value {
            s.push_str(&format!("{key} = {}\n", quoted(v)));
        }
    };
    line("prefix", &c.prefix);
    line("ca", &c.ca);
    line("client_cert", &c.client_cert);
    line("client_key", &c.client_key);
    line("username", &c.username);
    line("password", &c.password);
    s.push_str(&format!("groups = {}\n", list(&c.groups)));
    s.push_str(
        "# No desired state issued before this time is taken (the time it was provisioned).\n",
    );
    s.push_str(&format!("not_before = {}\n", quoted(&c.not_before)));
    s
}

/// A broker password for one device: 24 random bytes as 32 URL-safe base64
/// characters (192 bits), which any broker's password file takes as they are.
pub fn random_password() -> Result<String, String> {
    use base64::Engine;
    let mut bytes = [0u8; 24];
    getrandom::getrandom(&mut bytes).map_err(|e| format!("no random bytes: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether `bytes` hold a secret key (PEM `PRIVATE KEY`, OpenSSH's or kiln's own), so
/// that no secret is taken where a public file belongs.
pub fn holds_private_key(bytes: &[u8]) -> bool {
    bytes
        .windows(b"PRIVATE KEY".len())
        .any(|w| w == b"PRIVATE KEY")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_as_toml_whatever_they_hold() {
        let text = render(&DeviceConfig {
            device: "d".into(),
            broker: "mqtt://h\"\\\n:1".into(),
            not_before: "2026-12-06T10:00:00Z".into(),
            password: Some("p\"w".into()),
            username: Some("d".into()),
            ..DeviceConfig::default()
        });
        let value: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(value["mqtt"]["broker"].as_str(), Some("mqtt://h\"\\\n:1"));
        assert_eq!(value["mqtt"]["password"].as_str(), Some("p\"w"));
        assert_eq!(value["trust"].as_array().unwrap().len(), 1);
        assert!(value["mqtt"].get("ca").is_none());
    }

    #[test]
    fn passwords_differ_and_are_plain() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert!(holds_private_key(b"-----BEGIN PRIVATE KEY-----\n"));
        assert!(holds_private_key(b"-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert!(!holds_private_key(b"-----BEGIN CERTIFICATE-----"));
    }
}
