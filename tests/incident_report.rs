//! `smtpguard report` on the event file of a real incident: the hypervisor
//! lab (tests/hvlab.rs) with `smtpguard run --events FILE`, every drop
//! sampled. An outside spammer floods the tenant's mail server with real
//! `smtp-source` sessions until the datapath bans it; a source in a
//! blocked country knocks; the tenant VM tries to send out on port 25
//! with `swaks` (blocked outbound, over the suspect threshold). Then the
//! controller stops, so the file no longer grows, and the test counts the
//! file's lines itself and holds the JSON and Markdown reports to them:
//! the spammer is the top source with its exact drops and reasons, its
//! bans and strikes; the tenant is the top blocked tenant with its exact
//! drops and reasons, and its suspect events; lines read and skipped, and
//! the start's policy reload with the policy's path and SHA-256.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use smtpguard_tests::{
    hvlab::{flood, greeting, lab_policy, repo_root, swaks, Family, Lab, Role},
    require_root, smtpguard_bin,
};
use yaml_rust2::{Yaml, YamlLoader};

/// Inbound ban threshold (new connections a minute): a few seconds of the flood.
const BAN_ABOVE: i64 = 64;

/// The hosting example with the geo-fence, bans a short flood away, every
/// drop sampled into the events, tenant suspects quarantined.
fn policy(lab: &Lab) -> String {
    let base = lab_policy(&repo_root(), &lab.geo_db, "enforce", &[], Some(BAN_ABOVE)).expect("lab policy");
    let mut doc = YamlLoader::load_from_str(&base).unwrap().remove(0);
    let parse = |s: &str| YamlLoader::load_from_str(s).unwrap().remove(0);
    let Yaml::Hash(top) = &mut doc else { panic!("the policy is not a mapping") };
    top.insert(Yaml::String("events".into()), parse("{drop_sample_one_in: 1, per_second: 1000}"));
    let Some(Yaml::Hash(egress)) = top.get_mut(&Yaml::String("egress".into())) else { panic!("no egress") };
    egress.insert(Yaml::String("tenant_suspect".into()), parse("{blocked: 5, window: 1m, quarantine: 10m}"));
    let mut out = String::new();
    yaml_rust2::YamlEmitter::new(&mut out).dump(&doc).unwrap();
    out + "\n"
}

/// Polls `f` every 50 ms until it holds, for at most `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the test finds in the event file by itself.
#[derive(Debug, Default)]
struct Counted {
    lines: u64,
    unparsable: u64,
    drop_samples: u64,
    ban_added: u64,
    spammer_drops: u64,
    spammer_reasons: BTreeMap<String, u64>,
    spammer_bans: u64,
    spammer_max_strikes: u64,
    tenant_drops: u64,
    tenant_reasons: BTreeMap<String, u64>,
    suspects: Vec<Value>,
    blocked_drops: u64,
    blocked_country: Option<String>,
    reloads: Vec<Value>,
}

fn count(text: &str, spammer: &str, tenant: &str, blocked: &str) -> Counted {
    let mut c = Counted::default();
    for line in text.lines() {
        c.lines += 1;
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            c.unparsable += 1;
            continue;
        };
        let dropped = matches!(e["verdict"].as_str(), Some("drop" | "would_drop"));
        match e["event"].as_str() {
            Some("drop_sample") => {
                c.drop_samples += 1;
                let reason = e["reason"].as_str().unwrap_or("(none)").to_owned();
                match (e["src"].as_str(), e["direction"].as_str()) {
                    (Some(s), Some("ingress")) if s == spammer && dropped => {
                        c.spammer_drops += 1;
                        *c.spammer_reasons.entry(reason).or_default() += 1;
                    }
                    (Some(s), Some("egress")) if s == tenant && dropped => {
                        c.tenant_drops += 1;
                        *c.tenant_reasons.entry(reason).or_default() += 1;
                    }
                    (Some(s), Some("ingress")) if s == blocked && dropped => {
                        c.blocked_drops += 1;
                        c.blocked_country = e["country"].as_str().map(str::to_owned);
                    }
                    _ => {}
                }
            }
            Some("ban_added") => {
                c.ban_added += 1;
                if e["src"] == spammer {
                    c.spammer_bans += 1;
                    c.spammer_max_strikes = c.spammer_max_strikes.max(e["strikes"].as_u64().unwrap_or(0));
                }
            }
            Some("tenant_suspect") => c.suspects.push(e),
            Some("policy_reload") => c.reloads.push(e),
            _ => {}
        }
    }
    c
}

/// `smtpguard report --events FILE ARGS`: its stdout.
fn report(lab: &Lab, args: &[&str]) -> String {
    let out = Command::new(&lab.smtpguard).arg("report").arg("--events").arg(&lab.events).args(args).output().expect("running smtpguard report");
    assert!(out.status.success(), "smtpguard report {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn the_report_of_a_flood_and_a_blocked_tenant_counts_what_the_event_file_says() {
    require_root();
    let mut lab = Lab::new(&smtpguard_bin(), "report").expect("lab");
    let policy_path = lab.dir.join("policy.yaml");
    std::fs::write(&policy_path, policy(&lab)).unwrap();
    lab.start_controller(&policy_path, "native").expect("controller");
    let v4 = |role| Family::V4.addr(role);
    let (spammer, tenant, mx, blocked) = (v4(Role::Spammer), v4(Role::Tenant), v4(Role::Mx), v4(Role::Blocked));

    // The spammer floods (20 sessions a second, at most 30 s) until banned.
    let banned = |lab: &Lab| lab.smtpguard(&["bans"]).is_ok_and(|b| b.contains(spammer));
    let f = flood(&lab, Family::V4, 1200, Duration::from_secs(30), banned).expect("flood");
    assert!(banned(&lab), "the spammer was not banned after {} sessions in {:.1} s; controller log:\n{}", f.attempts, f.seconds, lab.controller_log());
    assert!(f.accepted > 0 && f.accepted < f.attempts, "some sessions got through before the limit, not all: {}/{}", f.accepted, f.attempts);
    // A source in a blocked country knocks; the tenant VM tries to send out on 25, three times.
    assert!(greeting(&lab.wan, blocked, tenant, 25).is_err(), "the geo-fence drops {blocked}");
    for _ in 0..3 {
        assert!(!swaks(&lab.tenant, tenant, mx, 25).unwrap(), "the tenant's outbound mail on 25 is blocked");
    }
    // Every kind of event the test looks at is in the file, then the controller stops.
    let events = lab.events.clone();
    let file = || std::fs::read_to_string(&events).unwrap_or_default();
    let seen = eventually(Duration::from_secs(10), || {
        let c = count(&file(), spammer, tenant, blocked);
        c.spammer_bans > 0 && c.spammer_drops > 0 && c.tenant_drops > 0 && c.blocked_drops > 0 && !c.suspects.is_empty()
    });
    assert!(seen, "events missing from the file: {:?}", count(&file(), spammer, tenant, blocked));
    lab.kill_controller();
    let text = file();
    let c = count(&text, spammer, tenant, blocked);
    eprintln!("counted in the event file: {c:?}");

    let r: Value = serde_json::from_str(&report(&lab, &["--format", "json"])).expect("one JSON object");
    // Lines read and skipped.
    assert_eq!(r["period"]["lines_read"], c.lines, "{}", r["period"]);
    assert_eq!(r["period"]["skipped"]["unparsable"], c.unparsable, "{}", r["period"]);
    assert_eq!(r["events"]["drop_sample"], c.drop_samples);
    assert_eq!(r["events"]["ban_added"], c.ban_added);
    // The spammer: the top source, every drop counted, exactly, by reason.
    let top = &r["sources"]["rows"][0];
    assert_eq!(top["source"], spammer, "top source: {}", r["sources"]);
    assert_eq!(top["drops"], c.spammer_drops, "{top}");
    assert_eq!(top["exact"], true, "{top}");
    assert_eq!(top["reasons"], serde_json::to_value(&c.spammer_reasons).unwrap(), "{top}");
    assert!(c.spammer_reasons.keys().any(|r| r == "rate_limited") && c.spammer_reasons.keys().any(|r| r == "banned"), "limited, then banned: {:?}", c.spammer_reasons);
    // Its bans and strikes.
    let bans = r["bans"]["by_source"]["rows"].as_array().unwrap();
    let ban = bans.iter().find(|b| b["source"] == spammer).unwrap_or_else(|| panic!("no ban row for {spammer}: {}", r["bans"]));
    assert_eq!((&ban["added"], &ban["max_strikes"]), (&Value::from(c.spammer_bans), &Value::from(c.spammer_max_strikes)), "{ban}");
    assert_eq!(r["bans"]["totals"]["added"], c.ban_added);
    // The blocked country.
    let country = c.blocked_country.clone().expect("the blocked source's drops name its country");
    let row = r["countries"]["rows"].as_array().unwrap().iter().find(|row| row["country"] == country.as_str()).unwrap_or_else(|| panic!("{country} not in {}", r["countries"]));
    assert_eq!(row["drops"], c.blocked_drops, "{row}");
    // The tenant: the top blocked tenant, exactly, by reason; its suspect events.
    let t = &r["tenants"]["drops"]["rows"][0];
    assert_eq!(t["source"], tenant, "{}", r["tenants"]);
    assert_eq!(t["drops"], c.tenant_drops, "{t}");
    assert_eq!(t["reasons"], serde_json::to_value(&c.tenant_reasons).unwrap(), "{t}");
    assert!(!r["sources"]["rows"].as_array().unwrap().iter().any(|s| s["source"] == tenant), "the tenant is no outside source");
    let suspects = r["tenants"]["suspects"]["shown"].as_array().unwrap();
    assert_eq!(suspects.len(), c.suspects.len());
    assert!(suspects.iter().all(|s| s["src"] == tenant && s["interface"] == "tap-t" && s["quarantine_s"] == 600), "{suspects:?}");
    // The start's policy reload names the policy and its SHA-256.
    let reloads = r["reloads"]["events"]["shown"].as_array().unwrap();
    assert_eq!(reloads.len(), c.reloads.len());
    let sha = Command::new("sha256sum").arg(&policy_path).output().expect("sha256sum");
    let sha = String::from_utf8_lossy(&sha.stdout).split_whitespace().next().expect("a digest").to_owned();
    assert_eq!((reloads[0]["trigger"].as_str(), reloads[0]["sha256"].as_str()), (Some("start"), Some(sha.as_str())), "{}", reloads[0]);
    assert_eq!(reloads[0]["policy"].as_str(), Some(policy_path.to_str().unwrap()));

    // The Markdown says the same.
    let md = report(&lab, &[]);
    for row in [format!("| {spammer} | {} |", c.spammer_drops), format!("| {tenant} | {} |", c.tenant_drops), format!("| {spammer} | ")] {
        assert!(md.contains(&row), "{row:?} not in the Markdown report:\n{md}");
    }
    let ban_row = md.lines().find(|l| l.starts_with(&format!("| {spammer} | ")) && l.matches('|').count() == 11).unwrap_or_else(|| panic!("no ban row:\n{md}"));
    let cells: Vec<&str> = ban_row.split('|').map(str::trim).collect();
    assert_eq!((cells[3], cells[4]), (c.spammer_bans.to_string().as_str(), c.spammer_max_strikes.to_string().as_str()), "{ban_row}");
    assert!(md.contains(&format!("| tap-t | {tenant} |")), "suspect row:\n{md}");
    assert!(md.contains(&format!("`{}`", &sha[..12])), "the policy's short SHA-256:\n{md}");
}
