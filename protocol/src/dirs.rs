//! A host directory made visible to a module: the `--dir HOST[:GUEST]` of `kilnd run`
//! and the `dirs` of a `[[module]]` in kilnd.toml.

use std::path::{Component, Path, PathBuf};

/// A host directory made visible to the module at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirMapping {
    pub host: PathBuf,
    pub guest: String,
}

impl std::str::FromStr for DirMapping {
    type Err = String;

    /// `HOST[:GUEST]`. Without GUEST the directory keeps its path, taken from `/` (the
    /// guest's working directory): `data` and `./data` appear as `/data`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, guest) = match s.split_once(':') {
            Some((h, g)) => (h, g.to_string()),
            None => (s, guest_default(Path::new(s))),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(format!("`{s}` is not HOST[:GUEST]"));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest,
        })
    }
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
}
