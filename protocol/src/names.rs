//! Names that travel (device, group, module, stream, an operator's tag) become MQTT topic levels and file
//! names, so every one of them passes [`check`] wherever it enters: `kiln compile`,
//! `kiln push`, `kilnd.toml`, and the fleet agent reading a signed desired state.
//!
//! ```
//! use kiln_protocol::names::{check, Kind};
//!
//! assert!(check(Kind::Device, "dev-01").is_ok());
//! assert!(check(Kind::Module, "../../etc").is_err());
//! assert!(check(Kind::Group, "lab/+").is_err());
//! ```

/// The longest name: one MQTT topic level and one path component, with room to spare.
pub const MAX_NAME: usize = 64;

/// What a name names, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Device,
    Group,
    Module,
    Stream,
    Fleet,
    Tag,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Device => "device",
            Kind::Group => "group",
            Kind::Module => "module",
            Kind::Stream => "stream",
            Kind::Fleet => "fleet",
            Kind::Tag => "tag",
        }
    }
}

/// Why a name was refused. The message names the kind of name and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0} name is empty")]
    Empty(&'static str),
    #[error("{what} name `{start}…` is {len} bytes long (at most {MAX_NAME})")]
    TooLong {
        what: &'static str,
        /// The first characters, escaped.
        start: String,
        len: usize,
    },
    #[error("{what} name `{name}` is not allowed")]
    Reserved { what: &'static str, name: String },
    #[error("{what} name `{name}` contains `{c}`; use only letters, digits, `.`, `_` and `-`")]
    BadChar {
        what: &'static str,
        /// The name, escaped.
        name: String,
        /// The first character refused, escaped.
        c: String,
    },
}

impl From<NameError> for String {
    fn from(e: NameError) -> Self {
        e.to_string()
    }
}

/// Shown (in JSON too) as its message.
impl serde::Serialize for NameError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `[A-Za-z0-9._-]{1,64}`, and neither `.` nor `..`: safe as a topic level (no `+`,
/// `#` or `/`) and as a file name (no separators, no way up).
pub fn check(kind: Kind, name: &str) -> Result<(), NameError> {
    let what = kind.word();
    if name.is_empty() {
        return Err(NameError::Empty(what));
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong {
            what,
            start: name
                .chars()
                .take(16)
                .collect::<String>()
                .escape_debug()
                .to_string(),
            len: name.len(),
        });
    }
    if name == "." || name == ".." {
        return Err(NameError::Reserved {
            what,
            name: name.into(),
        });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadChar {
            what,
            name: name.escape_debug().to_string(),
            c: c.escape_debug().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_escape_a_topic_or_a_directory_are_refused() {
        for good in ["dev-01", "a", "sensor_filter.v2", &"x".repeat(MAX_NAME)] {
            assert_eq!(check(Kind::Module, good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/x",
            "a/b",
            "lab+",
            "#",
            "a b",
            "é",
            "a\0",
            "a\u{1b}[31m",
            &"x".repeat(MAX_NAME + 1),
        ] {
            let err = check(Kind::Group, bad).unwrap_err().to_string();
            assert!(err.starts_with("group name"), "{err}");
            assert!(!err.contains('\n') && !err.contains('\u{1b}'), "{err}");
        }
    }
}
