//! The fleet harness itself, against a real etcd 3.4: hosts in their
//! namespaces reach a 3-member cluster, it keeps writing with one member
//! gone, stops within a bound with two gone and comes back when they
//! restart; TLS with client certificates and users; a host cut off from
//! etcd; nothing left behind when a test panics.

use std::{
    panic::AssertUnwindSafe,
    path::Path,
    time::{Duration, Instant},
};

use smtpguard_tests::{etcd::EtcdCluster, fleetlab::FleetLab, require_root};

/// A put must give up this fast once quorum is gone: `--command-timeout=2s`
/// plus process start and teardown.
const PUT_GIVES_UP_WITHIN: Duration = Duration::from_secs(4);
/// A leader killed: the election timeout (1 s) and a randomised wait (up
/// to 1 s more), with room for a slow machine.
const ELECTION_BOUND: Duration = Duration::from_secs(10);

/// Polls `put` until it succeeds, at most `bound`; returns how long it took.
fn put_within(lab: &FleetLab, host: &str, key: &str, value: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (code, out) = lab.host(host).etcdctl(&["--command-timeout=500ms", "put", key, value]);
        if code == 0 {
            return start.elapsed();
        }
        assert!(start.elapsed() < bound, "put {key} from {host} failed for {bound:?}: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get(lab: &FleetLab, host: &str, key: &str) -> String {
    let (code, out) = lab.host(host).etcdctl(&["get", "--print-value-only", key]);
    assert_eq!(code, 0, "get {key} from {host}: {out}");
    out.trim().to_owned()
}

#[test]
#[ignore = "privileged: needs root and namespaces; cargo xtask test runs it"]
fn three_hosts_write_through_one_member_loss_stop_without_quorum_and_recover() {
    require_root();
    let start = Instant::now();
    let mut lab = FleetLab::new(3, 3).expect("fleet lab");
    eprintln!("3-member cluster healthy and 3 hosts connected in {:?}", start.elapsed());

    // Every host writes through its own link; the next host reads it back.
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let host = lab.host(name);
        assert!(host.endpoints().starts_with(&format!("http://10.77.{}.1:2379,", host.link.n)), "{}", host.endpoints());
        let (code, out) = host.etcdctl(&["put", &format!("/selftest/{name}"), &format!("from-{name}")]);
        assert_eq!((code, out.trim()), (0, "OK"), "put from {name}");
        let next = ["a", "b", "c"][(i + 1) % 3];
        assert_eq!(get(&lab, next, &format!("/selftest/{name}")), format!("from-{name}"));
    }

    // The shortest lease etcd grants with the default election timeout.
    let (code, out) = lab.host("a").etcdctl(&["lease", "grant", "1"]);
    assert!(code == 0 && out.contains("TTL(2s)"), "a 1 s lease is granted 2 s: {out}");

    // The leader dies: the two others elect a new one and keep writing.
    let first = lab.etcd.leader().expect("a leader");
    lab.etcd.kill9(first);
    let took = put_within(&lab, "b", "/selftest/one-down", "1", ELECTION_BOUND);
    eprintln!("leader m{first} killed: a put went through after {took:?}");
    let second = lab.etcd.leader().expect("a new leader");
    assert_ne!(second, first);
    assert_eq!(get(&lab, "c", "/selftest/one-down"), "1");

    // A second member dies: no quorum, a put fails within its timeout.
    lab.etcd.kill9(second);
    let t = Instant::now();
    let (code, out) = lab.host("a").etcdctl(&["--command-timeout=2s", "put", "/selftest/two-down", "1"]);
    let took = t.elapsed();
    eprintln!("quorum lost: put failed after {took:?}");
    assert_ne!(code, 0, "a put without quorum: {out}");
    // The client's deadline, or the member's own when it led and lost its quorum.
    assert!(["context deadline exceeded", "etcdserver: request timed out", "etcdserver: no leader"].iter().any(|e| out.contains(e)), "{out}");
    assert!(took < PUT_GIVES_UP_WITHIN, "the put gave up after {took:?}");
    // A serializable read is still answered by the member left.
    let (code, out) = lab.host("a").etcdctl(&["get", "--consistency=s", "--print-value-only", "/selftest/a"]);
    assert_eq!((code, out.trim()), (0, "from-a"), "serializable read without quorum");

    // Both come back on their data dirs: writes resume, nothing was lost.
    let t = Instant::now();
    lab.etcd.restart(first).expect("restart");
    lab.etcd.restart(second).expect("restart");
    lab.etcd.wait_healthy().expect("healthy after restarts");
    eprintln!("two members restarted: healthy after {:?}", t.elapsed());
    let (code, out) = lab.host("c").etcdctl(&["put", "/selftest/back", "1"]);
    assert_eq!(code, 0, "put after the restarts: {out}");
    let all = lab.etcd.etcdctl(&["get", "--prefix", "--keys-only", "/selftest/"]).expect("get");
    let keys: Vec<&str> = all.split_whitespace().collect();
    assert_eq!(keys, ["/selftest/a", "/selftest/b", "/selftest/back", "/selftest/c", "/selftest/one-down"]);

    // A host cut off from etcd fails fast; the others do not notice.
    lab.host("b").set_etcd_link(false).expect("link down");
    let (code, out) = lab.host("b").etcdctl(&["--dial-timeout=1s", "--command-timeout=1s", "put", "/selftest/cut", "1"]);
    assert_ne!(code, 0, "a put from a cut-off host: {out}");
    let (code, out) = lab.host("a").etcdctl(&["put", "/selftest/cut", "1"]);
    assert_eq!(code, 0, "{out}");
    lab.host("b").set_etcd_link(true).expect("link up");
    put_within(&lab, "b", "/selftest/cut", "2", Duration::from_secs(5));

    // Commands of any kind run in a host's server namespace.
    let (code, out) = lab.host("c").exec(&["ip", "-4", "-o", "addr", "show", "mgmt0"]);
    assert!(code == 0 && out.contains("10.77.3.2/24"), "{out}");
    eprintln!("whole test {:?}", start.elapsed());
}

#[test]
#[ignore = "privileged: needs root and namespaces; cargo xtask test runs it"]
fn tls_cluster_with_auth_takes_cert_and_password_and_refuses_the_rest() {
    require_root();
    let start = Instant::now();
    let mut lab = FleetLab::new_tls(2, 1).expect("TLS fleet lab");
    eprintln!("TLS cluster (certificates made) and 2 hosts in {:?}", start.elapsed());
    lab.etcd.enable_auth("fleet", "fleet-pw", "/smtpguard/").expect("auth");
    let tls = lab.host("b").tls().expect("TLS files").clone();
    for f in [&tls.ca, &tls.cert, &tls.key] {
        assert!(f.is_file(), "{}", f.display());
    }

    for name in ["a", "b"] {
        let host = lab.host(name);
        assert!(host.endpoints().starts_with(&format!("https://10.77.{}.1:2379", host.link.n)), "{}", host.endpoints());
        let (code, out) = host.etcdctl(&["--user=fleet", "--password=fleet-pw", "put", &format!("/smtpguard/{name}"), "1"]);
        assert_eq!((code, out.trim()), (0, "OK"), "cert and password from {name}");
    }
    let b = lab.host("b");
    let refused = [
        (vec!["--user=fleet", "--password=wrong", "put", "/smtpguard/x", "1"], "authentication failed"),
        (vec!["--user=fleet", "--password=fleet-pw", "put", "/elsewhere", "1"], "permission denied"),
        // The certificate alone: its CN is no user.
        (vec!["put", "/smtpguard/x", "1"], "permission denied"),
    ];
    for (args, why) in refused {
        let (code, out) = b.etcdctl(&args);
        assert!(code != 0 && out.contains(why), "{args:?} must be refused ({why}): {out}");
    }
    // No client certificate: the handshake is refused, bounded.
    let endpoints = format!("--endpoints={}", b.endpoints());
    let cacert = format!("--cacert={}", tls.ca.display());
    let t = Instant::now();
    let (code, out) = b.exec(&["etcdctl", &endpoints, &cacert, "--dial-timeout=2s", "--command-timeout=2s", "--user=fleet", "--password=fleet-pw", "put", "/smtpguard/x", "1"]);
    assert_ne!(code, 0, "a put without a client certificate: {out}");
    assert!(t.elapsed() < PUT_GIVES_UP_WITHIN, "{:?}", t.elapsed());

    // Root (the harness's own etcdctl) sees everything; a restarted member keeps it all.
    lab.etcd.kill9(0);
    let t = Instant::now();
    lab.etcd.restart(0).expect("restart");
    lab.etcd.wait_healthy().expect("healthy after restart");
    eprintln!("single TLS member restarted: healthy after {:?}", t.elapsed());
    let keys = lab.etcd.etcdctl(&["get", "--prefix", "--keys-only", "/"]).expect("get as root");
    assert_eq!(keys.split_whitespace().collect::<Vec<_>>(), ["/smtpguard/a", "/smtpguard/b"]);
    eprintln!("whole test {:?}", start.elapsed());
}

#[test]
#[ignore = "privileged: needs root and namespaces; cargo xtask test runs it"]
fn a_panicking_test_leaves_no_etcd_process_data_or_namespace() {
    require_root();
    let mut pids = Vec::new();
    let mut namespaces = Vec::new();
    let mut dir = None;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let lab = FleetLab::new(1, 3).expect("fleet lab");
        pids.extend((0..3).filter_map(|i| lab.etcd.pid(i)));
        namespaces.extend([lab.etcd.netns().name(), lab.hosts[0].lab.server.name(), lab.hosts[0].lab.client.name()].map(str::to_owned));
        dir = Some(lab.etcd.dir().to_owned());
        panic!("deliberate failure with the lab up");
    }));
    assert!(result.is_err());
    assert_eq!(pids.len(), 3);
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "etcd {pid} survived the panic");
    }
    for ns in namespaces {
        assert!(!Path::new(&format!("/run/netns/{ns}")).exists(), "namespace {ns} survived the panic");
    }
    let dir = dir.expect("the cluster's dir");
    assert!(!dir.exists(), "{} survived the panic", dir.display());

    // Dropped without a panic too, a lone cluster.
    let t = Instant::now();
    let cluster = EtcdCluster::start(1).expect("cluster");
    eprintln!("1-member cluster healthy in {:?}", t.elapsed());
    let (pid, ns) = (cluster.pid(0).expect("running"), cluster.netns().name().to_owned());
    drop(cluster);
    assert!(!Path::new(&format!("/proc/{pid}")).exists() && !Path::new(&format!("/run/netns/{ns}")).exists());
}
