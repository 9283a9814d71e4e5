//! A host directory made visible to a module: the `--dir HOST[:GUEST]` of `kilnd run`
//! and the `dirs` of a `[[module]]` in kilnd.toml.

use std::path::{Component, Path, PathBuf};

/// A host directory made visible to the module at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirMapping {
    pub host: PathBuf,
    /// An absolute guest path in normal form: `/`, or `/a/b` without `.`, `..`, empty
    /// parts or a trailing `/`. `/` makes the host directory the module's whole file
    /// system.
    pub guest: String,
}

impl DirMapping {
    /// Whether this mapping is the guest's root (`HOST:/`).
    pub fn is_root(&self) -> bool {
        self.guest == "/"
    }
}

impl std::str::FromStr for DirMapping {
    type Err = String;

    /// `HOST[:GUEST]`. Without GUEST the directory keeps its path, taken from `/` (the
    /// guest's working directory): `data` and `./data` appear as `/data`. GUEST `/`
    /// maps HOST as the guest's root.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, guest) = match s.split_once(':') {
            Some((h, g)) => (h, g.to_string()),
            None => (s, guest_default(Path::new(s))),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(format!("`{s}` is not HOST[:GUEST]"));
        }
        // The root is given away only when asked for by name, never by default.
        if !s.contains(':') && guest == "/" {
            return Err(format!(
                "`{s}` has no name of its own in the guest: give one, e.g. `{s}:/data` (or `{s}:/` for the whole file system)"
            ));
        }
        let guest = guest_normal(&guest).ok_or_else(|| {
            format!(
                "guest path `{guest}` in `{s}` must be absolute without `.` or `..`, e.g. `{host}:/data` (or `{host}:/` for the whole file system)"
            )
        })?;
        Ok(Self {
            host: PathBuf::from(host),
            guest,
        })
    }
}

/// `guest` in normal form, or None when it is relative or has `.` or `..` parts (a
/// guest path names a place in the sandbox; it never walks).
fn guest_normal(guest: &str) -> Option<String> {
    let rest = guest.strip_prefix('/')?;
    let mut out = String::new();
    for part in rest.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return None;
        }
        out.push('/');
        out.push_str(part);
    }
    Some(if out.is_empty() { "/".into() } else { out })
}

fn guest_default(host: &Path) -> String {
    let mut guest = PathBuf::from("/");
    for c in host.components() {
        if let Component::Normal(part) = c {
            guest.push(part);
        }
    }
    guest.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_without_guest_keeps_its_path_from_the_root() {
        let d: DirMapping = "./data".parse().unwrap();
        assert_eq!(
            (d.host, d.guest.as_str()),
            (PathBuf::from("./data"), "/data")
        );
        let d: DirMapping = "/srv/in:/in".parse().unwrap();
        assert_eq!(
            (d.host, d.guest.as_str()),
            (PathBuf::from("/srv/in"), "/in")
        );
        assert!(":x".parse::<DirMapping>().is_err());
        assert!("x:".parse::<DirMapping>().is_err());
    }

    #[test]
    fn the_root_is_a_guest_path_and_guest_paths_are_normalised() {
        let d: DirMapping = "fs-tests.dir:/".parse().unwrap();
        assert!(d.is_root());
        let d: DirMapping = "x://".parse().unwrap();
        assert!(d.is_root());
        let d: DirMapping = "x:/a//b/".parse().unwrap();
        assert_eq!(d.guest, "/a/b");
        assert!(!d.is_root());
        // The root only by name: a bare `..` or `/` would make it by default.
        for bare in ["..", "/", "."] {
            let err = bare.parse::<DirMapping>().unwrap_err();
            assert!(err.contains("give one"), "{bare}: {err}");
        }
    }

    #[test]
    fn a_guest_path_that_walks_or_is_relative_is_refused() {
        for bad in ["x:data", "x:/a/../b", "x:/..", "x:/./a", "x:."] {
            let err = bad.parse::<DirMapping>().unwrap_err();
            assert!(err.contains("must be absolute"), "{bad}: {err}");
        }
    }
}
