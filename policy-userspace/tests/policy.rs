//! The policy language without a kernel: validation errors with positions,
//! warnings, the compiler's folding (golden files), geo databases built
//! here, the example policies, and robustness against any input.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use policy_common::{direction, reason, verdict};
use serde::Serialize;
use smtpguard::{
    reference::{decide, AclIndex, Packet, SourceState},
    policy::{self, analyze, compile_with, input::Limits, time, Compiled, Diagnostics, ReadOptions},
};

#[path = "support/crafted_mmdb.rs"]
mod crafted_mmdb;

const TODAY: &str = "2026-12-01";

fn options() -> ReadOptions {
    ReadOptions { today: time::parse_date(TODAY), ..ReadOptions::default() }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("smtpguard-policy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(dir: &Path, text: &str) -> (Option<policy::Policy>, Diagnostics) {
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).unwrap();
    let (p, mut d) = policy::load_file(&path, &options());
    if let Some(p) = &p {
        analyze::warnings(p, &mut d);
    }
    (p, d)
}

/// Each invalid policy yields an error at the given line and column, on the
/// given field, with a message containing the given words.
#[test]
fn every_kind_of_mistake_is_an_error_with_position_and_field() {
    let dir = temp_dir("errors");
    std::fs::write(dir.join("list.txt"), "192.0.2.0/24\n10.0.0.1/8 ; host bits\n").unwrap();
    // (name, policy text, expected line and column, field, words in the message)
    type Case<'a> = (&'a str, &'a str, (usize, usize), &'a str, &'a str);
    let cases: &[Case] = &[
        ("missing version", "mode: enforce\n", (1, 1), "version", "missing"),
        ("wrong version", "version: 2\n", (1, 10), "version", "not supported"),
        ("unknown top field", "version: 1\ncolour: red\n", (2, 1), "colour", "unknown field"),
        ("unknown nested field", "version: 1\negress: {alow: []}\n", (2, 10), "egress.alow", "valid fields here"),
        ("wrong type", "version: 1\negress: [1, 2]\n", (2, 9), "egress", "expected a mapping"),
        ("bad mode", "version: 1\nmode: strict\n", (2, 7), "mode", "enforce, monitor"),
        ("bad cidr", "version: 1\negress: {deny: [300.1.1.1/8]}\n", (2, 17), "egress.deny[0]", "not a CIDR"),
        ("host bits", "version: 1\negress: {deny: [{cidr: 10.1.2.3/8}]}\n", (2, 24), "egress.deny[0].cidr", "did you mean 10.0.0.0/8"),
        ("unguarded rule port", "version: 1\negress: {deny: [{cidr: 10.0.0.0/8, ports: [80]}]}\n", (2, 44), "egress.deny[0].ports[0]", "not guarded"),
        ("unguarded default", "version: 1\negress: {default: {80: deny}}\n", (2, 20), "egress.default.80", "not a guarded port"),
        ("bad profile", "version: 1\nports: {25: mail}\n", (2, 13), "ports.25", "smtp, smtps, submission, other"),
        ("too many ports", "version: 1\nports: {25: smtp, 465: smtps, 587: submission, 2525: other, 26: other}\n", (2, 8), "ports", "at most 4"),
        ("zero rate", "version: 1\ningress: {rate_limit: {new_per_minute: 0}}\n", (2, 40), "ingress.rate_limit.new_per_minute", "out of range"),
        ("impossible rate", "version: 1\ningress: {rate_limit: {new_per_minute: 1000000}}\n", (2, 40), "ingress.rate_limit.new_per_minute", "out of range"),
        ("bad duration", "version: 1\ningress: {rate_limit: {new_per_minute: 60, ban: soon}}\n", (2, 49), "ingress.rate_limit.ban", "not a duration"),
        ("ban threshold too high", "version: 1\ningress: {rate_limit: {new_per_minute: 60, ban_above_per_minute: 70000}}\n", (2, 66), "ingress.rate_limit.ban_above_per_minute", "out of range"),
        ("unknown country", "version: 1\ningress: {geo: {database: db.mmdb, block: [XX]}}\n", (2, 44), "ingress.geo.block[0]", "not an ISO 3166-1"),
        ("unreadable database", "version: 1\ningress: {geo: {database: nowhere.mmdb, block: [US]}}\n", (2, 27), "ingress.geo.database", "cannot open"),
        ("unreadable list", "version: 1\ningress: {deny_files: [missing.txt]}\n", (2, 24), "ingress.deny_files[0]", "cannot read list file"),
        ("duplicate id", "version: 1\negress:\n  allow: [{id: a, cidr: 10.0.0.0/8}]\n  deny: [{id: a, cidr: 11.0.0.0/8}]\n", (4, 15), "egress.deny[0].id", "duplicate id `a` (first used at line 3"),
        ("bad date", "version: 1\negress: {exemptions: [{cidr: 10.0.0.0/8, until: 2027-02-30}]}\n", (2, 49), "egress.exemptions[0].until", "YYYY-MM-DD"),
        ("exemption without date", "version: 1\negress: {exemptions: [{cidr: 10.0.0.0/8}]}\n", (2, 23), "egress.exemptions[0].until", "missing"),
        ("bad smtp command", "version: 1\ningress: {smtp_commands: {block: [HELO]}}\n", (2, 35), "ingress.smtp_commands.block[0]", "VRFY, EXPN"),
        ("block and allow_only", "version: 1\ningress: {geo: {database: db.mmdb, block: [US], allow_only: [DE]}}\n", (2, 61), "ingress.geo.allow_only", "not both"),
        ("repeated field", "version: 1\nmode: enforce\nmode: monitor\n", (3, 1), "mode", "repeated"),
        ("syntax", "version: 1\negress: {allow: [1.2.3.4\n", (3, 1), "", "YAML syntax"),
        ("bad size", "version: 1\nlimits: {list_file_bytes: 64MB/s}\n", (2, 27), "limits.list_file_bytes", "unknown unit"),
        ("zero size", "version: 1\nlimits: {geo_database_bytes: 0}\n", (2, 30), "limits.geo_database_bytes", "out of range"),
        ("unknown limit", "version: 1\nlimits: {nodes: 5}\n", (2, 10), "limits.nodes", "list_file_bytes, geo_database_bytes, geo_networks"),
        ("deep nesting", &format!("version: 1\nx: {}\n", "[".repeat(200)), (2, 67), "", "nested deeper than 64 levels"),
    ];
    let mut failures = Vec::new();
    for (name, text, (line, col), field, words) in cases {
        let (p, diags) = load(&dir, text);
        let found = diags
            .errors()
            .any(|d| d.pos.line == *line && d.pos.col == *col && d.field == *field && d.message.contains(words));
        if p.is_some() || !found {
            failures.push(format!("{name}: wanted {line}:{col} {field} `{words}`, got:\n{diags}"));
        }
    }
    // List-file errors name the list file and its line.
    let (_, diags) = load(&dir, "version: 1\ningress: {deny_files: [list.txt]}\n");
    let list_error = diags.errors().find(|d| d.file.ends_with("list.txt"));
    match list_error {
        Some(d) if d.pos.line == 2 && d.message.contains("host bits") => {}
        other => failures.push(format!("list file error: {other:?}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let dir = temp_dir("many");
    let (p, diags) = load(&dir, "version: 1\nmode: x\negress: {deny: [bad, 10.0.0.1/8], default: {25: maybe}}\n");
    assert!(p.is_none());
    assert_eq!(diags.errors().count(), 4, "{diags}");
}

#[test]
fn shadowed_rules_and_overlaps_are_warned_with_both_ids() {
    let dir = temp_dir("warnings");
    let (p, diags) = load(
        &dir,
        "version: 1\negress:\n  allow:\n    - {id: wide, cidr: 10.0.0.0/8}\n    - {id: narrow, cidr: 10.1.0.0/16}\n  deny:\n    - {id: hole, cidr: 10.2.0.0/16}\n",
    );
    assert!(p.is_some(), "{diags}");
    let w: Vec<String> = diags.warnings().map(|d| format!("{}:{} {}", d.pos.line, d.pos.col, d.message)).collect();
    assert!(w.iter().any(|m| m.starts_with("5:7") && m.contains("`narrow`") && m.contains("`wide`") && m.contains("never match")), "{w:?}");
    assert!(w.iter().any(|m| m.contains("`wide`") && m.contains("`hole`") && m.contains("overlap")), "{w:?}");
    assert_eq!(w.len(), 2, "{w:?}");
}

#[test]
fn an_expired_exemption_stops_applying() {
    let dir = temp_dir("expiry");
    let text = "version: 1\negress:\n  default: {25: deny}\n  exemptions:\n    - {id: old, cidr: 10.0.0.0/8, until: 2026-11-30}\n    - {id: new, cidr: 11.0.0.0/8, until: 2026-12-01}\n";
    let (p, diags) = load(&dir, text);
    let p = p.unwrap();
    assert!(diags.warnings().any(|d| d.message.contains("`old` expired on 2026-11-30")), "{diags}");
    let c = compile_with(&p, time::parse_date(TODAY).unwrap(), &Default::default()).unwrap();
    let ids: Vec<&str> = c.rules.iter().map(|r| &*r.id).collect();
    assert_eq!(ids, ["new"]);
    assert_eq!(c.next_expiry, time::parse_date("2026-12-02"), "recompile due the day after `new` ends");
    let explain = |src: &str| {
        let packet = Packet::new(direction::EGRESS, src.parse().unwrap(), "203.0.113.1".parse().unwrap(), 25, true, vec![]);
        decide(&c, &AclIndex::new(&c), &packet, SourceState::default(), None).counted
    };
    assert_eq!(explain("10.0.0.1"), Some((verdict::DROP, reason::DEFAULT_DENY)));
    assert_eq!(explain("11.0.0.1"), Some((verdict::PASS, reason::ALLOW_ACL)));
}

/// A stable text rendering of what the compiler produced.
fn render(c: &Compiled) -> String {
    let mut out = String::new();
    for d in [direction::INGRESS, direction::EGRESS] {
        let p = &c.config.direction[d as usize];
        out += &format!(
            "{}: ports {:?} profiles {:?} defaults {:?} mode {} malformed {} sides {} smtp {} rate {} {}ns/{}ns ban>{} {}s x{} max {}s geo {}\n",
            direction::NAMES[d as usize],
            p.ports.iter().filter(|p| **p != policy_common::PORT_UNUSED).collect::<Vec<_>>(),
            p.profile,
            p.default_verdict,
            p.mode,
            p.malformed_verdict,
            p.acl_sides,
            p.smtp_block,
            p.rate_enabled,
            p.rate_interval_ns,
            p.rate_tolerance_ns,
            p.ban_threshold,
            p.ban_base_s,
            p.ban_factor,
            p.ban_max_s,
            p.geo_enabled,
        );
        let blocked: Vec<String> = (0..256u32).filter(|i| p.geo_enabled != 0 && p.geo_drops(*i)).map(|i| c.country(i).unwrap_or("none").to_owned()).collect();
        if !blocked.is_empty() {
            out += &format!("  geo drops: {}\n", blocked.join(" "));
        }
    }
    let name = |id: u32| c.rule_slot(id).map(|r| r.id.clone()).unwrap_or_else(|| "-".into());
    let entry = |e: &policy_common::AclEntry| {
        let slots: Vec<String> = (0..4).map(|s| format!("{}/{}", name(e.allow_rule[s]), name(e.deny_rule[s]))).collect();
        format!("allow/deny by slot [{}] country {}", slots.join(" "), c.country(e.country).unwrap_or("-"))
    };
    for (scope, net, e) in &c.v4 {
        out += &format!("v4 scope {scope} {net}: {}\n", entry(e));
    }
    for (scope, net, e) in &c.v6 {
        out += &format!("v6 scope {scope} {net}: {}\n", entry(e));
    }
    out
}

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(actual, expected, "golden {} differs; rerun with UPDATE_GOLDEN=1 after checking the change", path.display());
}

/// `note` differs between records, so the writer cannot merge networks
/// itself and the compiler's merging is what the test sees.
#[derive(Serialize)]
struct GeoLite {
    country: IsoCode,
    note: String,
}

#[derive(Serialize)]
struct IsoCode {
    iso_code: &'static str,
}

#[derive(Serialize)]
struct TopLevel {
    country_code: &'static str,
    note: String,
}

/// A small database: each network and its country.
fn write_db(path: &Path, geolite: bool, nets: &[(&str, &'static str)]) {
    let mut w = mmdb_writer::Writer::new(if geolite { "GeoLite2-Country" } else { "country" });
    for (i, (net, cc)) in nets.iter().enumerate() {
        let net: ipnet::IpNet = net.parse().unwrap();
        let note = format!("record {i}");
        if geolite {
            w.insert(net, &GeoLite { country: IsoCode { iso_code: cc }, note }).unwrap();
        } else {
            w.insert(net, &TopLevel { country_code: cc, note }).unwrap();
        }
    }
    std::fs::write(path, w.to_bytes().unwrap()).unwrap();
}

#[test]
fn golden_fold_of_allow_deny_and_exemptions() {
    let dir = temp_dir("golden-acl");
    let text = "\
version: 1
ports: {25: smtp, 587: submission}
egress:
  default: {25: deny}
  allow:
    - {id: relay, cidr: 203.0.113.10/32, ports: [25]}
    - {id: office, cidr: 10.0.0.0/8, side: local}
  deny:
    - {id: lab, cidr: 10.9.0.0/16, side: local}
    - {id: bad-peer, cidr: 2001:db8:bad::/48}
  exemptions:
    - {id: ticket-1, cidr: 192.0.2.0/28, ports: [25], until: 2027-01-31}
ingress:
  deny: [198.51.100.0/24, 198.51.100.128/25]
  allow: [{id: partner, cidr: 198.51.100.200/32}]
";
    let (p, diags) = load(&dir, text);
    let p = p.unwrap_or_else(|| panic!("{diags}"));
    let c = compile_with(&p, time::parse_date(TODAY).unwrap(), &Default::default()).unwrap();
    golden("fold-acl", &render(&c));
}

#[test]
fn golden_geo_from_own_databases_in_both_record_layouts() {
    let dir = temp_dir("golden-geo");
    let nets = [
        ("192.0.2.0/25", "KP"),
        ("192.0.2.128/25", "KP"),
        ("198.51.100.0/24", "DE"),
        ("203.0.113.0/24", "US"),
        ("2001:db8:100::/48", "KP"),
        ("2001:db8:200::/48", "US"),
    ];
    write_db(&dir.join("geolite.mmdb"), true, &nets);
    write_db(&dir.join("flat.mmdb"), false, &nets);
    let mut renders = Vec::new();
    for (db, field) in [("geolite.mmdb", "country.iso_code"), ("flat.mmdb", "country_code")] {
        let text = format!(
            "version: 1\ningress:\n  geo: {{database: {db}, field: {field}, block: [KP]}}\n  deny: [{{id: d, cidr: 192.0.2.0/24}}]\negress:\n  geo: {{database: {db}, field: {field}, allow_only: [US, DE]}}\n"
        );
        let (p, diags) = load(&dir, &text);
        let p = p.unwrap_or_else(|| panic!("{diags}"));
        let c = policy::compile(&p, time::parse_date(TODAY).unwrap()).unwrap();
        // The two /25s of KP merged into one /24.
        assert_eq!(c.geo.networks_read, 12);
        renders.push(render(&c));

        let decide_at = |dir: u8, src: &str, dst: &str| {
            let packet = Packet::new(dir, src.parse().unwrap(), dst.parse().unwrap(), 25, true, vec![]);
            let d = decide(&c, &AclIndex::new(&c), &packet, SourceState::default(), None);
            (d.counted, c.country(d.country).map(str::to_owned))
        };
        assert_eq!(decide_at(direction::INGRESS, "2001:db8:100::1", "2001:db8:1::25"), (Some((verdict::DROP, reason::GEO)), Some("KP".into())));
        assert_eq!(decide_at(direction::INGRESS, "198.51.100.7", "192.0.2.200").0, Some((verdict::PASS, reason::DEFAULT_ALLOW)));
        // A deny and a blocked country on the same prefix: the deny decides.
        assert_eq!(decide_at(direction::INGRESS, "192.0.2.1", "198.51.100.1").0, Some((verdict::DROP, reason::DENY_ACL)));
        // Allow-only on egress: unknown and unlisted countries drop.
        assert_eq!(decide_at(direction::EGRESS, "192.0.2.9", "203.0.113.5").0, Some((verdict::PASS, reason::DEFAULT_ALLOW)));
        assert_eq!(decide_at(direction::EGRESS, "192.0.2.9", "192.0.2.200").0, Some((verdict::DROP, reason::GEO)));
        assert_eq!(decide_at(direction::EGRESS, "192.0.2.9", "100.64.0.1").0, Some((verdict::DROP, reason::GEO)));
    }
    assert_eq!(renders[0], renders[1], "both record layouts compile the same");
    golden("fold-geo", &renders[0]);
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The real database: `$SMTPGUARD_GEO_DATABASE` (`cargo xtask test` sets
/// it, fetching the file where it is not beside the clone), else
/// `../shared/data`. Tests that need it are `#[ignore]`d for a plain
/// `cargo test`, so a missing database fails them instead of passing them.
fn real_db() -> PathBuf {
    let p = std::env::var_os("SMTPGUARD_GEO_DATABASE").map(PathBuf::from).unwrap_or_else(|| repo_root().join("../shared/data/geo-whois-asn-country.mmdb"));
    assert!(p.is_file(), "the real geo database is not at {} (cargo xtask test provides it; see shared/data/README.md)", p.display());
    p
}

#[test]
fn example_policies_are_valid_and_say_what_they_promise() {
    // A fixed day: the examples' exemptions end on fixed days too.
    let today = time::parse_date(TODAY).unwrap();
    let mut checked = Vec::new();
    for name in ["idc-default.yaml", "monitor-rollout.yaml"] {
        let path = repo_root().join("policies").join(name);
        let (p, mut diags) = policy::load_file(&path, &options());
        let p = p.unwrap_or_else(|| panic!("{name}:\n{diags}"));
        analyze::warnings(&p, &mut diags);
        assert_eq!(diags.warning_count(), 0, "{name}: {diags}");
        let c = policy::compile(&p, today).unwrap();
        let eg = &c.config.direction[direction::EGRESS as usize];
        let ing = &c.config.direction[direction::INGRESS as usize];
        match name {
            "idc-default.yaml" | "monitor-rollout.yaml" => {
                assert_eq!(eg.default_verdict[0], verdict::DROP, "{name}: egress 25 denied");
                assert_eq!(&eg.default_verdict[1..], &[verdict::PASS; 3], "{name}: 465, 587, 2525 open");
                assert_eq!(ing.rate_enabled, 1);
                assert_eq!(ing.rate_interval_ns, 1_000_000_000, "60 per minute");
                assert_eq!(ing.ban_threshold, 100);
                assert_eq!(ing.smtp_block, policy_common::smtp_command::VRFY | policy_common::smtp_command::EXPN);
                assert_eq!(ing.geo_enabled + eg.geo_enabled, 0, "no geo-blocking by default");
                let mode = if name == "idc-default.yaml" { policy_common::mode::ENFORCE } else { policy_common::mode::MONITOR };
                assert_eq!((ing.mode, eg.mode), (mode, mode), "{name}");
            }
            _ => unreachable!(),
        }
        checked.push(name);
    }
    eprintln!("checked {checked:?}");
}

#[test]
#[ignore = "needs the real geo database: cargo xtask test provides it"]
fn the_geo_fence_example_is_valid_and_fences_what_it_says() {
    let path = repo_root().join("policies/geo-fence.yaml");
    let options = ReadOptions { geo_database: Some(real_db()), ..options() };
    let (p, mut diags) = policy::load_file(&path, &options);
    let p = p.unwrap_or_else(|| panic!("geo-fence.yaml:\n{diags}"));
    analyze::warnings(&p, &mut diags);
    assert_eq!(diags.warning_count(), 0, "{diags}");
    let c = policy::compile(&p, time::parse_date(TODAY).unwrap()).unwrap();
    let ing = &c.config.direction[direction::INGRESS as usize];
    assert_eq!(ing.geo_enabled, 1);
    assert!(c.geo.networks_read > 1_000_000, "the whole real database is read");
    let kp = c.countries.iter().position(|x| x == "KP").unwrap() as u32 + 1;
    assert!(ing.geo_drops(kp));
}

#[test]
#[ignore = "needs the real geo database: cargo xtask test provides it"]
fn the_whole_real_database_compiles_and_answers_spot_checks() {
    let db = real_db();
    let dir = temp_dir("realdb");
    let text = format!("version: 1\ningress:\n  geo: {{database: {}, field: country_code, allow_only: [US]}}\n", db.display());
    let (p, diags) = load(&dir, &text);
    let p = p.unwrap_or_else(|| panic!("{diags}"));
    let c = policy::compile(&p, time::parse_date(TODAY).unwrap()).unwrap();
    assert!(c.geo.networks_read > 1_000_000 && c.countries.len() > 200, "{:?} {}", c.geo, c.countries.len());
    let acl = AclIndex::new(&c);
    let country = |ip: &str| {
        let packet = Packet::new(direction::INGRESS, ip.parse().unwrap(), "192.0.2.1".parse().unwrap(), 25, true, vec![]);
        let d = decide(&c, &acl, &packet, SourceState::default(), None);
        (c.country(d.country).map(str::to_owned), d.counted)
    };
    assert_eq!(country("8.8.8.8"), (None, Some((verdict::PASS, reason::DEFAULT_ALLOW))), "US passes");
    assert_eq!(country("1.1.1.1"), (Some("AU".into()), Some((verdict::DROP, reason::GEO))));
    assert_eq!(country("2001:4860:4860::8888").1, Some((verdict::PASS, reason::DEFAULT_ALLOW)));
}

/// Deterministic xorshift, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn no_input_makes_the_loader_panic() {
    let dir = temp_dir("fuzz");
    let base = std::fs::read_to_string(repo_root().join("policies/idc-default.yaml")).unwrap();
    let bytes = base.as_bytes();
    let alphabet = b" :-[]{},#'\"\n\t0123456789abcxyz/.*&!|>";
    let mut rng = Rng(0x5eed);
    let mut outcomes = BTreeMap::new();
    for _ in 0..3000 {
        let mut text = bytes.to_vec();
        for _ in 0..(1 + rng.next() % 4) {
            let at = (rng.next() as usize) % text.len();
            match rng.next() % 3 {
                0 => text[at] = alphabet[(rng.next() as usize) % alphabet.len()],
                1 => {
                    text.remove(at);
                }
                _ => text.insert(at, alphabet[(rng.next() as usize) % alphabet.len()]),
            }
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        let result = std::panic::catch_unwind(|| {
            let mut diags = Diagnostics::default();
            let p = policy::load_str(&dir.join("fuzz.yaml"), &text, &options(), &mut diags);
            (p.is_some(), diags.has_errors())
        });
        let (valid, errors) = result.unwrap_or_else(|_| panic!("the loader panicked on:\n{text}"));
        assert_ne!(valid, errors, "valid policies have no errors, invalid ones have some");
        *outcomes.entry(valid).or_insert(0) += 1;
    }
    assert!(outcomes.get(&false).copied().unwrap_or(0) > 100, "mutations found errors: {outcomes:?}");
}

#[test]
fn the_schema_names_every_field_the_loader_accepts() {
    let schema = policy::schema::schema().to_string();
    for field in [
        "version", "mode", "ports", "events", "ingress", "egress", "default", "allow", "deny", "exemptions", "allow_files",
        "deny_files", "rate_limit", "new_per_minute", "burst", "ban_above_per_minute", "ban", "escalate", "factor", "max",
        "geo", "database", "field", "block", "allow_only", "unknown", "smtp_commands", "malformed", "until", "side", "cidr",
        "comment", "drop_sample_one_in", "per_second", "file", "limits", "list_file_bytes", "geo_database_bytes",
        "geo_networks",
    ] {
        assert!(schema.contains(&format!("\"{field}\"")), "schema lacks {field}");
    }
}

#[test]
fn explain_names_the_rule_and_its_line() {
    let path = repo_root().join("policies/idc-default.yaml");
    let (p, _) = policy::load_file(&path, &options());
    let c = policy::compile(&p.unwrap(), time::parse_date(TODAY).unwrap()).unwrap();
    let acl = AclIndex::new(&c);
    let run = |dir: u8, src: &str, dst: &str, dport: u16, payload: &str| {
        let packet = Packet::new(dir, src.parse::<IpAddr>().unwrap(), dst.parse().unwrap(), dport, payload.is_empty(), payload.as_bytes().to_vec());
        let d = decide(&c, &acl, &packet, SourceState::default(), None);
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let (peer, local) = if dir == direction::INGRESS { (src, dst) } else { (dst, src) };
        let line = c.matching_network(d.rule, peer).or_else(|| c.matching_network(d.rule, local));
        (d.counted, line.map(|r| (r.id.clone(), r.origin.pos.line)))
    };
    assert_eq!(run(direction::EGRESS, "192.0.2.50", "203.0.113.10", 25, ""), (Some((verdict::PASS, reason::ALLOW_ACL)), Some(("relay-a".into(), 13))));
    assert_eq!(run(direction::EGRESS, "198.51.100.3", "192.0.2.99", 25, ""), (Some((verdict::PASS, reason::ALLOW_ACL)), Some(("ticket-4711".into(), 17))));
    assert_eq!(run(direction::EGRESS, "192.0.2.50", "192.0.2.99", 25, "").0, Some((verdict::DROP, reason::DEFAULT_DENY)));
    assert_eq!(run(direction::EGRESS, "192.0.2.50", "192.0.2.99", 587, "").0, Some((verdict::PASS, reason::DEFAULT_ALLOW)));
    assert_eq!(run(direction::INGRESS, "198.18.5.5", "192.0.2.99", 25, ""), (Some((verdict::DROP, reason::DENY_ACL)), Some(("drop-list".into(), 4))));
    assert_eq!(run(direction::INGRESS, "203.0.113.99", "192.0.2.99", 25, "VRFY root\r\n").0, Some((verdict::DROP, reason::SMTP_COMMAND)));
    assert_eq!(run(direction::INGRESS, "203.0.113.99", "192.0.2.99", 80, "").0, None);
}

/// The one error of a load, as `line:col field: message`.
fn only_error(diags: &Diagnostics) -> String {
    assert_eq!(diags.error_count(), 1, "{diags}");
    let d = diags.errors().next().unwrap();
    format!("{}:{} {}: {}", d.pos.line, d.pos.col, d.field, d.message)
}

/// Loads in a thread, so that a load that blocks fails the test instead
/// of hanging it.
fn load_within(path: &Path, options: ReadOptions, limit: Duration) -> (Option<policy::Policy>, Diagnostics) {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(policy::load_file(&path, &options));
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("loading took longer than {limit:?}"))
}

#[test]
fn an_alias_bomb_is_refused_at_its_alias_in_bounded_time() {
    let dir = temp_dir("bomb");
    let mut text = String::from("version: 1\na: &a [x, x, x, x, x, x, x, x, x, x]\n");
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for w in names.windows(2) {
        text += &format!("{}: &{} [{}]\n", w[1], w[1], vec![format!("*{}", w[0]); 10].join(", "));
    }
    assert!(text.len() < 500, "a few hundred bytes");
    let path = dir.join("bomb.yaml");
    std::fs::write(&path, &text).unwrap();
    let start = Instant::now();
    let (p, diags) = load_within(&path, options(), Duration::from_secs(30));
    assert!(p.is_none());
    // Line 7 (`f`: ten copies of `e`) crosses 1,000,000 nodes at its 7th alias.
    assert_eq!(only_error(&diags), "7:32 : YAML syntax: this alias makes the document larger than 1000000 nodes; this reader refuses it");
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn list_files_that_are_not_regular_files_are_refused_at_once_naming_them() {
    let dir = temp_dir("kinds");
    let fifo = dir.join("feed.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::create_dir(dir.join("lists.d")).unwrap();
    for (name, what) in [("/dev/zero", "a character device"), ("feed.fifo", "a FIFO (named pipe)"), ("lists.d", "a directory")] {
        let path = dir.join("policy.yaml");
        std::fs::write(&path, format!("version: 1\ningress: {{deny_files: [{name}]}}\n")).unwrap();
        // No writer ever opens the FIFO: a blocking open would never return.
        let (p, diags) = load_within(&path, options(), Duration::from_secs(10));
        assert!(p.is_none());
        let shown = if name.starts_with('/') { PathBuf::from(name) } else { dir.join(name) };
        assert_eq!(
            only_error(&diags),
            format!("2:24 ingress.deny_files[0]: cannot read list file: {} is {what}, not a regular file; only regular files are read", shown.display())
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_list_over_its_limit_is_refused_until_the_flag_or_the_policy_raises_it() {
    let dir = temp_dir("limit");
    let list: String = (0..200).map(|i| format!("10.{i}.0.0/16\n")).collect();
    assert_eq!(list.len(), 2_690);
    std::fs::write(dir.join("list.txt"), &list).unwrap();
    let policy = |limits: &str| {
        let path = dir.join("policy.yaml");
        std::fs::write(&path, format!("version: 1\n{limits}ingress: {{deny_files: [list.txt]}}\n")).unwrap();
        path
    };
    let flag = |bytes| ReadOptions { limits: Limits { list_file_bytes: bytes, ..Limits::default() }, ..options() };
    let networks = |p: Option<policy::Policy>| p.map(|p| p.ingress.network_count());

    // The flag replaces the default of 8 MiB ...
    let (p, diags) = policy::load_file(&policy(""), &flag(2_000));
    assert!(p.is_none());
    let e = only_error(&diags);
    assert!(e.starts_with("2:24 ingress.deny_files[0]: cannot read list file: ") && e.contains("list.txt is 2690 bytes, over 2000 bytes"), "{e}");
    assert!(e.contains("`limits: {list_file_bytes: ...}` in the policy or --max-list-bytes"), "{e}");
    assert_eq!(networks(policy::load_file(&policy(""), &flag(2_690)).0), Some(200), "the limit itself is allowed");
    // ... and the policy's `limits` overrides both, up or down.
    let (p, diags) = policy::load_file(&policy("limits: {list_file_bytes: 3KiB}\n"), &flag(2_000));
    assert_eq!(networks(p), Some(200), "{diags}");
    let (p, diags) = policy::load_file(&policy("limits: {list_file_bytes: 1kB}\n"), &options());
    assert!(p.is_none() && only_error(&diags).contains("over 1000 bytes"), "{diags}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_million_bad_lines_keep_twenty_errors_and_count_the_rest() {
    let dir = temp_dir("million");
    std::fs::write(dir.join("bad.txt"), "junk\n".repeat(1_000_000)).unwrap();
    let (p, diags) = load(&dir, "version: 1\ningress: {deny_files: [bad.txt]}\n");
    assert!(p.is_none());
    let lines: Vec<usize> = diags.errors().map(|d| d.pos.line).collect();
    assert_eq!(lines, (1..=20).collect::<Vec<_>>());
    assert_eq!((diags.error_count(), diags.suppressed_errors()), (1_000_000, 999_980));
    let summaries: Vec<String> = diags.summaries().collect();
    assert_eq!(summaries, [format!("{}: 999980 more errors not shown (the first 20 of each kind are)", dir.join("bad.txt").display())]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_policy_file_that_is_too_large_or_not_text_is_refused() {
    let dir = temp_dir("policy-file");
    let path = dir.join("policy.yaml");
    std::fs::write(&path, format!("version: 1\n#{}\n", "x".repeat(4 << 20))).unwrap();
    let (_, diags) = policy::load_file(&path, &options());
    let e = only_error(&diags);
    assert!(e.starts_with("0:0 : cannot read the policy: ") && e.contains("is 4194317 bytes, over 4 MiB (the limit for a policy file"), "{e}");
    std::fs::write(&path, b"version: 1\nmode: enf\xffrce\n").unwrap();
    let (_, diags) = policy::load_file(&path, &options());
    assert_eq!(only_error(&diags), "2:10 : not UTF-8 text; a policy is UTF-8 YAML");
    let (_, diags) = load_within(Path::new("/dev/zero"), options(), Duration::from_secs(10));
    assert!(only_error(&diags).contains("/dev/zero is a character device"), "{diags}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_crafted_geo_database_of_two_to_the_32_networks_is_refused_naming_it() {
    let dir = temp_dir("crafted-geo");
    let db = dir.join("crafted.mmdb");
    let bytes = crafted_mmdb::self_similar_mmdb(32);
    assert!(bytes.len() < 500, "{} bytes", bytes.len());
    std::fs::write(&db, bytes).unwrap();
    let text = |limits: &str| format!("version: 1\n{limits}ingress:\n  geo: {{database: crafted.mmdb, block: [US]}}\n");
    let start = Instant::now();
    let (p, diags) = load(&dir, &text(""));
    assert!(p.is_none());
    assert_eq!(
        only_error(&diags),
        format!("3:19 ingress.geo.database: {} holds more than 4000000 networks (real databases hold about a million); refused. If it is genuine, raise `limits: {{geo_networks: ...}}` in the policy or --max-geo-networks", db.display())
    );
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    let (_, diags) = load(&dir, &text("limits: {geo_networks: 1000}\n"));
    assert!(only_error(&diags).starts_with(&format!("4:19 ingress.geo.database: {} holds more than 1000 networks", db.display())), "{diags}");
    // A smaller tree of the same kind is read whole.
    std::fs::write(&db, crafted_mmdb::self_similar_mmdb(16)).unwrap();
    let (p, diags) = load(&dir, &text(""));
    let c = policy::compile(&p.unwrap_or_else(|| panic!("{diags}")), time::parse_date(TODAY).unwrap()).unwrap();
    assert_eq!(c.geo.networks_read, 65_536);
    // Read through the bounded reader: never a device, never over its limit.
    let (_, diags) = load(&dir, "version: 1\ningress:\n  geo: {database: /dev/zero, block: [US]}\n");
    assert_eq!(only_error(&diags), "3:19 ingress.geo.database: /dev/zero is a character device, not a regular file; only regular files are read");
    let (_, diags) = load(&dir, &text("limits: {geo_database_bytes: 100}\n"));
    assert!(only_error(&diags).contains("over 100 bytes (the limit for a geo database; raise it with `limits: {geo_database_bytes: ...}`"), "{diags}");
    std::fs::remove_dir_all(&dir).unwrap();
}
