//! The one table of exit codes `kiln` and `kilnd` end with, so that a number means one
//! thing whichever binary printed it. Each binary keeps its own `Code` enum of the codes
//! it uses (`kiln_compiler::exit`, `kiln_runtime::exit`), whose values are taken from
//! here; docs/src/exit-codes.md holds [`markdown_table`]'s output (a test compares).
//!
//! `kilnd run` passes a module's own WASI exit code through (0-255): those numbers are
//! the module's, not kilnd's, and are not in this table.

/// Which binary ends with a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsedBy {
    Kiln,
    Kilnd,
    Both,
}

impl UsedBy {
    pub fn name(self) -> &'static str {
        match self {
            UsedBy::Kiln => "kiln",
            UsedBy::Kilnd => "kilnd",
            UsedBy::Both => "kiln, kilnd",
        }
    }

    pub fn kiln(self) -> bool {
        matches!(self, UsedBy::Kiln | UsedBy::Both)
    }

    pub fn kilnd(self) -> bool {
        matches!(self, UsedBy::Kilnd | UsedBy::Both)
    }
}

/// Every exit code either binary ends with (besides 0 and a module's own code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Failure = 1,
    Usage = 2,
    InvalidInput = 65,
    NoInput = 66,
    NoSuchScope = 68,
    Unavailable = 69,
    Internal = 70,
    Unreadable = 71,
    NotArtifact = 72,
    CannotWrite = 73,
    UnsupportedFormat = 74,
    Busy = 75,
    Refused = 76,
    Key = 77,
    WouldRefuse = 78,
    LoadFailed = 79,
    Trap = 80,
    Config = 81,
    ModuleFailed = 82,
    Corrupt = 83,
    Untrusted = 84,
    WrongTarget = 85,
    MissingCpuFeature = 86,
    IncompatibleEngine = 87,
}

/// One row of the table: a code, its name, which binary uses it and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub code: Code,
    pub name: &'static str,
    pub used_by: UsedBy,
    pub meaning: &'static str,
}

const fn entry(code: Code, name: &'static str, used_by: UsedBy, meaning: &'static str) -> Entry {
    Entry {
        code,
        name,
        used_by,
        meaning,
    }
}

/// The table, in order of the number.
pub const TABLE: &[Entry] = &[
    entry(
        Code::Failure,
        "Failure",
        UsedBy::Kiln,
        "other failure; `kiln conformance`: a failure the expectations file does not list; \
         `kiln rollout`: halted (or aborted); `kiln push --wait`: a device did not run the new \
         version within `--wait-timeout`",
    ),
    entry(
        Code::Usage,
        "Usage",
        UsedBy::Both,
        "bad command line; `kiln`: an unknown target, a device, group or module name that \
         fails the name check, `dashboard --listen` off loopback without `--allow-remote`",
    ),
    entry(
        Code::InvalidInput,
        "InvalidInput",
        UsedBy::Kiln,
        "invalid input: bad WebAssembly, an artifact that fails `inspect --trust`, a truncated \
         or corrupted artifact (`inspect`, with or without `--trust`); `conformance`: a kilnd \
         built without the replayer; `provision`: a malformed line of `--devices`, a `--ca` \
         that is no certificate",
    ),
    entry(Code::NoInput, "NoInput", UsedBy::Kiln, "input file missing"),
    entry(
        Code::NoSuchScope,
        "NoSuchScope",
        UsedBy::Kiln,
        "`push`, `rollout`: no device with that id has been seen, or no status names the group \
         (`--force` publishes anyway), or `rollout --where` selects none of the group's members; \
         `remove`: the state does not hold the module; \
         `decommission`: nothing retained and not enrolled",
    ),
    entry(
        Code::Unavailable,
        "Unavailable",
        UsedBy::Kiln,
        "`push`, `devices`, `watch`: the MQTT broker cannot be reached, refused a subscription \
         (its ACL, or overloaded), or the peer is not an MQTT broker",
    ),
    entry(Code::Internal, "Internal", UsedBy::Kilnd, "internal error"),
    entry(
        Code::Unreadable,
        "Unreadable",
        UsedBy::Kilnd,
        "an artifact, key or directory cannot be read; `kilnd provision`: a file of the \
         bundle is missing, unreadable or larger than its bound",
    ),
    entry(
        Code::NotArtifact,
        "NotArtifact",
        UsedBy::Kilnd,
        "not a kiln artifact: empty file, a plain `.wasm`, wrong magic",
    ),
    entry(
        Code::CannotWrite,
        "CannotWrite",
        UsedBy::Both,
        "output cannot be written (or a key file already exists, or `keygen` without \
         `--no-root` into a directory that holds a root document; `dashboard`: the address \
         cannot be listened on; `provision`: a device folder exists, without `--force`); \
         `kilnd provision`: the config directory cannot be written, or the bundle cannot be \
         deleted after the install",
    ),
    entry(
        Code::UnsupportedFormat,
        "UnsupportedFormat",
        UsedBy::Kilnd,
        "envelope format newer than this kilnd",
    ),
    entry(
        Code::Busy,
        "Busy",
        UsedBy::Kiln,
        "`decommission`: the device is online (without `--force`); `rollout`: another rollout \
         is running or paused on the group (named), or the rollout is not in a phase the \
         command applies to",
    ),
    entry(
        Code::Refused,
        "Refused",
        UsedBy::Kiln,
        "`push`: an online device refused the new desired state, or with `--wait` failed the \
         new version (the line names the device and its reason)",
    ),
    entry(
        Code::Key,
        "Key",
        UsedBy::Kiln,
        "signing key missing, malformed, untrusted or readable by others; `provision`: \
         `--root` is a secret key or not a valid root document",
    ),
    entry(
        Code::WouldRefuse,
        "WouldRefuse",
        UsedBy::Kiln,
        "`push`, `rollout`: the devices would refuse the update, known before publishing \
         (another target, a lower version, `--fuel-per-call` on an unmetered artifact, a module \
         that is neither a WASI command nor a reactor); nothing was published",
    ),
    entry(
        Code::LoadFailed,
        "LoadFailed",
        UsedBy::Kilnd,
        "verified but cannot be linked (e.g. an import kilnd does not provide)",
    ),
    entry(
        Code::Trap,
        "Trap",
        UsedBy::Kilnd,
        "the module trapped (unreachable, out of bounds, stack overflow, fuel exhausted, ...)",
    ),
    entry(
        Code::Config,
        "Config",
        UsedBy::Kilnd,
        "`kilnd serve`, `kilnd check`: the config is unreadable or invalid (file and line \
         named); `kilnd provision`: the bundle's kilnd.toml is invalid or names a file the \
         bundle does not hold",
    ),
    entry(
        Code::ModuleFailed,
        "ModuleFailed",
        UsedBy::Kilnd,
        "`kilnd serve`: every module ended and at least one was marked failed",
    ),
    entry(
        Code::Corrupt,
        "Corrupt",
        UsedBy::Kilnd,
        "a modified or truncated artifact: bad signature, payload hash or length",
    ),
    entry(
        Code::Untrusted,
        "Untrusted",
        UsedBy::Kilnd,
        "signed by a key that is not trusted, or an invalid trust key file; `kilnd provision`: \
         the bundle's trust directory holds no root document or key, or one that does not \
         verify",
    ),
    entry(
        Code::WrongTarget,
        "WrongTarget",
        UsedBy::Kilnd,
        "built for another target (the message names both)",
    ),
    entry(
        Code::MissingCpuFeature,
        "MissingCpuFeature",
        UsedBy::Kilnd,
        "needs a CPU feature this machine lacks (the message lists them)",
    ),
    entry(
        Code::IncompatibleEngine,
        "IncompatibleEngine",
        UsedBy::Kilnd,
        "serialized by another wasmer version, or needs a newer kiln ABI",
    ),
];

impl Code {
    /// This code's row of [`TABLE`].
    pub fn entry(self) -> &'static Entry {
        TABLE.iter().find(|e| e.code == self).unwrap_or(&TABLE[0])
    }

    /// The code with this number, if either binary uses it.
    pub fn from_number(n: u8) -> Option<Code> {
        TABLE.iter().find(|e| e.code as u8 == n).map(|e| e.code)
    }
}

/// The table as docs/src/exit-codes.md shows it.
pub fn markdown_table() -> String {
    let mut out = String::from("| code | name | binary | meaning |\n|---|---|---|---|\n");
    for e in TABLE {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            e.code as u8,
            e.name,
            e.used_by.name(),
            e.meaning
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_means_one_thing() {
        for (i, e) in TABLE.iter().enumerate() {
            assert_eq!(format!("{:?}", e.code), e.name);
            assert_eq!(e.code.entry(), e);
            assert_eq!(Code::from_number(e.code as u8), Some(e.code));
            assert!(
                !e.meaning.contains('\n') && !e.meaning.contains("  "),
                "{}",
                e.name
            );
            if let Some(next) = TABLE.get(i + 1) {
                assert!(
                    (e.code as u8) < next.code as u8,
                    "{} is out of order",
                    next.name
                );
            }
        }
        assert_eq!(Code::from_number(0), None);
    }

    /// docs/src/exit-codes.md shows the table this file defines, row for row.
    #[test]
    fn the_docs_show_this_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/src/exit-codes.md");
        let docs = std::fs::read_to_string(path).expect("docs/src/exit-codes.md");
        let rows: Vec<(u8, &str, &str, &str)> = docs
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line
                    .strip_prefix('|')?
                    .strip_suffix('|')?
                    .split(" | ")
                    .map(str::trim)
                    .collect();
                match cells.as_slice() {
                    [code, name, binary, meaning] => {
                        Some((code.parse().ok()?, *name, *binary, *meaning))
                    }
                    _ => None,
                }
            })
            .collect();
        let want: Vec<(u8, &str, &str, &str)> = TABLE
            .iter()
            .map(|e| (e.code as u8, e.name, e.used_by.name(), e.meaning))
            .collect();
        assert_eq!(
            rows,
            want,
            "docs/src/exit-codes.md disagrees with protocol/src/exit.rs; its table should be:\n{}",
            markdown_table()
        );
    }
}
