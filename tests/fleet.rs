//! The fleet (issue 16), with a real etcd (Debian's etcd-server) and three
//! smtpguard hosts, each in namespaces of its own with its own pins and
//! uplink: a source banned by the datapath of one host is dropped by the
//! others within 2 s and lifted everywhere by `unban` on any; strikes
//! count fleet-wide; the fleet policy reaches every host and a host that
//! cannot apply it says so; etcd killed, a member or the quorum lost, a
//! host restarted: no ban is lost; bad data from the fleet is refused and
//! counted; TLS with client certificates and a user.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use smtpguard::{clock::ktime_now_ns, dataplane::{bans::source_key, maps::Maps}};
use smtpguard_tests::{
    fleetlab::{FleetHost, FleetLab},
    pairlab::{http_get, metric, write_policy, RunningController, CLIENT_DENIED, CLIENT_OK, SERVER},
    peers::{assert_dropped, assert_greeted, connect, connect_within},
    require_root,
};

/// What the issue asks of propagation.
const PROPAGATION_BOUND: Duration = Duration::from_secs(2);
/// etcd back (or a host restarted): its first session begins within the
/// reconnect backoff (at most 4 s) plus a start.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

const FLOOD_POLICY: &str = "version: 1\ningress:\n  default: {25: allow}\n  rate_limit: {new_per_minute: 6000, burst: 1000, ban_above_per_minute: 10, ban: 15m, escalate: {factor: 2, max: 2h}}\n";

fn state_dir(h: &FleetHost) -> PathBuf {
    h.pins.policy_dir().join("state")
}

/// Starts `smtpguard run` on a host's uplink, in the fleet.
fn start(h: &FleetHost, policy: &Path, port: u16, extra: &[&str]) -> RunningController {
    let state = state_dir(h).display().to_string();
    let mut args = vec!["--uplink", "b0", "--fleet-etcd", h.endpoints(), "--host-id", &h.name, "--state-dir", &state];
    args.extend_from_slice(extra);
    RunningController::start_on(&h.lab, &h.pins, policy, port, &args).unwrap_or_else(|e| panic!("host {}: {e:#}", h.name))
}

/// Whether the host's datapath has `addr` banned now (read from its pins).
fn banned(h: &FleetHost, addr: &str) -> bool {
    let maps = Maps::open_pinned(&h.pins.pin_dir).expect("the host's pins");
    maps.source_table().banned_until(source_key(addr.parse::<IpAddr>().unwrap()), ktime_now_ns()).is_some()
}

/// Polls `cond` until it holds, at most `bound`.
fn within(bound: Duration, what: &str, cond: impl FnMut() -> bool) {
    within_or(bound, cond).unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn within_or(bound: Duration, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() >= bound {
            return Err(format!("not within {bound:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// New connections from `src` to the host until its datapath bans it
/// (bounded).
fn flood_until_banned(h: &FleetHost, src: &str) {
    for _ in 0..200 {
        let _ = connect_within(&h.lab.client, src, SERVER, 25, Duration::from_millis(200));
        if banned(h, src) {
            return;
        }
    }
    panic!("host {}: 200 connections from {src} did not ban it", h.name);
}

fn metrics(h: &FleetHost, port: u16) -> String {
    http_get(&h.lab, port, "/metrics").expect("/metrics")
}

fn banned_drops(h: &FleetHost, port: u16) -> f64 {
    metric(&metrics(h, port), "smtpguard_packets_total", &["direction=\"ingress\"", "verdict=\"drop\"", "reason=\"banned\""]).unwrap_or(0.0)
}

/// `smtpguard ARGS` in the host's namespace, with its pins.
fn cmd(h: &FleetHost, args: &[&str]) -> (i32, String) {
    let bin = smtpguard_tests::smtpguard_bin().display().to_string();
    let mut full = vec![bin.as_str()];
    full.extend_from_slice(args);
    let pins = h.pins.args();
    full.extend(pins.iter().map(String::as_str));
    h.exec(&full)
}

/// `smtpguard fleet ...` in the host's namespace, against its endpoints.
fn fleet(h: &FleetHost, args: &[&str]) -> (i32, String) {
    let bin = smtpguard_tests::smtpguard_bin().display().to_string();
    let mut full = vec![bin.as_str(), "fleet"];
    full.extend_from_slice(args);
    full.extend(["--fleet-etcd", h.endpoints()]);
    h.exec(&full)
}

#[test]
#[ignore = "privileged: needs root, BPF, namespaces and etcd; cargo xtask test runs it"]
fn a_source_banned_on_one_host_is_dropped_by_all_within_2s_and_unban_anywhere_lifts_it() {
    require_root();
    let lab = FleetLab::new(3, 1).expect("fleet lab");
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    let policy = write_policy(&a.pins.policy_dir(), "policy.yaml", FLOOD_POLICY);
    let _ctl: Vec<RunningController> = [a, b, c].iter().map(|h| start(h, &policy, 19600, &[])).collect();
    assert_greeted(connect(&b.lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "before any ban, on b");

    // The datapath of a bans the flood; b and c follow without seeing it.
    flood_until_banned(a, CLIENT_DENIED);
    let banned_at = Instant::now();
    for h in [b, c] {
        within(PROPAGATION_BOUND.saturating_sub(banned_at.elapsed()), &format!("the ban reaching {}", h.name), || banned(h, CLIENT_DENIED));
    }
    for h in [b, c] {
        let before = banned_drops(h, 19600);
        assert_dropped(connect(&h.lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), &format!("the source banned on a, at {}", h.name));
        assert_greeted(connect(&h.lab.client, CLIENT_OK, SERVER, 25).unwrap(), &format!("another source, at {}", h.name));
        within(Duration::from_secs(3), &format!("{}'s datapath counting the banned SYNs", h.name), || banned_drops(h, 19600) > before);
        let (code, bans) = cmd(h, &["bans", "--json"]);
        assert_eq!(code, 0, "{bans}");
        assert!(bans.contains(&format!("\"source\":\"{CLIENT_DENIED}/32\"")) && bans.contains("\"origin\":\"fleet\"") && bans.contains("\"from\":\"a (auto)\""), "{bans}");
        let m = metrics(h, 19600);
        assert_eq!(metric(&m, "smtpguard_fleet_bans_received_total", &["result=\"installed\""]), Some(1.0), "{m}");
        assert_eq!(metric(&m, "smtpguard_fleet_ban_propagation_seconds_count", &[]), Some(1.0));
        assert_eq!(metric(&m, "smtpguard_fleet_connected", &[]), Some(1.0));
    }
    let m = metrics(a, 19600);
    assert_eq!(metric(&m, "smtpguard_fleet_bans_published_total", &["result=\"ok\""]), Some(1.0), "{m}");

    // Unban on c lifts it on a and b.
    let (code, said) = cmd(c, &["unban", CLIENT_DENIED]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("fleet-wide"), "{said}");
    let lifted_at = Instant::now();
    for h in [a, b] {
        within(PROPAGATION_BOUND.saturating_sub(lifted_at.elapsed()), &format!("the unban reaching {}", h.name), || !banned(h, CLIENT_DENIED));
        assert_greeted(connect(&h.lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), &format!("the unbanned source, at {}", h.name));
    }
    let (_, keys) = a.etcdctl(&["get", "--prefix", "--keys-only", "/smtpguard/bans/"]);
    assert!(!keys.contains(CLIENT_DENIED), "the ban is gone from etcd: {keys}");

    // A repeat offender on another host: b's ban escalates from a's strike.
    flood_until_banned(b, CLIENT_DENIED);
    let (_, bans) = cmd(b, &["bans", "--json"]);
    assert!(bans.contains("\"strikes\":2") && bans.contains("\"origin\":\"escalated\""), "b escalates the second ban: {bans}");
    within(PROPAGATION_BOUND, "b's escalated ban reaching a", || banned(a, CLIENT_DENIED));
    let (_, value) = a.etcdctl(&["get", "--print-value-only", &format!("/smtpguard/bans/{CLIENT_DENIED}/32")]);
    assert!(value.contains("\"origin_host\":\"b\"") && value.contains("\"origin\":\"escalated\"") && value.contains("\"strikes\":2"), "{value}");
}

/// A tiny geo database placing `CLIENT_DENIED` in KP.
fn write_geo(path: &Path) {
    #[derive(serde::Serialize)]
    struct Record {
        country_code: &'static str,
    }
    let mut w = mmdb_writer::Writer::new("country");
    w.insert(format!("{CLIENT_DENIED}/32").parse::<ipnet::IpNet>().unwrap(), &Record { country_code: "KP" }).unwrap();
    std::fs::write(path, w.to_bytes().unwrap()).unwrap();
}

#[test]
#[ignore = "privileged: needs root, BPF, namespaces and etcd; cargo xtask test runs it"]
fn the_fleet_policy_reaches_every_host_and_one_that_cannot_apply_it_keeps_its_own_and_says_why() {
    require_root();
    let lab = FleetLab::new(3, 1).expect("fleet lab");
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    let dir = a.pins.policy_dir();
    let local = write_policy(&dir, "local.yaml", "version: 1\ningress:\n  default: {25: allow}\n");
    let geo = dir.join("geo.mmdb");
    write_geo(&geo);
    let geo_arg = geo.display().to_string();
    // a and b have the geo database the fleet policy names; c has none.
    let _ctl = [
        start(a, &local, 19610, &["--fleet-policy", "--geo-database", &geo_arg]),
        start(b, &local, 19610, &["--fleet-policy", "--geo-database", &geo_arg]),
        start(c, &local, 19610, &["--fleet-policy"]),
    ];
    // Each host's record appears once its first session with etcd began.
    let mut status = String::new();
    within(Duration::from_secs(5), "three host records", || {
        status = fleet(a, &["status"]).1;
        status.matches("local file").count() == 3
    });
    assert!(status.contains("no fleet policy pushed"), "{status}");

    // Revision 1: deny a source, its list shipped with it.
    std::fs::create_dir_all(dir.join("lists")).unwrap();
    std::fs::write(dir.join("lists/deny.txt"), format!("{CLIENT_DENIED}/32\n")).unwrap();
    let p1 = write_policy(&dir, "fleet.yaml", "version: 1\ningress:\n  default: {25: allow}\n  deny_files:\n    - {id: feed, file: lists/deny.txt}\n");
    let (code, pushed) = fleet(a, &["push", p1.to_str().unwrap(), "--comment", "deny the feed"]);
    assert_eq!(code, 0, "{pushed}");
    let rev1: i64 = pushed.split_whitespace().nth(2).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("{pushed}"));
    for h in [a, b, c] {
        within(Duration::from_secs(5), &format!("revision {rev1} on {}", h.name), || {
            metric(&metrics(h, 19610), "smtpguard_fleet_policy_revision", &[]) == Some(rev1 as f64)
        });
        assert_dropped(connect(&h.lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), &format!("the fleet's deny list, at {}", h.name));
        assert_greeted(connect(&h.lab.client, CLIENT_OK, SERVER, 25).unwrap(), &format!("another source, at {}", h.name));
    }
    let (code, status) = fleet(b, &["status"]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(status.matches(&format!("rev {rev1} ")).count(), 3, "{status}");
    assert!(status.contains("deny the feed") && status.contains(&format!("3 on revision {rev1}")), "{status}");

    // A push of a policy not valid here changes nothing.
    let bad = write_policy(&dir, "bad.yaml", "version: 1\ningress:\n  default: {25: alow}\n");
    let (code, said) = fleet(a, &["push", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("bad.yaml:3:") && said.contains("nothing was pushed"), "{said}");
    // Nor one that expects another revision than the fleet's.
    let (code, said) = fleet(a, &["push", p1.to_str().unwrap(), "--expect-revision", "1"]);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains(&format!("at revision {rev1}, not 1")), "{said}");

    // Revision 2 needs a geo database c does not have.
    let p2 = write_policy(&dir, "geo.yaml", "version: 1\ningress:\n  default: {25: allow}\n  geo: {database: /nonexistent/fleet-geo.mmdb, field: country_code, block: [KP], unknown: allow}\n");
    let (code, pushed) = fleet(a, &["push", p2.to_str().unwrap(), "--geo-database", &geo_arg]);
    assert_eq!(code, 0, "{pushed}");
    let rev2: i64 = pushed.split_whitespace().nth(2).and_then(|r| r.parse().ok()).unwrap();
    for h in [a, b] {
        within(Duration::from_secs(5), &format!("revision {rev2} on {}", h.name), || {
            metric(&metrics(h, 19610), "smtpguard_fleet_policy_revision", &[]) == Some(rev2 as f64)
        });
        let before = metric(&metrics(h, 19610), "smtpguard_packets_total", &["reason=\"geo\"", "verdict=\"drop\""]).unwrap_or(0.0);
        assert_dropped(connect(&h.lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), &format!("the geo-fence, at {}", h.name));
        let after = metric(&metrics(h, 19610), "smtpguard_packets_total", &["reason=\"geo\"", "verdict=\"drop\""]).unwrap_or(0.0);
        assert!(after > before, "{} drops it by the geo-fence now", h.name);
    }
    within(Duration::from_secs(5), "c reporting it cannot apply the revision", || {
        metric(&metrics(c, 19610), "smtpguard_fleet_policy_rejected_total", &[]) == Some(1.0)
    });
    assert_eq!(metric(&metrics(c, 19610), "smtpguard_fleet_policy_revision", &[]), Some(rev1 as f64), "c keeps revision 1");
    assert_dropped(connect(&c.lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "revision 1's deny list, still in force on c");
    let (code, status) = fleet(c, &["status"]);
    assert_eq!(code, 1, "a host failed: {status}");
    let row = status.lines().find(|l| l.starts_with("c ")).unwrap_or_else(|| panic!("{status}"));
    assert!(row.contains(&format!("rev {rev1} (behind)")) && row.contains(&format!("revision {rev2}:")) && row.contains("/nonexistent/fleet-geo.mmdb"), "{row}");
    assert!(status.contains("1 with an error (c)"), "{status}");
}

#[test]
#[ignore = "privileged: needs root, BPF, namespaces and etcd; cargo xtask test runs it"]
fn etcd_killed_a_member_lost_the_quorum_lost_or_a_host_restarted_lose_no_ban() {
    require_root();
    let mut lab = FleetLab::new(3, 3).expect("fleet lab");
    let policy = write_policy(&lab.host("a").pins.policy_dir(), "policy.yaml", FLOOD_POLICY);
    let mut ctl: Vec<RunningController> = lab.hosts.iter().map(|h| start(h, &policy, 19620, &[])).collect();
    let ban = |h: &FleetHost, addr: &str| {
        let (code, said) = cmd(h, &["ban", addr, "--for", "1h", "--reason", "test"]);
        assert_eq!(code, 0, "{said}");
    };
    let everywhere = |lab: &FleetLab, addr: &str, bound: Duration| {
        for h in &lab.hosts {
            within(bound, &format!("{addr} banned on {}", h.name), || banned(h, addr));
        }
    };

    // One member of three lost: nothing changes.
    let leader = lab.etcd.leader().unwrap();
    lab.etcd.kill9(leader);
    ban(lab.host("a"), "198.51.100.1");
    everywhere(&lab, "198.51.100.1", RECOVERY_BOUND);

    // Quorum lost: bans made meanwhile wait, enforced where made, and
    // reach the others once it is back.
    let second = (0..3).find(|i| *i != leader).unwrap();
    lab.etcd.kill9(second);
    ban(lab.host("b"), "198.51.100.2");
    assert!(banned(lab.host("b"), "198.51.100.2"));
    lab.etcd.restart(leader).unwrap();
    lab.etcd.restart(second).unwrap();
    everywhere(&lab, "198.51.100.2", RECOVERY_BOUND);

    // etcd killed whole (SIGKILL), a ban on a meanwhile, etcd back.
    lab.etcd.kill9_all();
    ban(lab.host("a"), "198.51.100.3");
    for h in &lab.hosts {
        within(Duration::from_secs(10), &format!("{} noticing etcd is gone", h.name), || metric(&metrics(h, 19620), "smtpguard_fleet_connected", &[]) == Some(0.0));
    }
    assert!(banned(lab.host("a"), "198.51.100.3") && !banned(lab.host("b"), "198.51.100.3"));
    lab.etcd.restart_all().unwrap();
    lab.etcd.wait_healthy().unwrap();
    everywhere(&lab, "198.51.100.3", RECOVERY_BOUND);

    // c away (killed) while a bans one source and b lifts another: on its
    // return it has the one and not the other, and publishes nothing stale.
    ctl[2].kill9();
    ban(lab.host("a"), "198.51.100.4");
    let (code, said) = cmd(lab.host("b"), &["unban", "198.51.100.1"]);
    assert_eq!(code, 0, "{said}");
    assert!(banned(lab.host("c"), "198.51.100.1"), "c, away, still holds the ban lifted meanwhile");
    ctl[2] = start(lab.host("c"), &policy, 19620, &[]);
    let c = lab.host("c");
    within(RECOVERY_BOUND, "c catching up with the ban made while it was away", || banned(c, "198.51.100.4"));
    within(RECOVERY_BOUND, "c lifting the ban lifted while it was away", || !banned(c, "198.51.100.1"));
    for h in &lab.hosts {
        assert!(!banned(h, "198.51.100.1"), "{} does not hold the lifted ban", h.name);
        assert!(["198.51.100.2", "198.51.100.3", "198.51.100.4"].iter().all(|s| banned(h, s)), "{} keeps every other ban", h.name);
    }
    let (_, keys) = lab.host("a").etcdctl(&["get", "--prefix", "--keys-only", "/smtpguard/bans/"]);
    assert!(!keys.contains("198.51.100.1/"), "c did not publish the lifted ban again: {keys}");
    let (code, said) = cmd(c, &["bans"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("198.51.100.4/32") && said.contains("a (manual)"), "{said}");
}

#[test]
#[ignore = "privileged: needs root, BPF, namespaces and etcd; cargo xtask test runs it"]
fn bad_data_from_the_fleet_is_refused_counted_and_reported() {
    require_root();
    let lab = FleetLab::new(2, 1).expect("fleet lab");
    let (a, b) = (lab.host("a"), lab.host("b"));
    let policy = write_policy(&a.pins.policy_dir(), "policy.yaml", FLOOD_POLICY);
    // b reads the bad data from its watch, a (started after) from its full
    // read: both paths are held to the same checks and the same cap.
    let _ctl_b = start(b, &policy, 19630, &["--fleet-max-bans", "2"]);
    within(Duration::from_secs(10), "b connected", || metric(&metrics(b, 19630), "smtpguard_fleet_connected", &[]) == Some(1.0));
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64;
    let record = |host: &str| {
        format!(r#"{{"origin_host":"{host}","origin":"auto","reason":"r","strikes":1,"until":"x","until_ms":{},"started_ms":{now_ms}}}"#, now_ms + 600_000)
    };
    let put = |key: &str, value: &str| {
        let (code, out) = b.etcdctl(&["put", key, value]);
        assert_eq!(code, 0, "{out}");
    };
    put("/smtpguard/bans/0.0.0.0/0", &record("x"));
    put("/smtpguard/bans/10.0.0.0/8", &record("x"));
    put("/smtpguard/bans/198.51.100.7/24", &record("x"));
    put("/smtpguard/bans/junk", "not json");
    put("/smtpguard/bans/203.0.113.1/32", r#"{"origin_host":"x","origin":"auto"}"#);
    put("/smtpguard/bans/203.0.113.2/32", &record("x").replace("auto", "fleet"));
    // Over the cap of 2: the third is refused.
    for n in 10..13 {
        put(&format!("/smtpguard/bans/203.0.113.{n}/32"), &record("x"));
    }
    let _ctl_a = start(a, &policy, 19630, &["--fleet-max-bans", "2"]);
    for h in [a, b] {
        let counted = |m: &str| {
            metric(m, "smtpguard_fleet_bans_received_total", &["result=\"over_cap\""]) == Some(1.0)
                && metric(m, "smtpguard_fleet_bans_received_total", &["result=\"too_wide\""]) == Some(2.0)
                && metric(m, "smtpguard_fleet_bans_received_total", &["result=\"unparsable\""]) == Some(4.0)
                && metric(m, "smtpguard_fleet_bans_received_total", &["result=\"installed\""]) == Some(2.0)
                && metric(m, "smtpguard_fleet_bans", &[]) == Some(2.0)
        };
        let mut m = String::new();
        within_or(Duration::from_secs(10), || {
            m = metrics(h, 19630);
            counted(&m)
        })
        .unwrap_or_else(|e| panic!("{}: 2 installed and 7 refused, counted: {e}\n{m}", h.name));
    }
    // The too-wide bans are nowhere: every other source still passes.
    for h in [a, b] {
        assert_greeted(connect(&h.lab.client, CLIENT_OK, SERVER, 25).unwrap(), &format!("0.0.0.0/0 was not installed on {}", h.name));
        let maps = Maps::open_pinned(&h.pins.pin_dir).unwrap();
        assert!(maps.network_bans().unwrap().is_empty(), "{}: no network ban installed", h.name);
    }
    // Each host's record says the same (a's first record may be on its way).
    let mut status = String::new();
    within_or(Duration::from_secs(10), || {
        status = fleet(a, &["status"]).1;
        status.lines().filter(|l| l.starts_with("a ") || l.starts_with("b ")).count() == 2
    })
    .unwrap_or_else(|e| panic!("both hosts in fleet status: {e}\n{status}"));
    let (code, status) = fleet(a, &["status"]);
    assert_eq!(code, 0, "refusals are no policy failure: {status}");
    for h in ["a ", "b "] {
        let row = status.lines().find(|l| l.starts_with(h)).unwrap_or_else(|| panic!("{status}"));
        assert!(row.split_whitespace().any(|w| w == "7"), "{h}refused 7: {row}");
    }
    let (_, json) = fleet(a, &["status", "--json"]);
    assert_eq!(json.matches(r#""refused":{"over_cap":1,"too_wide":2,"unparsable":4}"#).count(), 2, "{json}");
}

#[test]
#[ignore = "privileged: needs root, BPF, namespaces and etcd; cargo xtask test runs it"]
fn hosts_join_over_tls_with_a_client_certificate_and_a_user() {
    require_root();
    let mut lab = FleetLab::new_tls(2, 1).expect("fleet lab over TLS");
    lab.etcd.enable_auth("smtpguard", "s3cret-pass", "/smtpguard").unwrap();
    let (a, b) = (lab.host("a"), lab.host("b"));
    let dir = a.pins.policy_dir();
    let policy = write_policy(&dir, "policy.yaml", FLOOD_POLICY);
    std::fs::write(dir.join("password"), "s3cret-pass\n").unwrap();
    let tls = a.tls().unwrap().clone();
    let (ca, cert, key, pw) = (tls.ca.display().to_string(), tls.cert.display().to_string(), tls.key.display().to_string(), dir.join("password").display().to_string());
    let creds = ["--fleet-ca", &ca, "--fleet-cert", &cert, "--fleet-key", &key, "--fleet-user", "smtpguard", "--fleet-password-file", &pw];
    let _ctl = [start(a, &policy, 19640, &creds), start(b, &policy, 19640, &creds)];
    for h in [a, b] {
        within(Duration::from_secs(10), &format!("{} connected over TLS", h.name), || metric(&metrics(h, 19640), "smtpguard_fleet_connected", &[]) == Some(1.0));
    }
    flood_until_banned(a, CLIENT_DENIED);
    within(PROPAGATION_BOUND, "the ban reaching b over TLS", || banned(b, CLIENT_DENIED));
    // Without the user, etcd refuses: the fleet commands say so.
    let (code, said) = fleet(a, &["status", "--fleet-ca", &ca, "--fleet-cert", &cert, "--fleet-key", &key]);
    assert_ne!(code, 0, "{said}");
    let (code, said) = fleet(a, &["status", "--fleet-ca", &ca, "--fleet-cert", &cert, "--fleet-key", &key, "--fleet-user", "smtpguard", "--fleet-password-file", &pw]);
    assert_eq!(code, 0, "{said}");
    assert!(said.lines().filter(|l| l.starts_with("a ") || l.starts_with("b ")).count() == 2, "{said}");
}
