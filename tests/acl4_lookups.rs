//! The IPv4 ACL arrays in the kernel: every lookup answers as a plain
//! longest-prefix match would, in both generations, and a policy that does
//! not fit the arrays changes nothing that is enforced.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::Ipv4Net;
use policy_common::{verdict, acl4::Capacity, direction, event_kind, reason, side, AclEntry, MAX_PORTS};
use smtpguard::{
    policy,
    dataplane::{Capacities, Dataplane, Hook},
};
use smtpguard_tests::{
    fixtures::{base_policy, entry_all_ports, write_deny_policy, Harness},
    packet::{TcpFrame, SYN},
    require_root,
    rng::Rng,
};

const PREFIXES: usize = 20_000;
const PROBES: usize = 3_000;

/// What the kernel did with a SYN from `src`: the drop sample's rule id
/// and reason, or `None` for a pass.
fn judged(h: &mut Harness, src: Ipv4Addr) -> Option<(u32, u8)> {
    let frame = TcpFrame::new(IpAddr::V4(src), IpAddr::V4(Ipv4Addr::new(203, 0, 113, 25)), 25, SYN).build();
    let (rc, _) = h.dp.test_run(Hook::XdpIngress, &frame, 1).expect("test run");
    let events = h.dp.drain_events().expect("events");
    let (pass, _) = Hook::XdpIngress.verdict_codes();
    if rc == pass {
        assert!(events.is_empty(), "{src}: passed but sampled {events:?}");
        return None;
    }
    let sample = events.iter().find(|e| e.kind == event_kind::DROP_SAMPLE).unwrap_or_else(|| panic!("{src}: dropped without a sample"));
    Some((sample.rule, sample.reason))
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn kernel_lookups_equal_a_plain_longest_prefix_match() {
    require_root();
    let mut h = Harness::load().expect("loading the datapath");
    h.route(Hook::XdpIngress, direction::INGRESS, 1).unwrap();
    let mut rt = h.dp.runtime();
    rt.events_per_second = 10_000_000;
    h.dp.set_runtime(rt);
    // Unmatched sources are dropped by default, so allow, deny and no
    // match all look different.
    let mut policy = base_policy();
    policy.direction[direction::INGRESS as usize].default_verdict = [verdict::DROP; MAX_PORTS];
    h.set_policy(&policy).unwrap();

    // Nested prefixes of every length in 10.0.0.0/10, a tenth of them allows.
    let mut rng = Rng(0x0ac1_4000_5eed);
    let mut rules: HashMap<Ipv4Net, AclEntry> = HashMap::new();
    while rules.len() < PREFIXES {
        let len = 10 + rng.below(23) as u8;
        let net = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (rng.next_u64() as u32 & 0x003f_ffff)), len).unwrap().trunc();
        let id = rules.len() as u32 + 1;
        rules.insert(net, if rng.chance(10) { entry_all_ports(id, 0, 0) } else { entry_all_ports(0, id, 0) });
    }
    let longest = |addr: Ipv4Addr| (0..=32u8).rev().find_map(|len| rules.get(&Ipv4Net::new(addr, len).unwrap().trunc()));
    let expect = |addr: Ipv4Addr| match longest(addr) {
        Some(e) if e.allow_rule[0] != 0 => None,
        Some(e) => Some((e.deny_rule[0], reason::DENY_ACL)),
        None => Some((0, reason::DEFAULT_DENY)),
    };

    let (mut allowed, mut denied, mut unmatched) = (0, 0, 0);
    // Written into one generation and then, after a flip, into the other.
    let mut generations = Vec::new();
    for round in 0..2 {
        let target = h.dp.active_generation();
        generations.push(target);
        let entries: Vec<_> = rules.iter().map(|(net, e)| (IpAddr::V4(net.network()), net.prefix_len(), *e)).collect();
        h.add_acl_entries(direction::INGRESS, side::PEER, &entries).unwrap();
        for i in 0..PROBES {
            // Half inside a listed network, half anywhere in 10.0.0.0/9 (whose
            // upper half has no prefixes).
            let addr = if i % 2 == 0 {
                let (net, _) = rules.iter().nth(rng.below(rules.len() as u64) as usize).unwrap();
                Ipv4Addr::from(u32::from(net.network()) | (rng.next_u64() as u32 & !u32::from(net.netmask())))
            } else {
                Ipv4Addr::from(0x0a00_0000 | (rng.next_u64() as u32 & 0x007f_ffff))
            };
            let want = expect(addr);
            assert_eq!(judged(&mut h, addr), want, "{addr} in generation {target}");
            match want {
                None => allowed += 1,
                Some((_, r)) if r == reason::DENY_ACL => denied += 1,
                Some(_) => unmatched += 1,
            }
            h.clear_source(IpAddr::V4(addr)).unwrap();
        }
        if round == 0 {
            h.reset().unwrap();
            h.route(Hook::XdpIngress, direction::INGRESS, 1).unwrap();
            let mut rt = h.dp.runtime();
            rt.active ^= 1;
            rt.events_per_second = 10_000_000;
            h.dp.set_runtime(rt);
            h.set_policy(&policy).unwrap();
        }
    }
    h.reset().unwrap();
    assert_eq!(generations.len(), 2);
    assert_ne!(generations[0], generations[1], "both generations were probed");
    eprintln!("{} probes over {PREFIXES} prefixes: {allowed} allowed, {denied} denied, {unmatched} unmatched", 2 * PROBES);
    assert!(allowed > 50 && denied > PROBES / 2 && unmatched > 50, "the probes should reach every kind of answer");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_policy_too_large_for_the_arrays_is_refused_and_changes_nothing() {
    require_root();
    let dir = std::env::temp_dir().join(format!("smtpguard-acl4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let small = write_deny_policy(&dir, "small", &["192.0.2.0/25".parse().unwrap()], "").unwrap();
    // 100 /32s in 100 different /24s: 100 nodes below the /24s.
    let many: Vec<Ipv4Net> = (0..100u32).map(|i| Ipv4Net::new(Ipv4Addr::from(0xc633_0000 | i << 8 | 7), 32).unwrap()).collect();
    let large = write_deny_policy(&dir, "large", &many, "").unwrap();
    // As the controller's reload compiles.
    let compile = |p: &std::path::Path| {
        let (compiled, diags) = policy::load_for_reload(p, &Default::default());
        compiled.unwrap_or_else(|| panic!("{diags}")).1
    };
    let room = Capacity { nodes: 16, slots: 4096, values: 256 };
    let mut dp = Dataplane::load(Capacities { acl4: room, ..Capacities::default() }, None).unwrap();
    // As the controller does: the policy in both generations.
    let small = compile(&small);
    dp.install(1, &small, 1).unwrap();
    dp.activate(1, 0, 0);
    dp.install(0, &small, 1).unwrap();
    let verdict = |dp: &mut Dataplane, src: [u8; 4]| {
        let frame = TcpFrame::new(IpAddr::V4(src.into()), IpAddr::V4(Ipv4Addr::new(203, 0, 113, 25)), 25, SYN).build();
        dp.test_run(Hook::XdpIngress, &frame, 1).unwrap().0
    };
    let (pass, drop) = Hook::XdpIngress.verdict_codes();
    assert_eq!((verdict(&mut dp, [192, 0, 2, 9]), verdict(&mut dp, [192, 0, 2, 200])), (drop, pass));

    let err = dp.install(0, &compile(&large), 2).unwrap_err().to_string();
    assert!(err.contains("needs") && err.contains("--acl4-nodes"), "{err}");
    // Refused before anything was written: the active generation enforces
    // the small policy, and so does the standby one it was meant for.
    assert_eq!((verdict(&mut dp, [192, 0, 2, 9]), verdict(&mut dp, [198, 51, 0, 7])), (drop, pass));
    dp.activate(0, 0, 0);
    assert_eq!((verdict(&mut dp, [192, 0, 2, 9]), verdict(&mut dp, [198, 51, 0, 7])), (drop, pass), "generation 0 after the refusal");
    let _ = std::fs::remove_dir_all(&dir);
}
