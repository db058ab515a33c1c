//! `smtpguard report`: the event stream (`smtpguard run --events FILE`,
//! rotated sets as several files, `-` for stdin) summarised for an incident
//! ticket, as Markdown or one JSON object: the period covered, a timeline,
//! the notable events, top sources with their reasons and countries, bans,
//! countries, tenants with blocked outbound attempts and suspects, policy
//! reloads.
//!
//! Memory is bounded whatever the input: lines are read one at a time
//! into one buffer (`line.rs`), ranked tables are Space-Saving counters of
//! fixed capacity whose counts say when they are exact (`heavy.rs`),
//! timeline buckets widen to stay few and lists keep their earliest items
//! (`timeline.rs`). Lines that do not parse are counted, never fatal;
//! event kinds this version does not know are counted by kind and listed.

mod heavy;
mod line;
mod render;
mod summary;
mod timeline;

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

pub use summary::Report;
use summary::Summary;

/// Bytes read from a file at a time.
const READ_BUFFER: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Markdown, for a ticket.
    #[default]
    Md,
    /// One JSON object.
    Json,
}

/// Where `--since` starts: as given, and in ms since 1970.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Since {
    pub text: String,
    pub unix_ms: i64,
}

/// `--since`: a duration back from now (`30m`, `4h`, `3d`), an RFC 3339
/// time, or a date (`YYYY-MM-DD`, midnight UTC).
pub fn parse_since(s: &str) -> Result<Since, String> {
    since_at(s, time::OffsetDateTime::now_utc())
}

fn since_at(s: &str, now: time::OffsetDateTime) -> Result<Since, String> {
    let t = s.trim();
    let unix_ms = if let Some(secs) = crate::policy::time::parse_duration(t) {
        let secs = i64::try_from(secs).map_err(|_| format!("`{s}` is too long ago"))?;
        (now.unix_timestamp_nanos() / 1_000_000) as i64 - secs.saturating_mul(1000)
    } else if let Some(ms) = line::parse_time_ms(t) {
        ms
    } else if let Some(days) = crate::policy::time::parse_date(t) {
        days * 86_400_000
    } else {
        return Err(format!("`{s}`: write a duration back from now (30m, 4h, 3d) or a time (2026-12-06T08:00:00Z, 2026-12-06)"));
    };
    let text = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000).map(crate::clock::rfc3339).unwrap_or_else(|_| t.to_owned());
    Ok(Since { text, unix_ms })
}

pub struct Options {
    /// Event files in order; `-` is stdin.
    pub files: Vec<PathBuf>,
    pub since: Option<Since>,
    pub format: Format,
    /// Rows in each ranked table.
    pub top: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot open {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("reading {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing the report")]
    Write(#[source] io::Error),
}

/// Reads the files and prints the report on stdout.
pub fn run(options: &Options) -> Result<(), ReportError> {
    let report = summarise(options)?;
    let mut out = io::stdout().lock();
    match options.format {
        Format::Json => serde_json::to_writer(&mut out, &report).map_err(io::Error::from).and_then(|()| writeln!(out)),
        Format::Md => out.write_all(render::markdown(&report).as_bytes()),
    }
    .and_then(|()| out.flush())
    .map_err(ReportError::Write)
}

/// The report on the files of `options`.
pub fn summarise(options: &Options) -> Result<Report, ReportError> {
    let mut summary = Summary::new(options.since.as_ref().map(|s| s.unix_ms));
    let mut buf = Vec::with_capacity(4096);
    for path in &options.files {
        let read = |source| ReportError::Read { path: path.clone(), source };
        if path == Path::new("-") {
            let mut r = BufReader::with_capacity(READ_BUFFER, io::stdin());
            read_into(&mut summary, &mut r, &mut buf).map_err(read)?;
        } else {
            let file = File::open(path).map_err(|source| ReportError::Open { path: path.clone(), source })?;
            let mut r = BufReader::with_capacity(READ_BUFFER, file);
            read_into(&mut summary, &mut r, &mut buf).map_err(read)?;
        }
    }
    let files = options.files.iter().map(|p| p.display().to_string()).collect();
    Ok(summary.finish(options.top, files, options.since.as_ref().map(|s| s.text.clone())))
}

/// Every line of `r` into `summary`, through `buf`.
fn read_into(summary: &mut Summary, r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<()> {
    loop {
        match line::next_line(r, buf)? {
            line::Next::Line => summary.line(buf),
            line::Next::TooLong => summary.too_long(),
            line::Next::End => return Ok(()),
        }
    }
}

/// The Markdown form of a report.
pub fn markdown(report: &Report) -> String {
    render::markdown(report)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::events::{Event, Packet, ReloadResult};

    fn packet(time: &str, direction: &str, src: &str, reason: &str, verdict: &str, country: Option<&str>) -> Packet {
        Packet {
            time: time.into(),
            direction: direction.into(),
            src: src.parse().unwrap(),
            dst: "198.51.100.66".parse().unwrap(),
            sport: 40000,
            dport: 25,
            port: Some(25),
            reason: Some(reason.into()),
            verdict: Some(verdict.into()),
            rule: None,
            country: country.map(str::to_owned),
        }
    }

    fn drop(time: &str, src: &str, reason: &str) -> String {
        Event::DropSample { packet: packet(time, "ingress", src, reason, "drop", Some("KP")) }.to_line()
    }

    fn report_of(text: &str, since: Option<Since>) -> Report {
        let mut summary = Summary::new(since.as_ref().map(|s| s.unix_ms));
        let mut buf = Vec::new();
        read_into(&mut summary, &mut Cursor::new(text.as_bytes()), &mut buf).unwrap();
        summary.finish(10, vec!["test".into()], since.map(|s| s.text))
    }

    /// One line of every kind the enum has, and a few of each that matters.
    fn incident() -> String {
        let mut lines = vec![
            Event::PolicyReload {
                time: "2026-12-06T08:00:00.000Z".into(),
                result: ReloadResult::Ok,
                trigger: "start".into(),
                generation: 1,
                entries: Some(12),
                errors: vec![],
                more_errors: 0,
                duration_ms: Some(3.0),
                policy: Some("/etc/smtpguard/policy.yaml".into()),
                sha256: Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into()),
                changed_by: Some("root".into()),
            }
            .to_line(),
            Event::InterfaceAttached { time: "2026-12-06T08:00:00.100Z".into(), interface: "tap-t".into(), role: "tenant".into(), ifindex: 4 }.to_line(),
            Event::StalePin { time: "2026-12-06T08:00:00.200Z".into(), pin: "link_x".into(), why: "gone".into() }.to_line(),
        ];
        for i in 0..30 {
            lines.push(drop(&format!("2026-12-06T08:01:{:02}.000Z", i), "203.0.113.66", if i < 20 { "rate_limited" } else { "banned" }));
        }
        lines.push(drop("2026-12-06T08:02:00.000Z", "175.45.176.10", "geo"));
        for (strikes, t) in [(1u32, "08:01:10"), (2, "08:30:00")] {
            lines.push(
                Event::BanAdded { packet: packet(&format!("2026-12-06T{t}.000Z"), "ingress", "203.0.113.66", "rate_ban", "drop", None), count: 130, duration_s: 900 * strikes, strikes }
                    .to_line(),
            );
        }
        lines.push(Event::BanExpired { packet: packet("2026-12-06T08:20:00.000Z", "ingress", "203.0.113.66", "ban_expired", "pass", None) }.to_line());
        lines.push(Event::RateLimitTrip { packet: packet("2026-12-06T08:01:05.000Z", "ingress", "203.0.113.66", "rate_limited", "drop", None) }.to_line());
        for _ in 0..7 {
            lines.push(Event::DropSample { packet: packet("2026-12-06T08:40:00.000Z", "egress", "198.51.100.66", "default_deny", "drop", None) }.to_line());
        }
        lines.push(
            Event::TenantSuspect { time: "2026-12-06T08:40:01.000Z".into(), interface: "tap-t".into(), src: "198.51.100.66".parse().unwrap(), blocked: 7, window_s: 60, quarantine_s: 600 }.to_line(),
        );
        lines.push(Event::ManualBan { time: "2026-12-06T08:45:00.000Z".into(), source: "192.0.2.0/24".into(), duration_s: 3600, reason: Some("spam | run".into()) }.to_line());
        lines.push(Event::UplinkMissing { time: "2026-12-06T08:50:00.000Z".into(), interface: "up0".into() }.to_line());
        lines.push(
            Event::Bypass {
                time: "2026-12-06T08:50:30.000Z".into(),
                state: "on".into(),
                since: Some("2026-12-06T08:50:30.000Z".into()),
                by: Some("alice".into()),
                reason: Some("INC-1234".into()),
                trigger: "command".into(),
            }
            .to_line(),
        );
        lines.push(Event::InterfaceDetached { time: "2026-12-06T08:51:00.000Z".into(), interface: "tap-t".into(), role: "tenant".into(), why: "gone".into() }.to_line());
        lines.push(
            Event::PolicyReload {
                time: "2026-12-06T09:00:00.000Z".into(),
                result: ReloadResult::Rejected,
                trigger: "SIGHUP".into(),
                generation: 1,
                entries: None,
                errors: vec!["policy.yaml:3: `perhaps` is not allow or deny".into()],
                more_errors: 2,
                duration_ms: None,
                policy: Some("/etc/smtpguard/policy.yaml".into()),
                sha256: Some("fedcba9876543210".into()),
                changed_by: Some("alice".into()),
            }
            .to_line(),
        );
        // What a newer smtpguard may write, and what a full disk leaves.
        lines.push(r#"{"event":"future_kind","time":"2026-12-06T09:05:00.000Z","src":"198.51.100.5","count":"many"}"#.into());
        lines.push(r#"{"event":"other_future_kind","time":"2026-12-06T09:06:00.000Z","rule":"x"}"#.into());
        lines.push(r#"{"event":"drop_sam"#.into());
        lines.push("not json at all".into());
        lines.push(r#"{"event":"ban_added","time":"2026-12-06T09:07:00.000Z","src":"203.0.113.66","strikes":"two"}"#.into());
        lines.push(r#"{"event":"drop_sample","src":"203.0.113.66","verdict":"drop"}"#.into());
        lines.push(String::new());
        lines.join("\n") + "\n"
    }

    #[test]
    fn an_incident_is_summarised_with_exact_counts() {
        let r = report_of(&incident(), None);
        let p = &r.period;
        assert_eq!(p.first.as_deref(), Some("2026-12-06T08:00:00.000Z"));
        assert_eq!(p.last.as_deref(), Some("2026-12-06T09:06:00.000Z"));
        assert_eq!((p.skipped.unparsable, p.skipped.undated, p.blank_lines), (3, 1, 1), "{p:?}");
        assert_eq!(p.lines_read, p.events + 3 + 1 + 1);
        assert_eq!(r.unknown_kinds, [("future_kind".to_owned(), 1), ("other_future_kind".to_owned(), 1)].into());
        assert_eq!(r.events["drop_sample"], 38);
        // The spammer first, its reasons and country exact.
        let top = &r.sources.rows[0];
        assert_eq!((top.source.as_str(), top.drops, top.overcount, top.exact), ("203.0.113.66", 30, 0, true));
        assert_eq!(top.reasons, [("banned".to_owned(), 10), ("rate_limited".to_owned(), 20)].into());
        assert_eq!(top.countries, [("KP".to_owned(), 30)].into());
        assert!(r.sources.exact);
        assert_eq!(r.countries.rows[0].country, "KP");
        assert_eq!(r.countries.rows[0].drops, 31);
        // Bans: two added (one escalated), one expiry; the manual one by its network.
        let ban = r.bans.by_source.rows.iter().find(|b| b.source == "203.0.113.66").unwrap();
        assert_eq!((ban.added, ban.max_strikes, ban.escalations, ban.expired, ban.longest_s), (2, 2, 1, 1, 1800));
        assert!(r.bans.by_source.rows.iter().any(|b| b.source == "192.0.2.0/24" && b.manual == 1));
        assert_eq!((r.bans.totals.added, r.bans.totals.escalations, r.bans.totals.manual, r.bans.totals.rate_trips), (2, 1, 1, 1));
        // The tenant's blocked outbound attempts, apart from outside sources.
        let tenant = &r.tenants.drops.rows[0];
        assert_eq!((tenant.source.as_str(), tenant.drops), ("198.51.100.66", 7));
        assert_eq!(tenant.reasons, [("default_deny".to_owned(), 7)].into());
        assert!(!r.sources.rows.iter().any(|s| s.source == "198.51.100.66"));
        assert_eq!(r.tenants.suspects.shown[0].quarantine_s, 600);
        assert_eq!((r.reloads.ok, r.reloads.rejected), (1, 1));
        assert_eq!(r.reloads.events.shown[1].errors.len(), 1);
        // Notable, in time order: the reloads, the escalation, the suspect, the manual ban, the uplink, the unknown kinds.
        let kinds: Vec<&str> = r.notable.shown.iter().map(|n| n.event.as_str()).collect();
        assert_eq!(kinds, ["policy_reload", "ban_added", "tenant_suspect", "manual_ban", "uplink_missing", "bypass", "policy_reload", "future_kind", "other_future_kind"]);
        assert_eq!(r.timeline.bucket_s, 60, "an hour's events in minutes");
        assert_eq!(r.timeline.buckets.iter().map(|b| b.events).sum::<u64>(), p.events);
        assert_eq!(r.timeline.buckets.iter().map(|b| b.drops).sum::<u64>(), 38);
    }

    #[test]
    fn every_kind_the_report_reads_is_a_kind_of_the_enum() {
        let schema = crate::events::schema().to_string();
        for kind in summary::kind_names() {
            assert!(schema.contains(&format!("\"{kind}\"")), "{kind} is no event kind of events.rs");
        }
        // And the other way: every kind the controller writes is read.
        let schema = crate::events::schema();
        let written: Vec<&str> = schema["oneOf"].as_array().expect("one schema per kind").iter().filter_map(|k| k["properties"]["event"]["const"].as_str()).collect();
        assert!(written.len() > 10, "{schema}");
        let read = summary::kind_names();
        for kind in written {
            assert!(read.contains(&kind), "the report does not read {kind}");
        }
    }

    #[test]
    fn since_skips_older_events_and_counts_them() {
        let since = since_at("2026-12-06T08:45:00Z", time::OffsetDateTime::now_utc()).unwrap();
        let r = report_of(&incident(), Some(since));
        assert_eq!(r.period.first.as_deref(), Some("2026-12-06T08:45:00.000Z"));
        assert!(r.period.skipped.before_since > 40, "{:?}", r.period);
        assert!(r.sources.rows.is_empty());
        assert_eq!(r.bans.totals.manual, 1);
        assert_eq!(r.since.as_deref(), Some("2026-12-06T08:45:00.000Z"));
    }

    #[test]
    fn since_takes_durations_times_and_dates() {
        let now = time::macros::datetime!(2026-12-06 12:00 UTC);
        assert_eq!(since_at("4h", now).unwrap().text, "2026-12-06T08:00:00.000Z");
        assert_eq!(since_at("72h", now).unwrap().text, "2026-12-03T12:00:00.000Z");
        assert_eq!(since_at("2d", now).unwrap().unix_ms, since_at("48h", now).unwrap().unix_ms);
        assert_eq!(since_at("2026-12-06T09:30:00+01:00", now).unwrap().text, "2026-12-06T08:30:00.000Z");
        assert_eq!(since_at("2026-12-01", now).unwrap().text, "2026-12-01T00:00:00.000Z");
        for bad in ["4 hours", "-4h", "yesterday", "2026-12-32", ""] {
            assert!(since_at(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn markdown_and_json_say_the_same() {
        let r = report_of(&incident(), None);
        let md = markdown(&r);
        for needle in [
            "# smtpguard incident report",
            "| 203.0.113.66 | 30 | rate_limited 20, banned 10 | KP 30 |",
            "| 198.51.100.66 | 7 | default_deny 7 |",
            "| 2026-12-06T08:40:01.000Z | tap-t | 198.51.100.66 | 7 | 1m | 10m |",
            "`0123456789ab`",
            "| rejected | SIGHUP | 1 |",
            "(and 2 more)",
            "spam \\| run",
            "future_kind 1, other_future_kind 1",
            "3 unparsable",
            "Counts are exact",
            "Buckets of 1m.",
            "| bypass | enforcement switched OFF (bypass on by alice): INC-1234; drops pass as would_drop |",
        ] {
            assert!(md.contains(needle), "{needle:?} not in:\n{md}");
        }
        // Every table row has the columns of its header (a `|` from the file is escaped).
        let mut columns = None;
        for line in md.lines() {
            let n = line.replace("\\|", "").matches('|').count();
            match (line.starts_with('|'), columns) {
                (true, None) => columns = Some(n),
                (true, Some(c)) => assert_eq!(n, c, "{line}"),
                (false, _) => columns = None,
            }
        }
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["sources"]["rows"][0]["source"], "203.0.113.66");
        assert_eq!(json["sources"]["rows"][0]["drops"], 30);
        assert_eq!(json["sources"]["rows"][0]["exact"], true);
        assert_eq!(json["bans"]["by_source"]["rows"][0]["max_strikes"], 2);
        assert_eq!(json["tenants"]["suspects"]["shown"][0]["interface"], "tap-t");
        assert_eq!(json["reloads"]["events"]["shown"][0]["changed_by"], "root");
        assert_eq!(json["unknown_kinds"]["future_kind"], 1);
        assert_eq!(json["period"]["skipped"]["unparsable"], 3);
    }

    #[test]
    fn garbage_is_counted_and_never_fatal() {
        let mut input = b"\x00\xff\xfe garbage\n{}\n[1,2]\n{\"event\":7}\n".to_vec();
        input.extend(vec![b'{'; line::MAX_LINE + 10]);
        input.extend(b"\n");
        input.extend(drop("2026-12-06T08:00:00Z", "2001:db8::1", "deny_acl").as_bytes());
        let mut summary = Summary::new(None);
        read_into(&mut summary, &mut Cursor::new(input), &mut Vec::new()).unwrap();
        let r = summary.finish(10, vec![], None);
        assert_eq!((r.period.lines_read, r.period.skipped.unparsable, r.period.skipped.too_long, r.period.events), (6, 4, 1, 1));
        assert_eq!(r.sources.rows[0].source, "2001:db8::1");
        assert!(markdown(&report_of("", None)).contains("No events."));
    }

    #[test]
    fn hostile_fields_are_clipped_inert_in_markdown_and_times_shown_in_utc() {
        let long = "x".repeat(10_000);
        let text = [
            r#"{"event":"manual_ban","time":"2026-12-06T09:00:00+01:00","source":"192.0.2.5/32","duration_s":60,"reason":"[click](http://evil) <img src=x onerror=alert(1)> **bold** `code`"}"#.to_owned(),
            format!(r#"{{"event":"manual_ban","time":"2026-12-06T08:01:00Z","source":"192.0.2.6/32","duration_s":60,"reason":"{long}"}}"#),
            r#"{"event":"policy_reload","time":"2026-12-06T08:02:00Z","trigger":"SIGHUP","generation":2}"#.to_owned(),
            r#"{"event":"policy_reload","time":"2026-12-06T08:03:00Z","result":"failed","trigger":"SIGHUP","generation":3}"#.to_owned(),
            r#"{"event":"enforce_scheduled","time":"2026-12-06T08:04:00Z","direction":"egress","enforce_from":"2026-12-07","hours_left":15.9}"#.to_owned(),
            r#"{"event":"drop_sample","time":"2026-12-06T08:05:60Z"}"#.to_owned(),
        ]
        .join("\n");
        let r = report_of(&text, None);
        let md = markdown(&r);
        // No link, image, HTML, emphasis or code of the file's own.
        assert!(md.contains(r"\[click\](http://evil) \<img src=x onerror=alert(1)\> \*\*bold\*\* \`code\`"), "{md}");
        assert!(!md.contains("[click](") && md.matches("<img").count() == md.matches("\\<img").count(), "{md}");
        // Shown in UTC, as the rows are ordered.
        assert_eq!(r.notable.shown[0].time, "2026-12-06T08:00:00.000Z");
        // A long field is clipped where it is read.
        let kept = r.bans.manual.shown[1].reason.as_deref().unwrap();
        assert!(kept.len() <= line::MAX_TEXT + '…'.len_utf8() && kept.ends_with('…'), "{} bytes", kept.len());
        // A reload that does not say `ok` is not counted as applied.
        assert_eq!((r.reloads.ok, r.reloads.rejected), (0, 0));
        // The scheduled switch is a kind this version reads.
        assert!(r.unknown_kinds.is_empty(), "{:?}", r.unknown_kinds);
        assert!(r.notable.shown.iter().any(|n| n.event == "enforce_scheduled" && n.summary.contains("egress leaves monitor mode and enforces from 2026-12-07")));
        // A leap second only ends a day.
        assert_eq!(r.period.skipped.undated, 1);
    }

    #[test]
    fn millions_of_sources_keep_the_heavy_hitters_and_say_counts_are_not_all_exact() {
        let mut summary = Summary::new(None);
        let mut lines = String::new();
        for i in 0..20_000u32 {
            lines.clear();
            let src = if i % 4 == 0 { "203.0.113.66".to_owned() } else { format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255) };
            lines.push_str(&drop("2026-12-06T08:00:00Z", &src, "deny_acl"));
            summary.line(lines.as_bytes());
        }
        let r = summary.finish(3, vec![], None);
        assert!(!r.sources.exact);
        assert_eq!(r.sources.tracked, summary::TABLE_CAPACITY);
        let top = &r.sources.rows[0];
        assert_eq!(top.source, "203.0.113.66");
        assert_eq!((top.drops, top.overcount), (5000, 0), "held from its first drop on: exact");
        assert!(r.sources.rows[1].overcount > 0);
        assert!(markdown(&r).contains("(at least "));
    }
}
