//! What kilnd reads about processes and the device from /proc (and statvfs), for
//! start-up reports and periodic stats. Each reader returns `None` where the kernel
//! does not say, so a missing file never stops supervision.

use std::path::Path;

/// Resident memory of `pid` (VmRSS), from `statm`: one short line the kernel
/// writes in a fraction of the time `status` takes, which matters on a worker's
/// start, where the supervisor reads it.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(pages * page / 1024)
}

/// kilnd's own resident memory.
pub fn own_rss_kib() -> Option<u64> {
    status_kib("/proc/self/status", "VmRSS:")
}

/// CPU time (user + system) `pid` has used so far.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11); // utime is field 14 overall
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000 / hz)
}

pub fn uptime_s() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(secs as u64)
}

/// One-minute load average, times 1000.
pub fn load_milli() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let load: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((load * 1000.0) as u32)
}

pub fn mem_available_kib() -> Option<u64> {
    status_kib("/proc/meminfo", "MemAvailable:")
}

/// Space unprivileged processes may still use on the file system holding `path`.
pub fn disk_free_kib(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64 / 1024)
}

fn status_kib(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_this_machine() {
        let me = std::process::id();
        let (rss, status) = (rss_kib(me).unwrap(), own_rss_kib().unwrap());
        assert!(rss > 0);
        // The same figure as status's VmRSS, give or take what moved in between.
        assert!(
            rss.abs_diff(status) < 4096,
            "statm {rss} KiB, status {status} KiB"
        );
        // Burn a little CPU so the count is not zero at coarse tick rates.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed().as_millis() < 30 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(cpu_us(me).unwrap() > 0);
        assert!(uptime_s().unwrap() > 0);
        assert!(mem_available_kib().unwrap() > 0);
        assert!(disk_free_kib(Path::new("/")).unwrap() > 0);
        assert!(load_milli().is_some());
        assert!(rss_kib(u32::MAX).is_none());
    }
}
