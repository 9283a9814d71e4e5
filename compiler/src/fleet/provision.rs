//! Provisioning bundles: what one device needs in its `/etc/kiln`, written by `kiln
//! provision` and installed by `kilnd provision` (the layout and the config's
//! rendering are `kiln_protocol::provision`, which both sides share).
//!
//! Everything is read and checked before a byte is written: the device list, the root
//! document (verified as kiln verifies a root, and refused if it is a secret key), the
//! CA certificate and the client certificates; then each device's bundle is written
//! into a temporary folder beside its final one and renamed into place.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_protocol::names::{self, Kind};
use kiln_protocol::provision::{self as layout, holds_private_key, DeviceConfig, MAX_FILE};
use kiln_protocol::trust::MAX_ROOT;

use crate::fleet::trust::{read_bounded, read_root};
use crate::fleet::Error;

/// One line of a device list: a device and the groups it joins besides `--group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    pub name: String,
    pub groups: Vec<String>,
}

/// A device list: one device a line, `name[,group;group...]`; `#` starts a comment;
/// blank lines are skipped. Every name passes the name check; a device named twice is
/// refused. Errors name `file` and the line.
pub fn parse_devices(file: &str, text: &str) -> Result<Vec<DeviceEntry>, Error> {
    let mut seen = BTreeSet::new();
    let mut devices = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let bad =
            |why: String| Error::Invalid(format!("device list `{file}` line {}: {why}", n + 1));
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let (name, groups) = match line.split_once(',') {
            Some((name, groups)) => (name.trim(), groups),
            None => (line, ""),
        };
        names::check(Kind::Device, name).map_err(|e| bad(e.to_string()))?;
        let mut list = Vec::new();
        for group in groups.split(';').map(str::trim).filter(|g| !g.is_empty()) {
            names::check(Kind::Group, group).map_err(|e| bad(e.to_string()))?;
            if !list.iter().any(|g| g == group) {
                list.push(group.to_string());
            }
        }
        if !seen.insert(name.to_string()) {
            return Err(bad(format!("device `{name}` is listed twice")));
        }
        devices.push(DeviceEntry {
            name: name.to_string(),
            groups: list,
        });
    }
    if devices.is_empty() {
        return Err(Error::Invalid(format!(
            "device list `{file}` names no device"
        )));
    }
    Ok(devices)
}

/// A file of a bundle, relative to its `kiln/` folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// Secret (a password or a key in it): 0600 in the bundle, deleted from the boot
    /// medium by `kilnd provision` once installed.
    pub secret: bool,
}

/// The fleet's root document for `trust/`: its file name there (`fleet.root`) and its
/// bytes. A secret key is refused before it is parsed, and the document must verify
/// as kiln verifies a root (signed by its own root keys).
pub fn root_document(path: &Path) -> Result<BundleFile, Error> {
    let shown = path.display();
    if path.extension().is_some_and(|e| e == "key") {
        return Err(Error::Trust(format!(
            "`{shown}` is a secret key: --root takes the fleet's root document (fleet.root from `kiln keygen`), and no .key file ever goes onto a device"
        )));
    }
    let bytes = read_bounded(path, MAX_ROOT as u64)?;
    if holds_private_key(&bytes) {
        return Err(Error::Trust(format!(
            "`{shown}` holds a private key: --root takes the fleet's root document (fleet.root from `kiln keygen`)"
        )));
    }
    read_root(path)?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| names::check(Kind::Fleet, s).is_ok())
        .unwrap_or_else(|| "fleet".into());
    Ok(BundleFile {
        path: Path::new(layout::TRUST_DIR).join(format!("{stem}.root")),
        bytes,
        secret: false,
    })
}

/// A PEM certificate (the broker's CA, or a device's client certificate), bounded and
/// refused if it holds a private key or no certificate.
pub fn certificate(path: &Path, name: &str) -> Result<BundleFile, Error> {
    let bytes = read_bounded(path, MAX_FILE)?;
    if holds_private_key(&bytes) {
        return Err(Error::Invalid(format!(
            "`{}` holds a private key, not (only) a certificate",
            path.display()
        )));
    }
    if !bytes.windows(17).any(|w| w == b"BEGIN CERTIFICATE") {
        return Err(Error::Invalid(format!(
            "`{}` is not a PEM certificate (no BEGIN CERTIFICATE line)",
            path.display()
        )));
    }
    Ok(BundleFile {
        path: PathBuf::from(name),
        bytes,
        secret: false,
    })
}

/// A device's client key from `--client-certs DIR` (`DIR/NAME.key`).
pub fn client_key(path: &Path, name: &str) -> Result<BundleFile, Error> {
    let bytes = read_bounded(path, MAX_FILE)?;
    if !holds_private_key(&bytes) {
        return Err(Error::Invalid(format!(
            "`{}` is not a PEM private key",
            path.display()
        )));
    }
    Ok(BundleFile {
        path: PathBuf::from(name),
        bytes,
        secret: true,
    })
}

/// The bundle of one device: its rendered `kilnd.toml` and the files it names.
pub fn bundle(config: &DeviceConfig, files: Vec<BundleFile>) -> Vec<BundleFile> {
    let mut all = vec![BundleFile {
        path: PathBuf::from(layout::CONFIG),
        bytes: layout::render(config).into_bytes(),
        secret: config.has_secret(),
    }];
    all.extend(files);
    all
}

/// `out/NAME`: the folder of one device.
pub fn device_folder(out: &Path, name: &str) -> PathBuf {
    out.join(name)
}

/// Refuses before anything is written when a device folder exists (unless `force`).
pub fn check_free(out: &Path, names: &[&str], force: bool) -> Result<(), Error> {
    if force {
        return Ok(());
    }
    for name in names {
        let folder = device_folder(out, name);
        if folder.symlink_metadata().is_ok() {
            return Err(Error::CannotWrite(format!(
                "device `{name}`: `{}` exists; provision never overwrites a device's bundle (pass --force to replace it)",
                folder.display()
            )));
        }
    }
    Ok(())
}

/// Writes `out/NAME/kiln/` from `files`: into a temporary folder in `out`, renamed into
/// place, replacing an earlier `out/NAME` (the caller checked `--force`).
pub fn write_bundle(out: &Path, name: &str, files: &[BundleFile]) -> Result<PathBuf, Error> {
    let cannot = |what: &Path, e: std::io::Error| {
        Error::CannotWrite(format!(
            "device `{name}`: cannot write `{}`: {e}",
            what.display()
        ))
    };
    std::fs::create_dir_all(out).map_err(|e| cannot(out, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempdir_in(out)
        .map_err(|e| cannot(out, e))?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| cannot(tmp.path(), e))?;
    let kiln = tmp.path().join("kiln");
    for file in files {
        let path = kiln.join(&file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| cannot(dir, e))?;
        }
        let mode = if file.secret { 0o600 } else { 0o644 };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| cannot(&path, e))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| cannot(&path, e))?;
        f.write_all(&file.bytes).map_err(|e| cannot(&path, e))?;
        f.sync_all().map_err(|e| cannot(&path, e))?;
    }
    let folder = device_folder(out, name);
    if folder.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(&folder).map_err(|e| cannot(&folder, e))?;
    }
    let made = tmp.keep();
    std::fs::rename(&made, &folder).map_err(|e| cannot(&folder, e))?;
    std::fs::File::open(out)
        .and_then(|d| d.sync_all())
        .map_err(|e| cannot(out, e))?;
    Ok(folder.join("kiln"))
}

/// Adds `name:password` lines to `out/credentials.txt` (0600), for the broker's
/// password file (`mosquitto_passwd -U`): lines of other devices are kept, and a
/// device provisioned again gets its new password in place of the old one.
pub fn write_credentials(out: &Path, entries: &[(String, String)]) -> Result<PathBuf, Error> {
    let path = out.join("credentials.txt");
    let old = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(Error::CannotWrite(format!(
                "cannot read `{}`: {e}",
                path.display()
            )))
        }
    };
    let mut text = String::new();
    for line in old.lines() {
        let user = line.split(':').next().unwrap_or_default();
        if !entries.iter().any(|(name, _)| name == user) {
            text.push_str(line);
            text.push('\n');
        }
    }
    for (name, password) in entries {
        text.push_str(&format!("{name}:{password}\n"));
    }
    let cannot =
        |e: std::io::Error| Error::CannotWrite(format!("cannot write `{}`: {e}", path.display()));
    let mut tmp = tempfile::NamedTempFile::new_in(out).map_err(cannot)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(cannot)?;
    tmp.write_all(text.as_bytes()).map_err(cannot)?;
    tmp.as_file().sync_all().map_err(cannot)?;
    tmp.persist(&path).map_err(|e| cannot(e.error))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_list_gives_names_and_groups_and_skips_comments() {
        let list = parse_devices(
            "d.txt",
            "# the lab\npi-01\n\npi-02,lab;west # two groups\n  pi-03 , lab ; lab \n",
        )
        .unwrap();
        assert_eq!(
            list,
            [
                DeviceEntry {
                    name: "pi-01".into(),
                    groups: vec![]
                },
                DeviceEntry {
                    name: "pi-02".into(),
                    groups: vec!["lab".into(), "west".into()]
                },
                DeviceEntry {
                    name: "pi-03".into(),
                    groups: vec!["lab".into()]
                },
            ]
        );
    }

    #[test]
    fn a_bad_line_is_named_with_its_file_and_line() {
        for (text, want) in [
            (
                "pi-01\npi 02\n",
                "device list `d.txt` line 2: device name `pi 02`",
            ),
            (
                "pi-01,lab/+\n",
                "device list `d.txt` line 1: group name `lab/+`",
            ),
            (
                "pi-01\npi-01,lab\n",
                "line 2: device `pi-01` is listed twice",
            ),
            ("# nothing\n\n", "device list `d.txt` names no device"),
            (",lab\n", "line 1: device name is empty"),
        ] {
            let e = parse_devices("d.txt", text).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{e}");
            assert!(e.to_string().contains(want), "{e} lacks {want}");
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_][A-Za-z0-9._-]{0,20}"
    }

    proptest! {
        /// Any list of valid names and groups, written out as a list, reads back the same.
        #[test]
        fn a_written_list_reads_back(
            devices in proptest::collection::btree_map(name(), proptest::collection::vec(name(), 0..4), 1..8),
        ) {
            let text: String = devices
                .iter()
                .map(|(d, g)| format!("{d},{} # comment\n", g.join(";")))
                .collect();
            let list = parse_devices("d.txt", &text).unwrap();
            prop_assert_eq!(list.len(), devices.len());
            for (entry, (d, groups)) in list.iter().zip(&devices) {
                prop_assert_eq!(&entry.name, d);
                let mut want: Vec<String> = Vec::new();
                for g in groups {
                    if !want.contains(g) {
                        want.push(g.clone());
                    }
                }
                prop_assert_eq!(&entry.groups, &want);
            }
        }
    }

    #[test]
    fn a_secret_is_never_taken_as_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("fleet-root.key");
        std::fs::write(&key, "x").unwrap();
        let e = root_document(&key).unwrap_err();
        assert!(matches!(e, Error::Trust(_)) && e.to_string().contains("is a secret key"));
        let pem = dir.path().join("fleet.root");
        std::fs::write(&pem, "-----BEGIN PRIVATE KEY-----\nAAAA\n").unwrap();
        let e = root_document(&pem).unwrap_err();
        assert!(e.to_string().contains("holds a private key"), "{e}");
        std::fs::write(&pem, "not a root").unwrap();
        assert!(matches!(root_document(&pem).unwrap_err(), Error::Trust(_)));
    }

    #[test]
    fn credentials_keep_other_devices_and_replace_the_same_one() {
        let dir = tempfile::tempdir().unwrap();
        write_credentials(
            dir.path(),
            &[("a".into(), "1".into()), ("b".into(), "2".into())],
        )
        .unwrap();
        let path = write_credentials(dir.path(), &[("b".into(), "3".into())]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a:1\nb:3\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
