//! `smtpguard run` as an operator runs it, on a veth pair between two
//! network namespaces, with real TCP connections: enforcement, operator
//! commands, kill -9, restart with state carried over, detach, atomic
//! reloads under traffic, and the metrics exposition (promtool).

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray};
use policy_common::{direction, reason, stats_index, verdict, Counter};
use smtpguard_tests::{
    peers::{assert_dropped, assert_greeted, connect, Greeter, Prometheus},
    packet::{TcpFrame, SYN},
    pairlab::{http_get, metric, wait_for_metric, write_policy, PairLab, RunningController, TestPins, CLIENT_DENIED, CLIENT_OK, SERVER},
    require_root, smtpguard_bin,
    testrun::{load_empty_xdp, obj_get, time_run, XdpLink},
};

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn run_enforces_survives_kill_9_restarts_with_state_and_detaches_cleanly() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("life");
    let policy = write_policy(&state.policy_dir(), "policy.yaml", &format!(
        "version: 1\nevents: {{drop_sample_one_in: 1, per_second: 100}}\ningress:\n  default: {{25: allow}}\n  deny: [{{id: bad-host, cidr: {CLIENT_DENIED}/32}}]\n"
    ));
    let mut ctl = RunningController::start(&lab, &state, &policy, 19425).expect("controller");

    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "allowed source");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "denied source");
    // Sampled drops reach the event stream as JSON lines naming the rule.
    let events_file = state.events_file();
    let mut sampled = None;
    for _ in 0..100 {
        let text = std::fs::read_to_string(&events_file).unwrap_or_default();
        sampled = text.lines().find(|l| l.contains("\"event\":\"drop_sample\"")).map(str::to_owned);
        if sampled.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sampled: serde_json::Value = serde_json::from_str(&sampled.expect("a drop_sample event")).unwrap();
    assert_eq!(
        (sampled["src"].as_str(), sampled["dport"].as_u64(), sampled["rule"].as_str(), sampled["reason"].as_str(), sampled["direction"].as_str()),
        (Some(CLIENT_DENIED), Some(25), Some("bad-host"), Some("deny_acl"), Some("ingress"))
    );
    assert!(sampled["time"].as_str().is_some_and(|t| t.starts_with("20") && t.ends_with('Z')));

    // A manual ban, listed by `bans`.
    let (code, out) = state.cmd(&["ban", CLIENT_OK, "--for", "1h", "--reason", "test"]);
    assert_eq!(code, 0, "{out}");
    let (_, bans) = state.cmd(&["bans", "--json"]);
    assert!(bans.contains(&format!("\"source\":\"{CLIENT_OK}/32\"")) && bans.contains("\"origin\":\"manual\""), "{bans}");
    assert_dropped(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "banned source");

    let metrics = http_get(&lab, 19425, "/metrics").unwrap();
    let denied_before = metric(&metrics, "smtpguard_packets_total", &["reason=\"deny_acl\""]).expect("deny counter");
    assert!(denied_before >= 1.0);
    assert_eq!(metric(&metrics, "smtpguard_bans_total", &["origin=\"manual\""]), Some(1.0));
    // Gauges from the source table come from a scan at most 5 s old.
    let scanned = wait_for_metric(&lab, 19425, "smtpguard_active_bans", &["origin=\"manual\""], 1.0);
    assert!(scanned.is_ok(), "the ban reaches smtpguard_active_bans with the next table scan: {scanned:?}");

    // kill -9: the pins keep judging.
    ctl.kill9();
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "denied source after kill -9");
    assert_dropped(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "banned source after kill -9");
    let (code, out) = state.cmd(&["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("not running") && out.contains("xdp") && out.contains("b0"), "{out}");
    // Operator commands work without the daemon.
    let (code, out) = state.cmd(&["unban", CLIENT_OK]);
    assert_eq!(code, 0, "{out}");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "after unban without the daemon");
    let (code, _) = state.cmd(&["ban", CLIENT_OK, "--for", "1h"]);
    assert_eq!(code, 0);

    // Restart: the ban and the counters carry on.
    let mut ctl = RunningController::start(&lab, &state, &policy, 19425).expect("restart");
    let (_, bans) = state.cmd(&["bans", "--json"]);
    assert!(bans.contains(&format!("{CLIENT_OK}/32")), "ban kept across restart: {bans}");
    let metrics = http_get(&lab, 19425, "/metrics").unwrap();
    let denied_after = metric(&metrics, "smtpguard_packets_total", &["reason=\"deny_acl\""]).unwrap();
    assert!(denied_after >= denied_before + 1.0, "counters kept: {denied_before} then {denied_after}");
    assert_dropped(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "still banned after restart");

    // Detach: nothing left.
    let (code, out) = state.cmd(&["detach"]);
    assert_eq!(code, 0, "{out}");
    ctl.kill9();
    assert!(!state.pin_dir.exists(), "pins left in {}", state.pin_dir.display());
    let link = lab.server.ip(&["link", "show", "b0"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"), "XDP still attached");
    assert_greeted(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "nothing judges after detach");
    // Every command that reads the pins says so, and none creates them.
    for args in [&["status"][..], &["status", "--rules"], &["bans"], &["shadow"], &["bypass", "on"]] {
        let (code, out) = state.cmd(args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(out.contains("nothing is attached"), "{args:?}: {out}");
    }
    assert!(!state.pin_dir.exists(), "pins made by a command after detach");
}


/// Policy A denies the peer; policy B denies by default and allows the
/// local server. A packet from the peer to the server is (drop, deny_acl)
/// under A and (pass, allow_acl) under B. Judged by A's tries with B's
/// configuration it would be (drop, default_deny); by B's tries with A's
/// configuration (pass, default_allow): an update that wrote the maps in
/// place would show one of those while the reloads run.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn reloads_under_traffic_judge_every_packet_by_one_whole_policy() {
    require_root();
    const RELOADS: usize = 30;
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("atomic");
    let dir = state.policy_dir();
    let peer = "198.51.100.7";
    let local = "203.0.113.25";
    let a = format!("version: 1\ningress:\n  default: {{25: allow}}\n  deny: [{{id: a-peer, cidr: {peer}/32}}]\n");
    let b = format!("version: 1\ningress:\n  default: {{25: deny}}\n  allow: [{{id: b-local, cidr: {local}/32, side: local}}]\n");
    let policy = write_policy(&dir, "policy.yaml", &a);
    let ctl = RunningController::start(&lab, &state, &policy, 19426).expect("controller");

    let prog = obj_get(&state.pin_dir.join("prog_xdp_ingress")).unwrap();
    let stats = PerCpuArray::<MapData, Counter>::try_from(Map::PerCpuArray(MapData::from_pin(state.pin_dir.join("STATS")).unwrap())).unwrap();
    let frame = TcpFrame::new(peer.parse().unwrap(), local.parse().unwrap(), 25, SYN).build();
    let cells = [
        ("A", stats_index(direction::INGRESS, verdict::DROP, reason::DENY_ACL, 0)),
        ("B", stats_index(direction::INGRESS, verdict::PASS, reason::ALLOW_ACL, 0)),
        ("mix: A tries, B config", stats_index(direction::INGRESS, verdict::DROP, reason::DEFAULT_DENY, 0)),
        ("mix: B tries, A config", stats_index(direction::INGRESS, verdict::PASS, reason::DEFAULT_ALLOW, 0)),
    ];
    let read = |i: u32| stats.get(&i, 0).map(|v| v.iter().map(|c| c.packets).sum::<u64>()).unwrap_or(0);
    let before: Vec<u64> = cells.iter().map(|(_, i)| read(*i)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let frame = frame.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let started = std::time::Instant::now();
            // Bounded: stops when told, after 60 s or after 500,000,000 packets.
            while !stop.load(Ordering::Relaxed) && sent < 500_000_000 && started.elapsed() < Duration::from_secs(60) {
                use std::os::fd::AsFd;
                time_run(prog.as_fd(), &frame, 100).unwrap();
                sent += 100;
            }
            sent
        })
    };
    let generation = || -> u64 {
        http_get(&lab, 19426, "/healthz").ok().and_then(|h| h.split_whitespace().nth(2)?.parse().ok()).unwrap_or(0)
    };
    for i in 0..RELOADS {
        let text = if i % 2 == 0 { &b } else { &a };
        let before = generation();
        // Replace the file whole, as editors and config tools do: a reload
        // must never see half a file.
        let tmp = dir.join("policy.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &policy).unwrap();
        let (code, out) = state.cmd(&["reload"]);
        assert_eq!(code, 0, "{out}");
        // Wait for a newer generation (bounded). The file watcher may apply
        // the edit before the signal does; either counts.
        let mut ok = false;
        for _ in 0..500 {
            if generation() > before {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(ok, "reload {i} not applied");
    }
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.join().unwrap();
    let delta: Vec<u64> = cells.iter().zip(&before).map(|((_, i), b)| read(*i) - b).collect();
    eprintln!("{sent} packets over {RELOADS} reloads: {:?}", cells.iter().map(|(n, _)| *n).zip(&delta).collect::<Vec<_>>());
    assert_eq!(delta.iter().sum::<u64>(), sent, "every packet counted in one of the cells");
    assert!(delta[0] > 0 && delta[1] > 0, "both policies were in force during the run");
    assert_eq!((delta[2], delta[3]), (0, 0), "packets judged by half of one policy and half of another");
    drop(ctl);
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn metrics_pass_promtool_and_invalid_reloads_keep_the_running_policy() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("metrics");
    let dir = state.policy_dir();
    let policy = write_policy(&dir, "policy.yaml", &format!("version: 1\ningress:\n  deny: [{CLIENT_DENIED}/32]\n"));
    let _ctl = RunningController::start(&lab, &state, &policy, 19427).expect("controller");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "denied source");

    // An invalid edit, noticed by the file watcher alone, is rejected; the deny stays in force.
    std::fs::write(&policy, "version: 1\ningress:\n  deny: [not-a-cidr]\n").unwrap();
    let mut rejected = false;
    for _ in 0..500 {
        let m = http_get(&lab, 19427, "/metrics").unwrap();
        if metric(&m, "smtpguard_reloads_total", &["result=\"rejected\""]).is_some_and(|v| v >= 1.0) {
            assert_eq!(metric(&m, "smtpguard_last_reload_success", &[]), Some(0.0));
            rejected = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(rejected, "the invalid reload was not counted");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "deny still in force after a rejected reload");
    let events = std::fs::read_to_string(state.events_file()).unwrap();
    assert!(
        events.lines().any(|l| l.contains("\"result\":\"rejected\"") && l.contains("\"trigger\":\"file change\"") && l.contains("not-a-cidr")),
        "{events}"
    );

    let text = http_get(&lab, 19427, "/metrics").unwrap();
    for name in [
        "smtpguard_packets_total", "smtpguard_bytes_total", "smtpguard_active_bans", "smtpguard_tracked_sources", "smtpguard_map_entries",
        "smtpguard_map_capacity", "smtpguard_policy_generation", "smtpguard_last_reload_success", "smtpguard_last_reload_timestamp_seconds",
        "smtpguard_reload_duration_seconds", "smtpguard_build_info", "smtpguard_reloads_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    assert!(text.contains("# TYPE smtpguard_packets_total counter") && text.contains("# TYPE smtpguard_active_bans gauge"));
    for map in policy_common::ALL_MAPS {
        assert!(metric(&text, "smtpguard_map_capacity", &[&format!("map=\"{map}\"")]).is_some_and(|v| v > 0.0), "capacity of {map}");
    }
    let mut promtool = Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("promtool (Debian prometheus)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_real_prometheus_scrapes_the_controller_and_promql_matches_the_datapath() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("prom");
    let dir = state.policy_dir();
    let policy = write_policy(&dir, "policy.yaml", &format!("version: 1\ningress:\n  deny: [{CLIENT_DENIED}/32]\n"));
    let _ctl = RunningController::start(&lab, &state, &policy, 19428).expect("controller");
    for _ in 0..3 {
        assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "denied source");
    }
    // The datapath's own count, from the pinned counters.
    let stats = PerCpuArray::<MapData, Counter>::try_from(Map::PerCpuArray(MapData::from_pin(state.pin_dir.join("STATS")).unwrap())).unwrap();
    let cell = stats_index(direction::INGRESS, verdict::DROP, reason::DENY_ACL, 0);
    let kernel: u64 = stats.get(&cell, 0).unwrap().iter().map(|c| c.packets).sum();
    assert!(kernel >= 3);

    let prom = Prometheus::start(&lab.server, &dir.join("prometheus"), 19428, 19090).expect("prometheus");
    let mut answer = None;
    // Prometheus answers after its first scrape, some seconds after start (bounded: 60 s).
    for _ in 0..600 {
        if let Some((_, value)) = prom.query(&lab.server, "sum(smtpguard_packets_total{reason=\"deny_acl\"})") {
            answer = Some(value);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(answer, Some(kernel as f64), "PromQL answer against the kernel's count");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn run_refuses_a_missing_interface_or_an_invalid_policy_before_changing_anything() {
    require_root();
    let state = TestPins::new("preflight");
    let dir = state.policy_dir();
    let good = write_policy(&dir, "good.yaml", "version: 1\n");
    let bad = write_policy(&dir, "bad.yaml", "version: 1\nmode: sideways\n");
    let run = |policy: &Path, iface: &str| {
        let out = Command::new(smtpguard_bin())
            .args(["run", "--policy"])
            .arg(policy)
            .args(["--uplink", iface, "--metrics-addr", "127.0.0.1:19429"])
            .args(state.args())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&good, "nosuchif0");
    assert_eq!(code, Some(1));
    assert!(err.contains("interface nosuchif0 does not exist (nothing was changed)"), "{err}");
    let (code, err) = run(&bad, "lo");
    assert_eq!(code, Some(1));
    assert!(err.contains("bad.yaml:2:7: error: mode:") && err.contains("nothing was changed"), "{err}");
    assert!(!state.pin_dir.exists(), "a refused run must not create pins");
}

/// The server namespace plays the hypervisor and b0 the host side of a
/// tenant's veth: what the tenant sends is judged by the egress policy.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_tenant_interface_judges_what_the_vm_sends_by_the_egress_policy() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let _submission = Greeter::start(&lab.server, 587).expect("greeter on 587");
    let state = TestPins::new("tenant");
    let dir = state.policy_dir();
    // An exemption in force whatever the day the test runs.
    let until = smtpguard::policy::time::format_date(smtpguard::policy::time::today() + 365);
    let policy = write_policy(&dir, "policy.yaml", &format!(
        "version: 1\nports: {{25: smtp, 587: submission}}\negress:\n  default: {{25: deny, 587: allow}}\n  exemptions:\n    - {{id: ticket-1, cidr: {CLIENT_OK}/32, ports: [25], until: {until}}}\n"
    ));
    let _ctl = RunningController::start_on(&lab, &state, &policy, 19430, &["--tenant", "b0"]).expect("controller");
    let (_, status) = state.cmd(&["status"]);
    assert!(status.contains("tcingress") && status.contains("b0"), "{status}");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "exempt tenant on 25");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "ordinary tenant on 25");
    assert_greeted(connect(&lab.client, CLIENT_DENIED, SERVER, 587).unwrap(), "ordinary tenant on 587");
    let metrics = http_get(&lab, 19430, "/metrics").unwrap();
    assert!(metric(&metrics, "smtpguard_packets_total", &["direction=\"egress\"", "reason=\"default_deny\"", "port=\"25\""]).is_some_and(|v| v >= 1.0), "{metrics}");
    assert!(metric(&metrics, "smtpguard_packets_total", &["direction=\"egress\"", "reason=\"allow_acl\"", "port=\"25\""]).is_some_and(|v| v >= 1.0));
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_manual_network_ban_drops_every_source_in_it_until_lifted() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("netban");
    let dir = state.policy_dir();
    let policy = write_policy(&dir, "policy.yaml", "version: 1\ningress:\n  default: {25: allow}\n");
    let _ctl = RunningController::start(&lab, &state, &policy, 19431).expect("controller");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "before the ban");
    let (code, out) = state.cmd(&["ban", "192.0.2.0/30", "--for", "1h", "--reason", "spam run"]);
    assert_eq!(code, 0, "{out}");
    assert_dropped(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), ".1 inside the banned /30");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), ".3 inside the banned /30");
    let (_, bans) = state.cmd(&["bans", "--json"]);
    assert!(bans.contains("\"source\":\"192.0.2.0/30\""), "{bans}");
    let (code, out) = state.cmd(&["ban", "192.0.2.1/24", "--for", "1h"]);
    assert_ne!(code, 0);
    assert!(out.contains("host bits"), "{out}");
    let (code, out) = state.cmd(&["unban", "192.0.2.0/30"]);
    assert_eq!(code, 0, "{out}");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "after the ban is lifted");
}

/// An SMTP server in `ns` on `addr:port` (`smtp-sink`), killed on drop.
struct Sink(std::process::Child);

impl Sink {
    fn start(ns: &smtpguard_tests::netns::Netns, addr: &str, port: u16) -> Self {
        let child = Command::new("nsenter")
            .args([&format!("--net=/run/netns/{}", ns.name()), "--", "smtp-sink", "-u", "nobody", &format!("{addr}:{port}"), "64"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink");
        Self(child)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An SMTP session from `src` in `ns` to `dst:port`, past EHLO; waits
/// (bounded) for the server to listen.
fn open_session(ns: &smtpguard_tests::netns::Netns, src: &str, dst: &str, port: u16) -> std::net::TcpStream {
    use std::io::{BufRead, BufReader};
    for _ in 0..100 {
        let stream = ns
            .enter(|| -> std::io::Result<std::net::TcpStream> {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                socket.bind(&std::net::SocketAddr::new(src.parse().unwrap(), 0).into())?;
                socket.connect_timeout(&std::net::SocketAddr::new(dst.parse().unwrap(), port).into(), Duration::from_secs(2))?;
                Ok(socket.into())
            })
            .unwrap();
        let Ok(mut stream) = stream else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("220"), "banner {line:?}");
        stream.write_all(b"EHLO client.test\r\n").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.starts_with("250 ") {
                return stream;
            }
            assert!(line.starts_with("250-"), "EHLO answer {line:?}");
        }
    }
    panic!("no SMTP server answered on {dst}:{port}");
}

/// What the session's next command meets: the server's answer, or the
/// error the client's stack reports (bounded by the read timeout).
fn next_command(stream: &mut std::net::TcpStream) -> Result<String, std::io::ErrorKind> {
    use std::io::Read;
    stream.write_all(b"NOOP\r\n").map_err(|e| e.kind())?;
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(0) => Err(std::io::ErrorKind::UnexpectedEof),
        Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) => Err(e.kind()),
    }
}

/// Applies a new policy text and waits (bounded) for its generation.
fn apply(state: &TestPins, lab: &PairLab, port: u16, policy: &Path, text: &str) {
    let generation = || -> u64 { http_get(lab, port, "/healthz").ok().and_then(|h| h.split_whitespace().nth(2)?.parse().ok()).unwrap_or(0) };
    let before = generation();
    let tmp = policy.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, policy).unwrap();
    let (code, out) = state.cmd(&["reload"]);
    assert_eq!(code, 0, "{out}");
    for _ in 0..500 {
        if generation() > before {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the edited policy was not applied");
}

/// A policy edit that denies an open session: with `established: reset`
/// (the default) the client's next command fails at once with a reset,
/// at each hook (XDP on the uplink, TC on a tenant interface, TC on the
/// uplink's egress for the host's own connections); with `established:
/// drop` it stalls. Real kernel TCP at both ends.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn an_open_session_the_policy_now_denies_is_reset_to_its_client() {
    require_root();
    let lab = PairLab::new().expect("lab");
    // A veth delivers what an XDP program sends back (XDP_TX) only to a
    // peer that runs XDP itself (GRO is not enough on this kernel); a
    // real NIC has no such need. An empty program passes everything.
    let _peer_xdp = XdpLink::attach(&lab.client, "a0", &load_empty_xdp().expect("empty XDP program")).expect("XDP on a0");
    let _server_sink = Sink::start(&lab.server, SERVER, 2525);
    let _client_sink = Sink::start(&lab.client, CLIENT_OK, 2525);
    let state = TestPins::new("reset");
    let dir = state.policy_dir();
    let port = 19432;
    let allowed = |dir_name: &str, extra: &str| {
        format!("version: 1\nports: {{2525: smtp}}\n{dir_name}:\n  default: {{2525: deny}}\n  allow: [{{id: open, cidr: {CLIENT_OK}/32}}, {{id: host, cidr: {SERVER}/32}}]\n{extra}")
    };
    let denied = |dir_name: &str, extra: &str| format!("version: 1\nports: {{2525: smtp}}\n{dir_name}:\n  default: {{2525: deny}}\n{extra}");
    let resets = |dir_name: &str| {
        let m = http_get(&lab, port, "/metrics").unwrap();
        metric(&m, "smtpguard_resets_total", &[&format!("direction=\"{dir_name}\"")]).unwrap_or(0.0)
    };
    // (hook, interface arguments, policy direction, who opens the session)
    let cases: [(&str, &[&str], &str, bool); 3] =
        [("xdp uplink", &["--uplink", "b0"], "ingress", true), ("tc tenant", &["--tenant", "b0"], "egress", true), ("tc uplink egress", &["--uplink", "b0"], "egress", false)];
    for (hook, args, dir_name, from_client) in cases {
        let policy = write_policy(&dir, "policy.yaml", &allowed(dir_name, ""));
        let ctl = RunningController::start_on(&lab, &state, &policy, port, args).expect("controller");
        let session = || if from_client { open_session(&lab.client, CLIENT_OK, SERVER, 2525) } else { open_session(&lab.server, SERVER, CLIENT_OK, 2525) };

        let mut s = session();
        assert!(next_command(&mut s).is_ok_and(|a| a.starts_with("250")), "{hook}: the session works while allowed");
        let before = resets(dir_name);
        apply(&state, &lab, port, &policy, &denied(dir_name, ""));
        let r = next_command(&mut s);
        assert_eq!(r, Err(std::io::ErrorKind::ConnectionReset), "{hook}: the denied session is reset (resets counted: {})", resets(dir_name) - before);
        assert_eq!(resets(dir_name), before + 1.0, "{hook}: one reset counted");

        apply(&state, &lab, port, &policy, &allowed(dir_name, "  established: drop\n"));
        let mut s = session();
        apply(&state, &lab, port, &policy, &denied(dir_name, "  established: drop\n"));
        let r = next_command(&mut s);
        assert!(matches!(r, Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)), "{hook}: with `established: drop` the session stalls, got {r:?}");
        assert_eq!(resets(dir_name), before + 1.0, "{hook}: no reset with `established: drop`");
        drop(ctl);
        let (code, out) = state.cmd(&["detach"]);
        assert_eq!(code, 0, "{out}");
    }
}
