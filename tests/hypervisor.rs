//! Hypervisor life (issue 14): tenant interfaces come and go with VMs, and
//! `smtpguard run --tenant 'tap*'` follows them through rtnetlink. The
//! server namespace of a [`PairLab`] plays the hypervisor (`b0` its
//! uplink, greeters on 25 and 587); each "tap" is a veth pair whose
//! hypervisor end `tapN` is there and whose VM end `vmN` is in a namespace
//! of VMs. A VM's SYN to the hypervisor's port 25 enters `tapN`, where
//! `tc_ingress` judges it by the egress policy: the default denies 25.

use std::{
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use smtpguard_tests::{
    netns::Netns,
    pairlab::{http_get, metric, write_policy, PairLab, RunningController, TestPins, CLIENT_OK, SERVER},
    peers::{connect_within, Greeter},
    require_root,
};

const POLICY: &str = "version: 1\nports: {25: smtp, 587: submission}\ningress:\n  default: {25: deny, 587: allow}\negress:\n  default: {25: deny, 587: allow}\n  tenant_suspect: {blocked: 5, window: 1m, quarantine: 10m}\n";
/// A probe's patience: a veth answers in well under a millisecond, so a
/// SYN unanswered this long was dropped.
const PROBE: Duration = Duration::from_millis(400);

/// The hypervisor end's and the VM end's address of tap `n`.
fn tap_addrs(n: u32) -> (String, String) {
    (format!("10.77.{n}.1"), format!("10.77.{n}.2"))
}

/// The VMs' namespace and the taps that exist now.
struct Vms {
    ns: Netns,
}

impl Vms {
    fn new() -> Self {
        Self { ns: Netns::new("vms").expect("vms namespace") }
    }

    /// Creates `tapN` on the hypervisor and its VM end `vmN`, both up.
    fn create(&self, hv: &Netns, n: u32) {
        let (h, v) = tap_addrs(n);
        let (tap, vm) = (format!("tap{n}"), format!("vm{n}"));
        run(&["ip", "link", "add", &tap, "netns", hv.name(), "type", "veth", "peer", "name", &vm, "netns", self.ns.name()]);
        hv.ip(&["addr", "add", &format!("{h}/30"), "dev", &tap]).unwrap();
        self.ns.ip(&["addr", "add", &format!("{v}/30"), "dev", &vm]).unwrap();
        hv.ip(&["link", "set", &tap, "up"]).unwrap();
        self.ns.ip(&["link", "set", &vm, "up"]).unwrap();
    }

    /// Deletes tap `n` (both ends go).
    fn delete(&self, n: u32) {
        let _ = self.ns.ip(&["link", "del", &format!("vm{n}")]);
    }

    /// A connection from VM `n` to the hypervisor's `port`: true when it
    /// was dropped (no answer within [`PROBE`]).
    fn dropped(&self, n: u32, port: u16) -> bool {
        let (h, v) = tap_addrs(n);
        match connect_within(&self.ns, &v, &h, port, PROBE).unwrap() {
            Ok(_) => false,
            Err(std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => true,
            Err(e) => panic!("VM {n} to port {port}: {e:?}"),
        }
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Polls `f` every 10 ms until it holds, for at most `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn link_pins(pin_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> =
        std::fs::read_dir(pin_dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("link_")).collect();
    out.sort();
    out
}

/// Fields drop in order: the greeter before the namespace it serves in.
struct Hypervisor {
    _submission: Greeter,
    lab: PairLab,
    vms: Vms,
    state: TestPins,
}

impl Hypervisor {
    fn new(tag: &str) -> Self {
        let lab = PairLab::new().expect("lab");
        let submission = Greeter::start(&lab.server, 587).expect("greeter on 587");
        Self { vms: Vms::new(), state: TestPins::new(tag), lab, _submission: submission }
    }

    fn start(&self, port: u16) -> RunningController {
        let policy = write_policy(&self.state.policy_dir(), "policy.yaml", POLICY);
        RunningController::start_on(&self.lab, &self.state, &policy, port, &["--uplink", "b0", "--tenant", "tap*"]).expect("controller")
    }
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn taps_that_come_and_go_are_enforced_within_a_second_and_leave_no_pins() {
    require_root();
    let hv = Hypervisor::new("taps");
    let _ctl = hv.start(19460);
    // Traffic all along: VM 0's attempts on 25, until told to stop
    // (bounded), from the moment its tap is enforced.
    hv.vms.create(&hv.lab.server, 0);
    assert!(eventually(Duration::from_secs(1), || hv.vms.dropped(0, 25)), "tap0 enforced within a second");
    let stop = AtomicBool::new(false);
    let (tried, not_dropped) = (AtomicU64::new(0), AtomicU64::new(0));
    let (vms, stop_ref, tried_ref, not_dropped_ref) = (&hv.vms, &stop, &tried, &not_dropped);
    std::thread::scope(|scope| {
    scope.spawn(move || {
        let (stop, tried, not_dropped) = (stop_ref, tried_ref, not_dropped_ref);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            tried.fetch_add(1, Ordering::Relaxed);
            if !vms.dropped(0, 25) {
                not_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut alive: Vec<u32> = vec![0];
    for batch in 0..5u32 {
        let new: Vec<u32> = (1 + batch * 10..1 + (batch + 1) * 10).collect();
        let created = Instant::now();
        for &n in &new {
            hv.vms.create(&hv.lab.server, n);
        }
        // Enforced within a second of their creation: probe when it is up.
        std::thread::sleep((created + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
        let probes: Vec<_> = new.iter().map(|&n| scope.spawn(move || (n, vms.dropped(n, 25)))).collect();
        for p in probes {
            let (n, dropped) = p.join().unwrap();
            assert!(dropped, "batch {batch}: tap{n} was not enforced a second after it was created");
        }
        alive.extend(&new);
        // Half the batch's VMs stop: their taps go, and so must their pins.
        for &n in new.iter().step_by(2) {
            hv.vms.delete(n);
            alive.retain(|a| *a != n);
        }
        let want: Vec<String> = {
            let mut w: Vec<String> = alive.iter().map(|n| format!("link_tcingress_tap{n}")).chain(["link_tcegress_b0".into(), "link_xdp_b0".into()]).collect();
            w.sort();
            w
        };
        assert!(eventually(Duration::from_secs(2), || link_pins(&hv.state.pin_dir) == want), "batch {batch}: pins {:?}, want {want:?}", link_pins(&hv.state.pin_dir));
    }
    stop.store(true, Ordering::Relaxed);
    check(&hv, &alive);
    });
    assert!(tried.load(Ordering::Relaxed) > 5, "the background traffic ran");
    assert_eq!(not_dropped.load(Ordering::Relaxed), 0, "VM 0's attempts on 25 were all dropped while taps came and went");
}

/// After the churn: status lists every live tap as attached, one event
/// per tap created, one metric series per tap that exists.
fn check(hv: &Hypervisor, alive: &[u32]) {
    let (code, status) = hv.state.cmd(&["status"]);
    assert_eq!(code, 0, "{status}");
    for n in alive {
        assert!(status.lines().any(|l| l.contains(&format!("tap{n} ")) && l.contains("attached (ifindex")), "tap{n} in status:\n{status}");
    }
    assert!(!status.contains("stale: "), "{status}");
    let attached = hv.state.events_where(|e| e["event"] == "interface_attached" && e["role"] == "tenant").len();
    assert_eq!(attached, 51, "one interface_attached event per tap");
    let metrics = http_get(&hv.lab, 19460, "/metrics").unwrap();
    let series = metrics.lines().filter(|l| l.starts_with("smtpguard_interface_attached{") && l.contains("role=\"tenant\"")).count();
    assert_eq!(series, alive.len(), "one interface_attached series per tap that exists");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_recreated_uplink_and_tenant_are_enforced_again_without_a_restart() {
    require_root();
    let hv = Hypervisor::new("recreate");
    hv.vms.create(&hv.lab.server, 1);
    let _ctl = hv.start(19461);
    let from_internet = |port| connect_within(&hv.lab.client, CLIENT_OK, SERVER, port, PROBE).unwrap();
    assert!(from_internet(25).is_err(), "the uplink's ingress policy denies 25");
    assert!(from_internet(587).is_ok());
    assert!(hv.vms.dropped(1, 25));

    // The uplink goes: loudly (event, metric 0), then comes back under its name.
    run(&["ip", "-n", hv.lab.client.name(), "link", "del", "a0"]);
    assert!(eventually(Duration::from_secs(2), || !hv.state.events_where(|e| e["event"] == "uplink_missing" && e["interface"] == "b0").is_empty()), "uplink_missing event");
    let m = http_get(&hv.lab, 19461, "/metrics").unwrap();
    assert_eq!(metric(&m, "smtpguard_interface_attached", &["interface=\"b0\"", "role=\"uplink\""]), Some(0.0), "the missing uplink shows as 0");
    assert!(!link_pins(&hv.state.pin_dir).iter().any(|p| p.ends_with("_b0")), "the uplink's pins went with it");
    smtpguard_tests::netns::veth_pair(&hv.lab.client, "a0", &[&format!("{CLIENT_OK}/24")], &hv.lab.server, "b0", &[&format!("{SERVER}/24")]).unwrap();
    assert!(
        eventually(Duration::from_secs(2), || metric(&http_get(&hv.lab, 19461, "/metrics").unwrap(), "smtpguard_interface_attached", &["interface=\"b0\""]) == Some(1.0)),
        "the uplink is attached again"
    );
    assert!(from_internet(25).is_err(), "the new uplink's ingress is judged again");
    assert!(from_internet(587).is_ok());

    // A VM restart: its tap is deleted and created again under the same name.
    hv.vms.delete(1);
    hv.vms.create(&hv.lab.server, 1);
    assert!(eventually(Duration::from_secs(1), || hv.vms.dropped(1, 25)), "the recreated tap is enforced again");
    assert!(hv.vms.dropped(1, 25));
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_restart_after_kill_9_while_taps_churn_starts_clean_and_attaches_what_exists() {
    require_root();
    let hv = Hypervisor::new("kill9");
    for n in 1..=6 {
        hv.vms.create(&hv.lab.server, n);
    }
    let mut ctl = hv.start(19462);
    assert!(hv.vms.dropped(1, 25));
    ctl.kill9();
    // While no controller runs: VMs stop, restart (same tap name, a new
    // interface) and start.
    hv.vms.delete(1);
    hv.vms.delete(2);
    hv.vms.create(&hv.lab.server, 2);
    hv.vms.create(&hv.lab.server, 7);
    // The links of live taps still enforce meanwhile; the recreated one's was severed.
    assert!(hv.vms.dropped(3, 25), "enforcement outlives the controller");
    let _ctl = hv.start(19462);
    let stale: Vec<String> = hv.state.events("stale_pin").iter().map(|e| e["pin"].as_str().unwrap().to_owned()).collect();
    assert!(stale.iter().any(|p| p.ends_with("link_tcingress_tap1")) && stale.iter().any(|p| p.ends_with("link_tcingress_tap2")), "stale pins reported: {stale:?}");
    for n in 2..=7 {
        assert!(hv.vms.dropped(n, 25), "tap{n} is enforced after the restart");
    }
    let want: Vec<String> = {
        let mut w: Vec<String> = (2..=7).map(|n| format!("link_tcingress_tap{n}")).chain(["link_tcegress_b0".into(), "link_xdp_b0".into()]).collect();
        w.sort();
        w
    };
    assert_eq!(link_pins(&hv.state.pin_dir), want, "no pin of a tap that is gone");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_tenant_that_keeps_trying_port_25_is_a_suspect_once_per_episode_and_quarantined() {
    require_root();
    let hv = Hypervisor::new("suspect");
    hv.vms.create(&hv.lab.server, 1);
    hv.vms.create(&hv.lab.server, 2);
    let _ctl = hv.start(19463);
    assert!(!hv.vms.dropped(1, 587), "587 is allowed before");
    // 20 attempts on 25 (one SYN each: the probe gives up before a
    // retransmission): over the policy's 5 a minute.
    for _ in 0..20 {
        assert!(hv.vms.dropped(1, 25));
    }
    assert!(
        eventually(Duration::from_secs(2), || !hv.state.events("tenant_suspect").is_empty()),
        "a tenant_suspect event"
    );
    let suspects: Vec<serde_json::Value> = hv.state.events("tenant_suspect");
    assert_eq!(suspects.len(), 1, "once per episode: {suspects:?}");
    let (_, vm1) = tap_addrs(1);
    assert_eq!((suspects[0]["interface"].as_str(), suspects[0]["src"].as_str(), suspects[0]["quarantine_s"].as_u64()), (Some("tap1"), Some(vm1.as_str()), Some(600)));
    // Quarantined: banned on every guarded port, 587 included.
    assert!(eventually(Duration::from_secs(2), || hv.vms.dropped(1, 587)), "the suspect is quarantined on 587 too");
    assert!(!hv.vms.dropped(2, 587), "another tenant is not");
    let (_, bans) = hv.state.cmd(&["bans", "--json"]);
    assert!(bans.contains(&format!("\"source\":\"{vm1}/32\"")) && bans.contains("\"origin\":\"quarantine\""), "{bans}");
    let (code, tenants) = hv.state.cmd(&["tenants", "--json"]);
    assert_eq!(code, 0, "{tenants}");
    let rows: serde_json::Value = serde_json::from_str(tenants.lines().next().unwrap()).unwrap();
    let tap1 = rows.as_array().unwrap().iter().find(|r| r["interface"] == "tap1").expect("tap1 listed");
    assert!(tap1["blocked"].as_u64().unwrap() >= 20, "{tap1}");
    assert_eq!(tap1["suspects"][0]["source"].as_str(), Some(vm1.as_str()), "{tap1}");
    let m = http_get(&hv.lab, 19463, "/metrics").unwrap();
    assert_eq!(metric(&m, "smtpguard_tenant_suspect_episodes_total", &["interface=\"tap1\""]), Some(1.0));
    assert_eq!(metric(&m, "smtpguard_quarantines_total", &[]), Some(1.0));
    // The table scan feeds the per-interface counters and the gauge.
    assert!(
        eventually(Duration::from_secs(12), || {
            let m = http_get(&hv.lab, 19463, "/metrics").unwrap();
            metric(&m, "smtpguard_tenant_suspects", &["interface=\"tap1\""]) == Some(1.0)
                // Denied, then (once quarantined) banned.
                && ["default_deny", "banned"]
                    .iter()
                    .map(|r| metric(&m, "smtpguard_tenant_packets_total", &["interface=\"tap1\"", &format!("reason=\"{r}\""), "verdict=\"drop\""]).unwrap_or(0.0))
                    .sum::<f64>()
                    >= 20.0
        }),
        "tenant gauges: {}",
        http_get(&hv.lab, 19463, "/metrics").unwrap().lines().filter(|l| l.contains("tenant") || l.contains("scan")).collect::<Vec<_>>().join("\n")
    );
}
