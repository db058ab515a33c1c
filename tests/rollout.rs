//! The roll-out workflow of issue 18 on a veth pair: per-rule hit counts
//! (kernel counters per rule id, carried across reloads by rule id,
//! exported and shown by `status --rules`).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    packet::{TcpFrame, RST},
    pairlab::{http_get, metric, write_policy, PairLab, RunningController, TestPins, CLIENT_DENIED, CLIENT_OK, SERVER},
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
    expect_hits(&lab, 19730, &[("office", 7.0), ("file:drop.txt", 5.0), ("ticket-1", 0.0), ("unused-deny", 0.0)]);

    let (code, table) = state.cmd(&["status", "--rules"]);
    assert_eq!(code, 0, "{table}");
    let row = |id: &str| table.lines().find(|l| l.split_whitespace().next() == Some(id)).unwrap_or_else(|| panic!("{id}: {table}")).to_owned();
    assert!(row("office").split_whitespace().any(|w| w == "7"), "{table}");
    assert!(row("file:drop.txt").contains(" 3 ") && row("file:drop.txt").split_whitespace().any(|w| w == "5"), "3 networks, 5 hits: {table}");
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
    expect_hits(&lab, 19730, &[("office", 10.0), ("file:drop.txt", 7.0), ("new-allow", 0.0)]);
}
