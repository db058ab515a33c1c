//! The clocks smtpguard keeps time by: the datapath's (`bpf_ktime_get_coarse_ns`,
//! which userspace reads as `CLOCK_MONOTONIC_COARSE`) for map state such as
//! ban expiries, and the wall clock (UTC, RFC 3339) for what people read.

use time::{macros::format_description, OffsetDateTime};

/// The datapath's clock now, in ns.
pub fn ktime_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time of a datapath clock reading.
pub fn wall_time_of(ktime_ns: u64) -> OffsetDateTime {
    let age = ktime_now_ns().saturating_sub(ktime_ns);
    OffsetDateTime::now_utc() - time::Duration::nanoseconds(age as i64)
}

/// RFC 3339 UTC, to the millisecond: `2026-12-06T23:22:56.123Z`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let format = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    let t = t.to_offset(time::UtcOffset::UTC);
    t.format(format).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Now, as [`rfc3339`] writes it.
pub fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// A Unix time in seconds, as [`rfc3339`] writes it.
pub fn rfc3339_of_unix(seconds: u64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds as i64).map(rfc3339).unwrap_or_else(|_| seconds.to_string())
}

/// Unix time now, in seconds (metrics' timestamps).
pub fn unix_now_s() -> f64 {
    OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_to_the_millisecond() {
        let t = time::macros::datetime!(2026-12-06 23:22:56.123456789 UTC);
        assert_eq!(rfc3339(t), "2026-12-06T23:22:56.123Z");
        let t = time::macros::datetime!(2026-01-02 03:04:05 +02:00);
        assert_eq!(rfc3339(t), "2026-01-02T01:04:05.000Z");
    }
}
