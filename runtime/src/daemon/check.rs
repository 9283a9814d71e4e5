//! `kilnd check`: would `kilnd serve` start with this config? It loads the config as
//! `serve` does, reads the trusted keys, verifies and loads every artifact the config
//! names, asks of each module what its worker would (`worker::admit`), and checks that
//! the broker's TLS files read and that the data dir can be written, and says which
//! confinement layers this kernel gives workers. Nothing runs and nothing is written.
//! What it found goes to stdout; the first problem is the error.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::daemon::config::Config;
use crate::exit::{Code, Failure};
use crate::sandbox::confine;
use crate::sandbox::limits;
use crate::sandbox::load::{load_artifact, read_trusted_keys};
use crate::sandbox::worker::admit;

pub fn check(config_path: &Path) -> Result<i32, Failure> {
    let (config, plans) = Config::load(config_path).map_err(|e| Failure::new(Code::Config, e))?;
    crate::daemon::config::validate(&config, &plans).map_err(|e| {
        Failure::new(
            Code::Config,
            format!("config `{}`: {e}", config_path.display()),
        )
    })?;
    let trust = read_trusted_keys(&config.trust)?;
    let mut out = Vec::new();
    let ids: Vec<String> = trust.ids().iter().map(|id| id.to_string()).collect();
    let _ = writeln!(out, "trust: {} ({})", ids.len(), ids.join(", "));
    if let Some(root) = &config.root {
        let chain = crate::sandbox::load::read_root(root)?;
        let _ = writeln!(out, "root: {}", chain.root().describe());
    }
    for plan in &plans {
        let loaded = load_artifact(&plan.artifact, &trust, None, |m| {
            limits::engine(
                plan.memory_pages
                    .or(m.settings.memory_limit_pages)
                    .unwrap_or(limits::DEFAULT_MEMORY_PAGES),
            )
        })?;
        let m = &loaded.manifest;
        admit(m, plan.fuel_per_call).map_err(|f| {
            Failure::new(
                f.code,
                format!(
                    "module `{}` (`{}`): {}",
                    plan.name,
                    plan.artifact.display(),
                    f.message
                ),
            )
        })?;
        let _ = writeln!(
            out,
            "module {}: {}@{} for {}, {}, verified",
            plan.name,
            m.name,
            m.version,
            m.target.triple,
            if m.is_command() { "command" } else { "reactor" },
        );
    }
    if let Some(mqtt) = &config.mqtt {
        for file in [&mqtt.ca, &mqtt.client_cert, &mqtt.client_key]
            .into_iter()
            .flatten()
        {
            std::fs::metadata(file).map_err(|e| {
                Failure::new(
                    Code::NoInput,
                    format!("cannot read `{}`: {e}", file.display()),
                )
            })?;
        }
        let device = config.device.as_deref().unwrap_or_default();
        let _ = writeln!(out, "mqtt: {} as device {device}", mqtt.broker);
    }
    if let Some(dir) = &config.data_dir {
        writable(dir)?;
        let _ = writeln!(out, "data_dir: {}", dir.display());
    }
    // What this kernel lets each worker give up; a layer that is off is a warning, not
    // a reason to refuse the config.
    let _ = writeln!(out, "confinement: {}", confine::probe().summary());
    let _ = writeln!(out, "config {}: ok", config_path.display());
    std::io::stdout()
        .write_all(&out)
        .map_err(|e| Failure::new(Code::Internal, format!("cannot write to stdout: {e}")))?;
    Ok(0)
}

/// The data dir, or the directory it would be created in, must be writable by this
/// user (under systemd, the service's user).
fn writable(dir: &Path) -> Result<(), Failure> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !existing.is_dir() {
        return Err(Failure::new(
            Code::Config,
            format!(
                "data_dir `{}`: `{}` is not a directory",
                dir.display(),
                existing.display()
            ),
        ));
    }
    let path = CString::new(existing.as_os_str().as_bytes()).map_err(|_| {
        Failure::new(
            Code::Config,
            format!("data_dir `{}` has a NUL byte", dir.display()),
        )
    })?;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(Failure::new(
            Code::Config,
            format!(
                "data_dir `{}`: `{}` is not writable by this user: {}",
                dir.display(),
                existing.display(),
                std::io::Error::last_os_error()
            ),
        ));
    }
    Ok(())
}
