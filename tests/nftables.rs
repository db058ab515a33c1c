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
    nft::{ruleset, Sizes},
    policy::{self, time, ReadOptions},
    reference::{decide, AclIndex, Decision, Fragment, Packet, SourceState},
};
use smtpguard_tests::{
    nftlab::NftLab,
    packet::TcpFrame,
    randomized::{random_packet, random_policy, write_geo},
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

fn frame_of(p: &Packet, rng: &mut Rng) -> Vec<u8> {
    let flags = if p.syn { 0x02 } else { 0x18 };
    let frame = TcpFrame::new(p.src, p.dst, p.dport, flags).sport(p.sport).seq(p.seq).payload(&p.payload);
    match p.fragment {
        Fragment::Whole => frame,
        Fragment::First => frame.fragment(0, true),
        Fragment::Later => frame.fragment(1 + rng.below(100) as u16, rng.chance(50)),
    }
    .build()
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
        // Each policy replaces the last in one transaction, as a reload does.
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
