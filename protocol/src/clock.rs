//! The one wall clock kiln and kilnd read: milliseconds since the Unix epoch, as every
//! timestamp on the wire (records, statuses, serials, rollouts) carries it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the clock is set before it.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Text that is not a UTC time [`parse_utc`] reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a UTC time like 2026-11-30T08:00:00Z")]
pub struct NotUtc(pub String);

impl From<NotUtc> for String {
    fn from(e: NotUtc) -> Self {
        e.to_string()
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC only) as Unix milliseconds.
pub fn parse_utc(text: &str) -> Result<u64, NotUtc> {
    let bad = || NotUtc(text.into());
    let b = text.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, NotUtc> {
        text[r].parse::<u32>().map(i64::from).map_err(|_| bad())
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || hh > 23
        || mm > 59
        || ss > 59
    {
        return Err(bad());
    }
    // Days-from-civil (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) as u64;
    if utc(ms) != text {
        return Err(bad()); // a day the month does not have
    }
    Ok(ms)
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ`, for messages.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (proleptic Gregorian), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_both_ways() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(parse_utc("2000-02-29T00:00:00Z"), Ok(951_782_400_000));
        assert_eq!(parse_utc(&utc(1_764_489_600_000)), Ok(1_764_489_600_000));
        assert!(parse_utc("2001-02-29T00:00:00Z").is_err());
        assert!(parse_utc("2026-11-30 08:00:00").is_err());
    }

    #[test]
    fn after_2020() {
        assert!(now_ms() > 1_577_836_800_000);
    }
}
