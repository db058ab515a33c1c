//! `incident-report`: `smtpguard report` (release) on synthetic event files
//! of about 100 MB and 1 GB, each written to a scratch directory, read
//! once, and removed.
//!
//! The files are what a host under a long spam run writes: sampled drops
//! (about 90% of the lines) from about 2 million distinct outside sources,
//! a few heavy hitters among them; blocked outbound attempts of tenant VMs
//! (one of them compromised); bans (escalating for the heavy hitters),
//! expiries, rate-limit trips, tenant suspects, manual bans, reloads; a
//! few kinds this version does not know and a few garbage lines. A
//! deterministic PRNG (tests/rng.rs) makes the same file every run, and
//! the generator counts what the report must find.
//!
//! Measured: wall time of the whole `smtpguard report --format json` run
//! (the file in the page cache: it was just written), its throughput, and
//! its peak RSS (`ru_maxrss` of that child, from `wait4`). Checked: the
//! heavy hitters are the top rows with their exact counts, marked exact;
//! lines read and skipped are those written; peak RSS stays under
//! [`RSS_BOUND`] at both sizes.

use std::{
    fs::File,
    io::{BufWriter, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use smtpguard_tests::rng::Rng;

/// The sizes run, in bytes of event file.
pub const SIZES: [u64; 2] = [100_000_000, 1_000_000_000];
/// The most peak RSS `smtpguard report` may use, whatever the file.
pub const RSS_BOUND: u64 = 64 << 20;
/// Distinct outside sources the bulk of the drops cycle through.
const POOL: u64 = 2_000_000;
/// Tenant VMs with blocked outbound attempts.
const TENANTS: u64 = 500;
/// 2026-12-06T00:00:00Z, in ms.
const START_MS: i64 = 1_796_515_200_000;
/// The period a file covers (72 hours), whatever its size.
const SPAN_MS: i64 = 72 * 3_600_000;
/// About the bytes of a line, to spread the lines over the span.
const LINE_BYTES: u64 = 240;

/// Outside sources that send far more than the rest: address, share of
/// the ingress drops in per mille, reason, country.
const HEAVY: [(&str, u64, &str, &str); 5] = [
    ("203.0.113.66", 40, "banned", "CN"),
    ("198.18.0.7", 25, "deny_acl", "RU"),
    ("175.45.176.10", 15, "geo", "KP"),
    ("2001:db8:66::66", 10, "rate_limited", "US"),
    ("2a01:5ec0::10", 5, "geo", "IR"),
];
/// The compromised tenant VM, and its share of the egress drops in per mille.
const COMPROMISED: (&str, u64) = ("10.200.0.66", 300);
const COUNTRIES: [&str; 12] = ["CN", "RU", "US", "BR", "IN", "VN", "DE", "NL", "FR", "ID", "KR", "TR"];
const REASONS: [&str; 5] = ["deny_acl", "rate_limited", "banned", "geo", "smtp_command"];

/// What the generator wrote, to hold the report to.
#[derive(Default, Debug)]
pub struct Truth {
    pub bytes: u64,
    pub lines: u64,
    pub garbage: u64,
    pub heavy_drops: [u64; HEAVY.len()],
    pub compromised_drops: u64,
    pub heavy_bans: u64,
    pub heavy_max_strikes: u64,
}

/// One measured run.
pub struct Run {
    pub truth: Truth,
    pub generate_s: f64,
    pub seconds: f64,
    pub peak_rss_bytes: u64,
    /// The report called every count of its sources table exact (it
    /// cannot be, with more sources than counters).
    pub sources_exact: bool,
}

impl Run {
    pub fn mb_per_s(&self) -> f64 {
        self.truth.bytes as f64 / 1e6 / self.seconds
    }

    pub fn lines_per_s(&self) -> f64 {
        self.truth.lines as f64 / self.seconds
    }
}

/// Generates a file of about `bytes`, runs the report on it, checks it and
/// removes the file.
pub fn run(smtpguard: &Path, dir: &Path, bytes: u64) -> Result<Run> {
    let path = dir.join(format!("events-{bytes}.jsonl"));
    let out = dir.join(format!("report-{bytes}.json"));
    let started = Instant::now();
    let truth = generate(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    let generate_s = started.elapsed().as_secs_f64();
    let stdout = File::create(&out)?;
    let started = Instant::now();
    let child = Command::new(smtpguard).args(["report", "--format", "json", "--top", "10", "--events"]).arg(&path).stdout(Stdio::from(stdout)).stderr(Stdio::inherit()).spawn().context("running smtpguard report")?;
    let (status, maxrss_kib) = wait4(child.id())?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    if status != 0 {
        bail!("smtpguard report exited with status {status:#x}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?).context("the report's JSON")?;
    let _ = std::fs::remove_file(&out);
    check(&report, &truth)?;
    Ok(Run { generate_s, seconds, peak_rss_bytes: maxrss_kib * 1024, sources_exact: report["sources"]["exact"] == true, truth })
}

/// Waits for child `pid`: its exit status and peak RSS in KiB.
fn wait4(pid: u32) -> Result<(i32, u64)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 writes both out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pointers to live locals; pid is our child, not yet waited for.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    Ok((status, usage.ru_maxrss as u64))
}

/// The report names every heavy hitter first, with its exact count, and
/// read every line written.
fn check(r: &serde_json::Value, t: &Truth) -> Result<()> {
    let mut problems = Vec::new();
    let rows = r["sources"]["rows"].as_array().cloned().unwrap_or_default();
    for (i, (addr, ..)) in HEAVY.iter().enumerate() {
        match rows.get(i) {
            Some(row) if row["source"] == *addr && row["drops"] == t.heavy_drops[i] && row["exact"] == true => {}
            row => problems.push(format!("source row {i}: want {addr} with {} drops, exact; got {row:?}", t.heavy_drops[i])),
        }
    }
    let tenant = &r["tenants"]["drops"]["rows"][0];
    if tenant["source"] != COMPROMISED.0 || tenant["drops"] != t.compromised_drops || tenant["exact"] != true {
        problems.push(format!("tenant row 0: want {} with {} drops, exact; got {tenant}", COMPROMISED.0, t.compromised_drops));
    }
    let ban = r["bans"]["by_source"]["rows"].as_array().into_iter().flatten().find(|b| b["source"] == HEAVY[0].0);
    match ban {
        Some(b) if b["added"] == t.heavy_bans && b["max_strikes"] == t.heavy_max_strikes && b["exact"] == true => {}
        b => problems.push(format!("bans of {}: want {} added, max strikes {}, exact; got {b:?}", HEAVY[0].0, t.heavy_bans, t.heavy_max_strikes)),
    }
    if r["period"]["lines_read"] != t.lines || r["period"]["skipped"]["unparsable"] != t.garbage {
        problems.push(format!("period: want {} lines read, {} unparsable; got {}", t.lines, t.garbage, r["period"]));
    }
    if !problems.is_empty() {
        bail!("the report is wrong:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// The `i`th source of the pool: spread over 10.0.0.0/8 and 2001:db8:f::/48.
fn pool_source(i: u64) -> IpAddr {
    // A bijection of 0..2^21 (odd multiplier), so neighbours differ.
    let x = (i.wrapping_mul(0x9E37_79B1) & 0x1F_FFFF) as u32;
    if i % 8 == 7 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, (x >> 16) as u16, x as u16))
    } else {
        IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | (x + 1)))
    }
}

/// RFC 3339 of `ms`, as the controller writes it; the seconds part cached.
struct Clock {
    second: i64,
    prefix: String,
}

impl Clock {
    fn text(&mut self, ms: i64) -> String {
        let second = ms.div_euclid(1000);
        if second != self.second || self.prefix.is_empty() {
            self.second = second;
            let t = time::OffsetDateTime::from_unix_timestamp(second).expect("a time in range");
            self.prefix = format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second());
        }
        format!("{}.{:03}Z", self.prefix, ms.rem_euclid(1000))
    }
}

/// Writes about `target` bytes of events to `path`.
pub fn generate(path: &Path, target: u64) -> Result<Truth> {
    let mut w = Counting { inner: BufWriter::with_capacity(1 << 20, File::create(path)?), bytes: 0 };
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut truth = Truth::default();
    let mut clock = Clock { second: 0, prefix: String::new() };
    let lines_expected = (target / LINE_BYTES).max(1) as i64;
    let mut next_pool = 0u64;
    let mut generation = 0u64;
    while w.bytes < target {
        let ms = START_MS + truth.lines as i64 * SPAN_MS / lines_expected;
        let t = clock.text(ms);
        truth.lines += 1;
        let roll = rng.below(1_000_000);
        match roll {
            // Garbage: a line a full disk cut short, and noise.
            0..=9 => {
                truth.garbage += 1;
                if roll.is_multiple_of(2) {
                    writeln!(w, "{{\"event\":\"drop_sample\",\"time\":\"{t}\",\"direction\":\"ingr")?;
                } else {
                    writeln!(w, "\u{1}\u{2} not an event")?;
                }
            }
            // Kinds this version does not know.
            10..=29 => writeln!(w, "{{\"event\":\"shadow_difference\",\"time\":\"{t}\",\"src\":\"192.0.2.1\",\"shadow\":\"drop\",\"live\":\"pass\"}}")?,
            30..=49 => {
                generation += 1;
                let sha = format!("{:016x}{:048x}", rng.next_u64(), generation);
                writeln!(w, "{{\"event\":\"policy_reload\",\"time\":\"{t}\",\"result\":\"ok\",\"trigger\":\"file change\",\"generation\":{generation},\"entries\":1834,\"duration_ms\":2.4,\"policy\":\"/etc/smtpguard/policy.yaml\",\"sha256\":\"{sha}\",\"changed_by\":\"root\"}}")?;
            }
            50..=69 => writeln!(w, "{{\"event\":\"tenant_suspect\",\"time\":\"{t}\",\"interface\":\"tap{}\",\"src\":\"10.200.0.{}\",\"blocked\":{},\"window_s\":60,\"quarantine_s\":600}}", rng.below(64), rng.below(250) + 1, 5 + rng.below(50))?,
            70..=79 => writeln!(w, "{{\"event\":\"manual_ban\",\"time\":\"{t}\",\"source\":\"198.51.{}.0/24\",\"duration_s\":86400,\"reason\":\"INC-{}\"}}", rng.below(256), rng.below(10_000))?,
            80..=89 => writeln!(w, "{{\"event\":\"interface_attached\",\"time\":\"{t}\",\"interface\":\"tap{}\",\"role\":\"tenant\",\"ifindex\":{}}}", rng.below(64), rng.below(1000))?,
            // Bans (2%): a fifth of them the top heavy hitter's, escalating.
            90..=20_089 => {
                let heavy = rng.chance(20);
                let src = if heavy { HEAVY[0].0.parse().expect("an address") } else { pool_source(rng.below(POOL)) };
                let strikes = if heavy { 1 + truth.heavy_bans.min(7) } else { 1 + rng.below(3) };
                if heavy {
                    truth.heavy_bans += 1;
                    truth.heavy_max_strikes = truth.heavy_max_strikes.max(strikes);
                }
                let extra = format!(",\"count\":{},\"duration_s\":{},\"strikes\":{strikes}", 101 + rng.below(400), (900u64 << (strikes - 1)).min(86_400));
                packet(&mut w, "ban_added", &t, "ingress", src, ("rate_ban", "drop", "CN"), &extra)?;
            }
            // Expiries and rate-limit trips (1% each).
            20_090..=30_089 => packet(&mut w, "ban_expired", &t, "ingress", pool_source(rng.below(POOL)), ("ban_expired", "pass", "CN"), "")?,
            30_090..=40_089 => packet(&mut w, "rate_limit_trip", &t, "ingress", pool_source(rng.below(POOL)), ("rate_limited", "drop", "BR"), "")?,
            // Blocked outbound attempts of tenant VMs (4%).
            40_090..=80_089 => {
                let src = if rng.below(1000) < COMPROMISED.1 {
                    truth.compromised_drops += 1;
                    COMPROMISED.0.parse().expect("an address")
                } else {
                    IpAddr::V4(Ipv4Addr::new(10, 201, (rng.below(TENANTS) / 250) as u8, (rng.below(250) + 1) as u8))
                };
                packet(&mut w, "drop_sample", &t, "egress", src, ("default_deny", "drop", "US"), "")?;
            }
            // Sampled drops of outside sources (the rest, about 92%).
            _ => {
                let pick = rng.below(1000);
                let mut acc = 0;
                let heavy = HEAVY.iter().position(|(_, share, ..)| {
                    acc += share;
                    pick < acc
                });
                match heavy {
                    Some(i) => {
                        truth.heavy_drops[i] += 1;
                        let (addr, _, reason, country) = HEAVY[i];
                        packet(&mut w, "drop_sample", &t, "ingress", addr.parse().expect("an address"), (reason, "drop", country), "")?;
                    }
                    None => {
                        // Cycling through the pool: about 2 million distinct at 1 GB.
                        let src = pool_source(next_pool % POOL);
                        next_pool += 1 + rng.below(2);
                        let verdict = if rng.chance(5) { "would_drop" } else { "drop" };
                        packet(&mut w, "drop_sample", &t, "ingress", src, (*rng.pick(&REASONS), verdict, *rng.pick(&COUNTRIES)), "")?;
                    }
                }
            }
        }
    }
    w.inner.flush()?;
    truth.bytes = w.bytes;
    Ok(truth)
}

/// A datapath event's line, as `events::Packet` serialises, with
/// `(reason, verdict, country)` and the fields of its kind (`extra`).
fn packet(w: &mut Counting, kind: &str, t: &str, direction: &str, src: IpAddr, (reason, verdict, country): (&str, &str, &str), extra: &str) -> Result<()> {
    let dst = if direction == "egress" { "203.0.113.25" } else { "198.51.100.66" };
    writeln!(
        w,
        "{{\"event\":\"{kind}\",\"time\":\"{t}\",\"direction\":\"{direction}\",\"src\":\"{src}\",\"dst\":\"{dst}\",\"sport\":49152,\"dport\":25,\"port\":25,\"reason\":\"{reason}\",\"verdict\":\"{verdict}\",\"rule\":null,\"country\":\"{country}\"{extra}}}"
    )?;
    Ok(())
}

/// A writer that counts the bytes written.
struct Counting {
    inner: BufWriter<File>,
    bytes: u64,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
