//! The kernel and the userspace model (`explain`) must agree: random
//! policies, written as YAML and compiled the normal way, judge random
//! packets through the real programs (BPF_PROG_TEST_RUN) and through the
//! model, and every verdict and reason must match. Packets come alone or
//! as client streams cut into segments (with retransmissions, gaps and
//! overlaps), so the command filter's state across segments is held to
//! the model too, entry by entry; some are IP fragments.

use policy_common::{reason, stats_index, verdict, PORT_SLOT_UNKNOWN};
use smtpguard::{
    dataplane::Hook,
    reference::{decide, AclIndex, SourceState},
    policy::{self, time, ReadOptions},
};
use smtpguard_tests::{
    fixtures::Harness,
    randomized::{frame_of, random_packet, random_policy, random_stream, write_geo},
    require_root,
    rng::Rng,
};

const POLICIES: usize = 40;
const PACKETS_PER_POLICY: usize = 60;

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn kernel_and_model_agree_on_random_policies_and_packets() {
    require_root();
    let dir = std::env::temp_dir().join(format!("smtpguard-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_geo(&dir.join("geo.mmdb"));
    let mut h = Harness::load().expect("loading the datapath");
    let mut rng = Rng(0x00c0_ffee_1234_5678);
    // A fixed day: the random policies are judged the same on any date.
    let today = time::parse_date("2026-12-01").expect("a date");
    let mut failures = Vec::new();
    let (mut runs, mut counted, mut drops) = (0, 0, 0);
    let mut generation = 0u32;
    // The model's SMTP_FLOWS: like the kernel's, kept across policies.
    let mut flows = std::collections::HashMap::new();
    let mut by_reason = std::collections::BTreeMap::new();
    for p in 0..POLICIES {
        let text = random_policy(&mut rng);
        let path = dir.join(format!("policy-{p}.yaml"));
        std::fs::write(&path, &text).unwrap();
        let (policy, diags) = policy::load_file(&path, &ReadOptions::default());
        let policy = policy.unwrap_or_else(|| panic!("generated policy is invalid:\n{text}\n{diags}"));
        let c = policy::compile(&policy, today).unwrap();
        let acl = AclIndex::new(&c);
        generation ^= 1;
        h.dp.install(generation, &c, p as u64 + 1).unwrap();
        h.dp.activate(generation, 0, 0);
        let mut packets = Vec::new();
        while packets.len() < PACKETS_PER_POLICY {
            if rng.chance(15) {
                packets.extend(random_stream(&mut rng));
            } else {
                packets.push(random_packet(&mut rng));
            }
        }
        for packet in packets {
            let hook = *rng.pick(&Hook::ALL);
            let frame = frame_of(&packet, &mut rng);
            let mut rt = h.dp.runtime();
            rt.hook_direction[hook.index()] = packet.direction;
            h.dp.set_runtime(rt);
            let before = h.dp.stats().unwrap();
            let (rc, _) = h.dp.test_run(hook, &frame, 1).unwrap();
            let after = h.dp.stats().unwrap();
            // Keep every source fresh, as the model assumes.
            h.clear_source(packet.src).unwrap();
            // Verdict, events-lost and ban cells; a fresh source's SYN also
            // claims a way (STATS_CLAIMS), which the model does not track.
            let moved: Vec<usize> = (0..policy_common::STATS_CLAIMS as usize).filter(|i| after[*i].packets != before[*i].packets).collect();
            let key = packet.flow_key();
            let expected = decide(&c, &acl, &packet, SourceState::default(), flows.get(&key).copied());
            if let Some(next) = expected.flow {
                flows.insert(key, next);
            }
            if h.dp.smtp_flow(&key).unwrap() != flows.get(&key).copied() {
                failures.push(format!("policy {p}, {hook:?}, {packet:?}: kernel flow entry {:?}, model {:?}", h.dp.smtp_flow(&key).unwrap(), flows.get(&key)));
            }
            let (pass_code, drop_code) = hook.verdict_codes();
            let expected_cell = expected.counted.map(|(v, r)| stats_index(packet.direction, v, r, expected.port_slot.unwrap_or(PORT_SLOT_UNKNOWN)) as usize);
            let expected_rc = if expected.reset {
                hook.reset_code()
            } else if expected.passes() {
                pass_code
            } else {
                drop_code
            };
            runs += 1;
            if let Some((_, r)) = expected.counted {
                *by_reason.entry(reason::NAMES[r as usize]).or_insert(0usize) += 1;
            }
            if expected.counted.is_some() {
                counted += 1;
            }
            if !expected.passes() {
                drops += 1;
            }
            if moved != expected_cell.into_iter().collect::<Vec<_>>() || rc != expected_rc {
                failures.push(format!(
                    "policy {p}, {hook:?}, {packet:?}: kernel rc {rc:#x} cells {moved:?}, model {:?} (cell {expected_cell:?}, rc {expected_rc:#x})\n{text}",
                    expected.counted.map(|(v, r)| (verdict::NAMES[v as usize], reason::NAMES[r as usize]))
                ));
            }
        }
    }
    h.reset().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{runs} packets over {POLICIES} policies: {counted} counted, {drops} dropped, {} disagreements; by reason {by_reason:?}", failures.len());
    assert!(counted > runs / 2 && drops > runs / 10, "the random mix should exercise the pipeline");
    for why in ["smtp_command", "smtp_out_of_order", "fragment"] {
        assert!(by_reason.get(why).is_some_and(|n| *n >= 5), "the random mix should reach {why} (by reason {by_reason:?})");
    }
    assert!(failures.is_empty(), "{}", failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n\n"));
}
