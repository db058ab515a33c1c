//! Dates and durations as policies write them.

/// Days since 1970-01-01 of a `YYYY-MM-DD` date.
pub fn parse_date(s: &str) -> Option<i64> {
    let mut parts = s.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's days_from_civil.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a day number.
pub fn format_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Today (UTC) as days since 1970-01-01.
pub fn today() -> i64 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    (secs / 86_400) as i64
}

/// Seconds of a duration such as `30s`, `15m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The longest manual ban `smtpguard ban --for` takes: a year. Longer bans
/// are a policy's deny list's job, not an operator's.
pub const MAX_MANUAL_BAN_S: u64 = 365 * 86_400;

/// The length of a manual ban (`smtpguard ban --for`): a duration such as
/// `30s`, `15m`, `2h`, `7d`, positive and at most [`MAX_MANUAL_BAN_S`].
/// The error says what is wrong in words an operator can act on.
pub fn parse_ban_duration(s: &str) -> Result<std::time::Duration, String> {
    const EXAMPLES: &str = "such as 30s, 15m, 2h, 7d";
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("`{s}`: durations are positive, {EXAMPLES}"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => 0,
    };
    if num.is_empty() || mult == 0 {
        return Err(format!("`{s}` is not a duration; write a number and s, m, h or d, {EXAMPLES}"));
    }
    // All digits: a number too large for u64 is too long a ban too.
    let secs = num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).unwrap_or(u64::MAX);
    if secs == 0 {
        return Err(format!("`{s}`: a ban must last a while, {EXAMPLES}"));
    }
    if secs > MAX_MANUAL_BAN_S {
        return Err(format!("`{s}` is longer than the longest manual ban, 365d; ban for up to 365d (and again when it ends), or deny the source in the policy"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        for s in ["1970-01-01", "2000-02-29", "2027-03-31", "2100-12-31"] {
            assert_eq!(format_date(parse_date(s).unwrap()), s);
        }
        assert_eq!(parse_date("1970-01-02"), Some(1));
        for bad in ["2027-02-29", "2027-13-01", "27-03-31", "2027-3-31", "tomorrow"] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Some(900));
        assert_eq!(parse_duration("24h"), Some(86_400));
        assert_eq!(parse_duration("90"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5w"), None);
    }

    #[test]
    fn ban_durations_are_positive_and_at_most_a_year() {
        assert_eq!(parse_ban_duration("15m"), Ok(std::time::Duration::from_secs(900)));
        assert_eq!(parse_ban_duration("365d"), Ok(std::time::Duration::from_secs(MAX_MANUAL_BAN_S)));
        assert!(parse_ban_duration("-5m").unwrap_err().contains("durations are positive, such as 30s"));
        assert!(parse_ban_duration("0s").unwrap_err().contains("must last"));
        assert!(parse_ban_duration("0d").unwrap_err().contains("must last"));
        for long in ["366d", "213504d", "18446744074s", "99999999999999999999999d", "31536001s"] {
            assert!(parse_ban_duration(long).unwrap_err().contains("longest manual ban, 365d"), "{long}");
        }
        for bad in ["", "m", "5w", "1.5h", "5 m", "h5"] {
            assert!(parse_ban_duration(bad).unwrap_err().contains("is not a duration"), "{bad}");
        }
    }
}
