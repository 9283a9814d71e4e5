use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{ArgGroup, Parser};
use kiln_protocol::clock::{parse_utc, utc};
use kiln_protocol::fleet::DEFAULT_PREFIX;
use kiln_protocol::names::Kind;
use kiln_protocol::provision::{self as layout, random_password, DeviceConfig};

use crate::fleet::broker::now_ms;
use crate::fleet::provision::{
    bundle, certificate, check_free, client_key, parse_devices, root_document, write_bundle,
    write_credentials, BundleFile, DeviceEntry,
};
use crate::fleet::Error;
use crate::names::valid_name;

const AFTER_HELP: &str = "\
For each device it writes DIR/NAME/kiln/, exactly what belongs in the device's
/etc/kiln: kilnd.toml (device, data_dir, trust = [\"trust\"], [mqtt] with the broker,
groups and not_before), trust/fleet.root, and ca.pem and the client certificate and key
when given. Put the folder on the device's boot partition as /boot/firmware/kiln and
kilnd-provision.service installs it at first boot, or copy it into an image's
/etc/kiln. Secret files (a kilnd.toml with a password, a client key) are 0600.

With --password each device gets its own random broker password (username: the
device name), and DIR/credentials.txt (0600) gets a `name:password` line per device:
`mosquitto_passwd -U credentials.txt` hashes it in place into a password file.

A device list has one device a line, `name[,group;group...]`; `#` starts a comment.

It works offline (no broker session, no release key): operator tags, which rollouts
select on (`kiln rollout --where tag=canary`), are set with `kiln tag` once the device
is online.

Examples:
  kiln provision --out out --device pi-01 --broker mqtts://broker.lan:8883 \\
      --root fleet.root --ca ca.pem --group lab --password
  kiln provision --out out --devices devices.txt --broker mqtts://broker.lan:8883 \\
      --root fleet.root --ca ca.pem --client-certs certs/";

/// Write each device's /etc/kiln (config, root document, broker credentials) as a
/// bundle to put on its boot partition or into its image
#[derive(Parser, Debug)]
#[command(after_help = AFTER_HELP, group(ArgGroup::new("which").required(true).args(["device", "devices"])))]
pub struct ProvisionCommand {
    /// Where the bundles go: DIR/NAME/kiln/ per device
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// One device, by its id
    #[arg(long, value_name = "NAME")]
    pub device: Option<String>,
    /// A list of devices: one a line, `name[,group;group...]`, `#` comments
    #[arg(long, value_name = "FILE")]
    pub devices: Option<PathBuf>,
    /// The broker the devices connect to: mqtt://host[:port] or mqtts://host[:port], or
    /// a cluster's nodes as URL,URL,... (tried in turn)
    #[arg(long, value_name = "URL")]
    pub broker: String,
    /// The fleet's root document (fleet.root from `kiln keygen`), verified first
    #[arg(long, value_name = "FILE")]
    pub root: PathBuf,
    /// The fleet's topic prefix, written into kilnd.toml when it is not the default
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// The broker's CA certificate (PEM), installed as ca.pem; needed with mqtts://
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// A group every device follows (repeatable), besides the list's own
    #[arg(long, value_name = "GROUP")]
    pub group: Vec<String>,
    /// A random broker password per device (username: its name), in its kilnd.toml
    /// and in DIR/credentials.txt for the broker
    #[arg(long)]
    pub password: bool,
    /// A folder of client certificates: NAME.pem and NAME.key for each device
    #[arg(long, value_name = "DIR")]
    pub client_certs: Option<PathBuf>,
    /// The devices take no desired state issued before this UTC time
    /// (YYYY-MM-DDTHH:MM:SSZ) [default: now]
    #[arg(long, value_name = "TIME")]
    pub not_before: Option<String>,
    /// The device's data dir
    #[arg(long, value_name = "DIR", default_value = layout::DATA_DIR)]
    pub data_dir: String,
    /// Replace a device's existing bundle folder
    #[arg(long)]
    pub force: bool,
}

impl ProvisionCommand {
    pub fn execute(self) -> Result<()> {
        let devices = self.device_list()?;
        for group in &self.group {
            valid_name(Kind::Group, group)?;
        }
        let urls = kiln_protocol::fleet::parse_brokers(&self.broker).map_err(Error::usage)?;
        let tls = urls.iter().any(|(_, u)| u.tls);
        if tls && self.ca.is_none() {
            return Err(Error::Usage(format!(
                "broker `{}` is mqtts://: pass --ca FILE, the broker's CA certificate",
                self.broker
            ))
            .into());
        }
        if urls.iter().any(|(_, u)| !u.tls) && (self.ca.is_some() || self.client_certs.is_some()) {
            return Err(Error::Usage(format!(
                "--ca and --client-certs need an mqtts:// broker, not `{}`",
                self.broker
            ))
            .into());
        }
        let not_before = match &self.not_before {
            Some(t) => {
                parse_utc(t).map_err(|e| Error::Usage(format!("--not-before: {e}")))?;
                t.clone()
            }
            None => utc(now_ms()),
        };
        // Every input is read and checked before anything is written.
        let root = root_document(&self.root)?;
        let ca = self
            .ca
            .as_deref()
            .map(|p| certificate(p, layout::CA))
            .transpose()?;
        let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
        check_free(&self.out, &names, self.force)?;
        let mut planned = Vec::new();
        for entry in &devices {
            planned.push(self.plan(entry, &not_before, &root, ca.as_ref())?);
        }
        let mut credentials = Vec::new();
        for (config, files) in planned {
            let folder = write_bundle(&self.out, &config.device, &bundle(&config, files))?;
            let groups = if config.groups.is_empty() {
                "no group".to_string()
            } else {
                config.groups.join(",")
            };
            println!("{}: {} ({groups})", config.device, folder.display());
            if let Some(p) = config.password {
                credentials.push((config.device, p));
            }
        }
        if !credentials.is_empty() {
            let path = write_credentials(&self.out, &credentials)?;
            eprintln!(
                "wrote {} (0600): each device's broker password; `mosquitto_passwd -U {}` hashes it into a password file for the broker, then keep it no longer",
                path.display(),
                path.display()
            );
        }
        eprintln!(
            "provisioned {} device(s) into {}: copy NAME/kiln to the device's boot partition as /boot/firmware/kiln, or into its image's /etc/kiln",
            devices.len(),
            self.out.display()
        );
        Ok(())
    }

    fn device_list(&self) -> Result<Vec<DeviceEntry>> {
        let list = match (&self.device, &self.devices) {
            (Some(name), _) => {
                valid_name(Kind::Device, name)?;
                vec![DeviceEntry {
                    name: name.clone(),
                    groups: Vec::new(),
                }]
            }
            (None, Some(path)) => {
                let bytes = crate::fleet::trust::read_bounded(path, layout::MAX_FILE)?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    Error::Invalid(format!("device list `{}` is not UTF-8", path.display()))
                })?;
                parse_devices(&path.display().to_string(), &text)?
            }
            (None, None) => unreachable!("clap requires --device or --devices"),
        };
        if let Some(d) = list.iter().find(|d| d.name == "credentials.txt") {
            return Err(Error::Usage(format!(
                "device `{}`: that name is the credentials file's in --out",
                d.name
            ))
            .into());
        }
        Ok(list)
    }

    /// One device's config and the files beside it.
    fn plan(
        &self,
        entry: &DeviceEntry,
        not_before: &str,
        root: &BundleFile,
        ca: Option<&BundleFile>,
    ) -> Result<(DeviceConfig, Vec<BundleFile>)> {
        let mut groups = self.group.clone();
        for g in &entry.groups {
            if !groups.contains(g) {
                groups.push(g.clone());
            }
        }
        let mut files = vec![root.clone()];
        files.extend(ca.cloned());
        let mut config = DeviceConfig {
            device: entry.name.clone(),
            data_dir: self.data_dir.clone(),
            broker: self.broker.clone(),
            prefix: (self.prefix != DEFAULT_PREFIX).then(|| self.prefix.clone()),
            ca: ca.map(|_| layout::CA.to_string()),
            groups,
            not_before: not_before.to_string(),
            ..DeviceConfig::default()
        };
        if self.password {
            let password = random_password().map_err(Error::Invalid)?;
            config.username = Some(entry.name.clone());
            config.password = Some(password);
        }
        if let Some(dir) = &self.client_certs {
            let (cert, key) = client_files(dir, &entry.name);
            let device = |e: Error| Error::Unreadable(format!("device `{}`: {e}", entry.name));
            let cert = certificate(&cert, &format!("{}.pem", entry.name)).map_err(|e| match e {
                Error::Unreadable(_) => device(e),
                other => other,
            })?;
            let key = client_key(&key, &format!("{}.key", entry.name)).map_err(|e| match e {
                Error::Unreadable(_) => device(e),
                other => other,
            })?;
            config.client_cert = Some(cert.path.display().to_string());
            config.client_key = Some(key.path.display().to_string());
            files.extend([cert, key]);
        }
        Ok((config, files))
    }
}

/// `DIR/NAME.pem`, `DIR/NAME.key`.
fn client_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}
