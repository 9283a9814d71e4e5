//! The build wing's errors: one kind for each way building an artifact fails, each
//! kind's exit code given in one place ([`crate::exit`]); the message is the line kiln
//! prints.

use crate::exit::one_line;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line asks for what cannot be: a module name that cannot be one,
    /// a SOURCE_DATE_EPOCH that is no number.
    #[error("{0}")]
    Usage(String),
    /// The input is not valid: WebAssembly that does not parse or compile, a target
    /// profile or a release file that is malformed.
    #[error("{0}")]
    Invalid(String),
    /// An input file cannot be read.
    #[error("{0}")]
    Unreadable(String),
    /// A compile failed for another reason than its input.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// Each constructor takes any error and keeps its whole chain on one line.
    pub fn usage(e: impl Into<anyhow::Error>) -> Self {
        Error::Usage(one_line(&e.into()))
    }
    pub fn invalid(e: impl Into<anyhow::Error>) -> Self {
        Error::Invalid(one_line(&e.into()))
    }
    pub fn unreadable(e: impl Into<anyhow::Error>) -> Self {
        Error::Unreadable(one_line(&e.into()))
    }
    pub fn failed(e: impl Into<anyhow::Error>) -> Self {
        Error::Failed(one_line(&e.into()))
    }
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::Error;
    use crate::exit::{code_of, Code};

    #[test]
    fn each_kind_has_its_code() {
        for (error, code) in [
            (Error::usage(anyhow!("x")), Code::Usage),
            (Error::invalid(anyhow!("x")), Code::InvalidInput),
            (Error::unreadable(anyhow!("x")), Code::NoInput),
            (Error::failed(anyhow!("x")), Code::Failure),
        ] {
            assert_eq!(code_of(&error.into()), code);
        }
        let e = Error::invalid(anyhow!("bad magic").context("cannot compile `a.wasm`"));
        assert_eq!(e.to_string(), "cannot compile `a.wasm`: bad magic");
    }
}
