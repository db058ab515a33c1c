//! Upgrades (issue 15): pins of the previous layout (layout 1, before it
//! was recorded), with bans, network bans and counters in place, are
//! upgraded by `smtpguard run` of this build: bans keep dropping, counters
//! keep their meaning, the layout is recorded; pins of a newer layout are
//! refused, unread, with the way out.
//!
//! The layout-1 maps are made here the way that build made them: every
//! map of layout 1 with this object's definition, but for the three that
//! changed (`POLICY` 200-byte values, `STATS` 339 cells, `SCAN_BUF`
//! 512-byte values).

use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{lpm_trie::Key, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues};
use policy_common::{source::sets_for, Counter, Runtime};
use smtpguard::dataplane::{bans::source_key, runtime_words::RuntimeWords, source_table::SourceTable, DEFAULT_HOOK_DIRECTION};
use smtpguard_tests::{
    pairlab::{write_policy, PairLab, RunningController, TestPins, CLIENT_DENIED, CLIENT_OK, SERVER},
    peers::{assert_dropped, assert_greeted, connect},
    require_root,
};

/// The maps of layout 1.
const V1_MAPS: [&str; 17] = [
    "RUNTIME", "POLICY", "ACL4_ROOT", "ACL4_NODES", "ACL4_SLOTS", "ACL4_VALUES", "ACL_V6", "BAN_V4", "BAN_V6", "SOURCES", "STATS", "GEO_DROPS", "EVENTS",
    "EVENT_BUDGET", "SCRATCH", "TENANT_IFACES", "SCAN_BUF",
];
/// Layout 1's `STATS`: 2 directions x 3 verdicts x 11 reasons x 5 port
/// slots, events lost, 3 ban origins, 4 claim kinds, scans cut short.
const V1_STATS_ENTRIES: u32 = 330 + 1 + 3 + 4 + 1;
/// Layout 1's cell of (egress, drop, default_deny, port slot 0):
/// ((direction 1 x 3 verdicts + drop 1) x 11 reasons + reason 10) x 5 slots.
const V1_EGRESS_DEFAULT_DENY: u32 = ((3 + 1) * 11 + 10) * 5;

/// Creates a map (BPF_MAP_CREATE) and pins it at `path`.
fn create_pinned(path: &Path, name: &str, map_type: u32, key: u32, value: u32, entries: u32, flags: u32) {
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key, value, entries, flags].into_iter().enumerate() {
        attr[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // map_name at offset 28 (after inner_map_fd and numa_node).
    attr[28..28 + name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a zeroed bpf_attr with the fields BPF_MAP_CREATE reads.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), attr.len()) };
    assert!(fd >= 0, "creating {name}: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just gave us this fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u64; 4];
    attr[0] = c.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u64;
    // SAFETY: BPF_OBJ_PIN reads a path pointer and the fd.
    assert_eq!(unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_mut_ptr(), 32) }, 0, "pinning {name}: {}", std::io::Error::last_os_error());
}

/// Pins made as the layout-1 build made them, with state worth keeping:
/// a ban of `banned`, a network ban of 198.51.100.0/24, and 7 egress
/// default-deny drops on CPU 0.
fn pin_layout_1(dir: &Path, banned: std::net::IpAddr) {
    std::fs::create_dir_all(dir).unwrap();
    let object = aya_obj::Object::parse(smtpguard::EBPF_OBJECT).unwrap();
    let sources = sets_for(policy_common::DEFAULT_SOURCE_CAPACITY);
    for name in V1_MAPS {
        let m = &object.maps[name];
        let (value, entries) = match name {
            "POLICY" => (200, m.max_entries()),
            "STATS" => (m.value_size(), V1_STATS_ENTRIES),
            "SCAN_BUF" => (512, 1),
            "SOURCES" => (m.value_size(), sources),
            _ => (m.value_size(), m.max_entries()),
        };
        create_pinned(&dir.join(name), name, m.map_type(), m.key_size(), value, entries, m.map_flags());
    }
    let open = |name: &str| MapData::from_pin(dir.join(name)).unwrap();
    let runtime = open("RUNTIME");
    RuntimeWords::open(runtime.fd().as_fd()).unwrap().write_controller_words(&Runtime { source_sets: sources, hook_direction: DEFAULT_HOOK_DIRECTION, ..Runtime::default() });
    let table = open("SOURCES");
    let table = SourceTable::open(table.fd().as_fd(), sources).unwrap();
    let now = smtpguard::clock::ktime_now_ns;
    table.ban(source_key(banned), now() + 3_600_000_000_000, policy_common::source::ban_origin::MANUAL, now).unwrap();
    let mut net: LpmTrie<MapData, [u32; 1], u64> = LpmTrie::try_from(Map::LpmTrie(open("BAN_V4"))).unwrap();
    net.insert(&Key::new(24, [u32::from_ne_bytes([198, 51, 100, 0])]), now() + 3_600_000_000_000, 0).unwrap();
    let runtime = RuntimeWords::open(open("RUNTIME").fd().as_fd()).unwrap();
    runtime.set_cidr_bans(true);
    let mut stats: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(open("STATS"))).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let mut values = vec![Counter::default(); cpus];
    values[0] = Counter { packets: 7, bytes: 420 };
    stats.set(V1_EGRESS_DEFAULT_DENY, PerCpuValues::try_from(values).unwrap(), 0).unwrap();
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn pins_of_the_previous_layout_are_upgraded_with_bans_and_counters_in_place() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("upgrade");
    pin_layout_1(&state.pin_dir, CLIENT_DENIED.parse().unwrap());
    assert_eq!(smtpguard::dataplane::upgrade::pinned_layout(&state.pin_dir), Some(1));
    // Operator commands do not read layout 1 as their own.
    let (code, said) = state.cmd(&["bans"]);
    assert_ne!(code, 0);
    assert!(said.contains("have layout 1") && said.contains("upgrades them"), "{said}");

    let policy = write_policy(&state.policy_dir(), "policy.yaml", "version: 1\ningress:\n  default: {25: allow}\n");
    let _ctl = RunningController::start(&lab, &state, &policy, 19480).expect("the controller starts on layout-1 pins");
    assert_eq!(smtpguard::dataplane::upgrade::pinned_layout(&state.pin_dir), Some(policy_common::LAYOUT_VERSION));
    assert!(!std::fs::read_dir(&state.pin_dir).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("v1_")), "the old maps are gone");
    // The ban made under layout 1 still drops; others pass.
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "the source banned under layout 1");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "an unbanned source");
    let (code, bans) = state.cmd(&["bans", "--json"]);
    assert_eq!(code, 0, "{bans}");
    assert!(bans.contains(&format!("\"source\":\"{CLIENT_DENIED}/32\"")) && bans.contains("\"source\":\"198.51.100.0/24\""), "{bans}");
    // The layout-1 counter, renumbered: egress default-deny drops on 25.
    let (code, status) = state.cmd(&["status"]);
    assert_eq!(code, 0, "{status}");
    assert!(status.lines().any(|l| l.contains("egress") && l.contains("default_deny") && l.split_whitespace().nth(3) == Some("7")), "{status}");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn an_upgrade_stopped_half_way_is_finished_by_the_next_start() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("halfway");
    pin_layout_1(&state.pin_dir, CLIENT_DENIED.parse().unwrap());
    // As a start killed after moving the old STATS aside and pinning its
    // own: the new one counted 5 on the same cell, which must not be read
    // as layout 1.
    std::fs::rename(state.pin_dir.join("STATS"), state.pin_dir.join("v1_STATS")).unwrap();
    let object = aya_obj::Object::parse(smtpguard::EBPF_OBJECT).unwrap();
    let m = &object.maps["STATS"];
    create_pinned(&state.pin_dir.join("STATS"), "STATS", m.map_type(), m.key_size(), m.value_size(), m.max_entries(), m.map_flags());
    let mut half: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(MapData::from_pin(state.pin_dir.join("STATS")).unwrap())).unwrap();
    let mut values = vec![Counter::default(); aya::util::nr_cpus().unwrap()];
    values[0] = Counter { packets: 5, bytes: 300 };
    half.set(V1_EGRESS_DEFAULT_DENY, PerCpuValues::try_from(values).unwrap(), 0).unwrap();

    let policy = write_policy(&state.policy_dir(), "policy.yaml", "version: 1\ningress:\n  default: {25: allow}\n");
    let _ctl = RunningController::start(&lab, &state, &policy, 19482).expect("the controller finishes the upgrade");
    assert_eq!(smtpguard::dataplane::upgrade::pinned_layout(&state.pin_dir), Some(policy_common::LAYOUT_VERSION));
    assert!(!state.pin_dir.join("v1_STATS").exists());
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "the source banned under layout 1");
    let (code, status) = state.cmd(&["status"]);
    assert_eq!(code, 0, "{status}");
    assert!(status.lines().any(|l| l.contains("egress") && l.contains("default_deny") && l.split_whitespace().nth(3) == Some("7")), "the old counter, once: {status}");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn pins_of_a_newer_layout_are_refused_unread() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("newer");
    pin_layout_1(&state.pin_dir, CLIENT_DENIED.parse().unwrap());
    std::fs::create_dir(state.pin_dir.join("layout_99")).unwrap();
    let policy = write_policy(&state.policy_dir(), "policy.yaml", "version: 1\ningress:\n  default: {25: allow}\n");
    let stderr = state.run_dir.with_extension("stderr");
    std::fs::create_dir_all(&state.run_dir).unwrap();
    let mut ctl = RunningController::spawn(&lab, &state, &policy, 19481, &["--uplink", "b0"], std::fs::File::create(&stderr).unwrap()).unwrap();
    let status = ctl.child().wait().unwrap();
    let said = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains("have layout 99") && said.contains("newer") && said.contains("Nothing was changed"), "{said}");
    assert!(state.pin_dir.join("STATS").exists() && state.pin_dir.join("POLICY").exists(), "nothing moved");
    let _ = std::fs::remove_file(&stderr);
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn pins_of_layout_2_are_upgraded_in_place_and_gain_the_bypass_switch_and_rule_hits() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("upgrade2");
    let policy = write_policy(&state.policy_dir(), "policy.yaml", "version: 1\ningress:\n  default: {25: allow}\n");
    let mut ctl = RunningController::start(&lab, &state, &policy, 19483).expect("controller");
    let (code, out) = state.cmd(&["ban", CLIENT_DENIED, "--for", "1h"]);
    assert_eq!(code, 0, "{out}");
    ctl.kill9();
    // Layout 2 is this layout without `BYPASS`, `RULE_HITS` and the
    // shadow's maps, and with a `POLICY` of two entries.
    for map in [policy_common::BYPASS, policy_common::RULE_HITS, policy_common::SHADOW_DIFFS, policy_common::SHADOW_SOURCES, policy_common::SHADOW_TOTALS, policy_common::SHADOW_BUF] {
        std::fs::remove_file(state.pin_dir.join(map)).unwrap();
    }
    let object = aya_obj::Object::parse(smtpguard::EBPF_OBJECT).unwrap();
    let m = &object.maps["POLICY"];
    std::fs::remove_file(state.pin_dir.join("POLICY")).unwrap();
    create_pinned(&state.pin_dir.join("POLICY"), "POLICY", m.map_type(), m.key_size(), m.value_size(), 2, m.map_flags());
    std::fs::rename(state.pin_dir.join(format!("layout_{}", policy_common::LAYOUT_VERSION)), state.pin_dir.join("layout_2")).unwrap();
    let (code, said) = state.cmd(&["bans"]);
    assert_ne!(code, 0);
    assert!(said.contains("have layout 2") && said.contains("upgrades them"), "{said}");

    let _ctl = RunningController::start(&lab, &state, &policy, 19484).expect("the controller starts on layout-2 pins");
    assert_eq!(smtpguard::dataplane::upgrade::pinned_layout(&state.pin_dir), Some(policy_common::LAYOUT_VERSION));
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "the source banned under layout 2");
    assert!(!state.pin_dir.join("v2_POLICY").exists(), "the old POLICY is gone");
    let policy_entries = aya::maps::MapInfo::from_pin(state.pin_dir.join("POLICY")).unwrap().max_entries();
    assert_eq!(policy_entries, policy_common::POLICY_ENTRIES, "POLICY made afresh with the shadow's generations");
    let (code, out) = state.cmd(&["bypass", "on"]);
    assert_eq!(code, 0, "{out}");
    assert_greeted(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "the new switch works");
}
