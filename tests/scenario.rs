//! The scripted scenario of `cargo xtask demo` and the end-to-end tests:
//! each step drives real clients through the lab and records what the
//! servers received and which datapath counters moved (the "why").

use std::time::Duration;

use anyhow::Result;
use policy_common::{direction, reason, verdict};

use crate::hvlab::{flood, swaks, Counters, Family, Lab, Role, SmtpSession};

/// The policy's rate limit (idc-default.yaml): new connections per minute, burst.
pub const RATE_PER_MINUTE: f64 = 60.0;
pub const RATE_BURST: f64 = 20.0;
/// How the spammer floods the tenant's mail server.
pub const FLOOD_PER_MINUTE: u32 = 200;
/// The ban threshold is 100 a minute: at 200 a minute that is about 30 s in.
pub const FLOOD_MAX: Duration = Duration::from_secs(50);

/// One line of the demo's table.
pub struct Row {
    pub step: String,
    pub path: &'static str,
    pub expected: String,
    pub observed: String,
    pub why: String,
    pub ok: bool,
}

pub struct Scenario<'a> {
    pub lab: &'a Lab,
    /// The policy runs in monitor mode: everything must pass.
    pub monitor: bool,
    pub progress: bool,
    pub rows: Vec<Row>,
    step: usize,
    steps: usize,
}

/// Counter cells that moved, as "egress drop default_deny x1, ...".
pub fn describe(moved: &[(u8, u8, u8, u64)]) -> String {
    if moved.is_empty() {
        return "no counted packets".into();
    }
    moved
        .iter()
        .map(|(d, v, r, n)| {
            let d = if *d == direction::INGRESS { "ingress" } else { "egress" };
            format!("{d} {} {} x{n}", verdict::NAMES[*v as usize], reason::NAMES[*r as usize])
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl<'a> Scenario<'a> {
    pub fn new(lab: &'a Lab, monitor: bool, progress: bool, families: usize, with_flood: bool) -> Self {
        let steps = families * 8 + usize::from(with_flood);
        Self { lab, monitor, progress, rows: Vec::new(), step: 0, steps }
    }

    fn begin(&mut self, what: &str) {
        self.step += 1;
        if self.progress {
            let mode = if self.monitor { "monitor" } else { "enforce" };
            eprintln!("[{mode} {}/{}] {what}", self.step, self.steps);
        }
    }

    /// Where the backend judged a flow of direction `d`.
    fn path(&self, d: u8, from_host: bool) -> &'static str {
        let nft = self.lab.backend == "nftables";
        match (d, from_host, nft) {
            (direction::INGRESS, _, false) => "XDP up0",
            (direction::INGRESS, _, true) => "nft up0 in",
            (_, true, false) => "TC up0",
            (_, true, true) => "nft up0 out",
            (_, false, false) => "TC tap",
            (_, false, true) => "nft tap in",
        }
    }

    /// The verdict a blocked flow gets in this mode.
    fn blocked(&self) -> u8 {
        if self.monitor {
            verdict::WOULD_DROP
        } else {
            verdict::DROP
        }
    }

    /// swaks from `from` to `to`'s server on `port`; checks delivery and
    /// that the counter cell (dir, verdict, reason) moved.
    fn send(&mut self, step: &str, family: Family, (from, to, port): (Role, Role, u16), delivered: bool, cell: (u8, u8, u8)) -> Result<()> {
        self.begin(step);
        let lab = self.lab;
        let before = lab.counters()?;
        let got_before = lab.delivered(to, family, port);
        let accepted = swaks(lab.ns_of(from), family.addr(from), family.addr(to), port)?;
        let got = lab.delivered(to, family, port) - got_before;
        let moved = lab.counters()?.moved_since(&before);
        let (d, v, r) = cell;
        let counted = moved.iter().any(|m| (m.0, m.1, m.2) == (d, v, r));
        let ok = accepted == delivered && got == usize::from(delivered) && counted;
        let path = self.path(d, from == Role::Host);
        self.rows.push(Row {
            step: format!("{step} [{}]", family.label()),
            path,
            expected: format!("{} ({} {})", if delivered { "delivered" } else { "not delivered" }, verdict::NAMES[v as usize], reason::NAMES[r as usize]),
            observed: format!("{}, {got} message(s) at the server", if accepted { "swaks: accepted" } else { "swaks: failed" }),
            why: describe(&moved),
            ok,
        });
        Ok(())
    }

    /// Every step except the flood, in one address family.
    pub fn run_family(&mut self, family: Family) -> Result<()> {
        use direction::{EGRESS, INGRESS};
        let monitor = self.monitor;
        let b = self.blocked();
        self.send("ordinary tenant sends on 25", family, (Role::Tenant, Role::Mx, 25), monitor, (EGRESS, b, reason::DEFAULT_DENY))?;
        self.send("ordinary tenant sends on 587", family, (Role::Tenant, Role::Mx, 587), true, (EGRESS, verdict::PASS, reason::DEFAULT_ALLOW))?;
        self.send("ordinary tenant sends on 465", family, (Role::Tenant, Role::Mx, 465), true, (EGRESS, verdict::PASS, reason::DEFAULT_ALLOW))?;
        self.send("exempted tenant sends on 25", family, (Role::Exempt, Role::Mx, 25), true, (EGRESS, verdict::PASS, reason::ALLOW_ACL))?;
        self.send("outside sender mails the tenant", family, (Role::Sender, Role::Tenant, 25), true, (INGRESS, verdict::PASS, reason::DEFAULT_ALLOW))?;
        self.vrfy(family)?;
        self.send("source in a blocked country", family, (Role::Blocked, Role::Tenant, 25), monitor, (INGRESS, b, reason::GEO))?;
        self.send("the hypervisor itself sends on 25", family, (Role::Host, Role::Mx, 25), monitor, (EGRESS, b, reason::DEFAULT_DENY))?;
        Ok(())
    }

    fn vrfy(&mut self, family: Family) -> Result<()> {
        self.begin("VRFY probe");
        let lab = self.lab;
        let before = lab.counters()?;
        let mut s = SmtpSession::open(lab.ns_of(Role::Prober), family.addr(Role::Prober), family.addr(Role::Tenant), 25, Duration::from_secs(3))?;
        let banner = s.line()?;
        let ehlo = s.send("EHLO prober.test")?;
        // A dropped segment gets no answer; the server answers VRFY at once.
        s.set_timeout(Duration::from_secs(2))?;
        let answer = s.send("VRFY postmaster").ok();
        drop(s);
        let moved = lab.counters()?.moved_since(&before);
        let counted = moved.iter().any(|m| (m.0, m.1, m.2) == (direction::INGRESS, self.blocked(), reason::SMTP_COMMAND));
        let answered = answer.is_some();
        let ok = banner.starts_with("220") && ehlo.starts_with("250") && answered == self.monitor && counted;
        self.rows.push(Row {
            step: format!("VRFY probe [{}]", family.label()),
            path: self.path(direction::INGRESS, false),
            expected: if self.monitor { "answered (would_drop smtp_command)".into() } else { "no answer (drop smtp_command)".into() },
            observed: match answer {
                Some(a) => format!("EHLO ok, VRFY answered {a:?}"),
                None => "EHLO ok, VRFY got no answer in 2 s".into(),
            },
            why: describe(&moved),
            ok,
        });
        Ok(())
    }

    /// The spammer at 200 connections a minute until `smtpguard bans` lists
    /// it (or [`FLOOD_MAX`]): about the policy's rate gets through, then the ban.
    pub fn run_flood(&mut self, family: Family) -> Result<()> {
        self.begin(&format!("spammer floods the tenant at {FLOOD_PER_MINUTE}/min until banned"));
        let lab = self.lab;
        let spammer = family.addr(Role::Spammer);
        let before = lab.counters()?;
        let delivered_before = lab.delivered(Role::Tenant, family, 25);
        let events_before = lab.event_lines();
        let src = format!("\"src\":\"{spammer}\"");
        let ban_event = |lab: &Lab| lab.wait_for_event(&[&src, "\"ban_added\""], events_before, Duration::ZERO).is_ok();
        let f = flood(lab, family, FLOOD_PER_MINUTE, FLOOD_MAX, ban_event)?;
        let banned = lab.smtpguard(&["bans"]).map(|t| t.contains(&family.ban_entry(Role::Spammer))).unwrap_or(false);
        let delivered = lab.delivered(Role::Tenant, family, 25) - delivered_before;
        let moved = lab.counters()?.moved_since(&before);
        // Tokens: the burst, then one per second of the flood.
        let allowance = RATE_BURST + RATE_PER_MINUTE * f.seconds / 60.0;
        let ok = banned
            && f.accepted == delivered
            && if self.monitor {
                f.accepted == f.attempts && moved.iter().any(|m| m.1 == verdict::WOULD_DROP && m.2 == reason::RATE_LIMITED)
            } else {
                (f.accepted as f64 - allowance).abs() <= 0.15 * allowance
                    && moved.iter().any(|m| m.1 == verdict::DROP && m.2 == reason::RATE_LIMITED)
                    && moved.iter().any(|m| m.2 == reason::RATE_BAN)
            };
        self.rows.push(Row {
            step: format!("spammer at {FLOOD_PER_MINUTE}/min [{}]", family.label()),
            path: self.path(direction::INGRESS, false),
            expected: if self.monitor {
                "all delivered; would-drops counted; ban recorded".into()
            } else {
                format!("~{allowance:.0} through (burst {RATE_BURST} + {RATE_PER_MINUTE}/min), then banned")
            },
            observed: format!(
                "{} of {} attempts delivered in {:.0} s; {}",
                f.accepted,
                f.attempts,
                f.seconds,
                if banned { "listed by `smtpguard bans`" } else { "NOT listed by `smtpguard bans`" }
            ),
            why: describe(&moved),
            ok,
        });
        Ok(())
    }

    pub fn all_ok(&self) -> bool {
        self.rows.iter().all(|r| r.ok)
    }

    /// The rows as a fixed-width table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for r in &self.rows {
            out += &format!(
                "{} {:<44} {:<8} expected: {}\n     observed: {}\n     why: {}\n",
                if r.ok { "ok  " } else { "FAIL" },
                r.step,
                r.path,
                r.expected,
                r.observed,
                r.why
            );
        }
        out
    }

    pub fn failures(&self) -> Vec<String> {
        self.rows.iter().filter(|r| !r.ok).map(|r| format!("{}: expected {}; observed {}; counters: {}", r.step, r.expected, r.observed, r.why)).collect()
    }
}

/// The counters a table cannot show: would-drops per reason (monitor mode).
pub fn would_drops(c: &Counters) -> u64 {
    (0..reason::COUNT as u8).map(|r| c.packets(direction::INGRESS, verdict::WOULD_DROP, r) + c.packets(direction::EGRESS, verdict::WOULD_DROP, r)).sum()
}
