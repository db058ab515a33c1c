//! The source table under churn: every new source's claim of a way is
//! counted by what the way held (free, stale, live, ban), exactly, and
//! `smtpguard status` shows the counts. Frames go through
//! BPF_PROG_TEST_RUN; small tables make the arithmetic exact.

use std::net::{IpAddr, Ipv4Addr};

use policy_common::{
    claim_kind, direction,
    source::{source_key_v4, source_set, SlotInfo, SourceSet, SourceSlot, WAYS},
    STATS_CLAIMS,
};
use smtpguard::{
    clock::ktime_now_ns,
    dataplane::{Capacities, Hook},
};
use smtpguard_tests::{
    fixtures::{base_policy, Harness, TestPins, NS_PER_S},
    packet::{TcpFrame, SYN},
    require_root,
};

/// A datapath with `capacity` sources whose ingress policy meters SYNs
/// (and never bans on its own).
fn metered(capacity: u32, pins: Option<&TestPins>) -> Harness {
    let capacities = Capacities { sources: capacity, ..Capacities::default() };
    let mut h = Harness::load_with(capacities, pins.map(|p| p.pins.dir.as_path())).expect("loading the datapath");
    let mut policy = base_policy();
    let p = &mut policy.direction[direction::INGRESS as usize];
    p.rate_enabled = 1;
    p.ban_threshold = 0;
    h.set_policy(&policy).unwrap();
    h.route(Hook::XdpIngress, direction::INGRESS, 0).unwrap();
    h
}

fn source(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xc612_0000 + n)
}

fn syn(h: &mut Harness, src: Ipv4Addr) {
    let frame = TcpFrame::new(IpAddr::V4(src), "203.0.113.25".parse().unwrap(), 25, SYN).build();
    h.dp.test_run(Hook::XdpIngress, &frame, 1).unwrap();
}

/// Claims so far by kind: free, stale, live, ban.
fn claims(h: &mut Harness) -> [u64; claim_kind::COUNT] {
    let stats = h.dp.stats().unwrap();
    std::array::from_fn(|k| stats[STATS_CLAIMS as usize + k].packets)
}

fn since(now: [u64; claim_kind::COUNT], before: [u64; claim_kind::COUNT]) -> [u64; claim_kind::COUNT] {
    std::array::from_fn(|k| now[k] - before[k])
}

/// Rewrites the one set of the table: its current keys, with `slot` as
/// every way's other words.
fn seed_all_ways(h: &mut Harness, slot: impl Fn(usize) -> SourceSlot) {
    let mut set = h.dp.source_set(0);
    for (way, s) in set.slots.iter_mut().enumerate() {
        assert_ne!(s.key, 0, "way {way} is tracked");
        *s = SourceSlot { key: s.key, ..slot(way) };
    }
    h.dp.set_source_set(0, &set);
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn every_claim_of_a_way_is_counted_by_what_the_way_held() {
    require_root();
    let mut h = metered(WAYS as u32, None);
    assert_eq!(h.dp.source_sets(), 1, "one set: every source shares it");
    let (free, stale, live, ban) =
        (claim_kind::FREE as usize, claim_kind::STALE as usize, claim_kind::LIVE as usize, claim_kind::BAN as usize);
    let mut next = 0;
    let mut newcomers = |h: &mut Harness, count: u32| {
        let before = claims(h);
        for _ in 0..count {
            next += 1;
            syn(h, source(next));
        }
        since(claims(h), before)
    };

    // An empty set: eight free ways.
    assert_eq!(newcomers(&mut h, 8), [8, 0, 0, 0]);
    // A tracked source's next SYN claims nothing.
    let before = claims(&mut h);
    syn(&mut h, source(3));
    assert_eq!(since(claims(&mut h), before), [0; 4]);
    // Eight more, while the first eight were active a moment ago: live.
    assert_eq!(newcomers(&mut h, 8), [0, 0, 8, 0]);

    // Every way idle past STALE_AFTER_S with a full bucket: the newcomers
    // evict the idle ones first, so all eight evictions are stale.
    let now_s = (ktime_now_ns() / NS_PER_S) as u32;
    seed_all_ways(&mut h, |way| SourceSlot { info: SlotInfo { last_seen_s: now_s - 200 - way as u32, ..SlotInfo::default() }.pack(), ..SourceSlot::default() });
    assert_eq!(newcomers(&mut h, 8), [0, 8, 0, 0]);

    // Idle as long, but the bucket still short of tokens: live.
    let now = ktime_now_ns();
    seed_all_ways(&mut h, |_| SourceSlot { admit_tat_ns: now + 30 * NS_PER_S, info: SlotInfo { last_seen_s: now_s - 200, ..SlotInfo::default() }.pack(), ..SourceSlot::default() });
    assert_eq!(newcomers(&mut h, 8), [0, 0, 8, 0]);

    // Every way banned: the first newcomer evicts a ban; the next ones
    // evict that newcomer and each other (unbanned ways go before bans).
    let until = ktime_now_ns() + 600 * NS_PER_S;
    seed_all_ways(&mut h, |_| SourceSlot { ban_until_ns: until, info: SlotInfo { strikes: 1, origin: 1, flags: 0, last_seen_s: now_s }.pack(), ..SourceSlot::default() });
    let got = newcomers(&mut h, 8);
    assert_eq!((got[free], got[stale], got[live], got[ban]), (0, 0, 7, 1));
    let banned = h.dp.source_set(0).slots.iter().filter(|s| s.ban_until_ns > ktime_now_ns()).count();
    assert_eq!(banned, 7, "seven bans stand, one was evicted");
    h.dp.set_source_set(0, &SourceSet::default());
}

/// 4,096 distinct sources through a table of 1,024: each set's first eight
/// take free ways, every later one evicts a source active a moment ago.
/// (On a host, 2,000,000 sources churning through the default 1.3M table
/// look like this, with larger numbers.)
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn sources_churning_through_a_small_table_count_exactly_and_status_shows_it() {
    require_root();
    const CAPACITY: u32 = 1024;
    const SOURCES: u32 = 4096;
    let state = TestPins::new("srcchurn");
    let mut h = metered(CAPACITY, Some(&state));
    let sets = h.dp.source_sets();
    assert_eq!(sets, CAPACITY / WAYS as u32);
    let mut per_set = vec![0u64; sets as usize];
    for n in 1..=SOURCES {
        per_set[source_set(source_key_v4(source(n).octets()), sets) as usize] += 1;
        syn(&mut h, source(n));
    }
    let free: u64 = per_set.iter().map(|&n| n.min(WAYS as u64)).sum();
    let got = claims(&mut h);
    assert_eq!(got, [free, 0, SOURCES as u64 - free, 0], "claims (free, stale, live, ban) of {SOURCES} sources in {sets} sets");
    assert_eq!(h.dp.maps().source_table().slots().len() as u64, free, "every way holding a source");

    let (code, out) = state.cmd(&["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("source table: {free} of {CAPACITY} ways tracked")), "{out}");
    assert!(
        out.contains(&format!("new sources tracked: {SOURCES} (free way: {free}; evicted: stale 0, live {}, ban 0)", SOURCES as u64 - free)),
        "{out}"
    );
}
