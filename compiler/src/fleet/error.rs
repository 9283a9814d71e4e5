//! The fleet wing's errors: one kind for each way operating the fleet fails. Each kind
//! has one exit code, given in one place ([`crate::exit`]); the message is the line
//! kiln prints, worded where the error is made.

use crate::exit::one_line;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MQTT broker cannot be reached, refused the session, or went away.
    #[error("{}", one_line(.0))]
    Broker(anyhow::Error),
    /// A key, a root document or a signed message is missing, unusable or not trusted.
    #[error("{0}")]
    Trust(String),
    /// What was given or found is not valid: an artifact, a release file, a state
    /// file, a record, a desired state too large for devices.
    #[error("{0}")]
    Invalid(String),
    /// An input file cannot be read.
    #[error("{0}")]
    Unreadable(String),
    /// The command line asks for what cannot be: an unknown target, inputs that do
    /// not go together, a key missing for a compile.
    #[error("{0}")]
    Usage(String),
    /// No device has been seen with that id, or in that group.
    #[error("{0}")]
    NoSuchScope(String),
    /// The devices would refuse this update; nothing was published.
    #[error("{0}")]
    WouldRefuse(String),
    /// Another operator's rollout holds the group, or the rollout is not in a state
    /// the command applies to.
    #[error("{0}")]
    Busy(String),
    /// A rollout halted or was aborted.
    #[error("{0}")]
    Stopped(String),
    /// An output cannot be written, or exists and is not overwritten.
    #[error("{0}")]
    CannotWrite(String),
}

impl Error {
    /// Each constructor takes any error and keeps its whole chain on one line.
    pub fn trust(e: impl Into<anyhow::Error>) -> Self {
        Error::Trust(one_line(&e.into()))
    }
    pub fn invalid(e: impl Into<anyhow::Error>) -> Self {
        Error::Invalid(one_line(&e.into()))
    }
    pub fn unreadable(e: impl Into<anyhow::Error>) -> Self {
        Error::Unreadable(one_line(&e.into()))
    }
    pub fn usage(e: impl Into<anyhow::Error>) -> Self {
        Error::Usage(one_line(&e.into()))
    }
    pub fn no_such_scope(e: impl Into<anyhow::Error>) -> Self {
        Error::NoSuchScope(one_line(&e.into()))
    }
    pub fn busy(e: impl Into<anyhow::Error>) -> Self {
        Error::Busy(one_line(&e.into()))
    }
    pub fn stopped(e: impl Into<anyhow::Error>) -> Self {
        Error::Stopped(one_line(&e.into()))
    }
    pub fn cannot_write(e: impl Into<anyhow::Error>) -> Self {
        Error::CannotWrite(one_line(&e.into()))
    }
}

#[cfg(test)]
mod tests {
    use anyhow::{anyhow, Context};

    use super::Error;
    use crate::exit::{code_of, one_line, Code};

    /// A kind keeps its code and its words under any context a command adds, as
    /// `coded` did.
    #[test]
    fn each_kind_keeps_its_code_and_its_line_under_context() {
        let away = Error::Broker(anyhow!("connection refused").context("cannot reach broker"));
        assert_eq!(away.to_string(), "cannot reach broker: connection refused");
        let e = Err::<(), _>(away).context("rollout lab-1").unwrap_err();
        assert_eq!(code_of(&e), Code::Unavailable);
        assert_eq!(
            one_line(&e),
            "rollout lab-1: cannot reach broker: connection refused"
        );
        for (error, code) in [
            (Error::trust(anyhow!("a").context("b")), Code::Key),
            (Error::invalid(anyhow!("x")), Code::InvalidInput),
            (Error::unreadable(anyhow!("x")), Code::NoInput),
            (Error::usage(anyhow!("x")), Code::Usage),
            (Error::no_such_scope(anyhow!("x")), Code::NoSuchScope),
            (Error::WouldRefuse("x".into()), Code::WouldRefuse),
            (Error::busy(anyhow!("x")), Code::Busy),
            (Error::stopped(anyhow!("x")), Code::Failure),
            (Error::cannot_write(anyhow!("x")), Code::CannotWrite),
        ] {
            assert_eq!(code_of(&error.into()), code);
        }
        assert_eq!(Error::trust(anyhow!("a").context("b")).to_string(), "b: a");
    }
}
