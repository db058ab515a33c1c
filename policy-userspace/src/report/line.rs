//! Event lines read leniently, in bounded memory.
//!
//! A line is the bytes up to `\n`, read into one reused buffer; past
//! [`MAX_LINE`] the rest of it is skipped (and counted), so a file without
//! newlines cannot make the reader grow. Fields are borrowed from that
//! buffer and every one is optional: a line of a kind this version does not
//! know, or with fields it does not know, is read as far as it goes instead
//! of refused. The names are those of [`crate::events::Event`].

use std::{
    borrow::Cow,
    io::{self, BufRead},
};

use serde::{Deserialize, Deserializer};

/// The longest line read; event lines are a few hundred bytes (a rejected
/// reload's errors a few KiB).
pub const MAX_LINE: usize = 64 * 1024;

/// What [`next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A line is in the buffer (without its `\n`).
    Line,
    /// A line longer than [`MAX_LINE`] was skipped; the buffer is empty.
    TooLong,
    /// The end of the input.
    End,
}

/// Reads the next line into `buf` (cleared first), at most [`MAX_LINE`]
/// bytes of it. A last line without `\n` is a line.
pub fn next_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Next> {
    buf.clear();
    let mut any = false;
    let mut too_long = false;
    loop {
        let available = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Next::End,
                (true, false) => Next::Line,
                (true, true) => Next::TooLong,
            });
        }
        any = true;
        let (take, end) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, Some(i + 1)),
            None => (available.len(), None),
        };
        if !too_long {
            if buf.len() + take <= MAX_LINE {
                buf.extend_from_slice(&available[..take]);
            } else {
                too_long = true;
                buf.clear();
            }
        }
        match end {
            Some(n) => {
                r.consume(n);
                return Ok(if too_long { Next::TooLong } else { Next::Line });
            }
            None => {
                let n = available.len();
                r.consume(n);
            }
        }
    }
}

/// A string field, borrowed from the line unless it has escapes.
#[derive(Debug, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

/// Bytes of a string field kept (then `…`): what the report holds per
/// field is bounded whatever a line carries.
pub const MAX_TEXT: usize = 256;

impl<'a> Text<'a> {
    pub fn clipped(v: Cow<'a, str>) -> Self {
        if v.len() <= MAX_TEXT {
            return Text(v);
        }
        let mut end = MAX_TEXT;
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        Text(Cow::Owned(format!("{}…", &v[..end])))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text::clipped(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text::clipped(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text::clipped(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visitor(std::marker::PhantomData))
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// The fields of an event line the report reads, of every kind at once
/// (serde ignores the others).
#[derive(Debug, Default, Deserialize)]
pub struct Fields<'a> {
    #[serde(borrow)]
    pub event: Text<'a>,
    #[serde(borrow, default)]
    pub time: Option<Text<'a>>,
    // Datapath events (`Packet`).
    #[serde(borrow, default)]
    pub direction: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub src: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub reason: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub verdict: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub country: Option<Text<'a>>,
    // ban_added, manual_ban.
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default)]
    pub duration_s: Option<u64>,
    #[serde(default)]
    pub strikes: Option<u64>,
    #[serde(borrow, default)]
    pub source: Option<Text<'a>>,
    // tenant_suspect, uplink_missing.
    #[serde(borrow, default)]
    pub interface: Option<Text<'a>>,
    #[serde(default)]
    pub blocked: Option<u64>,
    #[serde(default)]
    pub window_s: Option<u64>,
    #[serde(default)]
    pub quarantine_s: Option<u64>,
    // bypass.
    #[serde(borrow, default)]
    pub state: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub by: Option<Text<'a>>,
    // policy_reload.
    #[serde(borrow, default)]
    pub result: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub trigger: Option<Text<'a>>,
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(default)]
    pub entries: Option<u64>,
    #[serde(borrow, default)]
    pub errors: Vec<Text<'a>>,
    #[serde(default)]
    pub more_errors: Option<u64>,
    #[serde(borrow, default)]
    pub policy: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub sha256: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub changed_by: Option<Text<'a>>,
    // enforce_scheduled.
    #[serde(borrow, default)]
    pub enforce_from: Option<Text<'a>>,
    #[serde(default)]
    pub hours_left: Option<f64>,
    // rollback.
    #[serde(default)]
    pub known_good: Option<u64>,
    #[serde(default)]
    pub to_generation: Option<u64>,
    #[serde(borrow, default)]
    pub restored: Vec<Text<'a>>,
    #[serde(borrow, default)]
    pub error: Option<Text<'a>>,
}

impl Default for Text<'_> {
    fn default() -> Self {
        Text(Cow::Borrowed(""))
    }
}

/// Milliseconds since 1970 of an RFC 3339 time. The events' own form,
/// `2026-12-06T23:22:56.123Z`, is read without allocating; any other
/// (an offset, a lower-case `t`) through the `time` crate.
pub fn parse_time_ms(s: &str) -> Option<i64> {
    fast_utc_ms(s.as_bytes()).or_else(|| {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
fn fast_utc_ms(b: &[u8]) -> Option<i64> {
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || *b.last()? != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        b[range].iter().try_fold(0i64, |n, &c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 60 || (second == 60 && (hour, minute) != (23, 59)) {
        return None;
    }
    let millis = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', digits @ ..] if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) => {
            let mut ms = 0i64;
            for i in 0..3 {
                ms = ms * 10 + digits.get(i).map_or(0, |d| i64::from(d - b'0'));
            }
            ms
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, Cursor};

    use super::*;

    fn lines(input: &[u8], capacity: usize) -> Vec<(Next, Vec<u8>)> {
        let mut r = BufReader::with_capacity(capacity, Cursor::new(input.to_vec()));
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let n = next_line(&mut r, &mut buf).unwrap();
            if n == Next::End {
                return out;
            }
            out.push((n, buf.clone()));
        }
    }

    #[test]
    fn lines_are_split_at_newlines_and_overlong_ones_skipped() {
        let long = vec![b'x'; MAX_LINE + 1];
        let mut input = b"a\n\nbc\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nlast");
        for capacity in [1, 7, 1 << 16] {
            let got = lines(&input, capacity);
            let want = vec![
                (Next::Line, b"a".to_vec()),
                (Next::Line, vec![]),
                (Next::Line, b"bc".to_vec()),
                (Next::TooLong, vec![]),
                (Next::Line, b"last".to_vec()),
            ];
            assert_eq!(got, want, "buffer capacity {capacity}");
        }
        let exact = vec![b'y'; MAX_LINE];
        assert_eq!(lines(&exact, 4096), vec![(Next::Line, exact.clone())], "a line of exactly MAX_LINE is read");
        assert_eq!(lines(&long, 4096), vec![(Next::TooLong, vec![])], "an overlong last line without a newline");
    }

    #[test]
    fn times_read_fast_agree_with_the_time_crate() {
        for s in [
            "1970-01-01T00:00:00Z",
            "2026-12-06T23:22:56.123Z",
            "2024-02-29T12:00:00.5Z",
            "2000-03-01T00:00:00.999999Z",
            "1969-12-31T23:59:59.000Z",
            "2100-12-31T23:59:59Z",
        ] {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap();
            let want = (t.unix_timestamp_nanos() / 1_000_000) as i64;
            assert_eq!(fast_utc_ms(s.as_bytes()), Some(want), "{s}");
        }
        assert_eq!(parse_time_ms("2026-12-07T01:22:56.123+02:00"), parse_time_ms("2026-12-06T23:22:56.123Z"), "offsets through the time crate");
        for bad in ["2026-02-30T00:00:00Z", "2026-13-01T00:00:00Z", "2026-12-06T23:22:56", "yesterday", "2026-12-06T23:22:56.Z", ""] {
            assert_eq!(parse_time_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn fields_borrow_from_the_line_and_ignore_what_they_do_not_know() {
        let line = br#"{"event":"drop_sample","time":"2026-12-06T00:00:00.000Z","src":"203.0.113.66","reason":"rate_ban","verdict":"drop","new_field":{"x":[1,2]},"port":25}"#;
        let f: Fields = serde_json::from_slice(line).unwrap();
        assert_eq!(&*f.event, "drop_sample");
        assert!(matches!(f.src.as_ref().unwrap().0, Cow::Borrowed("203.0.113.66")));
        assert_eq!(f.reason.as_deref(), Some("rate_ban"));
        let escaped: Fields = serde_json::from_slice(br#"{"event":"manual_ban","reason":"say \"hi\""}"#).unwrap();
        assert_eq!(escaped.reason.as_deref(), Some("say \"hi\""));
        let null: Fields = serde_json::from_slice(br#"{"event":"drop_sample","country":null}"#).unwrap();
        assert_eq!(null.country, None);
    }
}
