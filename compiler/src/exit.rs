//! Exit codes of `kiln`. Every failure prints one line; the code says which kind.
//! The numbers come from the table kiln and kilnd share (`kiln_protocol::exit`).

use std::fmt;

use kiln_protocol::exit::Code as Shared;

use crate::{build, fleet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Anything not classified below.
    Failure = Shared::Failure as u8,
    /// Bad command line (clap's own code).
    Usage = Shared::Usage as u8,
    /// The input is not valid: bad WebAssembly, a tampered or foreign artifact.
    InvalidInput = Shared::InvalidInput as u8,
    /// An input file does not exist or cannot be read.
    NoInput = Shared::NoInput as u8,
    /// An output file cannot be written.
    CannotWrite = Shared::CannotWrite as u8,
    /// A key is missing, malformed, untrusted or has unsafe permissions.
    Key = Shared::Key as u8,
    /// The MQTT broker cannot be reached, or refused the session or a subscription.
    Unavailable = Shared::Unavailable as u8,
    /// A device refused the desired state `kiln push` published.
    Refused = Shared::Refused as u8,
    /// `kiln push`/`rollout`/`remove`: no device has been seen with that id, or no
    /// device's status names that group (`--force` publishes anyway), or `rollout
    /// --where` selects none of its members.
    NoSuchScope = Shared::NoSuchScope as u8,
    /// `kiln push`/`rollout`: the devices would refuse this update, known before
    /// publishing: an artifact for another target (`--force`), a version below what
    /// they run (`--allow-downgrade`), limits the artifact cannot meet, a module that
    /// is neither a WASI command nor a reactor. Nothing was published.
    WouldRefuse = Shared::WouldRefuse as u8,
    /// Another operator's rollout holds the group (or a rollout is not in a state the
    /// command applies to).
    Busy = Shared::Busy as u8,
}

impl From<Code> for Shared {
    fn from(code: Code) -> Shared {
        Shared::from_number(code as u8).unwrap_or(Shared::Failure)
    }
}

/// An error that carries the exit code `kiln` ends with.
#[derive(Debug)]
pub struct Coded {
    pub code: Code,
    pub message: String,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

/// Wraps `err` (with its whole context chain on one line) into an error with `code`.
pub fn coded(code: Code, err: impl Into<anyhow::Error>) -> anyhow::Error {
    let err = err.into();
    anyhow::Error::new(Coded {
        code,
        message: one_line(&err),
    })
}

/// `outer: inner: root cause`, the way the error is printed.
pub fn one_line(err: &anyhow::Error) -> String {
    err.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// The code of the outermost error in `err`'s chain that carries one: a [`Coded`], or
/// a wing's typed error.
pub fn code_of(err: &anyhow::Error) -> Code {
    err.chain()
        .find_map(|e| {
            e.downcast_ref::<Coded>()
                .map(|c| c.code)
                .or_else(|| e.downcast_ref::<fleet::Error>().map(Code::from))
                .or_else(|| e.downcast_ref::<build::Error>().map(Code::from))
        })
        .unwrap_or(Code::Failure)
}

/// The build wing's errors, each kind with its code: the one place they are mapped.
impl From<&build::Error> for Code {
    fn from(e: &build::Error) -> Code {
        match e {
            build::Error::Usage(_) => Code::Usage,
            build::Error::Invalid(_) => Code::InvalidInput,
            build::Error::Unreadable(_) => Code::NoInput,
            build::Error::Failed(_) => Code::Failure,
        }
    }
}

/// The fleet wing's errors, each kind with its code: the one place they are mapped.
impl From<&fleet::Error> for Code {
    fn from(e: &fleet::Error) -> Code {
        match e {
            fleet::Error::Broker(_) => Code::Unavailable,
            fleet::Error::Trust(_) => Code::Key,
            fleet::Error::Invalid(_) => Code::InvalidInput,
            fleet::Error::Unreadable(_) => Code::NoInput,
            fleet::Error::Usage(_) => Code::Usage,
            fleet::Error::NoSuchScope(_) => Code::NoSuchScope,
            fleet::Error::WouldRefuse(_) => Code::WouldRefuse,
            fleet::Error::Busy(_) => Code::Busy,
            fleet::Error::Stopped(_) => Code::Failure,
            fleet::Error::CannotWrite(_) => Code::CannotWrite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code kiln ends with is a kiln row of the shared table.
    #[test]
    fn codes_are_the_shared_tables() {
        use Code::*;
        for code in [
            Failure,
            Usage,
            InvalidInput,
            NoInput,
            CannotWrite,
            Key,
            Unavailable,
            Refused,
            NoSuchScope,
            WouldRefuse,
            Busy,
        ] {
            let shared = Shared::from_number(code as u8).expect("in the table");
            assert_eq!(Shared::from(code), shared);
            assert!(shared.entry().used_by.kiln(), "{code:?}");
        }
    }
}
