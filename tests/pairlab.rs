//! A two-namespace lab for `smtpguard run`: a client and a server joined
//! by a veth pair, the controller running on the server side with its own
//! pins, and the calls tests make of it (operator commands, /metrics).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    peers::Greeter,
    netns::{veth_pair, Netns},
    smtpguard_bin,
};

pub const SERVER: &str = "192.0.2.2";
pub const CLIENT_OK: &str = "192.0.2.1";
pub const CLIENT_DENIED: &str = "192.0.2.3";

/// A client and a server namespace joined by a veth pair (`a0` in the
/// client, `b0` in the server), a greeter on 25 in the server.
pub struct PairLab {
    _greeter: Option<Greeter>,
    pub client: Netns,
    pub server: Netns,
}

impl PairLab {
    pub fn new() -> Result<Self> {
        let mut lab = Self::bare()?;
        lab._greeter = Some(Greeter::start(&lab.server, 25)?);
        Ok(lab)
    }

    /// The namespaces and the veth pair only: port 25 is free for a
    /// server of the test's own.
    pub fn bare() -> Result<Self> {
        let client = Netns::new("ccli")?;
        let server = Netns::new("csrv")?;
        veth_pair(&client, "a0", &[&format!("{CLIENT_OK}/24"), &format!("{CLIENT_DENIED}/24")], &server, "b0", &[&format!("{SERVER}/24")])?;
        Ok(Self { _greeter: None, client, server })
    }
}

/// Where one test keeps its pins and pid file, removed on drop.
pub struct TestPins {
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl TestPins {
    pub fn new(tag: &str) -> Self {
        let id = format!("{tag}_{}", std::process::id());
        Self { pin_dir: PathBuf::from(format!("/sys/fs/bpf/sgtest_{id}")), run_dir: std::env::temp_dir().join(format!("sgtest-{id}")) }
    }

    pub fn args(&self) -> Vec<String> {
        vec!["--pin-dir".into(), self.pin_dir.display().to_string(), "--run-dir".into(), self.run_dir.display().to_string()]
    }

    /// The controller's event log.
    pub fn events_file(&self) -> PathBuf {
        self.run_dir.with_extension("events.jsonl")
    }

    /// The events of the log that `keep` keeps, in order.
    pub fn events_where(&self, keep: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.events_file()).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|e| keep(e)).collect()
    }

    /// The events of `kind`.
    pub fn events(&self, kind: &str) -> Vec<serde_json::Value> {
        self.events_where(|e| e["event"] == kind)
    }

    /// Polls until `keep` keeps `n` events (bounded: 10 s), returning them;
    /// `what` names them when they do not come.
    pub fn wait_events_where(&self, n: usize, what: &str, keep: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let start = std::time::Instant::now();
        loop {
            let found = self.events_where(&keep);
            if found.len() >= n {
                return found;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{n} {what} event(s) within 10 s: have {found:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Self::wait_events_where`] for `n` events of `kind`.
    pub fn wait_events(&self, kind: &str, n: usize) -> Vec<serde_json::Value> {
        self.wait_events_where(n, kind, |e| e["event"] == kind)
    }

    /// The controller's state directory (removed with the pins).
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir.with_extension("state")
    }

    /// A directory for the test's policy files (removed with the pins).
    pub fn policy_dir(&self) -> PathBuf {
        self.run_dir.with_extension("d")
    }

    /// Runs an operator command; returns exit code and stdout.
    pub fn cmd(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(smtpguard_bin()).args(args).args(self.args()).output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = smtpguard::pins::Pins::new(&self.pin_dir, &self.run_dir).remove_all();
        let _ = std::fs::remove_file(self.events_file());
        let _ = std::fs::remove_dir_all(self.policy_dir());
        let _ = std::fs::remove_dir_all(self.state_dir());
    }
}

/// A running controller in the server namespace; killed on drop.
pub struct RunningController {
    child: Option<Child>,
    pub port: u16,
}

impl RunningController {
    /// On the uplink `b0`, ready (answering /healthz).
    pub fn start(lab: &PairLab, state: &TestPins, policy: &Path, port: u16) -> Result<Self> {
        Self::start_on(lab, state, policy, port, &["--uplink", "b0"])
    }

    /// With these interface (and other) arguments, ready.
    pub fn start_on(lab: &PairLab, state: &TestPins, policy: &Path, port: u16, args: &[&str]) -> Result<Self> {
        let mut c = Self::spawn(lab, state, policy, port, args, Stdio::inherit())?;
        c.wait_ready(lab)?;
        Ok(c)
    }

    /// Started, not yet ready; stderr goes to `stderr`. Metrics are served
    /// on `127.0.0.1:port`, unless `args` has a `--metrics-addr` of its own
    /// (for a scraper in another namespace): it must serve `port` on
    /// loopback too (`0.0.0.0:port`), where /healthz and /metrics are read.
    pub fn spawn(lab: &PairLab, state: &TestPins, policy: &Path, port: u16, args: &[&str], stderr: impl Into<Stdio>) -> Result<Self> {
        let loopback = format!("127.0.0.1:{port}");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.server.name()))
            .arg("--")
            .arg(smtpguard_bin())
            .args(["run", "--policy"])
            .arg(policy)
            .args(args)
            .args(if args.contains(&"--metrics-addr") { vec![] } else { vec!["--metrics-addr", &loopback] })
            .args(if args.contains(&"--events") { vec![] } else { vec!["--events".into(), state.events_file()] })
            .args(if args.contains(&"--state-dir") { vec![] } else { vec!["--state-dir".into(), state.state_dir()] })
            .args(state.args())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting smtpguard run")?;
        Ok(Self { child: Some(child), port })
    }

    /// The controller's pid (nsenter execs it, keeping the pid).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// The child itself, for its stderr or exit status.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    /// Polls /healthz until it answers (bounded: the controller loads and verifies first).
    pub fn wait_ready(&mut self, lab: &PairLab) -> Result<()> {
        for _ in 0..200 {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("the controller exited: {status}");
            }
            if http_get(lab, self.port, "/healthz").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the controller did not answer /healthz in 10 s")
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A GET of `path` on the controller's port in the server namespace.
pub fn http_get(lab: &PairLab, port: u16, path: &str) -> Result<String> {
    crate::peers::http_get(&lab.server, port, path)
}

/// The value of a metric line with all the given label pairs.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
}

/// Polls /metrics until the metric has the value (bounded: two table scans).
pub fn wait_for_metric(lab: &PairLab, port: u16, name: &str, labels: &[&str], want: f64) -> Result<(), Option<f64>> {
    let deadline = std::time::Instant::now() + 2 * smtpguard::http::TABLE_SCAN_INTERVAL + Duration::from_secs(1);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = http_get(lab, port, "/metrics").ok().and_then(|m| metric(&m, name, labels));
        if last == Some(want) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last)
}

pub fn write_policy(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}


/// A list file's text of distinct IPv4 /32s, just under `bytes` long:
/// the largest valid list a size limit lets in (and more networks than
/// the default IPv4 ACL room holds).
pub fn distinct_hosts_list(bytes: usize) -> (String, u32) {
    let mut text = String::with_capacity(bytes);
    let mut n = 0u32;
    while text.len() < bytes - 20 {
        text += &format!("{}/32\n", std::net::Ipv4Addr::from(0x0b00_0000 + n.wrapping_mul(2_654_435_761) % 0xd000_0000));
        n += 1;
    }
    (text, n)
}
