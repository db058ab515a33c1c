//! `smtpguard run` against hostile input and careless operators (issue
//! 11): a second controller on the same pins, a SIGHUP during start-up,
//! idle and concurrent clients on the metrics port, a full disk under the
//! event log and its rotation, a reload of a policy that is slow and bad,
//! a FIFO where a list file should be.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use smtpguard_tests::{
    peers::{assert_dropped, assert_greeted, connect, connect_within},
    pairlab::{distinct_hosts_list, http_get, metric, write_policy, PairLab, RunningController, TestPins, CLIENT_DENIED, CLIENT_OK, SERVER},
    require_root,
};

/// Polls `f` every 10 ms until it gives `Some`, for at most `limit`.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn reloads(state: &TestPins, trigger: &str) -> Vec<serde_json::Value> {
    state.events_where(|e| e["event"] == "policy_reload" && e["trigger"] == trigger)
}

/// `field: value` of /proc/PID/status.
fn proc_status(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().to_owned()))
}

fn proc_kib(pid: i32, field: &str) -> u64 {
    proc_status(pid, field).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_second_controller_on_the_same_pins_is_refused_and_changes_nothing() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("second");
    let allow = write_policy(&state.policy_dir(), "allow.yaml", "version: 1\ningress:\n  default: {25: allow}\n");
    let deny = write_policy(&state.policy_dir(), "deny.yaml", "version: 1\ningress:\n  default: {25: deny}\n");
    let first = RunningController::start(&lab, &state, &allow, 19440).expect("first controller");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "the first controller's policy allows");
    let pid_file = state.run_dir.join("controller.pid");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), first.pid().to_string());

    // Another metrics port, so nothing but the pins stands in its way.
    let stderr_path = state.policy_dir().join("second.stderr");
    let mut second = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.server.name()))
        .arg("--")
        .arg(smtpguard_tests::smtpguard_bin())
        .args(["run", "--policy"])
        .arg(&deny)
        .args(["--uplink", "b0", "--metrics-addr", "127.0.0.1:19441"])
        .args(state.args())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let exited = wait_for(Duration::from_secs(30), || second.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = second.kill();
        let _ = second.wait();
    }
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(exited.and_then(|s| s.code()), Some(1), "the second controller must exit 1 at once: {err}");
    assert!(err.contains(&format!("another smtpguard controller (pid {}) runs on", first.pid())) && err.contains("nothing was changed"), "{err}");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "the first controller's policy is still in force");
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), first.pid().to_string(), "the pid file still names the first");
    let health = http_get(&lab, 19440, "/healthz").unwrap();
    assert!(health.starts_with("ok generation 1"), "{health}");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_sighup_during_start_up_is_a_reload_after_it_not_an_exit() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("earlyhup");
    let policy = write_policy(&state.policy_dir(), "policy.yaml", "version: 1\ningress:\n  default: {25: allow}\n");
    let mut ctl = RunningController::spawn(&lab, &state, &policy, 19442, &["--uplink", "b0"], std::process::Stdio::inherit()).expect("spawn");
    let pid = ctl.pid();
    let pid_file = state.run_dir.join("controller.pid");
    // The handler is in place (SigCgt has SIGHUP) while start-up still
    // runs (no pid file yet): a SIGHUP now must not kill it.
    let hup_bit = 1u64 << (libc::SIGHUP - 1);
    let caught_while_starting = wait_for(Duration::from_secs(20), || {
        let mask = u64::from_str_radix(&proc_status(pid, "SigCgt")?, 16).ok()?;
        (mask & hup_bit != 0).then(|| !pid_file.exists())
    });
    assert_eq!(caught_while_starting, Some(true), "SIGHUP is handled before start-up ends");
    // SAFETY: signalling our child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    ctl.wait_ready(&lab).expect("the controller survives a SIGHUP during start-up");
    let reload = wait_for(Duration::from_secs(10), || reloads(&state, "SIGHUP").pop());
    let start = reloads(&state, "start").pop().expect("a start event");
    let reload = reload.expect("the SIGHUP of start-up is served as a reload once started");
    assert_eq!(reload["result"], "ok");
    assert!(reload["generation"].as_u64() > start["generation"].as_u64(), "{reload} after {start}");
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "enforcing");
}

/// Connections to the metrics port that never send a request.
fn idle_connections(lab: &PairLab, port: u16, n: usize) -> Vec<TcpStream> {
    lab.server
        .enter(|| (0..n).map(|_| TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1)).unwrap()).collect())
        .unwrap()
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn idle_and_concurrent_metrics_clients_stall_nothing() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("idle");
    let policy = write_policy(
        &state.policy_dir(),
        "policy.yaml",
        &format!("version: 1\nevents: {{drop_sample_one_in: 1, per_second: 100}}\ningress:\n  deny: [{CLIENT_DENIED}/32]\n"),
    );
    let ctl = RunningController::start(&lab, &state, &policy, 19443).expect("controller");
    let idle = idle_connections(&lab, 19443, 20);
    // Each answer within the client's own timeout (peers::http_get: 5 s),
    // while all 20 sit open: the old in-loop server gave each 2 s in turn.
    let health = http_get(&lab, 19443, "/healthz").expect("/healthz with 20 idle connections open");
    assert!(health.starts_with("ok generation"), "{health}");
    // SAFETY: signalling our child.
    assert_eq!(unsafe { libc::kill(ctl.pid(), libc::SIGHUP) }, 0);
    assert!(wait_for(Duration::from_secs(5), || reloads(&state, "SIGHUP").pop()).is_some(), "a reload with 20 idle connections open");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "denied source");
    let sampled = wait_for(Duration::from_secs(5), || state.events("drop_sample").into_iter().next());
    assert!(sampled.is_some(), "events flow with 20 idle connections open");
    // 20 scrapers at once all get the exposition.
    std::thread::scope(|scope| {
        let scrapes: Vec<_> = (0..20).map(|_| scope.spawn(|| http_get(&lab, 19443, "/metrics").map(|m| metric(&m, "smtpguard_policy_generation", &[])))).collect();
        for s in scrapes {
            assert_eq!(s.join().unwrap().expect("a concurrent scrape"), Some(2.0));
        }
    });
    drop(idle);
}

/// A small tmpfs of the test's own, unmounted on drop: a disk to fill.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn new(tag: &str, size: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sgtest-disk-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir).status().unwrap();
        assert!(st.success(), "mounting a tmpfs");
        Self { dir }
    }

    /// Fills it up; returns the filler file.
    fn fill(&self) -> PathBuf {
        let filler = self.dir.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// SYNs of the denied source (each a sampled drop) until `done` says the
/// events wanted are there (bounded: 100 SYNs).
fn provoke_events(lab: &PairLab, mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        let r = connect_within(&lab.client, CLIENT_DENIED, SERVER, 25, Duration::from_millis(100)).unwrap();
        assert_eq!(r, Err(std::io::ErrorKind::TimedOut), "the denied source's SYN is dropped");
        if wait_for(Duration::from_millis(500), || done().then_some(())).is_some() {
            return true;
        }
    }
    false
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn the_event_log_survives_a_full_disk_and_follows_rotation() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("disk");
    let disk = SmallDisk::new("events", "512k");
    let policy = write_policy(
        &state.policy_dir(),
        "policy.yaml",
        &format!("version: 1\nevents: {{drop_sample_one_in: 1, per_second: 100}}\ningress:\n  deny: [{CLIENT_DENIED}/32]\n"),
    );
    let log = disk.dir.join("events.jsonl");
    let stderr_path = state.policy_dir().join("stderr.txt");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let args = ["--uplink", "b0", "--events", log.to_str().unwrap()];
    let mut ctl = RunningController::spawn(&lab, &state, &policy, 19444, &args, stderr).expect("spawn");
    ctl.wait_ready(&lab).expect("ready");
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>();
    let failures = || http_get(&lab, 19444, "/metrics").ok().and_then(|m| metric(&m, "smtpguard_event_write_failures_total", &[])).unwrap_or(0.0);
    assert!(provoke_events(&lab, || lines(&log).iter().any(|l| l.contains("drop_sample"))), "events are written");
    assert_eq!(failures(), 0.0);

    let filler = disk.fill();
    let before = lines(&log).len();
    assert!(provoke_events(&lab, || failures() >= 3.0), "failed writes are counted");
    let said = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(said.matches("events: writing to").count(), 1, "one log line for the episode:\n{said}");
    std::fs::remove_file(&filler).unwrap();
    assert!(provoke_events(&lab, || std::fs::read_to_string(&stderr_path).unwrap().contains("works again")), "writes resume");
    let after = lines(&log);
    assert!(after.len() > before);
    let unparsable: Vec<&String> = after.iter().filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err()).collect();
    assert!(unparsable.len() <= 1, "at most the line the disk cut short: {unparsable:?}");
    assert!(serde_json::from_str::<serde_json::Value>(after.last().unwrap()).is_ok(), "the lines after the episode are whole");

    // logrotate without copytruncate: the file is moved away; a new one appears.
    let rotated = disk.dir.join("events.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    assert!(provoke_events(&lab, || lines(&log).iter().any(|l| l.contains("drop_sample"))), "a new file after rotation");
    // SIGUSR1 reopens on demand.
    // SAFETY: signalling our child.
    assert_eq!(unsafe { libc::kill(ctl.pid(), libc::SIGUSR1) }, 0);
    let reopened = wait_for(Duration::from_secs(5), || std::fs::read_to_string(&stderr_path).unwrap().contains("reopened").then_some(()));
    assert!(reopened.is_some());
    drop(ctl);
    drop(disk);
}

/// A policy whose deny list the test then spoils.
fn list_policy(state: &TestPins) -> (PathBuf, PathBuf) {
    let dir = state.policy_dir();
    let list = dir.join("deny.txt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&list, format!("{CLIENT_DENIED}/32\n")).unwrap();
    let policy = write_policy(&dir, "policy.yaml", "version: 1\ningress:\n  deny_files: [deny.txt]\n");
    (policy, list)
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_long_rejected_reload_keeps_health_answering_memory_bounded_and_the_old_policy() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("badlist");
    let (policy, list) = list_policy(&state);
    let ctl = RunningController::start(&lab, &state, &policy, 19445).expect("controller");
    let rss_before = proc_kib(ctl.pid(), "VmRSS");
    // A million bad lines, moved into place whole.
    let spoiled = list.with_extension("new");
    std::fs::write(&spoiled, "bad\n".repeat(1_000_000)).unwrap();
    std::fs::rename(&spoiled, &list).unwrap();
    // SAFETY: signalling our child.
    assert_eq!(unsafe { libc::kill(ctl.pid(), libc::SIGHUP) }, 0);
    let rejected = wait_for(Duration::from_secs(60), || reloads(&state, "SIGHUP").into_iter().find(|e| e["result"] == "rejected")).expect("the reload is rejected");
    let errors = rejected["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 20, "the first 20 errors, not {} of them", errors.len());
    assert_eq!(rejected["more_errors"].as_u64(), Some(1_000_000 - 20), "and a count of the rest");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "the old policy stays");
    let peak = proc_kib(ctl.pid(), "VmHWM");
    let rss_after = proc_kib(ctl.pid(), "VmRSS");
    assert!(peak < 256 * 1024, "peak RSS during the rejected reload: {peak} KiB");
    assert!(rss_after < rss_before + 32 * 1024, "RSS back near its level before the reload: {rss_before} KiB, then {rss_after} KiB");

    // The worst valid list the default limit lets in: distinct /32s up to
    // 8 MiB, compiled, then refused for want of ACL room. A list file is one
    // rule, so its networks share one value and the nodes run out first.
    let (text, n) = distinct_hosts_list(8 << 20);
    std::fs::write(&spoiled, text).unwrap();
    std::fs::rename(&spoiled, &list).unwrap();
    // SAFETY: signalling our child.
    assert_eq!(unsafe { libc::kill(ctl.pid(), libc::SIGHUP) }, 0);
    // Compiling half a million networks takes a while: /healthz answers
    // meanwhile, and says so.
    let mut answered_during = false;
    let refused = wait_for(Duration::from_secs(120), || {
        let health = http_get(&lab, 19445, "/healthz").expect("/healthz answers during the reload");
        answered_during |= health.contains("reload running");
        reloads(&state, "SIGHUP").into_iter().filter(|e| e["result"] == "rejected").nth(1)
    })
    .expect("the list of valid networks is refused");
    assert!(answered_during, "/healthz answered while the reload ran");
    assert!(refused["errors"].to_string().contains("--acl4-nodes"), "refused for the ACL's room: {refused}");
    let peak = proc_kib(ctl.pid(), "VmHWM");
    assert!(peak < 256 * 1024, "peak RSS compiling {n} networks and refusing them: {peak} KiB");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "the old policy still stays");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_fifo_for_a_list_file_is_refused_without_freezing_the_controller() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("fifo");
    let (policy, list) = list_policy(&state);
    let ctl = RunningController::start(&lab, &state, &policy, 19446).expect("controller");
    std::fs::remove_file(&list).unwrap();
    let c = std::ffi::CString::new(list.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // SAFETY: signalling our child.
    assert_eq!(unsafe { libc::kill(ctl.pid(), libc::SIGHUP) }, 0);
    let rejected = wait_for(Duration::from_secs(10), || reloads(&state, "SIGHUP").into_iter().find(|e| e["result"] == "rejected"));
    let rejected = rejected.expect("the reload is rejected, not stuck on the FIFO");
    assert!(rejected.to_string().contains("not a regular file"), "{rejected}");
    let health = http_get(&lab, 19446, "/healthz").expect("/healthz");
    assert!(health.starts_with("ok generation 1"), "{health}");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "the old policy stays");
}
