//! Dates and durations as policies write them.

use time::{macros::format_description, Date, OffsetDateTime};

const DAY_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = format_description!("[year]-[month]-[day]");

/// Days since 1970-01-01 of a `YYYY-MM-DD` date.
pub fn parse_date(s: &str) -> Option<i64> {
    // `time` takes a year of any width; policies write four digits.
    if s.len() != 10 {
        return None;
    }
    let date = Date::parse(s, DAY_FORMAT).ok()?;
    Some((date - Date::from_julian_day(UNIX_EPOCH_JULIAN_DAY).ok()?).whole_days())
}

/// The Julian day of 1970-01-01.
const UNIX_EPOCH_JULIAN_DAY: i32 = 2_440_588;

/// `YYYY-MM-DD` of a day number.
pub fn format_date(days: i64) -> String {
    let date = i32::try_from(days).ok().and_then(|d| Date::from_julian_day(UNIX_EPOCH_JULIAN_DAY + d).ok());
    match date.and_then(|d| d.format(DAY_FORMAT).ok()) {
        Some(s) => s,
        None => format!("day {days}"),
    }
}

/// Today (UTC) as days since 1970-01-01.
pub fn today() -> i64 {
    (OffsetDateTime::now_utc().date().to_julian_day() - UNIX_EPOCH_JULIAN_DAY) as i64
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
