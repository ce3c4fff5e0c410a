//! RFC 3339 times and `--since` arguments, without a date library: the event log writes UTC
//! (`2024-05-01T03:00:00.123Z`) and reads back any offset.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm, the inverse of the one in
/// `events::now_rfc3339`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Milliseconds since the epoch of an RFC 3339 time (`Z` or `±HH:MM`, optional fraction).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut ms = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        ms = padded.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[3..4], ":") => {
            let sign = match &rest[..1] {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            sign * (oh * 60 + om)
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset_min * 60;
    Some(secs * 1000 + ms)
}

/// A duration for `--since`: `90s`, `10m`, `2h`, `1d` (and `ms`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    if let Some(days) = s.strip_suffix('d') {
        let n: u64 = days.parse().ok()?;
        return n.checked_mul(86400).map(Duration::from_secs);
    }
    guardrail_policy::parse_duration(s)
}

/// An RFC 3339 UTC time with milliseconds from ms since the epoch.
pub fn format_rfc3339(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `--since` as a point in time (ms since the epoch): a duration back from now, or a time.
pub fn parse_since(s: &str, now_ms: i64) -> Option<i64> {
    if let Some(d) = parse_duration(s) {
        return Some(now_ms - d.as_millis() as i64);
    }
    parse_rfc3339(s)
}

/// Wall-clock now as the event log writes it (RFC 3339, UTC, milliseconds).
pub fn now_rfc3339() -> String {
    format_rfc3339(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_the_writer() {
        let now = crate::incident::now_rfc3339();
        let ms = parse_rfc3339(&now).expect("parses its own output");
        assert!((ms - now_ms()).abs() < 5_000, "{now} is about now");
    }

    #[test]
    fn rfc3339_known_values_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:00:00.5Z"),
            Some(1_709_208_000_500)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T14:00:00+02:00"),
            parse_rfc3339("2024-02-29T12:00:00Z")
        );
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn format_and_parse_agree() {
        for ms in [0, 951_782_400_123, 1_709_208_000_500, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Some(ms));
        }
        assert_eq!(
            format_rfc3339(1_709_208_000_500),
            "2024-02-29T12:00:00.500Z"
        );
    }

    #[test]
    fn since_accepts_durations_and_times() {
        let now = 1_000_000_000;
        assert_eq!(parse_since("10m", now), Some(now - 600_000));
        assert_eq!(parse_since("1d", now), Some(now - 86_400_000));
        assert_eq!(parse_since("1970-01-01T00:00:01Z", now), Some(1000));
        assert_eq!(parse_since("soon", now), None);
    }
}
