//! The roll-out workflow of issue 18 on a veth pair: per-rule hit counts
//! (kernel counters per rule id, carried across reloads by rule id,
//! exported and shown by `status --rules`).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    packet::{TcpFrame, RST},
    peers::{assert_dropped, assert_greeted, connect},
    pairlab::{distinct_hosts_list, http_get, metric, write_policy, PairLab, RunningController, TestPins, CLIENT_DENIED, CLIENT_OK, SERVER},
    rawtcp::send_frames,
    require_root,
};

/// `n` reset segments from `src` to the server's port 25: each crosses
/// the uplink's XDP hook exactly once, and no host answers them.
fn frames(src: &str, n: usize) -> Vec<Vec<u8>> {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), SERVER.parse().unwrap());
    (0..n).map(|i| TcpFrame::new(src, dst, 25, RST).sport(20_000 + i as u16).build()).collect()
}

fn rule_hits(lab: &PairLab, port: u16, rule: &str) -> Option<f64> {
    metric(&http_get(lab, port, "/metrics").unwrap(), "smtpguard_rule_hits_total", &[&format!("rule=\"{rule}\"")])
}

/// Polls until every rule's count is at least the number sent (bounded),
/// then holds each to exactly that.
fn expect_hits(lab: &PairLab, port: u16, want: &[(&str, f64)]) {
    let start = Instant::now();
    while want.iter().any(|(r, n)| rule_hits(lab, port, r).unwrap_or(0.0) < *n) {
        assert!(start.elapsed() < Duration::from_secs(5), "hits within 5 s: {:?}", want.iter().map(|(r, _)| (r, rule_hits(lab, port, r))).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(20));
    }
    for (rule, n) in want {
        assert_eq!(rule_hits(lab, port, rule), Some(*n), "{rule}");
    }
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn every_rule_counts_the_packets_it_decided_across_reloads() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("rulehits");
    let dir = state.policy_dir();
    std::fs::create_dir_all(dir.join("lists")).unwrap();
    // A list of 3 networks: one rule, whichever line matches.
    std::fs::write(dir.join("lists/drop.txt"), format!("{CLIENT_DENIED}/32\n203.0.113.0/24\n198.18.0.0/15\n")).unwrap();
    let text = |extra: &str| {
        format!(
            "version: 1\ningress:\n  default: {{25: allow}}\n  allow:\n    - {{id: office, cidr: {CLIENT_OK}/32}}\n  exemptions: [{{id: ticket-1, cidr: 198.51.100.0/24, until: 2999-01-01}}]\n  deny_files: [lists/drop.txt]\n{extra}"
        )
    };
    let policy = write_policy(&dir, "policy.yaml", &text("  deny: [{id: unused-deny, cidr: 100.64.0.0/10}]\n"));
    let _ctl = RunningController::start(&lab, &state, &policy, 19730).expect("controller");
    send_frames(&lab.client, "a0", &[frames(CLIENT_OK, 7), frames(CLIENT_DENIED, 5)].concat()).unwrap();
    expect_hits(&lab, 19730, &[("office", 7.0), ("file:lists/drop.txt", 5.0), ("ticket-1", 0.0), ("unused-deny", 0.0)]);

    let (code, table) = state.cmd(&["status", "--rules"]);
    assert_eq!(code, 0, "{table}");
    let row = |id: &str| table.lines().find(|l| l.split_whitespace().next() == Some(id)).unwrap_or_else(|| panic!("{id}: {table}")).to_owned();
    assert!(row("office").split_whitespace().any(|w| w == "7"), "{table}");
    assert!(row("file:lists/drop.txt").contains(" 3 ") && row("file:lists/drop.txt").split_whitespace().any(|w| w == "5"), "3 networks, 5 hits: {table}");
    assert!(row("unused-deny").contains("never hit"), "{table}");
    assert!(row("ticket-1").contains("exemption until 2999-01-01") && row("ticket-1").contains("unused"), "{table}");
    assert!(table.contains("4 rules, 2 never hit"), "{table}");

    // A reload that drops a rule and puts a new one first: the counts stay
    // with their rule ids, and go on from there.
    std::fs::write(&policy, text("  deny: [{id: new-first, cidr: 100.64.0.0/10}]\n").replace("  allow:\n", "  allow:\n    - {id: new-allow, cidr: 10.0.0.0/8}\n")).unwrap();
    let (code, out) = state.cmd(&["reload"]);
    assert_eq!(code, 0, "{out}");
    let start = Instant::now();
    while rule_hits(&lab, 19730, "new-allow").is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "the reload applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rule_hits(&lab, 19730, "unused-deny"), None, "a rule gone is no series any more");
    send_frames(&lab.client, "a0", &[frames(CLIENT_OK, 3), frames(CLIENT_DENIED, 2)].concat()).unwrap();
    expect_hits(&lab, 19730, &[("office", 10.0), ("file:lists/drop.txt", 7.0), ("new-allow", 0.0)]);
}

/// The controller on the uplink b0, judging `shadow` beside `policy`.
fn start_with_shadow(lab: &PairLab, state: &TestPins, policy: &std::path::Path, port: u16, shadow: &std::path::Path) -> anyhow::Result<RunningController> {
    let shadow = shadow.display().to_string();
    RunningController::start_on(lab, state, policy, port, &["--uplink", "b0", "--shadow", &shadow])
}

fn shadow_json(state: &TestPins) -> serde_json::Value {
    let (code, out) = state.cmd(&["shadow", "--json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_shadow_candidate_that_denies_a_legitimate_sender_is_counted_while_mail_flows() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("shadow");
    let dir = state.policy_dir();
    let current = format!("version: 1\nevents: {{drop_sample_one_in: 1, per_second: 1000}}\ningress:\n  default: {{25: allow}}\n  deny: [{{id: bad-host, cidr: {CLIENT_DENIED}/32}}]\n");
    let policy = write_policy(&dir, "policy.yaml", &current);
    // Its IPv6 deny-all must not cover IPv4 sources (the shadow keeps
    // both families in one trie).
    let candidate = current.replace("  deny: [", &format!("  deny: [{{id: too-wide, cidr: {CLIENT_OK}/32}}, {{id: no-v6, cidr: \"::/0\"}}, "));
    let shadow = write_policy(&dir, "candidate.yaml", &candidate);
    let _ctl = start_with_shadow(&lab, &state, &policy, 19731, &shadow).expect("controller");

    send_frames(&lab.client, "a0", &[frames(CLIENT_OK, 6), frames(CLIENT_DENIED, 4), frames("192.0.2.77", 3)].concat()).unwrap();
    let start = Instant::now();
    let mut report = shadow_json(&state);
    while report["judged"][0].as_u64() < Some(13) {
        assert!(start.elapsed() < Duration::from_secs(5), "13 packets judged by the shadow within 5 s: {report}");
        std::thread::sleep(Duration::from_millis(20));
        report = shadow_json(&state);
    }
    assert_eq!(report["judged"][0].as_u64(), Some(13), "{report}");
    // Only the legitimate sender's packets differ, each once; the denied
    // source is denied by both, the third allowed by both.
    assert_eq!(report["differences"].as_u64(), Some(6), "{report}");
    assert_eq!(report["newly_dropped"].as_u64(), Some(6), "{report}");
    let rows = report["by_decision"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report}");
    assert_eq!(
        (rows[0]["direction"].as_str(), rows[0]["port"].as_str(), rows[0]["current"].as_str(), rows[0]["candidate"].as_str(), rows[0]["candidate_rule"].as_str(), rows[0]["packets"].as_u64()),
        (Some("ingress"), Some("25"), Some("pass/default_allow"), Some("drop/deny_acl"), Some("too-wide"), Some(6)),
        "{report}"
    );
    assert_eq!(report["top_sources"][0][0].as_str(), Some(CLIENT_OK), "{report}");

    // Mail still flows: only the policy in force decides.
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "the legitimate sender, judged by the shadow");
    let m = http_get(&lab, 19731, "/metrics").unwrap();
    let counted = metric(&m, "smtpguard_shadow_differences_total", &["shadow_rule=\"too-wide\"", "decision=\"pass/default_allow\"", "shadow_decision=\"drop/deny_acl\""]);
    assert!(counted.is_some_and(|n| n > 6.0), "the real connection's packets too: {counted:?}");
    // Sampled as events naming both decisions.
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(state.events_file()).unwrap_or_default();
        let found = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|e| e["event"] == "shadow_difference");
        if let Some(e) = found {
            assert_eq!((e["src"].as_str(), e["verdict"].as_str(), e["shadow_verdict"].as_str(), e["shadow_rule"].as_str()), (Some(CLIENT_OK), Some("pass"), Some("drop"), Some("too-wide")), "{e}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "a shadow_difference event: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn promote_swaps_the_candidate_in_with_no_packet_judged_by_both_policies() {
    use std::sync::{atomic::{AtomicBool, Ordering}, Arc};

    use aya::maps::{Map, MapData, PerCpuArray};
    use policy_common::{direction, reason, stats_index, verdict, Counter};
    use smtpguard_tests::{packet::SYN, testrun::{obj_get, time_run}};

    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("promote");
    let dir = state.policy_dir();
    let (peer, local) = ("198.51.100.7", "203.0.113.25");
    let a = format!("version: 1\ningress:\n  default: {{25: allow}}\n  deny: [{{id: a-peer, cidr: {peer}/32}}]\n");
    let b = format!("version: 1\ningress:\n  default: {{25: deny}}\n  allow: [{{id: b-local, cidr: {local}/32, side: local}}]\n");
    let policy = write_policy(&dir, "policy.yaml", &a);
    let shadow = write_policy(&dir, "candidate.yaml", &b);
    let _ctl = start_with_shadow(&lab, &state, &policy, 19732, &shadow).expect("controller");

    let prog = obj_get(&state.pin_dir.join("prog_xdp_ingress")).unwrap();
    let stats = PerCpuArray::<MapData, Counter>::try_from(Map::PerCpuArray(MapData::from_pin(state.pin_dir.join("STATS")).unwrap())).unwrap();
    let frame = TcpFrame::new(peer.parse().unwrap(), local.parse().unwrap(), 25, SYN).build();
    let cells = [
        stats_index(direction::INGRESS, verdict::DROP, reason::DENY_ACL, 0),
        stats_index(direction::INGRESS, verdict::PASS, reason::ALLOW_ACL, 0),
        stats_index(direction::INGRESS, verdict::DROP, reason::DEFAULT_DENY, 0),
        stats_index(direction::INGRESS, verdict::PASS, reason::DEFAULT_ALLOW, 0),
    ];
    let read = |i: u32| stats.get(&i, 0).map(|v| v.iter().map(|c| c.packets).sum::<u64>()).unwrap_or(0);
    let before: Vec<u64> = cells.iter().map(|i| read(*i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, frame) = (stop.clone(), frame.clone());
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let started = Instant::now();
            // Bounded: stops when told, after 60 s or 500,000,000 packets.
            while !stop.load(Ordering::Relaxed) && sent < 500_000_000 && started.elapsed() < Duration::from_secs(60) {
                use std::os::fd::AsFd;
                time_run(prog.as_fd(), &frame, 100).unwrap();
                sent += 100;
            }
            sent
        })
    };
    // Both policies judge the traffic before the promote: A decides.
    let start = Instant::now();
    while read(cells[0]) == before[0] || shadow_json(&state)["differences"].as_u64() == Some(0) {
        assert!(start.elapsed() < Duration::from_secs(10), "traffic judged by A with B in the shadow");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, out) = state.cmd(&["promote"]);
    assert_eq!(code, 0, "{out}");
    let start = Instant::now();
    while read(cells[1]) == before[1] {
        assert!(start.elapsed() < Duration::from_secs(10), "traffic judged by B after the promote");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.join().unwrap();
    let delta: Vec<u64> = cells.iter().zip(&before).map(|(i, b)| read(*i) - b).collect();
    assert_eq!(delta.iter().sum::<u64>(), sent, "every packet counted in one of the cells: {delta:?}");
    assert!(delta[0] > 0 && delta[1] > 0, "both policies were in force: {delta:?}");
    assert_eq!((delta[2], delta[3]), (0, 0), "packets judged by half of one policy and half of another: {delta:?}");

    assert_eq!(std::fs::read_to_string(&policy).unwrap(), b, "the candidate is where --policy points");
    assert_eq!(std::fs::read_to_string(dir.join("policy.yaml.before-promote")).unwrap(), a, "the old policy kept aside");
    let (code, said) = state.cmd(&["shadow"]);
    assert_ne!(code, 0);
    assert!(said.contains("no shadow policy is loaded"), "{said}");
    // A reload does not bring the promoted candidate back as a shadow.
    let (code, out) = state.cmd(&["reload"]);
    assert_eq!(code, 0, "{out}");
    state.wait_events_where(1, "SIGHUP reload", |e| e["event"] == "policy_reload" && e["trigger"] == "SIGHUP");
    let (code, said) = state.cmd(&["shadow"]);
    assert!(code != 0 && said.contains("no shadow policy is loaded"), "after a reload: {said}");
    let reloads = state.events("policy_reload");
    assert!(reloads.iter().any(|e| e["trigger"] == "promote"), "{reloads:?}");
    assert_eq!(metric(&http_get(&lab, 19732, "/metrics").unwrap(), "smtpguard_promotions_total", &["result=\"ok\""]), Some(1.0));
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_scheduled_switch_to_enforce_is_announced_a_day_ahead_and_enforces_on_its_day() {
    use smtpguard::policy::time;
    use smtpguard_tests::peers::assert_dropped;

    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("enforcefrom");
    let dir = state.policy_dir();
    let text = |day: i64| format!("version: 1\nmode: monitor\nenforce_from: {}\ningress:\n  default: {{25: allow}}\n  deny: [{{id: bad-host, cidr: {CLIENT_DENIED}/32}}]\n", time::format_date(day));
    let tomorrow = time::today() + 1;
    let policy = write_policy(&dir, "policy.yaml", &text(tomorrow));
    let _ctl = RunningController::start(&lab, &state, &policy, 19733).expect("controller");
    // Monitor mode until tomorrow: the denied source passes, counted.
    assert_greeted(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "monitored until tomorrow");
    let m = http_get(&lab, 19733, "/metrics").unwrap();
    assert_eq!(metric(&m, "smtpguard_enforce_from_timestamp_seconds", &["direction=\"ingress\""]), Some(tomorrow as f64 * 86_400.0), "{m}");
    // Announced: less than a day ahead.
    let start = Instant::now();
    let announced = loop {
        let text = std::fs::read_to_string(state.events_file()).unwrap_or_default();
        let found: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|e: &serde_json::Value| e["event"] == "enforce_scheduled").collect();
        if !found.is_empty() {
            break found;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "an enforce_scheduled event: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(announced.len(), 2, "one per direction: {announced:?}");
    assert_eq!(announced[0]["enforce_from"].as_str(), Some(time::format_date(tomorrow).as_str()));
    assert!(announced[0]["hours_left"].as_f64().is_some_and(|h| h > 0.0 && h <= 24.0), "{announced:?}");

    // Its day come (today, here): it enforces.
    std::fs::write(&policy, text(time::today())).unwrap();
    let (code, out) = state.cmd(&["reload"]);
    assert_eq!(code, 0, "{out}");
    let start = Instant::now();
    while metric(&http_get(&lab, 19733, "/metrics").unwrap(), "smtpguard_enforce_from_timestamp_seconds", &["direction=\"ingress\""])!= Some(0.0) {
        assert!(start.elapsed() < Duration::from_secs(10), "the reload applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "enforced from its day on");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "the allowed source");
}

/// Paths in a policy are relative to its directory. A candidate kept
/// elsewhere that reads a file beside it (here its geo database) would read
/// another one, or none, once written where --policy points: refused,
/// nothing changed, the shadow still loaded.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn promote_refuses_a_candidate_that_would_read_other_files_from_where_policy_points() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("promotedir");
    let dir = state.policy_dir();
    let current = "version: 1\ningress:\n  default: {25: allow}\n";
    let policy = write_policy(&dir, "policy.yaml", current);
    let elsewhere = dir.join("candidates");
    std::fs::create_dir_all(&elsewhere).unwrap();
    smtpguard_tests::randomized::write_geo(&elsewhere.join("geo.mmdb"));
    let candidate = format!("{current}  geo: {{database: geo.mmdb, field: country_code, block: [KP], unknown: allow}}\n");
    let shadow = write_policy(&elsewhere, "candidate.yaml", &candidate);
    let _ctl = start_with_shadow(&lab, &state, &policy, 19734, &shadow).expect("controller");

    let (code, said) = state.cmd(&["promote"]);
    assert_ne!(code, 0, "{said}");
    assert!(said.contains(&format!("reads {}", elsewhere.join("geo.mmdb").display())) && said.contains("keep both in one directory"), "{said}");
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), current, "the policy file is untouched");
    assert!(!dir.join("policy.yaml.before-promote").exists());
    let (code, out) = state.cmd(&["shadow"]);
    assert_eq!(code, 0, "the candidate is still the shadow: {out}");
    assert_eq!(metric(&http_get(&lab, 19734, "/metrics").unwrap(), "smtpguard_promotions_total", &["result=\"failed\""]), Some(1.0));
}

/// A promote asked for while a reload compiles is taken after it: the
/// reload's policy, read before the promote, must not land over the
/// promoted one.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_promote_during_a_reload_waits_for_it_and_is_not_undone_by_it() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("promoterace");
    let dir = state.policy_dir();
    // A list long enough to keep a reload compiling for a while.
    let (hosts, n) = distinct_hosts_list(1 << 20);
    write_policy(&dir, "slow.txt", &hosts);
    let policy = write_policy(&dir, "policy.yaml", "version: 1\ningress:\n  default: {25: allow}\n  deny_files: [slow.txt]\n");
    let candidate = format!("version: 1\ningress:\n  default: {{25: allow}}\n  deny: [{{id: b-deny, cidr: {CLIENT_OK}/32}}]\n");
    let shadow = write_policy(&dir, "candidate.yaml", &candidate);
    let _ctl = start_with_shadow(&lab, &state, &policy, 19735, &shadow).expect("controller");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "the sender the candidate denies, before the promote");

    let (code, out) = state.cmd(&["reload"]);
    assert_eq!(code, 0, "{out}");
    let start = Instant::now();
    while !http_get(&lab, 19735, "/healthz").unwrap_or_default().contains("reload running") {
        assert!(start.elapsed() < Duration::from_secs(10), "the reload of {n} networks seen running");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, out) = state.cmd(&["promote"]);
    assert_eq!(code, 0, "{out}");
    let reloads = state.wait_events_where(3, "start, reload and promote", |e| e["event"] == "policy_reload" && e["policy"] == policy.display().to_string());
    let triggers: Vec<_> = reloads.iter().map(|e| (e["trigger"].as_str().unwrap_or("").to_owned(), e["result"].as_str().unwrap_or("").to_owned())).collect();
    eprintln!("reload of {n} networks: {:?} ms", reloads[1]["duration_ms"]);
    let ok = |t: &str| (t.to_owned(), "ok".to_owned());
    assert_eq!(triggers, vec![ok("start"), ok("SIGHUP"), ok("promote")], "the promote came last");
    assert_dropped(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "the promoted candidate is in force");
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), candidate, "and where --policy points");
}

/// What promote would write and a restart read must be what was judged:
/// a list file of the candidate edited since (and rejected as the next
/// shadow) makes promote refuse. And a restart whose --shadow is invalid
/// does not go on judging the shadow the earlier run left in the pins.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn promote_refuses_changed_candidate_files_and_a_restart_drops_a_shadow_it_cannot_load() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("promotelist");
    let dir = state.policy_dir();
    let current = "version: 1\ningress:\n  default: {25: allow}\n";
    let policy = write_policy(&dir, "policy.yaml", current);
    let list = write_policy(&dir, "candidate-deny.txt", &format!("{CLIENT_OK}/32\n"));
    let shadow = write_policy(&dir, "candidate.yaml", &format!("{current}  deny_files: [candidate-deny.txt]\n"));
    let mut ctl = start_with_shadow(&lab, &state, &policy, 19736, &shadow).expect("controller");

    std::fs::write(&list, "not an address\n").unwrap();
    state.wait_events_where(1, "the edited candidate rejected as the next shadow", |e| e["trigger"] == "shadow file change" && e["result"] == "rejected");
    let (code, said) = state.cmd(&["promote"]);
    assert_ne!(code, 0, "{said}");
    assert!(said.contains(&format!("{} changed since the candidate was loaded", list.display())), "{said}");
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), current, "the policy file is untouched");
    assert_eq!(state.cmd(&["shadow"]).0, 0, "the candidate as judged is still the shadow");

    // The list stays invalid: a restart cannot load the candidate.
    ctl.kill9();
    let _ctl = start_with_shadow(&lab, &state, &policy, 19736, &shadow).expect("restart");
    let (code, said) = state.cmd(&["shadow"]);
    assert!(code != 0 && said.contains("no shadow policy is loaded"), "{said}");
    let m = http_get(&lab, 19736, "/metrics").unwrap();
    assert_eq!(metric(&m, "smtpguard_shadow_policy", &[]), None, "no shadow exported: {m}");
}

/// The shadow's counts name ports by the enforced policy's slots: a reload
/// that renumbers them starts the counts again rather than putting the
/// differences seen before under another port.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_reload_that_renumbers_ports_starts_the_shadow_counts_again() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("shadowports");
    let dir = state.policy_dir();
    let current = |ports: &str| format!("version: 1\nports: {{{ports}}}\ningress:\n  default: {{25: allow}}\n");
    let policy = write_policy(&dir, "policy.yaml", &current("25: smtp"));
    let candidate = format!("{}  deny: [{{id: too-wide, cidr: {CLIENT_OK}/32}}]\n", current("25: smtp"));
    let shadow = write_policy(&dir, "candidate.yaml", &candidate);
    let _ctl = start_with_shadow(&lab, &state, &policy, 19737, &shadow).expect("controller");
    let rows = |state: &TestPins| -> Vec<(String, u64)> {
        let r = shadow_json(state);
        r["by_decision"].as_array().unwrap().iter().map(|row| (row["port"].as_str().unwrap_or("").to_owned(), row["packets"].as_u64().unwrap_or(0))).collect()
    };
    let wait_rows = |state: &TestPins, want: Vec<(String, u64)>| {
        let start = Instant::now();
        while rows(state) != want {
            assert!(start.elapsed() < Duration::from_secs(5), "{want:?}: {:?}", rows(state));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    send_frames(&lab.client, "a0", &frames(CLIENT_OK, 6)).unwrap();
    wait_rows(&state, vec![("25".into(), 6)]);

    // Port 465 guarded first: port 25 moves to the second slot.
    std::fs::write(&policy, current("465: smtps, 25: smtp")).unwrap();
    let (code, out) = state.cmd(&["reload"]);
    assert_eq!(code, 0, "{out}");
    state.wait_events_where(1, "SIGHUP reload", |e| e["event"] == "policy_reload" && e["trigger"] == "SIGHUP");
    assert_eq!(rows(&state), vec![], "counted again from the reload");
    send_frames(&lab.client, "a0", &frames(CLIENT_OK, 3)).unwrap();
    wait_rows(&state, vec![("25".into(), 3)]);
}
