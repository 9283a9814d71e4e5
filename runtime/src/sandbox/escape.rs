//! Test builds only (feature `test-hooks`, never in the shipped kilnd): a confined
//! worker that finds `KILND_TEST_ESCAPE=DIR,PORT` in its environment tries, as a
//! module that got code execution in its worker would, each thing the confinement
//! must stop, and reports each outcome as a log record (`escape WHAT: blocked (WHY)`
//! or `escape WHAT: ALLOWED`). `DIR` stands for a device: `DIR/kilnd.toml` and a data
//! dir `DIR/data` with `identity.key`, `state` and a slot `modules/m/a.kiln`; `PORT` is
//! a TCP listener on 127.0.0.1.

use std::ffi::CString;
use std::io;

use kiln_protocol::abi::Level;
use kiln_protocol::worker::{LogSource, Reply};

use crate::sandbox::abi::Emit;
use crate::sandbox::confine::Report;

/// The variable that asks for the attempts.
pub const VAR: &str = "KILND_TEST_ESCAPE";

/// Makes every attempt if [`VAR`] is set; `parent` is the worker's parent (read before
/// confinement: `getppid` is not among a confined worker's syscalls). Without seccomp
/// (under qemu-user, which refuses filters) `execve` is not tried: it would succeed
/// and replace the worker.
pub fn attempt_if_asked(parent: u32, confined: &Report, emit: &Emit) {
    let Ok(value) = std::env::var(VAR) else {
        return;
    };
    let Some((dir, port)) = value.rsplit_once(',') else {
        return;
    };
    let port: u16 = port.parse().unwrap_or(0);
    let data = format!("{dir}/data");
    let seccomp = confined.layers.iter().any(|l| l.name == "seccomp" && l.on);
    let attempts: Vec<(String, Result<(), String>)> = vec![
        (
            "read kilnd.toml".into(),
            open(&format!("{dir}/kilnd.toml"), libc::O_RDONLY),
        ),
        (
            "read identity.key".into(),
            open(&format!("{data}/identity.key"), libc::O_RDONLY),
        ),
        (
            "read state".into(),
            open(&format!("{data}/state"), libc::O_RDONLY),
        ),
        (
            "write slot".into(),
            open(
                &format!("{data}/modules/m/a.kiln"),
                libc::O_WRONLY | libc::O_TRUNC,
            ),
        ),
        (
            "plant root".into(),
            open(
                &format!("{data}/root"),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            ),
        ),
        ("connect tcp".into(), connect(port)),
        ("signal parent".into(), signal(parent)),
        ("fork".into(), fork()),
        ("ptrace parent".into(), ptrace(parent)),
        ("execve".into(), if seccomp { execve() } else { Ok(()) }),
    ];
    for (what, outcome) in attempts {
        let line = match outcome {
            Ok(()) if what == "execve" && !seccomp => {
                format!("escape {what}: ALLOWED (not tried: it would replace the worker)")
            }
            Ok(()) => format!("escape {what}: ALLOWED"),
            Err(why) => format!("escape {what}: blocked ({why})"),
        };
        emit(Reply::Log {
            level: Level::Warn,
            source: LogSource::Abi,
            line,
        });
    }
}

fn last() -> String {
    io::Error::last_os_error().to_string()
}

fn open(path: &str, flags: libc::c_int) -> Result<(), String> {
    let path = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: open with a valid NUL-terminated path; the fd is closed at once.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: closing the fd just opened.
    unsafe { libc::close(fd) };
    Ok(())
}

fn connect(port: u16) -> Result<(), String> {
    std::net::TcpStream::connect(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| e.to_string())
}

fn signal(parent: u32) -> Result<(), String> {
    // SIGCONT: harmless should it get through, and it tells.
    // SAFETY: kill with a pid and a signal number.
    if unsafe { libc::kill(parent as libc::pid_t, libc::SIGCONT) } != 0 {
        return Err(last());
    }
    Ok(())
}

fn fork() -> Result<(), String> {
    // SAFETY: the child does nothing but _exit.
    match unsafe { libc::fork() } {
        -1 => Err(last()),
        0 => unsafe { libc::_exit(0) },
        pid => {
            // SAFETY: reaping the child just forked.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            Ok(())
        }
    }
}

fn ptrace(parent: u32) -> Result<(), String> {
    // SAFETY: PTRACE_ATTACH takes a pid and null pointers.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            parent as libc::pid_t,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r != 0 {
        return Err(last());
    }
    // SAFETY: detach from the process just attached.
    unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            parent as libc::pid_t,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    Ok(())
}

fn execve() -> Result<(), String> {
    let sh = c"/bin/true";
    let argv = [sh.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: valid NUL-terminated arrays; on success this process is replaced, which
    // the test sees as a worker that never becomes ready.
    unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(last())
}
