//! `kilnd provision`: installs a bundle that `kiln provision` wrote (the layout is
//! `kiln_protocol::provision`) into the config directory, at first boot.
//!
//! Everything is checked before anything is written: the bundle's `kilnd.toml` loads
//! with [`Config::load`] and passes [`validate`], as `kilnd check` does; every file it
//! names is in the bundle (or, named by an absolute path, already on the device); the
//! trust directory holds a root document or a key, and each verifies; no file is over
//! its bound. Then each file is written atomically (temp file, fsync, rename, fsync of
//! the directory), `kilnd.toml` last, so a power cut leaves the old config or the new
//! one and the bundle, which the next boot installs again. Nothing is lost: a file it
//! replaces that differs, and a key or root in `trust/` that the bundle does not hold,
//! is kept beside it as `NAME.pre-provision` (`.1`, `.2`, ... when that exists). Last,
//! the bundle is deleted, secrets first, so a lost SD card does not carry the
//! device's credentials.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use kiln_protocol::files::{read_bounded, MAX_LOCAL_ARTIFACT};
use kiln_protocol::provision::{holds_private_key, CONFIG, MAX_FILE, TRUST_DIR};

use crate::daemon::config::{validate, Config};
use crate::exit::{Code, Failure};
use crate::sandbox::load::{is_root, read_trusted_keys};

/// Why a bundle was not installed; each kind has one exit code (`crate::exit`).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The bundle's kilnd.toml does not load, or names a file the bundle lacks.
    #[error("{0}")]
    Config(String),
    /// A file of the bundle is missing, unreadable or over its bound.
    #[error("{0}")]
    Unreadable(String),
    /// The trust directory holds no root document or key, or one that does not verify.
    #[error("{0}")]
    Untrusted(String),
    /// The config directory cannot be written, or the bundle cannot be deleted.
    #[error("{0}")]
    CannotWrite(String),
}

impl From<Failure> for ProvisionError {
    fn from(f: Failure) -> Self {
        match f.code {
            Code::Untrusted => ProvisionError::Untrusted(f.message),
            Code::NoInput => ProvisionError::Unreadable(f.message),
            _ => ProvisionError::Config(f.message),
        }
    }
}

/// How an installed file is owned: secret (the config, a key, a password) or public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Secret,
    Public,
}

/// One file to install, relative to both the bundle and the config directory.
#[derive(Debug)]
struct Item {
    rel: PathBuf,
    bytes: Vec<u8>,
    kind: Kind,
}

/// `kilnd provision --from DIR --etc ETC`; prints what it did on stdout.
pub fn provision(from: &Path, etc: &Path) -> Result<i32, Failure> {
    let mut out = Vec::new();
    let result = run(from, etc, &mut out);
    let _ = std::io::stdout().write_all(&out);
    result.map_err(|e| Failure::new(Code::from(&e), e.to_string()))
}

fn run(from: &Path, etc: &Path, out: &mut Vec<u8>) -> Result<i32, ProvisionError> {
    if from.symlink_metadata().is_err() {
        let _ = writeln!(out, "no bundle at {}: nothing to provision", from.display());
        return Ok(0);
    }
    let items = check_bundle(from, etc)?;
    let owner = Owner::of(etc);
    install(etc, &items, &owner, out)?;
    // What was installed loads where it is, as the service will load it.
    let installed = etc.join(CONFIG);
    Config::load(&installed).map_err(|e| {
        ProvisionError::Config(format!(
            "installed, but {e}; the bundle `{}` is kept",
            from.display()
        ))
    })?;
    delete_bundle(from, &items)?;
    let _ = writeln!(out, "deleted the bundle {}", from.display());
    let _ = writeln!(
        out,
        "next: kilnd.service starts with it (at boot it follows this unit; now: systemctl start kilnd), makes its identity key in its data dir, and comes online; then `kiln enroll` records that key"
    );
    Ok(0)
}

/// The files to install, every one read and checked.
fn check_bundle(from: &Path, etc: &Path) -> Result<Vec<Item>, ProvisionError> {
    let config_path = from.join(CONFIG);
    no_link(from, Path::new(CONFIG))?;
    let text = read_bounded(&config_path, MAX_FILE).map_err(|e| {
        ProvisionError::Unreadable(format!(
            "bundle `{}`: cannot read `{}`: {e}",
            from.display(),
            config_path.display()
        ))
    })?;
    // The trust entries first, so that a bundle without its root says so.
    if let Ok(raw) = std::str::from_utf8(&text)
        .map_err(|_| ())
        .and_then(|t| toml::from_str::<toml::Table>(t).map_err(|_| ()))
    {
        for entry in raw
            .get("trust")
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
        {
            check_trust_entry(from, &config_path, Path::new(entry))?;
        }
    }
    let (config, plans) = Config::load(&config_path).map_err(ProvisionError::Config)?;
    validate(&config, &plans)
        .map_err(|e| ProvisionError::Config(format!("config `{}`: {e}", config_path.display())))?;
    read_trusted_keys(&config.trust)?;

    let mut named: Vec<(PathBuf, u64, bool)> = Vec::new();
    for t in &config.trust {
        named.push((t.clone(), MAX_FILE, false));
    }
    if let Some(mqtt) = &config.mqtt {
        named.extend(mqtt.ca.iter().map(|p| (p.clone(), MAX_FILE, false)));
        named.extend(
            mqtt.client_cert
                .iter()
                .map(|p| (p.clone(), MAX_FILE, false)),
        );
        named.extend(mqtt.client_key.iter().map(|p| (p.clone(), MAX_FILE, true)));
    }
    for plan in &plans {
        named.push((plan.artifact.clone(), MAX_LOCAL_ARTIFACT, false));
    }
    let base = config_path.parent().unwrap_or(Path::new("."));
    for m in &config.modules {
        if let Some(p) = &m.config_file {
            named.push((base.join(p), MAX_FILE, false));
        }
    }

    let mut items = vec![Item {
        rel: PathBuf::from(CONFIG),
        bytes: text,
        kind: Kind::Secret,
    }];
    let mut seen = BTreeSet::new();
    for (path, limit, key) in named {
        match in_bundle(from, &path) {
            Some(rel) => {
                if !seen.insert(rel.clone()) {
                    continue;
                }
                no_link(from, &rel)?;
                let bytes = read_bounded(&path, limit).map_err(|e| {
                    ProvisionError::Unreadable(format!(
                        "bundle `{}`: `{}`, which kilnd.toml names: {e}",
                        from.display(),
                        path.display()
                    ))
                })?;
                let secret = key
                    || path.extension().is_some_and(|e| e == "key")
                    || holds_private_key(&bytes);
                items.push(Item {
                    rel,
                    bytes,
                    kind: if secret { Kind::Secret } else { Kind::Public },
                });
            }
            None => {
                // Named outside the bundle: it must already be on the device.
                let rel = path.strip_prefix(from).unwrap_or(&path);
                let on_device = etc.join(rel);
                if !on_device.exists() {
                    return Err(ProvisionError::Config(format!(
                        "config `{}` names `{}`, which is neither in the bundle nor on this device",
                        config_path.display(),
                        on_device.display()
                    )));
                }
            }
        }
    }
    Ok(items)
}

/// Refuses a symbolic link on the way from the bundle to `rel`: a bundle holds plain
/// files (FAT has no links), and a link could make root install a file from elsewhere,
/// readable by the group kiln or by all.
fn no_link(from: &Path, rel: &Path) -> Result<(), ProvisionError> {
    let mut path = from.to_path_buf();
    for part in rel.components() {
        path.push(part);
        if path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(ProvisionError::Unreadable(format!(
                "bundle `{}`: `{}` is a symbolic link; a bundle holds plain files",
                from.display(),
                path.display()
            )));
        }
    }
    Ok(())
}

/// `from`-relative path of `path` if it lies in the bundle (no `..`, not absolute).
fn in_bundle(from: &Path, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(from).ok()?;
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| rel.to_path_buf())
}

/// A `trust` entry of the bundle's config: in the bundle, and a directory of them
/// holds at least one root document or key.
fn check_trust_entry(from: &Path, config: &Path, entry: &Path) -> Result<(), ProvisionError> {
    let path = from.join(entry);
    if in_bundle(from, &path).is_none() {
        return Ok(()); // judged with the other files named outside the bundle
    }
    let meta = path.metadata().map_err(|e| {
        ProvisionError::Untrusted(format!(
            "bundle `{}`: `{}`, the trust that `{}` names: {e}",
            from.display(),
            path.display(),
            config.display()
        ))
    })?;
    if meta.is_dir() {
        let any = fs::read_dir(&path)
            .map_err(|e| {
                ProvisionError::Unreadable(format!("cannot read `{}`: {e}", path.display()))
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .any(|p| p.is_file() && (is_root(&p) || p.extension().is_some_and(|x| x == "pub")));
        if !any {
            return Err(ProvisionError::Untrusted(format!(
                "bundle `{}`: `{}` holds no `*.root` document and no `*.pub` key: the device would trust nothing",
                from.display(),
                path.display()
            )));
        }
    }
    Ok(())
}

/// Who owns what is installed: root, and the group `kiln` for secrets if it exists.
struct Owner {
    /// The gid of `kiln`, from the `group` file beside the config directory.
    gid: Option<u32>,
    /// The group file looked in, for the message when `kiln` is not in it.
    group_file: PathBuf,
    /// Whether ownership can be given (running as root).
    root: bool,
}

impl Owner {
    fn of(etc: &Path) -> Self {
        let group_file = etc.parent().unwrap_or(Path::new("/etc")).join("group");
        let gid = fs::read_to_string(&group_file).ok().and_then(|text| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                (fields.next() == Some("kiln"))
                    .then(|| fields.nth(1).and_then(|g| g.parse().ok()))
                    .flatten()
            })
        });
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        Self {
            gid,
            group_file,
            root,
        }
    }

    /// Mode, gid (None: root's) and how to say it.
    fn of_kind(&self, kind: Kind) -> (u32, Option<u32>, &'static str) {
        match (kind, self.gid) {
            (Kind::Secret, Some(gid)) => (0o640, Some(gid), "0640 root:kiln"),
            (Kind::Secret, None) => (0o600, None, "0600 root"),
            (Kind::Public, _) => (0o644, None, "0644 root"),
        }
    }
}

fn cannot(path: &Path, e: impl std::fmt::Display) -> ProvisionError {
    ProvisionError::CannotWrite(format!("cannot write `{}`: {e}", path.display()))
}

fn install(
    etc: &Path,
    items: &[Item],
    owner: &Owner,
    out: &mut Vec<u8>,
) -> Result<(), ProvisionError> {
    if owner.gid.is_none() {
        let _ = writeln!(
            out,
            "note: no group `kiln` in {}: secrets are installed 0600 root, which kilnd (user kiln) cannot read; install the kilnd package first, or chgrp kiln and chmod 0640 them",
            owner.group_file.display()
        );
    }
    if !owner.root {
        let _ = writeln!(
            out,
            "note: not running as root: the files keep this user as their owner"
        );
    }
    make_dir(etc, owner)?;
    let trust = etc.join(TRUST_DIR);
    if items.iter().any(|i| i.rel.starts_with(TRUST_DIR)) {
        make_dir(&trust, owner)?;
        // trust/ becomes the bundle's: a key or root it does not hold is kept aside,
        // not trusted (two roots would not load).
        let keep: BTreeSet<PathBuf> = items.iter().map(|i| etc.join(&i.rel)).collect();
        let mut old: Vec<PathBuf> = fs::read_dir(&trust)
            .map_err(|e| cannot(&trust, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                (is_root(p) || p.extension().is_some_and(|x| x == "pub")) && !keep.contains(p)
            })
            .collect();
        old.sort();
        for path in old {
            let aside = aside_name(&path);
            fs::rename(&path, &aside).map_err(|e| cannot(&aside, e))?;
            sync_dir(&trust)?;
            let _ = writeln!(
                out,
                "kept {} (not in the bundle, so no longer trusted)",
                aside.display()
            );
        }
    }
    // kilnd.toml last: it is what makes the rest used.
    let mut order: Vec<&Item> = items
        .iter()
        .filter(|i| i.rel != Path::new(CONFIG))
        .collect();
    order.extend(items.iter().filter(|i| i.rel == Path::new(CONFIG)));
    for item in order {
        let path = etc.join(&item.rel);
        if let Some(dir) = path.parent() {
            make_dir(dir, owner)?;
        }
        match fs::read(&path) {
            Ok(old) if old == item.bytes => {}
            Ok(_) => {
                let aside = aside_name(&path);
                fs::hard_link(&path, &aside).map_err(|e| cannot(&aside, e))?;
                let _ = writeln!(
                    out,
                    "kept {} (the {} it replaces)",
                    aside.display(),
                    path.display()
                );
            }
            Err(_) => {}
        }
        let (mode, gid, said) = owner.of_kind(item.kind);
        write_file(&path, &item.bytes, mode, gid, owner.root)?;
        let _ = writeln!(out, "installed {} ({said})", path.display());
    }
    Ok(())
}

/// `NAME.pre-provision`, or `NAME.pre-provision.N` with the first N free.
fn aside_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let first = path.with_file_name(format!("{name}.pre-provision"));
    if first.symlink_metadata().is_err() {
        return first;
    }
    (1..)
        .map(|n| path.with_file_name(format!("{name}.pre-provision.{n}")))
        .find(|p| p.symlink_metadata().is_err())
        .unwrap_or(first)
}

/// A directory, 0755 root, made if missing.
fn make_dir(dir: &Path, owner: &Owner) -> Result<(), ProvisionError> {
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(|e| cannot(dir, e))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(|e| cannot(dir, e))?;
    if owner.root {
        chown(dir, 0)?;
    }
    Ok(())
}

fn chown(path: &Path, gid: u32) -> Result<(), ProvisionError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| cannot(path, e))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::chown(c.as_ptr(), 0, gid) } != 0 {
        return Err(cannot(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes `path` atomically: a temp file beside it, given its owner and mode before a
/// byte is written, fsynced, renamed over `path`, and the directory fsynced.
fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    gid: Option<u32>,
    root: bool,
) -> Result<(), ProvisionError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.provision-tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| cannot(&tmp, e))?;
    if root {
        chown(&tmp, gid.unwrap_or(0))?;
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| cannot(&tmp, e))?;
    file.write_all(bytes).map_err(|e| cannot(&tmp, e))?;
    file.sync_all().map_err(|e| cannot(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| cannot(path, e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), ProvisionError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| cannot(dir, e))
}

/// Deletes the bundle: its secret files first, then the whole folder.
fn delete_bundle(from: &Path, items: &[Item]) -> Result<(), ProvisionError> {
    let failed = |path: &Path, e: std::io::Error| {
        ProvisionError::CannotWrite(format!(
            "installed, but cannot delete `{}` from the bundle: {e}; delete {} by hand, it holds the device's credentials",
            path.display(),
            from.display()
        ))
    };
    for item in items.iter().filter(|i| i.kind == Kind::Secret) {
        let path = from.join(&item.rel);
        fs::remove_file(&path).map_err(|e| failed(&path, e))?;
    }
    if let Ok(d) = fs::File::open(from) {
        let _ = d.sync_all();
    }
    fs::remove_dir_all(from).map_err(|e| failed(from, e))?;
    if let Some(parent) = from.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::keys::SecretKey;
    use kiln_protocol::provision::{render, DeviceConfig};
    use kiln_protocol::trust::{Role, Root};
    use proptest::prelude::*;

    fn root_doc() -> Vec<u8> {
        let key = SecretKey::generate().unwrap();
        Root {
            fleet: "f".into(),
            version: 1,
            issued_ms: 1,
            root: Role::new(&[key.public()], 1),
            release: Role::new(&[key.public()], 1),
            registry: None,
            expires_ms: None,
        }
        .sign(&[&key])
        .unwrap()
    }

    fn bundle(dir: &Path, config: &DeviceConfig) -> PathBuf {
        let b = dir.join("bundle");
        fs::create_dir_all(b.join(TRUST_DIR)).unwrap();
        fs::write(b.join(TRUST_DIR).join("fleet.root"), root_doc()).unwrap();
        fs::write(b.join(CONFIG), render(config)).unwrap();
        b
    }

    fn config(device: &str, groups: Vec<String>, broker: String) -> DeviceConfig {
        DeviceConfig {
            device: device.into(),
            broker,
            groups,
            not_before: "2026-12-06T10:00:00Z".into(),
            username: Some(device.into()),
            password: Some("p\"\\w".into()),
            ..DeviceConfig::default()
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// What `kiln provision` renders, kilnd's own parser loads back, value for value.
        #[test]
        fn a_rendered_config_loads_back_with_the_same_values(
            device in name(),
            groups in proptest::collection::vec(name(), 0..5),
            host in "[a-z][a-z0-9.-]{0,20}",
            port in proptest::option::of(1u16..),
            prefix in proptest::option::of("[a-z]{1,8}/v[0-9]"),
        ) {
            let broker = match port {
                Some(p) => format!("mqtt://{host}:{p}"),
                None => format!("mqtt://{host}"),
            };
            let dir = tempfile::tempdir().unwrap();
            let mut c = config(&device, groups.clone(), broker.clone());
            c.prefix = prefix.clone();
            let b = bundle(dir.path(), &c);
            let (c, _) = Config::load(&b.join(CONFIG)).unwrap();
            prop_assert_eq!(c.device.as_deref(), Some(device.as_str()));
            prop_assert_eq!(c.data_dir.as_deref(), Some(Path::new("/var/lib/kiln")));
            prop_assert_eq!(c.root, Some(b.join("trust/fleet.root")));
            let mqtt = c.mqtt.unwrap();
            prop_assert_eq!(mqtt.broker, broker);
            prop_assert_eq!(mqtt.prefix, prefix.unwrap_or_else(|| "kiln/v1".into()));
            prop_assert_eq!(mqtt.groups, groups);
            prop_assert_eq!(mqtt.username.as_deref(), Some(device.as_str()));
            prop_assert_eq!(mqtt.password.as_deref(), Some("p\"\\w"));
            prop_assert_eq!(mqtt.not_before_ms, 1_796_551_200_000);
        }
    }

    #[test]
    fn a_bundle_installs_with_its_modes_and_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(
            dir.path(),
            &config("pi-01", vec!["lab".into()], "mqtt://h".into()),
        );
        let etc = dir.path().join("etc/kiln");
        fs::create_dir_all(&etc).unwrap();
        fs::write(etc.join(CONFIG), "# the packaged template\n").unwrap();
        fs::create_dir_all(etc.join(TRUST_DIR)).unwrap();
        fs::write(etc.join("trust/old.root"), root_doc()).unwrap();
        let mut out = Vec::new();
        assert_eq!(run(&b, &etc, &mut out).unwrap(), 0);
        let out = String::from_utf8(out).unwrap();
        assert!(!b.exists(), "{out}");
        let mode = |p: &str| fs::metadata(etc.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(CONFIG), 0o600, "{out}"); // no group file: 0600
        assert_eq!(mode("trust"), 0o755);
        assert_eq!(mode("trust/fleet.root"), 0o644);
        assert_eq!(
            fs::read_to_string(etc.join("kilnd.toml.pre-provision")).unwrap(),
            "# the packaged template\n"
        );
        assert!(etc.join("trust/old.root.pre-provision").exists(), "{out}");
        assert!(out.contains("no group `kiln`"), "{out}");
        Config::load(&etc.join(CONFIG)).unwrap();
        // No bundle: nothing to do, and success.
        let mut again = Vec::new();
        assert_eq!(run(&b, &etc, &mut again).unwrap(), 0);
        assert!(String::from_utf8(again)
            .unwrap()
            .contains("nothing to provision"));
    }

    #[test]
    fn nothing_is_written_for_a_bad_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(dir.path(), &config("pi-01", vec![], "mqtt://h".into()));
        let etc = dir.path().join("etc/kiln");
        fs::remove_file(b.join("trust/fleet.root")).unwrap();
        let e = run(&b, &etc, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ProvisionError::Untrusted(_)), "{e}");
        assert!(e.to_string().contains("trust` holds no `*.root`"), "{e}");
        fs::write(b.join("trust/fleet.root"), root_doc()).unwrap();
        fs::write(
            b.join(CONFIG),
            "device = \"pi-01\"\ntrust = [\"trust\"]\nbogus = 1\n",
        )
        .unwrap();
        let e = run(&b, &etc, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ProvisionError::Config(_)), "{e}");
        assert!(e.to_string().contains("kilnd.toml` line 3"), "{e}");
        let mut c = config("pi-01", vec![], "mqtts://h".into());
        c.ca = Some("ca.pem".into());
        fs::write(b.join(CONFIG), render(&c)).unwrap();
        let e = run(&b, &etc, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
        assert!(!etc.exists());
        assert!(b.join(CONFIG).exists());
        // A link in the bundle would install a file from elsewhere.
        fs::write(
            b.join(CONFIG),
            render(&config("pi-01", vec![], "mqtt://h".into())),
        )
        .unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, root_doc()).unwrap();
        fs::remove_file(b.join("trust/fleet.root")).unwrap();
        std::os::unix::fs::symlink(&secret, b.join("trust/fleet.root")).unwrap();
        let e = run(&b, &etc, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ProvisionError::Unreadable(_)), "{e}");
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert!(!etc.exists());
    }
}
