//! What the tests, the bench and the soak read about a process from /proc.

/// The parent pid of `pid` (a forked worker's is its zygote), while it lives.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces, so read after the `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The live children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| parent_of(*child) == Some(pid))
        .collect()
}

/// A field of `/proc/PID/smaps_rollup` in KiB: `Pss` (private pages plus a share of
/// the shared ones, the figure that adds up across processes) or `Private_Dirty`.
pub fn rollup_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Proportional set size in KiB.
pub fn pss_kib(pid: u32) -> Option<u64> {
    rollup_kib(pid, "Pss")
}
