//! Deployment (issue 15): the controller as a service runs it. As
//! `nobody` with exactly its three capabilities, and refused with one
//! less; systemd readiness once the policy is enforced, started from the
//! config file; the unit against `systemd-analyze`; the Kubernetes
//! manifests against the binary; a ConfigMap's `..data` swap reloaded
//! exactly once per swap.

use std::{
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use smtpguard_tests::{
    pairlab::{http_get, write_policy, PairLab, RunningController, TestPins, CLIENT_DENIED, CLIENT_OK, SERVER},
    peers::{assert_dropped, assert_greeted, connect},
    require_root, smtpguard_bin,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

const DENY_ONE: &str = "version: 1\ningress:\n  default: {25: allow}\n  deny: [{id: bad, cidr: 192.0.2.3/32}]\n";

/// A controller in the lab's server namespace, run by `setpriv` as
/// `nobody` with only `caps` (such as `+bpf,+net_admin,+perfmon`).
fn spawn_as_nobody(lab: &PairLab, state: &TestPins, policy: &Path, port: u16, caps: &str, stderr: &Path) -> Child {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.server.name()))
        .args(["--", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps=-all,{caps}"))
        .arg(format!("--bounding-set=-all,{caps}"))
        .arg(smtpguard_bin())
        .args(["run", "--policy"])
        .arg(policy)
        .args(["--uplink", "b0", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(state.args())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap()
}

/// Directories `nobody` can use: the pins, the run dir, the policy's.
fn hand_to_nobody(state: &TestPins) {
    for d in [&state.pin_dir, &state.run_dir, &state.policy_dir()] {
        std::fs::create_dir_all(d).unwrap();
        std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn the_controller_enforces_as_nobody_with_three_capabilities_and_names_a_missing_one() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("caps");
    hand_to_nobody(&state);
    let policy = write_policy(&state.policy_dir(), "policy.yaml", DENY_ONE);
    let stderr = state.run_dir.with_extension("stderr");

    // One capability less: refused, naming it, nothing pinned.
    for (caps, missing) in [("+bpf,+net_admin", "CAP_PERFMON"), ("+bpf,+perfmon", "CAP_NET_ADMIN"), ("+net_admin,+perfmon", "CAP_BPF")] {
        let mut child = spawn_as_nobody(&lab, &state, &policy, 19470, caps, &stderr);
        let status = child.wait().unwrap();
        let said = std::fs::read_to_string(&stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{caps}: {said}");
        assert!(said.contains(&format!("lacks {missing}")) && said.contains("nothing was changed"), "{caps}: {said}");
        assert_eq!(std::fs::read_dir(&state.pin_dir).unwrap().count(), 0, "{caps}: nothing pinned");
    }

    // Exactly the three: it enforces, as nobody.
    let child = Killed(spawn_as_nobody(&lab, &state, &policy, 19470, "+bpf,+net_admin,+perfmon", &stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&lab, 19470, "/healthz").is_err() {
        assert!(Instant::now() < deadline, "not ready: {}", std::fs::read_to_string(&stderr).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    let field = |name: &str| proc_status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_owned();
    assert!(field("Uid:").starts_with("65534"), "{proc_status}");
    // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39), nothing else.
    assert_eq!(u64::from_str_radix(&field("CapEff:"), 16).unwrap(), (1 << 12) | (1 << 38) | (1 << 39));
    assert_greeted(connect(&lab.client, CLIENT_OK, SERVER, 25).unwrap(), "allowed source");
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "denied source");
    drop(child);
    let _ = std::fs::remove_file(&stderr);
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn systemd_hears_ready_once_the_policy_is_enforced_started_from_the_config_file() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("notify");
    let dir = state.policy_dir();
    write_policy(&dir, "policy.yaml", DENY_ONE);
    let config = write_policy(
        &dir,
        "smtpguard.toml",
        &format!(
            "policy = \"policy.yaml\"\nuplink = [\"b0\"]\nmetrics_addr = \"127.0.0.1:19471\"\npin_dir = \"{}\"\nrun_dir = \"{}\"\nevents = \"events.jsonl\"\n",
            state.pin_dir.display(),
            state.run_dir.display()
        ),
    );
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let child = Killed(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.server.name()))
            .arg("--")
            .arg(smtpguard_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a notification");
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(said.starts_with("READY=1\n") && said.contains("STATUS=enforcing policy generation 1"), "{said}");
    // Ready means enforcing, at that very moment.
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "denied source, right after READY=1");
    assert!(dir.join("events.jsonl").exists(), "paths in the config file are relative to it");
    // A reload updates the status line.
    // SAFETY: signalling the controller this test started.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGHUP) }, 0);
    let n = socket.recv(&mut buf).expect("a status after the reload");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), "STATUS=enforcing policy generation 2");
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_its_exposure_is_low() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/smtpguard.service")).unwrap();
    for wanted in [
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf/smtpguard",
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "Before=network-pre.target",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(wanted)), "the unit lacks {wanted}");
    }
    // The binary path of this build, as the package installs it at /usr/bin.
    let dir = std::env::temp_dir().join(format!("smtpguard-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("smtpguard.service");
    std::fs::write(&path, unit.replace("/usr/bin/smtpguard", &smtpguard_bin().display().to_string())).unwrap();
    let verify = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let said = String::from_utf8_lossy(&verify.stdout).into_owned() + &String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify: {said}");
    let security = Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&security.stdout).into_owned();
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for smtpguard.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score <= 2.5, "exposure {score}: {text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The text of a `key: |` block of the Kubernetes manifest's ConfigMap.
fn configmap_file(manifest: &str, key: &str) -> String {
    let docs = yaml_rust2::YamlLoader::load_from_str(manifest).unwrap();
    let cm = docs.iter().find(|d| d["kind"].as_str() == Some("ConfigMap")).expect("a ConfigMap");
    cm["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap data.{key}")).to_owned()
}

#[test]
fn the_kubernetes_manifests_fit_the_binary() {
    let manifest = std::fs::read_to_string(repo().join("deploy/kubernetes/smtpguard.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&manifest).unwrap();
    let ds = docs.iter().find(|d| d["kind"].as_str() == Some("DaemonSet")).expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"].as_vec().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(args, ["run", "--config", "/etc/smtpguard/smtpguard.toml"]);
    let caps = &c["securityContext"]["capabilities"];
    let list = |k: &str| caps[k].as_vec().unwrap().iter().filter_map(|a| a.as_str().map(str::to_owned)).collect::<Vec<_>>();
    assert_eq!((list("drop"), list("add")), (vec!["ALL".to_owned()], vec!["BPF".to_owned(), "NET_ADMIN".to_owned(), "PERFMON".to_owned()]));
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some("/healthz"), "{probe}");
    }
    let mounts: Vec<(&str, &str)> = c["volumeMounts"].as_vec().unwrap().iter().map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap())).collect();
    assert!(mounts.contains(&("config", "/etc/smtpguard")) && mounts.contains(&("bpffs", "/sys/fs/bpf")), "{mounts:?}");

    // The ConfigMap's settings and policy, as the binary reads them.
    let dir = std::env::temp_dir().join(format!("smtpguard-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml_path = dir.join("smtpguard.toml");
    std::fs::write(&toml_path, configmap_file(&manifest, "smtpguard.toml")).unwrap();
    let settings = smtpguard::settings::Settings::load(&toml_path).expect("the ConfigMap's settings load");
    let o = settings.resolve().expect("and resolve");
    assert_eq!(o.policy, PathBuf::from("/etc/smtpguard/policy.yaml"));
    assert_eq!(o.metrics_addr.port(), c["ports"][0]["containerPort"].as_i64().unwrap() as u16, "probes reach /healthz where it is served");
    assert!(!o.metrics_addr.ip().is_loopback(), "the kubelet probes the node's address");
    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, configmap_file(&manifest, "policy.yaml")).unwrap();
    let out = Command::new(smtpguard_bin()).arg("check").arg(&policy_path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A ConfigMap volume as the kubelet lays it out: the files in a
/// timestamped directory, `..data` linking to it, each file a link
/// through `..data`. An update writes a new directory and renames a new
/// `..data` link over the old one (one atomic step), then removes the old.
struct ConfigMapVolume {
    dir: PathBuf,
    version: u32,
}

impl ConfigMapVolume {
    fn new(dir: &Path, policy: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut v = Self { dir: dir.to_owned(), version: 0 };
        v.swap(policy);
        std::os::unix::fs::symlink("..data/policy.yaml", dir.join("policy.yaml")).unwrap();
        v
    }

    fn swap(&mut self, policy: &str) {
        let old = (self.version > 0).then(|| self.dir.join(format!("..2026_12_07_00_00_00.{:09}", self.version)));
        self.version += 1;
        let name = format!("..2026_12_07_00_00_00.{:09}", self.version);
        std::fs::create_dir(self.dir.join(&name)).unwrap();
        std::fs::write(self.dir.join(&name).join("policy.yaml"), policy).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(old).unwrap();
        }
    }
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn a_configmap_swap_is_reloaded_exactly_once() {
    require_root();
    let lab = PairLab::new().expect("lab");
    let state = TestPins::new("cmap");
    let mount = state.policy_dir().join("config");
    let mut volume = ConfigMapVolume::new(&mount, DENY_ONE);
    let _ctl = RunningController::start(&lab, &state, &mount.join("policy.yaml"), 19472).expect("controller");
    let reloads = || {
        std::fs::read_to_string(state.events_file())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"event\":\"policy_reload\"") && l.contains("\"trigger\":\"file change\""))
            .count()
    };
    assert_dropped(connect(&lab.client, CLIENT_DENIED, SERVER, 25).unwrap(), "the first policy denies .3");
    for swap in 1..=3usize {
        // Alternate: deny .3, then deny .1, then .3 again.
        let denied = if swap % 2 == 1 { CLIENT_OK } else { CLIENT_DENIED };
        volume.swap(&DENY_ONE.replace("192.0.2.3/32", &format!("{denied}/32")));
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads() < swap {
            assert!(Instant::now() < deadline, "swap {swap} was not reloaded");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_dropped(connect(&lab.client, denied, SERVER, 25).unwrap(), "the swapped-in policy is in force");
    }
    // Three watcher polls more: no second reload of any swap.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(reloads(), 3, "exactly one reload per swap");
}
