//! The nftables backend held to the userspace model, as the eBPF datapath
//! is in `differential.rs`: random policies, compiled the normal way and
//! rendered into smtpguard's nftables table in a namespace, judge random
//! packets sent through real nftables; each packet's fate is read back
//! from the table's named counters and must be the model's. The one
//! documented difference the random mix reaches (docs/nftables.md: a
//! blocked command is matched only at the start of a segment) is counted
//! apart, its expectation being the model's decision without the command.

use std::collections::HashMap;

use policy_common::{profile, reason, verdict};
use smtpguard::{
    nft::{self, ruleset, Sizes},
    policy::{self, time, ReadOptions},
    reference::{decide, AclIndex, Decision, Packet, SourceState},
};
use smtpguard_tests::{
    nftlab::NftLab,
    packet::TcpFrame,
    randomized::{frame_of, random_packet, random_policy, write_geo},
    require_root,
    rng::Rng,
};

const POLICIES: usize = 30;
const PACKETS_PER_POLICY: usize = 40;
const SIZES: Sizes = Sizes { sources: 65_536 };

/// Does nftables' command match (the verb at the payload's start, any
/// case, then a byte that is not a letter or digit) find a blocked verb?
fn matched_at_start(payload: &[u8], blocked: u8) -> bool {
    if payload.len() < 5 || payload[4].is_ascii_alphanumeric() {
        return false;
    }
    let verb = payload[..4].to_ascii_uppercase();
    (verb == b"VRFY" && blocked & policy_common::smtp_command::VRFY != 0) || (verb == b"EXPN" && blocked & policy_common::smtp_command::EXPN != 0)
}

/// The counters a decision moves, by name.
fn expected_counters(p: &Packet, d: &Decision) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    if let Some((v, r)) = d.counted {
        out.insert(ruleset::counter_name(p.direction, v, r, d.port_slot), 1);
    }
    if d.reset {
        out.insert(ruleset::resets_counter(p.direction), 1);
    }
    out
}

#[test]
#[ignore = "privileged: needs root and namespaces; cargo xtask test runs it"]
fn nftables_and_model_agree_on_random_policies_and_packets() {
    require_root();
    let dir = std::env::temp_dir().join(format!("smtpguard-nftdiff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_geo(&dir.join("geo.mmdb"));
    let mut lab = NftLab::new("nftd").expect("the lab");
    let mut rng = Rng(0x00c0_ffee_8765_4321);
    let today = time::parse_date("2026-12-01").expect("a date");
    let mut failures = Vec::new();
    let (mut runs, mut counted, mut drops, mut command_elsewhere) = (0, 0, 0, 0);
    let mut by_reason = std::collections::BTreeMap::new();
    for p in 0..POLICIES {
        let text = random_policy(&mut rng);
        let path = dir.join(format!("policy-{p}.yaml"));
        std::fs::write(&path, &text).unwrap();
        let (policy, diags) = policy::load_file(&path, &ReadOptions::default());
        let policy = policy.unwrap_or_else(|| panic!("generated policy is invalid:\n{text}\n{diags}"));
        let c = policy::compile(&policy, today).unwrap();
        let acl = AclIndex::new(&c);
        // Each policy replaces the last in one transaction, as a reload does
        // (the sets told only what changed).
        lab.load(&c, SIZES).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        for _ in 0..PACKETS_PER_POLICY {
            let packet = random_packet(&mut rng);
            let mut expected = decide(&c, &acl, &packet, SourceState::default(), None);
            let dp = &c.config.direction[packet.direction as usize];
            if let (Some((_, reason::SMTP_COMMAND)), Some(slot)) = (expected.counted, expected.port_slot) {
                if dp.profile[slot] == profile::SMTP && !matched_at_start(&packet.payload, dp.smtp_block) {
                    command_elsewhere += 1;
                    expected = decide(&c, &acl, &Packet { payload: Vec::new(), ..packet.clone() }, SourceState::default(), None);
                }
            }
            let moved = lab.judge(packet.direction, &frame_of(&packet, &mut rng)).unwrap();
            runs += 1;
            if let Some((v, r)) = expected.counted {
                *by_reason.entry(reason::NAMES[r as usize]).or_insert(0usize) += 1;
                counted += 1;
                drops += usize::from(v == verdict::DROP);
            }
            let want = expected_counters(&packet, &expected);
            if moved != want {
                failures.push(format!("policy {p}, {packet:?}: nftables moved {moved:?}, the model {want:?}\n{text}"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{runs} packets over {POLICIES} policies through nftables: {counted} counted, {drops} dropped, {command_elsewhere} with a \
         command past the segment's start (documented), {} disagreements; by reason {by_reason:?}",
        failures.len()
    );
    assert!(counted > runs / 2 && drops > runs / 10, "the random mix should exercise the pipeline");
    for why in ["smtp_command", "fragment", "allow_acl", "deny_acl", "geo", "default_deny"] {
        assert!(by_reason.get(why).is_some_and(|n| *n >= 3), "the random mix should reach {why} (by reason {by_reason:?})");
    }
    for f in &failures {
        eprintln!("{}", f.lines().next().unwrap_or_default());
    }
    assert!(failures.is_empty(), "{}", failures.iter().take(3).cloned().collect::<Vec<_>>().join("\n\n"));
}

const PROVIDER_TABLES: &str = "table inet provider {
	set blocklist {
		type ipv4_addr
		elements = { 198.51.100.77 }
	}

	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @blocklist drop
		tcp dport 22 accept
	}
}
table netdev provider_edge {
	chain in_up0 {
		type filter hook ingress device \"up0\" priority filter; policy accept;
		udp dport 4789 accept
	}
}
";

fn provider_tables(lab: &NftLab) -> String {
    lab.nft(&["list", "table", "inet", "provider"]).unwrap() + &lab.nft(&["list", "table", "netdev", "provider_edge"]).unwrap()
}

fn syn_from(src: &str, dport: u16) -> Vec<u8> {
    TcpFrame::new(src.parse().unwrap(), "192.0.2.10".parse().unwrap(), dport, 0x02).build()
}

fn lab_policy(extra_deny: &str) -> String {
    format!(
        "version: 1
ports: {{25: smtp, 587: submission}}
ingress:
  default: {{25: allow, 587: allow}}
  deny:
    - {{cidr: 203.0.113.9/32}}{extra_deny}
  rate_limit: {{new_per_minute: 600, burst: 50, ban_above_per_minute: 10, ban: 1m, escalate: {{factor: 3, max: 1h}}}}
egress:
  default: {{25: deny, 587: allow}}
"
    )
}

/// Polls `f` every 50 ms for up to 10 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what} did not happen within 10 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The operator's whole life with the backend on a host whose nftables
/// already holds the provider's own tables: they are kept byte for byte
/// across run, reload, kill -9, restart and detach, while smtpguard's
/// table enforces (denies, manual and automatic bans that survive reloads
/// and restarts, enforcement with no controller) and `detach` deletes its
/// table and nothing else.
#[test]
#[ignore = "privileged: needs root and namespaces; cargo xtask test runs it"]
fn the_backend_runs_reloads_survives_and_detaches_leaving_other_tables_as_they_were() {
    require_root();
    let mut lab = NftLab::new("nftrun").expect("the lab");
    let file = lab.dir.join("provider.nft");
    std::fs::write(&file, PROVIDER_TABLES).unwrap();
    lab.host.exec(&["nft", "-f", file.to_str().unwrap()]).expect("the provider's tables load");
    let before = provider_tables(&lab);
    assert!(before.contains("198.51.100.77") && before.contains("4789"), "{before}");

    let policy = lab.dir.join("policy.yaml");
    std::fs::write(&policy, lab_policy("")).unwrap();
    lab.start_controller(&policy).expect("smtpguard run --backend nftables");
    assert_eq!(provider_tables(&lab), before, "run changed the provider's tables");
    let deny = ruleset::counter_name(0, verdict::DROP, reason::DENY_ACL, Some(0));
    let moved = lab.judge(0, &syn_from("203.0.113.9", 25)).unwrap();
    assert_eq!(moved.get(&deny), Some(&1), "{moved:?}");
    let metrics = lab.http_get("/metrics").unwrap();
    assert!(
        metrics.contains(r#"smtpguard_packets_total{backend="nftables",direction="ingress",port="25",reason="deny_acl",verdict="drop"} 1"#),
        "{metrics}"
    );

    // A manual ban, then a reload that adds a deny: the ban stays.
    lab.smtpguard(&["ban", "198.51.100.5", "--for", "1h", "--reason", "test"]).unwrap();
    std::fs::write(&policy, lab_policy("\n    - {cidr: 203.0.113.10/32}")).unwrap();
    lab.smtpguard(&["reload"]).unwrap();
    eventually("generation 2", || lab.http_get("/healthz").is_ok_and(|h| h.contains("generation 2")));
    assert_eq!(provider_tables(&lab), before, "the reload changed the provider's tables");
    let moved = lab.judge(0, &syn_from("203.0.113.10", 25)).unwrap();
    assert_eq!(moved.get(&deny), Some(&1), "the reloaded deny: {moved:?}");
    let banned = ruleset::counter_name(0, verdict::DROP, reason::BANNED, Some(0));
    let moved = lab.judge(0, &syn_from("198.51.100.5", 25)).unwrap();
    assert_eq!(moved.get(&banned), Some(&1), "the manual ban across the reload: {moved:?}");

    // An edit with 25 invalid lines: rejected, generation 2 stays, and
    // the event holds the first 20 errors and a count of the rest.
    let good = std::fs::read_to_string(&policy).unwrap();
    let bad: String = (0..25).map(|i| format!("\n    - {{cidr: 203.0.113.{i}/33}}")).collect();
    std::fs::write(&policy, lab_policy(&bad)).unwrap();
    let _ = lab.smtpguard(&["reload"]);
    let mut rejected = serde_json::Value::Null;
    eventually("the rejected reload's event", || {
        rejected = lab.events().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|e| e["event"] == "policy_reload" && e["result"] == "rejected").unwrap_or_default();
        !rejected.is_null()
    });
    assert_eq!((rejected["errors"].as_array().map(Vec::len), rejected["more_errors"].as_u64()), (Some(20), Some(5)), "{rejected}");
    assert!(lab.http_get("/healthz").unwrap().contains("generation 2"));
    assert_eq!(lab.judge(0, &syn_from("203.0.113.10", 25)).unwrap().get(&deny), Some(&1), "generation 2 still judges");
    // Put back (the file watch or the reload applies it, perhaps both).
    std::fs::write(&policy, good).unwrap();
    lab.smtpguard(&["reload"]).unwrap();
    let generation = |h: String| h.split_whitespace().nth(2).and_then(|g| g.parse::<u64>().ok());
    eventually("a generation after 2", || lab.http_get("/healthz").ok().and_then(generation).is_some_and(|g| g > 2));

    // Over the ban threshold: the meter bans, the controller records it.
    let rate_ban = ruleset::counter_name(0, verdict::DROP, reason::RATE_BAN, Some(0));
    let mut rate_banned = 0;
    for _ in 0..14 {
        rate_banned += lab.judge(0, &syn_from("203.0.113.50", 25)).unwrap().get(&rate_ban).copied().unwrap_or(0);
    }
    assert_eq!(rate_banned, 1, "one SYN over the threshold starts the ban; the rest find it");
    let mut last = String::new();
    eventually("the automatic ban recorded", || {
        last = lab.smtpguard(&["bans", "--json"]).unwrap_or_else(|e| e.to_string());
        last.contains(r#""origin":"auto","remaining_s""#) && last.contains("203.0.113.50/32")
    });
    eventually("the ban_added event", || lab.events().contains(r#""event":"ban_added""#));
    assert!(lab.smtpguard(&["bans", "--json"]).unwrap().contains(r#""strikes":1"#), "{}", lab.controller_log());
    // Lifted and banned again: a repeat offender, banned three times longer.
    lab.smtpguard(&["unban", "203.0.113.50"]).unwrap();
    assert_eq!(lab.judge(0, &syn_from("203.0.113.50", 25)).unwrap().get(&rate_ban), Some(&1), "banned again at once: its bucket is empty");
    eventually("the second strike recorded", || {
        let b = lab.smtpguard(&["bans", "--json"]).unwrap_or_default();
        b.contains(r#""origin":"escalated""#) && b.contains(r#""strikes":2"#)
    });
    let rows: Vec<serde_json::Value> = serde_json::from_str(lab.smtpguard(&["bans", "--json"]).unwrap().trim()).unwrap();
    let again = rows.iter().find(|r| r["source"] == "203.0.113.50/32").unwrap();
    assert!((170..=180).contains(&again["remaining_s"].as_u64().unwrap()), "escalated to 3 minutes: {again}");

    // kill -9: the table keeps judging.
    lab.kill_controller();
    assert_eq!(provider_tables(&lab), before, "kill -9 changed the provider's tables");
    let moved = lab.judge(0, &syn_from("203.0.113.50", 25)).unwrap();
    assert_eq!(moved.get(&banned), Some(&1), "no controller, still enforced: {moved:?}");

    // A restart takes the table over with its bans.
    lab.start_controller(&policy).expect("restart");
    assert_eq!(provider_tables(&lab), before, "the restart changed the provider's tables");
    let bans = lab.smtpguard(&["bans"]).unwrap();
    assert!(bans.contains("198.51.100.5/32") && bans.contains("203.0.113.50/32") && bans.contains("manual"), "{bans}");
    let status = lab.smtpguard(&["status"]).unwrap();
    assert!(status.contains("backend: nftables") && status.contains("hook_ingress_up0") && status.contains("hook_ingress_tap0"), "{status}");
    // The roll-out levers are the eBPF datapath's (difference 11): each
    // says so and changes nothing.
    for args in [&["bypass", "on"][..], &["shadow"], &["promote"], &["rollback"], &["status", "--rules"]] {
        let said = lab.smtpguard(args).unwrap_err().to_string();
        assert!(said.contains("nftables"), "{args:?}: {said}");
    }
    let p = policy.display().to_string();
    let said = lab.smtpguard(&["run", "--backend", "nftables", "--policy", &p, "--shadow", &p, "--uplink", "up0"]).unwrap_err().to_string();
    assert!(said.contains("--shadow") && said.contains("eBPF backend"), "{said}");
    assert_eq!(provider_tables(&lab), before, "the refusals changed the provider's tables");
    let moved = lab.judge(0, &syn_from("203.0.113.50", 25)).unwrap();
    assert_eq!(moved.get(&banned), Some(&1), "still enforced as before: {moved:?}");

    // Detach: the table goes, the provider's stay, the controller stops.
    lab.smtpguard(&["detach"]).unwrap();
    let status = lab.wait_controller().unwrap();
    assert!(status.success(), "the controller exits cleanly on detach: {status}");
    assert!(lab.nft(&["list", "tables"]).is_ok_and(|t| !t.contains("smtpguard")), "the table is gone");
    assert_eq!(provider_tables(&lab), before, "detach changed the provider's tables");
}

/// Each documented difference (docs/nftables.md) shown on real nftables,
/// next to what the same packet gets where nftables does what eBPF does.
#[test]
#[ignore = "privileged: needs root and namespaces; cargo xtask test runs it"]
fn each_documented_difference_holds_as_documented() {
    require_root();
    let mut lab = NftLab::new("nftdd").expect("the lab");
    let dir = lab.dir.clone();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1
ports: {25: smtp, 587: submission}
ingress:
  default: {25: allow, 587: allow}
  smtp_commands: {block: [VRFY, EXPN]}
  deny:
    - {cidr: 203.0.113.9/32}
  malformed: deny
  rate_limit: {new_per_minute: 6000, burst: 1000, ban_above_per_minute: 10}
egress:
  default: {25: deny, 587: allow}
  established: reset
",
    )
    .unwrap();
    let (p, diags) = policy::load_file(&policy, &ReadOptions::default());
    let c = policy::compile(&p.unwrap_or_else(|| panic!("{diags}")), time::today()).unwrap();
    lab.load(&c, SIZES).unwrap();
    let client: std::net::IpAddr = "198.51.100.20".parse().unwrap();
    let server: std::net::IpAddr = "192.0.2.10".parse().unwrap();
    let data = |payload: &[u8]| TcpFrame::new(client, server, 25, 0x18).payload(payload).build();
    let command = ruleset::counter_name(0, verdict::DROP, reason::SMTP_COMMAND, Some(0));
    let allowed = ruleset::counter_name(0, verdict::PASS, reason::DEFAULT_ALLOW, Some(0));

    // 1. The command filter reads the segment's start only.
    for (payload, caught) in [
        (&b"VRFY root\r\n"[..], true),
        (b"vrfy root\r\n", true),
        (b"EXPN staff\r\n", true),
        (b"VRFYX\r\n", false),
        (b"EHLO x\r\nVRFY root\r\n", false),
        (b" VRFY root\r\n", false),
        (b"VRFY", false),
    ] {
        let moved = lab.judge(0, &data(payload)).unwrap();
        let want = if caught { &command } else { &allowed };
        assert_eq!(moved.get(want), Some(&1), "{:?}: {moved:?}", String::from_utf8_lossy(payload));
    }

    // 2. A frame cut inside its TCP header is not judged: it passes uncounted
    // (eBPF counts it as malformed and, here, drops it).
    let mut cut = TcpFrame::new("203.0.113.9".parse().unwrap(), server, 25, 0x02).build();
    cut.truncate(14 + 20 + 10);
    let moved = lab.judge(0, &cut).unwrap();
    assert!(moved.is_empty(), "a cut frame: {moved:?}");

    // 3. A QinQ frame's inner tag hides its IP header from nftables (the
    // kernel takes the outer tag off before the hook); one tag is judged.
    use smtpguard_tests::packet::{TPID_8021AD, TPID_8021Q};
    let denied = ruleset::counter_name(0, verdict::DROP, reason::DENY_ACL, Some(0));
    let one_tag = TcpFrame::new("203.0.113.9".parse().unwrap(), server, 25, 0x02).vlan(TPID_8021Q, 100).build();
    assert_eq!(lab.judge(0, &one_tag).unwrap().get(&denied), Some(&1), "802.1Q is judged");
    let qinq = TcpFrame::new("203.0.113.9".parse().unwrap(), server, 25, 0x02).vlan(TPID_8021AD, 10).vlan(TPID_8021Q, 100).build();
    assert!(lab.judge(0, &qinq).unwrap().is_empty(), "QinQ passes unjudged");

    // 4. The ban threshold is a token bucket: ten SYNs in a row pass, the
    // eleventh bans, as in a sliding minute; but a token comes back every
    // 6 s, so a source that waits is not banned at its eleventh SYN of the
    // minute (a sliding minute would ban it).
    let syn = |src: &str| TcpFrame::new(src.parse().unwrap(), server, 25, 0x02).build();
    let rate_ban = ruleset::counter_name(0, verdict::DROP, reason::RATE_BAN, Some(0));
    for src in ["198.51.100.30", "198.51.100.31"] {
        for i in 0..10 {
            assert_eq!(lab.judge(0, &syn(src)).unwrap().get(&allowed), Some(&1), "SYN {i} of {src} under the threshold");
        }
    }
    assert_eq!(lab.judge(0, &syn("198.51.100.30")).unwrap().get(&rate_ban), Some(&1), "the eleventh SYN at once bans");
    std::thread::sleep(std::time::Duration::from_millis(6_500));
    assert_eq!(lab.judge(0, &syn("198.51.100.31")).unwrap().get(&allowed), Some(&1), "the eleventh SYN 6.5 s later passes");

    // 5. A source both denied and banned counts as denied (eBPF: banned):
    // the deny list's lookup is the hot path's only one.
    lab.host
        .enter(|| smtpguard::nft::bans::ban("203.0.113.9/32".parse().unwrap(), 600, &smtpguard::nft::bans::Origin::Manual { reason: None }))
        .unwrap()
        .unwrap();
    let denied_syn = TcpFrame::new("203.0.113.9".parse().unwrap(), server, 25, 0x02).build();
    assert_eq!(lab.judge(0, &denied_syn).unwrap().get(&denied), Some(&1), "denied and banned: counted as denied");
    let banned = ruleset::counter_name(0, verdict::DROP, reason::BANNED, Some(0));
    lab.host.enter(|| smtpguard::nft::bans::ban("198.51.100.40/32".parse().unwrap(), 600, &smtpguard::nft::bans::Origin::Manual { reason: None })).unwrap().unwrap();
    assert_eq!(lab.judge(0, &syn("198.51.100.40")).unwrap().get(&banned), Some(&1), "banned only: counted as banned");

    // 6. The host's own segments of a denied connection (uplink egress,
    // where nftables cannot reject) are dropped, not reset; a tenant's are reset.
    let ack = |src: &str| TcpFrame::new(src.parse().unwrap(), "203.0.113.80".parse().unwrap(), 25, 0x10).build();
    let egress_drop = ruleset::counter_name(1, verdict::DROP, reason::DEFAULT_DENY, Some(0));
    let resets = ruleset::resets_counter(1);
    let tenant = lab.judge(1, &ack("10.0.0.5")).unwrap();
    assert_eq!((tenant.get(&egress_drop), tenant.get(&resets)), (Some(&1), Some(&1)), "a tenant's segment is reset: {tenant:?}");
    let host = lab.judge_host_out(&ack("192.0.2.1")).unwrap();
    assert_eq!((host.get(&egress_drop), host.get(&resets)), (Some(&1), None), "the host's own is dropped only: {host:?}");
}

/// `check --backend nftables` names each approximation at the line of the
/// field that asks for it; `render` prints what nft itself parsed.
#[test]
#[ignore = "privileged: needs root and namespaces; cargo xtask test runs it"]
fn check_names_each_approximation_at_its_field_and_render_prints_the_ruleset() {
    require_root();
    let dir = std::env::temp_dir().join(format!("smtpguard-nftcheck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1
ports: {25: smtp}
events: {drop_sample_one_in: 100}
ingress:
  default: {25: allow}
  smtp_commands: {block: [VRFY]}
  rate_limit: {new_per_minute: 60, burst: 10, ban_above_per_minute: 100, escalate: {factor: 4, max: 24h}}
egress:
  default: {25: deny}
  established: reset
  tenant_suspect: {blocked: 50, window: 5m}
",
    )
    .unwrap();
    let bin = smtpguard_tests::smtpguard_bin();
    let out = std::process::Command::new(&bin).args(["check", "--backend", "nftables"]).arg(&policy).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}");
    let file = policy.display().to_string();
    for (line, field) in [
        (3, "events.drop_sample_one_in"),
        (6, "ingress.smtp_commands"),
        (7, "ingress.rate_limit.ban_above_per_minute"),
        (7, "ingress.rate_limit.escalate"),
        (4, "ingress.malformed"),
        (10, "egress.established"),
        (11, "egress.tenant_suspect"),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{file}:{line}:")) && l.contains("nftables backend") && l.contains(field)),
            "no warning at line {line} for {field}:\n{text}"
        );
    }
    let plain = std::process::Command::new(&bin).arg("check").arg(&policy).output().unwrap();
    assert!(!String::from_utf8_lossy(&plain.stderr).contains("nftables backend"), "only with --backend nftables");

    let out = std::process::Command::new(&bin).args(["render", "--backend", "nftables", "--uplink", "eth0", "--tenant", "tap0"]).arg(&policy).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "table netdev smtpguard",
        "type filter hook ingress device \"eth0\"",
        "type filter hook egress device \"eth0\"",
        "type filter hook ingress device \"tap0\"",
        "limit rate over 60/minute burst 10 packets",
        "@ih,0,32 & 0xdfdfdfdf == 0x56524659",
        "size 1310720",
    ] {
        assert!(text.contains(want), "render lacks {want:?}:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One row of the verdict table: a frame into a direction and the one
/// counter it must move (`None`: none), with whether a reset is sent.
struct Row {
    name: String,
    dir: u8,
    frame: Vec<u8>,
    expect: Option<(u8, u8, Option<usize>)>,
    reset: bool,
}

/// The verdict table through real nftables: every reason of the pipeline,
/// in IPv4 and IPv6, untagged and 802.1Q-tagged, enforce and monitor, each
/// row's counter read back (the eBPF table is tests/verdicts.rs).
#[test]
#[ignore = "privileged: needs root and namespaces; cargo xtask test runs it"]
fn verdict_table_through_nftables() {
    require_root();
    use policy_common::direction::{EGRESS as EG, INGRESS as IN};
    use smtpguard_tests::packet::TPID_8021Q;
    let mut lab = NftLab::new("nftvt").expect("the lab");
    let dir = lab.dir.clone();
    smtpguard_tests::randomized::write_geo(&dir.join("geo.mmdb"));
    let policy_text = |mode: &str| {
        format!(
            "version: 1
mode: {mode}
ports: {{25: smtp, 587: submission}}
ingress:
  default: {{25: allow, 587: allow}}
  allow:
    - {{cidr: 10.0.2.0/24}}
    - {{cidr: \"2001:db8:0:2::/64\"}}
  deny:
    - {{cidr: 10.0.3.0/24}}
    - {{cidr: \"2001:db8:0:3::/64\"}}
  geo: {{database: geo.mmdb, field: country_code, block: [KP], unknown: allow}}
  smtp_commands: {{block: [VRFY, EXPN]}}
  rate_limit: {{new_per_minute: 60, burst: 2, ban_above_per_minute: 5}}
egress:
  default: {{25: deny, 587: allow}}
"
        )
    };
    let mut rows_run = 0;
    let mut variant_no = 0u16;
    for mode in ["enforce", "monitor"] {
        let path = dir.join(format!("{mode}.yaml"));
        std::fs::write(&path, policy_text(mode)).unwrap();
        let (p, diags) = policy::load_file(&path, &ReadOptions::default());
        let c = policy::compile(&p.unwrap_or_else(|| panic!("{diags}")), time::today()).unwrap();
        lab.load(&c, SIZES).unwrap();
        let blocked = if mode == "monitor" { verdict::WOULD_DROP } else { verdict::DROP };
        for (v6, tag) in [(false, false), (true, false), (false, true), (true, true)] {
            let variant = format!("{mode} {} {}", if v6 { "IPv6" } else { "IPv4" }, if tag { "802.1Q" } else { "untagged" });
            // SYNs that reach the rate meters come from sources of their own
            // per variant, so rate state never carries over.
            variant_no += 1;
            let n = variant_no;
            let a = |v4: &str, v6a: &str| -> std::net::IpAddr { if v6 { v6a.parse().unwrap() } else { v4.parse().unwrap() } };
            let server = a("192.0.2.10", "2001:db8:ffff::10");
            let banned_src = a(&format!("10.9.0.{n}"), &format!("2001:db8:9:{n}::77"));
            lab.host.enter(|| nft::bans::ban(nft::commands::source_net(banned_src), 600, &nft::bans::Origin::Manual { reason: None })).unwrap().unwrap();
            let frame = |src: std::net::IpAddr, dst: std::net::IpAddr, port: u16, flags: u8, payload: &[u8]| {
                let mut f = TcpFrame::new(src, dst, port, flags).payload(payload);
                if tag {
                    f = f.vlan(TPID_8021Q, 100);
                }
                f
            };
            let syn = |src| frame(src, server, 25, 0x02, b"").build();
            let mut rows = vec![
                Row { name: "allow list".into(), dir: IN, frame: syn(a("10.0.2.5", "2001:db8:0:2::5")), expect: Some((verdict::PASS, reason::ALLOW_ACL, Some(0))), reset: false },
                Row { name: "deny list".into(), dir: IN, frame: syn(a("10.0.3.5", "2001:db8:0:3::5")), expect: Some((blocked, reason::DENY_ACL, Some(0))), reset: false },
                Row {
                    name: "deny list, open connection".into(),
                    dir: IN,
                    frame: frame(a("10.0.3.6", "2001:db8:0:3::6"), server, 25, 0x10, b"").build(),
                    expect: Some((blocked, reason::DENY_ACL, Some(0))),
                    reset: blocked == verdict::DROP,
                },
                Row { name: "geo-fence".into(), dir: IN, frame: syn(a("10.0.1.5", "2001:db8:0:1::5")), expect: Some((blocked, reason::GEO, Some(0))), reset: false },
                Row { name: "banned".into(), dir: IN, frame: syn(banned_src), expect: Some((blocked, reason::BANNED, Some(0))), reset: false },
                Row {
                    name: "nothing against it".into(),
                    dir: IN,
                    // Outside the geo database (unknown: allow), a /64 per variant.
                    frame: syn(a(&format!("10.8.{n}.5"), &format!("2001:db8:8:{n}::5"))),
                    expect: Some((verdict::PASS, reason::DEFAULT_ALLOW, Some(0))),
                    reset: false,
                },
                Row {
                    name: "VRFY".into(),
                    dir: IN,
                    frame: frame(a("10.0.0.6", "2001:db8::6"), server, 25, 0x18, b"VRFY root\r\n").build(),
                    expect: Some((blocked, reason::SMTP_COMMAND, Some(0))),
                    reset: false,
                },
                Row {
                    name: "VRFY on 587 (not plaintext 25)".into(),
                    dir: IN,
                    frame: frame(a("10.0.0.6", "2001:db8::6"), server, 587, 0x18, b"VRFY root\r\n").build(),
                    expect: Some((verdict::PASS, reason::DEFAULT_ALLOW, Some(1))),
                    reset: false,
                },
                Row {
                    name: "first fragment".into(),
                    dir: IN,
                    frame: frame(a("10.0.0.7", "2001:db8::7"), server, 25, 0x18, b"MAIL FROM:<a@b>\r\n").fragment(0, true).build(),
                    expect: Some((blocked, reason::FRAGMENT, Some(0))),
                    reset: false,
                },
                Row {
                    name: "later fragment".into(),
                    dir: IN,
                    frame: frame(a("10.0.0.7", "2001:db8::7"), server, 25, 0x18, b"x\r\n").fragment(3, false).build(),
                    expect: Some((verdict::PASS, reason::FRAGMENT, None)),
                    reset: false,
                },
                Row { name: "unguarded port".into(), dir: IN, frame: frame(a("10.0.3.5", "2001:db8:0:3::5"), server, 80, 0x02, b"").build(), expect: None, reset: false },
                Row {
                    name: "tenant to 25".into(),
                    dir: EG,
                    frame: frame(a("10.50.0.5", "2001:db8:50::5"), a("198.51.100.1", "2001:db8:51::1"), 25, 0x02, b"").build(),
                    expect: Some((blocked, reason::DEFAULT_DENY, Some(0))),
                    reset: false,
                },
                Row {
                    name: "tenant to 587".into(),
                    dir: EG,
                    frame: frame(a("10.50.0.5", "2001:db8:50::5"), a("198.51.100.1", "2001:db8:51::1"), 587, 0x02, b"").build(),
                    expect: Some((verdict::PASS, reason::DEFAULT_ALLOW, Some(1))),
                    reset: false,
                },
            ];
            // A flood from one source: two SYNs pass (burst 2), the next three
            // are rate limited, the sixth goes over the ban threshold (5),
            // and the seventh finds the ban.
            let flooder = a(&format!("10.9.100.{n}"), &format!("2001:db8:9:10{n:02}::1"));
            for (i, why) in [
                (verdict::PASS, reason::DEFAULT_ALLOW),
                (verdict::PASS, reason::DEFAULT_ALLOW),
                (blocked, reason::RATE_LIMITED),
                (blocked, reason::RATE_LIMITED),
                (blocked, reason::RATE_LIMITED),
                (blocked, reason::RATE_BAN),
                (blocked, reason::BANNED),
            ]
            .into_iter()
            .enumerate()
            {
                rows.push(Row { name: format!("flood SYN {}", i + 1), dir: IN, frame: syn(flooder), expect: Some((why.0, why.1, Some(0))), reset: false });
            }
            for row in rows {
                let moved = lab.judge(row.dir, &row.frame).unwrap();
                let mut want = HashMap::new();
                if let Some((v, r, slot)) = row.expect {
                    want.insert(ruleset::counter_name(row.dir, v, r, slot), 1);
                }
                if row.reset {
                    want.insert(ruleset::resets_counter(row.dir), 1);
                }
                assert_eq!(moved, want, "{variant}: {}", row.name);
                rows_run += 1;
            }
        }
    }
    assert!(rows_run >= 150, "{rows_run} rows");
}
