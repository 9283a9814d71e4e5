//! When a wave may start (a window of the UTC day), and which devices a sampled wave
//! takes (a draw every operator's copy of the record makes alike).

use crate::transfer::sha256;

/// Minutes in a day: a window's minutes are below it.
pub const DAY_MINUTES: u16 = 1440;
const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = DAY_MINUTES as u64 * MINUTE_MS;

/// Refuses a window that is empty or names a minute past the day's last.
pub(super) fn check_window((start, end): (u16, u16)) -> Result<(), String> {
    if start >= DAY_MINUTES || end >= DAY_MINUTES {
        return Err(format!(
            "window {start}..{end}: minutes of the day run from 0 to {}",
            DAY_MINUTES - 1
        ));
    }
    if start == end {
        return Err(format!("window {start}..{end} is empty"));
    }
    Ok(())
}

/// Whether `now_ms` (since the Unix epoch) is within `window`: from its start minute
/// of the UTC day until its end minute (not included), across midnight when the
/// start is after the end.
pub fn in_window((start, end): (u16, u16), now_ms: u64) -> bool {
    let minute = ((now_ms % DAY_MS) / MINUTE_MS) as u16;
    if start <= end {
        (start..end).contains(&minute)
    } else {
        minute >= start || minute < end
    }
}

/// The first moment from `now_ms` within `window`.
pub fn next_open(window: (u16, u16), now_ms: u64) -> u64 {
    if in_window(window, now_ms) {
        return now_ms;
    }
    let day = now_ms - now_ms % DAY_MS;
    let open = day + u64::from(window.0) * MINUTE_MS;
    match open > now_ms {
        true => open,
        false => open + DAY_MS,
    }
}

/// A seed from the rollout's id and its devices.
pub(super) fn seed<'a>(id: &str, devices: impl Iterator<Item = &'a String>) -> u64 {
    let mut text = id.to_string();
    for d in devices {
        text.push('\0');
        text.push_str(d);
    }
    let hash = sha256(text.as_bytes());
    u64::from_le_bytes(hash[..8].try_into().unwrap_or_default())
}

/// `percent` of `total` devices, rounded up, at least one.
pub(super) fn sample_size(percent: u8, total: usize) -> usize {
    (total * usize::from(percent)).div_ceil(100).max(1)
}

/// `n` of `pool`, each ranked by a hash of the seed, the wave and its name: the same
/// seed draws the same devices; the draw keeps the pool's order.
pub(super) fn draw(seed: u64, wave: u32, pool: &[String], n: usize) -> Vec<String> {
    let rank = |d: &String| {
        let mut bytes = seed.to_le_bytes().to_vec();
        bytes.extend(wave.to_le_bytes());
        bytes.extend(d.as_bytes());
        sha256(&bytes)
    };
    let mut ranked: Vec<([u8; 32], usize)> =
        pool.iter().enumerate().map(|(i, d)| (rank(d), i)).collect();
    ranked.sort();
    let mut chosen: Vec<usize> = ranked.into_iter().take(n).map(|(_, i)| i).collect();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| pool[i].clone()).collect()
}
