//! The operator commands `ban` and `unban` as the `smtpguard` binary runs
//! them against pinned state: durations that are refused rather than
//! wrapped, networks too wide to ban without `--force`, and what the
//! datapath does with the bans that are taken.

use std::net::IpAddr;

use policy_common::direction;
use smtpguard::dataplane::{Capacities, Hook};
use smtpguard_tests::{
    fixtures::{base_policy, Harness, TestPins},
    packet::{TcpFrame, SYN},
    require_root,
};

const DAY_S: u64 = 86_400;

/// A datapath pinned where the commands look, judging ingress on XDP.
fn pinned(tag: &str) -> (TestPins, Harness) {
    let state = TestPins::new(tag);
    let mut h = Harness::load_with(Capacities::default(), Some(&state.pins.dir)).expect("loading the datapath");
    h.set_policy(&base_policy()).unwrap();
    h.route(Hook::XdpIngress, direction::INGRESS, 0).unwrap();
    (state, h)
}

/// Does a SYN from `src` to port 25 get dropped?
fn syn_dropped(h: &mut Harness, src: &str) -> bool {
    let frame = TcpFrame::new(src.parse().unwrap(), "203.0.113.25".parse::<IpAddr>().unwrap(), 25, SYN).build();
    let (rc, _) = h.dp.test_run(Hook::XdpIngress, &frame, 1).unwrap();
    rc == Hook::XdpIngress.verdict_codes().1
}

fn bans(state: &TestPins) -> Vec<serde_json::Value> {
    let (code, out) = state.cmd(&["bans", "--json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(out.lines().next().unwrap_or("[]")).unwrap()
}

/// Each refusal exits non-zero, says what is wrong, and changes nothing.
fn refused(state: &TestPins, args: &[&str], says: &[&str]) {
    let (code, out) = state.cmd(args);
    assert_ne!(code, 0, "{args:?} was taken: {out}");
    for s in says {
        assert!(out.contains(s), "{args:?}: the refusal does not say {s:?}: {out}");
    }
    assert!(bans(state).is_empty(), "{args:?} was refused but left a ban");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn ban_durations_are_refused_when_zero_negative_or_longer_than_a_year_never_wrapped() {
    require_root();
    let (state, mut h) = pinned("opdur");
    // 213504 days is 2^64 ns and a bit: it wrapped to 1525 s.
    refused(&state, &["ban", "192.0.2.7", "--for", "213504d"], &["longest manual ban, 365d"]);
    // 18446744074 s wrapped to a time already past: exit 0, no ban in force.
    refused(&state, &["ban", "198.51.100.0/24", "--for", "18446744074s"], &["longest manual ban, 365d"]);
    assert!(!syn_dropped(&mut h, "198.51.100.9"));
    refused(&state, &["ban", "192.0.2.7", "--for", "366d"], &["longest manual ban, 365d"]);
    refused(&state, &["ban", "192.0.2.7", "--for", "0s"], &["must last"]);
    refused(&state, &["ban", "192.0.2.7", "--for", "-5m"], &["durations are positive, such as 30s, 15m, 2h, 7d"]);
    refused(&state, &["ban", "192.0.2.7", "--for", "5w"], &["is not a duration"]);

    let (code, out) = state.cmd(&["ban", "192.0.2.7", "--for", "365d"]);
    assert_eq!(code, 0, "{out}");
    let listed = bans(&state);
    let remaining = listed[0]["remaining_s"].as_u64().unwrap();
    assert!((365 * DAY_S - 5..=365 * DAY_S).contains(&remaining), "a year's ban has {remaining} s left: {listed:?}");
    assert!(syn_dropped(&mut h, "192.0.2.7"));
    let (code, out) = state.cmd(&["ban", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("365d") && out.contains("--force"), "{out}");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn networks_wider_than_a_v4_slash_8_or_a_v6_slash_32_take_force() {
    require_root();
    let (state, mut h) = pinned("opnet");
    refused(&state, &["ban", "0.0.0.0/0", "--for", "1h"], &["wider than a /8", "--force", "all of them"]);
    refused(&state, &["ban", "::/0", "--for", "1h"], &["wider than a /32", "--force"]);
    refused(&state, &["ban", "10.0.0.0/7", "--for", "1h"], &["wider than a /8", "--force"]);
    refused(&state, &["ban", "2001:db8::/31", "--for", "1h"], &["wider than a /32", "--force"]);
    assert!(!syn_dropped(&mut h, "10.1.2.3") && !syn_dropped(&mut h, "198.51.100.9"));

    let (code, out) = state.cmd(&["ban", "10.0.0.0/8", "--for", "1h"]);
    assert_eq!(code, 0, "{out}");
    assert!(syn_dropped(&mut h, "10.1.2.3") && !syn_dropped(&mut h, "11.1.2.3"));
    let (code, out) = state.cmd(&["unban", "10.0.0.0/8"]);
    assert_eq!(code, 0, "{out}");
    assert!(!syn_dropped(&mut h, "10.1.2.3"));

    let (code, out) = state.cmd(&["ban", "0.0.0.0/0", "--for", "1m", "--force"]);
    assert_eq!(code, 0, "{out}");
    assert!(syn_dropped(&mut h, "198.51.100.9") && syn_dropped(&mut h, "10.1.2.3"));
    let (code, out) = state.cmd(&["unban", "0.0.0.0/0"]);
    assert_eq!(code, 0, "{out}");
    assert!(!syn_dropped(&mut h, "198.51.100.9"));
    assert!(bans(&state).is_empty());
}

/// A map pinned by a build before RUNTIME was mmapable (52-byte value, no
/// flags): loading over it, and the operator commands, refuse with the
/// way out instead of a verifier or mmap error.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn pins_of_an_older_build_are_refused_with_a_detach_hint() {
    require_root();
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let state = TestPins::new("opold");
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| {
        // SAFETY: a zeroed bpf_attr-sized buffer filled for `cmd`.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) }
    };
    // BPF_MAP_CREATE: an array of one 52-byte value, as older builds made RUNTIME.
    let mut attr = [0u64; 16];
    attr[0] = 2 | 4 << 32; // map_type ARRAY, key_size 4
    attr[1] = 52 | 1 << 32; // value_size, max_entries
    let fd = bpf(0, &mut attr);
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd from the kernel.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(state.pins.dir.join(policy_common::RUNTIME).display().to_string()).unwrap();
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    attr[1] = map.as_raw_fd() as u64;
    assert!(bpf(6, &mut attr) == 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());

    let err = match Harness::load_with(Capacities::default(), Some(&state.pins.dir)) {
        Ok(_) => panic!("loaded over an older build's pins"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("another smtpguard build") && err.contains("RUNTIME") && err.contains("smtpguard detach"), "{err}");
    // Refused before anything moved: the pins are as they were found.
    let mut left: Vec<String> =
        std::fs::read_dir(&state.pins.dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, [policy_common::RUNTIME], "the refused load changed the pins");
    let (code, out) = state.cmd(&["status"]);
    assert_ne!(code, 0);
    assert!(out.contains("another smtpguard build") && out.contains("smtpguard detach"), "{out}");
}
