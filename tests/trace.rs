//! The flow trace (`smtpguard trace`): a datapath pinned where the
//! command looks, frames run through BPF_PROG_TEST_RUN, and the lines the
//! kernel writes to aya-log's ring read back, through the library (each
//! decision, exactly) and through the `smtpguard` binary (stdout, the
//! selector turned off on exit, bounded when the command is killed).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::IpAddr,
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use policy_common::{direction, side, trace::TraceSelector};
use smtpguard::{
    clock::ktime_now_ns,
    commands::trace::render,
    dataplane::{
        trace::{attach_loggers, pinned_program_ids, TraceSwitch},
        Capacities, Hook,
    },
};
use smtpguard_tests::{
    fixtures::{base_policy, ends, entry, entry_all_ports, Harness, TestPins, NS_PER_S},
    packet::{TcpFrame, ACK, PSH, SYN},
    require_root, smtpguard_bin,
};

/// The source the deny ACL catches.
const DENIED: &str = "198.51.100.7";
/// A source nothing in the policy names: passes by default on ingress.
const OTHER: &str = "198.51.100.99";
const DENY_RULE: u32 = 22;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A datapath pinned (maps and programs) where the command looks; every
/// hook judges by the ingress policy, which denies `DENIED` on every port.
fn pinned(tag: &str) -> (TestPins, Harness) {
    let state = TestPins::new(tag);
    let mut h = Harness::load_with(Capacities::default(), Some(&state.pins.dir)).expect("loading the datapath");
    h.dp.programs().pin(&state.pins.dir).expect("pinning the programs");
    for hook in Hook::ALL {
        h.route(hook, direction::INGRESS, 0).unwrap();
    }
    let mut policy = base_policy();
    policy.direction[direction::INGRESS as usize].established_reset = 1;
    h.set_policy(&policy).unwrap();
    h.add_acl(direction::INGRESS, side::PEER, ip(DENIED), 32, entry_all_ports(0, DENY_RULE, 0)).unwrap();
    (state, h)
}

/// Collects the records aya-log reads, as the kernel formatted them.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<String>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

/// A line's fields, named as `smtpguard trace` prints them.
fn fields(line: &str) -> HashMap<String, String> {
    let rendered = render(line);
    rendered.split(' ').filter_map(|f| f.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// Runs `frame` through `hook` once; its return value.
fn run(h: &mut Harness, hook: Hook, frame: &[u8]) -> u32 {
    h.dp.test_run(hook, frame, 1).expect("BPF_PROG_TEST_RUN").0
}

struct Reader {
    loggers: Vec<aya_log::EbpfLogger<Collect>>,
    lines: Collect,
}

impl Reader {
    fn attach(ids: &[u32]) -> Self {
        let lines = Collect::default();
        let loggers = attach_loggers(ids, lines.clone()).expect("attaching aya-log to the pinned programs");
        assert_eq!(loggers.len(), 1, "the three programs share one log ring");
        Self { loggers, lines }
    }

    /// Everything the ring holds now. BPF_PROG_TEST_RUN returns after the
    /// program ran, so a line it wrote is already there.
    fn take(&mut self) -> Vec<String> {
        self.loggers.iter_mut().for_each(|l| l.flush());
        std::mem::take(&mut *self.lines.0.lock().unwrap())
    }
}

fn in_a_minute() -> u64 {
    ktime_now_ns() + 60 * NS_PER_S
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn the_selected_address_gets_one_line_per_decision_and_nothing_else_does() {
    require_root();
    let (state, mut h) = pinned("trace");
    let ids: Vec<u32> = pinned_program_ids(&state.pins).unwrap().into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 3, "a program pin per hook");
    let switch = TraceSwitch::open(&ids).unwrap();
    let mut ring = Reader::attach(&ids);
    let dst = ends(direction::INGRESS, false).dst;
    let denied_syn = TcpFrame::new(ip(DENIED), dst, 25, SYN).build();
    let (pass, drop) = Hook::XdpIngress.verdict_codes();

    // Off (a fresh selector): judged as always, nothing written.
    assert_eq!(switch.read().until_ns, 0);
    assert_eq!(run(&mut h, Hook::XdpIngress, &denied_syn), drop);
    assert_eq!(ring.take(), Vec::<String>::new(), "a line while tracing is off");

    // On for the denied source: its SYN's decision, on every hook.
    switch.set(&TraceSelector::new(ip(DENIED), 0, in_a_minute()));
    for hook in Hook::ALL {
        assert_eq!(run(&mut h, hook, &denied_syn), hook.verdict_codes().1);
        let lines = ring.take();
        assert_eq!(lines.len(), 1, "{hook:?}: {lines:?}");
        let f = fields(&lines[0]);
        let want = [
            ("hook", hook.program_name()),
            ("dir", "ingress"),
            ("src", DENIED),
            ("sport", "40000"),
            ("dst", "203.0.113.25"),
            ("dport", "25"),
            ("syn", "yes"),
            ("len", "0"),
            ("verdict", "drop"),
            ("reason", "deny_acl"),
            ("rule", "22"),
            ("country", "0"),
            ("reset", "no"),
        ];
        for (k, v) in want {
            assert_eq!(f.get(k).map(String::as_str), Some(v), "{hook:?} field {k}: {}", lines[0]);
        }
    }

    // Another source is judged without a line, though tracing is on.
    let other_syn = TcpFrame::new(ip(OTHER), dst, 25, SYN).build();
    assert_eq!(run(&mut h, Hook::XdpIngress, &other_syn), pass);
    assert_eq!(ring.take(), Vec::<String>::new(), "a line for another address");

    // The address as destination matches too (a reply's flow, here judged
    // as a guarded port's segment).
    let to_it = TcpFrame::new(ip(OTHER), ip(DENIED), 25, SYN).build();
    assert_eq!(run(&mut h, Hook::XdpIngress, &to_it), pass);
    let lines = ring.take();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let f = fields(&lines[0]);
    assert_eq!((f["src"].as_str(), f["dst"].as_str(), f["verdict"].as_str(), f["reason"].as_str()), (OTHER, DENIED, "pass", "default_allow"));

    // A segment of an open connection from the denied source: answered
    // with a reset, and the line says so.
    let data = TcpFrame::new(ip(DENIED), dst, 25, ACK | PSH).payload(b"NOOP\r\n").build();
    assert_eq!(run(&mut h, Hook::XdpIngress, &data), Hook::XdpIngress.reset_code());
    let lines = ring.take();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let f = fields(&lines[0]);
    assert_eq!((f["syn"].as_str(), f["len"].as_str(), f["verdict"].as_str(), f["reset"].as_str()), ("no", "6", "drop", "yes"), "{}", lines[0]);

    // A port narrows the selector: 587 only.
    switch.set(&TraceSelector::new(ip(DENIED), 587, in_a_minute()));
    assert_eq!(run(&mut h, Hook::XdpIngress, &denied_syn), drop);
    assert_eq!(ring.take(), Vec::<String>::new(), "port 25 traced with --port 587");
    assert_eq!(run(&mut h, Hook::XdpIngress, &TcpFrame::new(ip(DENIED), dst, 587, SYN).build()), drop);
    let lines = ring.take();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(fields(&lines[0])["dport"], "587");

    // IPv6: the family is part of the match.
    let v6 = ends(direction::INGRESS, true);
    h.add_acl(direction::INGRESS, side::PEER, v6.src, 128, entry(0, 0, 31, 0)).unwrap();
    switch.set(&TraceSelector::new(v6.src, 0, in_a_minute()));
    assert_eq!(run(&mut h, Hook::TcIngress, &denied_syn), Hook::TcIngress.verdict_codes().1);
    assert_eq!(ring.take(), Vec::<String>::new(), "an IPv4 flow traced for an IPv6 selector");
    assert_eq!(run(&mut h, Hook::TcIngress, &TcpFrame::new(v6.src, v6.dst, 25, SYN).build()), Hook::TcIngress.verdict_codes().1);
    let lines = ring.take();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let f = fields(&lines[0]);
    assert_eq!((f["src"].clone(), f["dst"].clone(), f["rule"].as_str()), (v6.src.to_string(), v6.dst.to_string(), "31"), "{}", lines[0]);

    // Monitor mode: the verdict the line gives is the one after it.
    let mut policy = base_policy();
    policy.direction[direction::INGRESS as usize].mode = policy_common::mode::MONITOR;
    h.set_policy(&policy).unwrap();
    switch.set(&TraceSelector::new(ip(DENIED), 0, in_a_minute()));
    assert_eq!(run(&mut h, Hook::XdpIngress, &denied_syn), pass);
    let lines = ring.take();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(fields(&lines[0])["verdict"], "would_drop", "{}", lines[0]);

    // The datapath honours the expiry: a selector past its time is off.
    switch.set(&TraceSelector::new(ip(DENIED), 0, ktime_now_ns() - 1));
    assert_eq!(run(&mut h, Hook::XdpIngress, &denied_syn), pass);
    assert_eq!(ring.take(), Vec::<String>::new(), "a line after the selector's expiry");

    // And off is off.
    switch.set(&TraceSelector::new(ip(DENIED), 0, in_a_minute()));
    switch.off();
    assert_eq!(run(&mut h, Hook::XdpIngress, &denied_syn), pass);
    assert_eq!(ring.take(), Vec::<String>::new(), "a line after the switch went off");
}

/// A running `smtpguard trace` whose stdout and stderr lines arrive on channels.
struct TraceCmd {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
}

impl TraceCmd {
    fn start(state: &TestPins, args: &[&str]) -> Self {
        let mut child = Command::new(smtpguard_bin())
            .arg("trace")
            .args(args)
            .args(state.args())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting smtpguard trace");
        let forward = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let out = forward(Box::new(child.stdout.take().unwrap()));
        let err = forward(Box::new(child.stderr.take().unwrap()));
        Self { child, out, err }
    }

    /// The next line of `rx` within `within`.
    fn next(rx: &mpsc::Receiver<String>, within: Duration, what: &str) -> String {
        rx.recv_timeout(within).unwrap_or_else(|e| panic!("no {what} within {within:?} ({e})"))
    }

    /// Waits for the line saying the selector is set and the ring read.
    fn ready(&self) {
        let line = Self::next(&self.err, Duration::from_secs(10), "`tracing ...` line on stderr");
        assert!(line.starts_with("tracing "), "{line}");
    }

    fn signal(&self, sig: i32) {
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Its exit status, within a deadline.
    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < end, "smtpguard trace did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TraceCmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn smtpguard_trace_prints_the_address_lines_and_turns_tracing_off_on_exit() {
    require_root();
    let (state, mut h) = pinned("tracecmd");
    let ids: Vec<u32> = pinned_program_ids(&state.pins).unwrap().into_iter().map(|(_, id)| id).collect();
    let switch = TraceSwitch::open(&ids).unwrap();
    let dst = ends(direction::INGRESS, false).dst;
    let denied_syn = TcpFrame::new(ip(DENIED), dst, 25, SYN).build();
    let other_syn = TcpFrame::new(ip(OTHER), dst, 25, SYN).build();

    let mut cmd = TraceCmd::start(&state, &[DENIED, "--for", "10m"]);
    cmd.ready();
    let sel = switch.read();
    let now = ktime_now_ns();
    assert_eq!(sel, TraceSelector::new(ip(DENIED), 0, sel.until_ns), "the selector the command set");
    assert!(sel.until_ns > now && sel.until_ns <= now + 600 * NS_PER_S, "until {} is not within --for of now {now}", sel.until_ns);

    // A second trace on the same pins is refused while this one runs.
    let (code, out) = state.cmd(&["trace", OTHER]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("another `smtpguard trace` is running"), "{out}");
    assert_eq!(switch.read(), sel, "the refused trace changed the selector");

    // Another source first, then the traced one: the ring is in order, so
    // the first line printed after both is the traced source's, and none
    // came before it for the other.
    h.dp.test_run(Hook::XdpIngress, &other_syn, 1).unwrap();
    h.dp.test_run(Hook::XdpIngress, &denied_syn, 1).unwrap();
    let line = TraceCmd::next(&cmd.out, Duration::from_secs(10), "trace line on stdout");
    let (time, rest) = line.split_once(' ').unwrap();
    assert!(time.ends_with('Z') && time.contains('T'), "no RFC 3339 time first: {line}");
    let f = fields(rest);
    assert_eq!(
        (f["hook"].as_str(), f["src"].as_str(), f["verdict"].as_str(), f["reason"].as_str(), f["rule"].as_str()),
        ("xdp_ingress", DENIED, "drop", "deny_acl", "22"),
        "{line}"
    );
    // And one to the address, on another hook.
    h.dp.test_run(Hook::TcEgress, &TcpFrame::new(ip(OTHER), ip(DENIED), 25, SYN).build(), 1).unwrap();
    let line = TraceCmd::next(&cmd.out, Duration::from_secs(10), "second trace line on stdout");
    let f = fields(line.split_once(' ').unwrap().1);
    assert_eq!((f["hook"].as_str(), f["dst"].as_str(), f["verdict"].as_str()), ("tc_egress", DENIED, "pass"), "{line}");

    // Ctrl-C: exit 0, the selector off.
    cmd.signal(libc::SIGINT);
    let st = cmd.wait(Duration::from_secs(10));
    assert!(st.success(), "{st}");
    let last = TraceCmd::next(&cmd.err, Duration::from_secs(1), "closing line");
    assert!(last.contains("tracing is off") && last.contains("interrupted") && last.contains("2 line(s)"), "{last}");
    assert_eq!(switch.read().until_ns, 0, "the selector is still on after the command ended");
    assert!(cmd.out.recv_timeout(Duration::from_millis(100)).is_err(), "a line for the other source");
    let mut ring = Reader::attach(&ids);
    ring.take();
    h.dp.test_run(Hook::XdpIngress, &denied_syn, 1).unwrap();
    assert_eq!(ring.take(), Vec::<String>::new(), "a line after the trace ended");
    drop(ring);

    // An IPv4-mapped IPv6 address is the IPv4 address; SIGTERM ends the
    // trace as Ctrl-C does.
    let mut cmd = TraceCmd::start(&state, &[&format!("::ffff:{DENIED}"), "--port", "25"]);
    cmd.ready();
    let sel = switch.read();
    assert_eq!(sel, TraceSelector::new(ip(DENIED), 25, sel.until_ns), "the selector for ::ffff:{DENIED}");
    cmd.signal(libc::SIGTERM);
    assert!(cmd.wait(Duration::from_secs(10)).success());
    let last = TraceCmd::next(&cmd.err, Duration::from_secs(1), "closing line");
    assert!(last.contains("terminated") && last.contains("tracing is off"), "{last}");
    assert_eq!(switch.read().until_ns, 0);

    // Killed: the selector stays, but only until its expiry, which the
    // datapath honours.
    let mut cmd = TraceCmd::start(&state, &[DENIED, "--for", "2s"]);
    cmd.ready();
    cmd.signal(libc::SIGKILL);
    cmd.wait(Duration::from_secs(10));
    let sel = switch.read();
    assert_ne!(sel.until_ns, 0, "a killed trace's selector");
    assert!(sel.until_ns <= ktime_now_ns() + 2 * NS_PER_S);
    let mut ring = Reader::attach(&ids);
    ring.take();
    // Until the coarse clock passes the expiry (2 s at most).
    let end = Instant::now() + Duration::from_secs(5);
    while ktime_now_ns() <= sel.until_ns {
        assert!(Instant::now() < end, "the kernel clock did not reach the expiry");
        std::thread::sleep(Duration::from_millis(50));
    }
    h.dp.test_run(Hook::XdpIngress, &denied_syn, 1).unwrap();
    assert_eq!(ring.take(), Vec::<String>::new(), "a line after a killed trace's expiry");

    // --for ends it by itself.
    let mut cmd = TraceCmd::start(&state, &[DENIED, "--for", "1s"]);
    cmd.ready();
    assert!(cmd.wait(Duration::from_secs(10)).success());
    assert_eq!(switch.read().until_ns, 0);
    let last = TraceCmd::next(&cmd.err, Duration::from_secs(1), "closing line");
    assert!(last.contains("its time is up"), "{last}");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn smtpguard_trace_without_pinned_state_says_so() {
    require_root();
    let state = TestPins::new("tracenone");
    let (code, out) = state.cmd(&["trace", DENIED, "--for", "5s"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("nothing is attached"), "{out}");
    let (code, out) = state.cmd(&["trace", DENIED, "--for", "25h"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("longest trace, 24h"), "{out}");
}
