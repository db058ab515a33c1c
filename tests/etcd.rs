//! A real etcd for the fleet tests: Debian's etcd-server 3.4 (`/usr/bin/etcd`),
//! one or three members in a network namespace of their own.
//!
//! Members listen for clients on `0.0.0.0` inside that namespace (member `i` on
//! port [`CLIENT_PORT`] + 10 i) and talk to one another over its loopback
//! (peer port [`PEER_PORT`] + 10 i). Other namespaces reach the members through
//! [`EtcdCluster::connect`]: a veth per namespace, `10.77.N.0/24`, etcd on `.1`.
//!
//! etcd 3.4 facts that shape this file (measured with 3.4.23):
//! - There is no `--unsafe-no-fsync` (that came in 3.5): data dirs live on
//!   tmpfs (`/dev/shm`) where fsync costs nothing.
//! - Logs go to a file per member (`--logger zap --log-outputs FILE
//!   --log-level warn`); failures to become healthy quote their tails.
//! - With the default 100 ms heartbeat and 1 s election timeout the shortest
//!   lease is 2 s (`ceil(1.5 x election timeout)`): a grant of 1 s gets 2 s.
//!   A new leader gives every lease its full TTL again (no checkpoints).
//! - With quorum lost, puts, linearizable gets and `endpoint health` fail
//!   after the client's `--command-timeout` ("context deadline exceeded";
//!   "etcdserver: request timed out" when the member asked had just led);
//!   serializable gets (`--consistency=s`) still answer from any member.
//! - When auth is on and a client presents a certificate but no password, the
//!   certificate's CN is taken as the user name. The client certificate here
//!   has CN [`CLIENT_CN`], which is no user: it opens the TLS door only.
//!
//! Everything is removed on drop, on panic too: members are killed (SIGKILL,
//! reaped), the temp dir is removed, the namespace goes with its [`Netns`].
//! Members also get SIGKILL when the thread that started them dies
//! (`PR_SET_PDEATHSIG`), so a test binary killed from outside leaves no etcd
//! running; `cargo xtask test` removes the data dir (about 125 MB of tmpfs
//! per member: etcd preallocates its WAL) and namespace such a binary left.
//! Start and restart members from the thread that owns the cluster.

use std::{
    fs::OpenOptions,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::{run, veth_pair, Netns};

/// Member 0's client port; member `i` uses this + 10 i.
pub const CLIENT_PORT: u16 = 2379;
/// Member 0's peer port; member `i` uses this + 10 i.
pub const PEER_PORT: u16 = 2380;
const PORT_STRIDE: u16 = 10;

/// The interface [`EtcdCluster::connect`] adds to a namespace.
pub const MGMT_IF: &str = "mgmt0";
/// How many namespaces may connect: the TLS server certificate names the
/// etcd side address of every one of them.
pub const LINK_MAX: u8 = 32;

/// The client certificate's subject CN: not an etcd user (see the module doc).
pub const CLIENT_CN: &str = "smtpguard-fleet-test-client";
/// The root user's password once [`EtcdCluster::enable_auth`] ran.
pub const ROOT_PASSWORD: &str = "root-test-password";

/// Time for a cluster to elect a leader and answer every running member's
/// health check: a fresh cluster takes well under 2 s.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on any command run through this module (etcdctl bounds itself
/// with its own timeouts; this only catches a hang).
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The files a TLS client of the cluster needs.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// The client certificate (CN [`CLIENT_CN`]).
    pub cert: PathBuf,
    /// The client certificate's key (PKCS#8 PEM, P-256).
    pub key: PathBuf,
}

/// One namespace's link to the etcd namespace.
#[derive(Clone, Copy, Debug)]
pub struct MgmtLink {
    /// The link's number: it is `10.77.N.0/24`.
    pub n: u8,
    /// The address on [`MGMT_IF`] in the connected namespace (`.2`).
    pub host_addr: Ipv4Addr,
    /// etcd's address on the link (`.1`): what clients dial.
    pub etcd_addr: Ipv4Addr,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running etcd cluster in its own namespace. See the module doc.
pub struct EtcdCluster {
    members: Vec<Member>,
    tls: Option<TlsFiles>,
    auth: bool,
    token: String,
    links: Vec<(String, MgmtLink)>,
    // Dropped after `Drop::drop` killed the members: the namespace, then the files.
    ns: Netns,
    dir: TempDir,
}

impl EtcdCluster {
    /// `members` (1 or 3) members on plain http, healthy.
    pub fn start(members: usize) -> Result<Self> {
        Self::start_with(members, false)
    }

    /// `members` members on https with client certificates required
    /// (`--client-cert-auth`), healthy. Clients need [`Self::tls`].
    pub fn start_tls(members: usize) -> Result<Self> {
        Self::start_with(members, true)
    }

    fn start_with(members: usize, tls: bool) -> Result<Self> {
        if !matches!(members, 1 | 3) {
            bail!("an etcd cluster of {members} members: use 1 or 3");
        }
        for (program, package) in [("etcd", "etcd-server"), ("etcdctl", "etcd-client"), ("openssl", "openssl")] {
            let found = std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()));
            if !found {
                bail!("{program} is not installed: `cargo xtask setup` installs Debian's {package}");
            }
        }
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let ns = Netns::new("etcd")?;
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = TempDir(base.join(format!("sg-etcd-{id}")));
        std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
        let members = (0..members as u16)
            .map(|i| Member { name: format!("m{i}"), client_port: CLIENT_PORT + PORT_STRIDE * i, peer_port: PEER_PORT + PORT_STRIDE * i, child: None })
            .collect();
        let mut cluster = Self { members, tls: None, auth: false, token: format!("sg-etcd-{id}"), links: Vec::new(), ns, dir };
        if tls {
            cluster.tls = Some(cluster.make_certificates()?);
        }
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    /// The namespace the members run in.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// How many members the cluster has (running or not).
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Whether member `i` runs (its process has not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        matches!(self.members[i].child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Member `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// CA, client certificate and key of a TLS cluster.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The directory holding data dirs, logs and certificates.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Member `i`'s log file.
    pub fn log_file(&self, i: usize) -> PathBuf {
        self.dir.0.join(format!("{}.log", self.members[i].name))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn initial_cluster(&self) -> String {
        self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect::<Vec<_>>().join(",")
    }

    /// Starts member `i` with `state` "new" or "existing"; does not wait.
    fn spawn(&mut self, i: usize, state: &str) -> Result<()> {
        let scheme = self.scheme();
        let initial_cluster = self.initial_cluster();
        let m = &self.members[i];
        let dir = &self.dir.0;
        let out = OpenOptions::new().create(true).append(true).open(dir.join(format!("{}.out", m.name)))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns.name()))
            .args(["--", "etcd", "--name", &m.name, "--data-dir"])
            .arg(dir.join(&m.name))
            .args(["--listen-client-urls", &format!("{scheme}://0.0.0.0:{}", m.client_port)])
            .args(["--advertise-client-urls", &format!("{scheme}://127.0.0.1:{}", m.client_port)])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", m.peer_port)])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", m.peer_port)])
            .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", state, "--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-level", "warn", "--log-outputs"])
            .arg(self.log_file(i))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if self.tls.is_some() {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(dir.join("ca.crt"))
                .arg("--cert-file")
                .arg(dir.join("server.crt"))
                .arg("--key-file")
                .arg(dir.join("server.key"));
        }
        // SAFETY: prctl is async-signal-safe and touches only the child.
        // nsenter (net namespace only) execs etcd in place, which keeps
        // the setting: etcd dies with the thread that started it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting etcd member {i} through nsenter"))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// SIGKILLs member `i` and reaps it. A member not running is left alone.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data dir, with the same flags
    /// (`--initial-cluster-state existing` in a 3-member cluster). Does not
    /// wait: call [`Self::wait_healthy`]. A member still running is killed first.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill9(i);
        let state = if self.members.len() > 1 { "existing" } else { "new" };
        self.spawn(i, state)
    }

    pub fn kill9_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }

    /// Restarts every member (see [`Self::restart`]); does not wait.
    pub fn restart_all(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            self.restart(i)?;
        }
        Ok(())
    }

    /// Waits, up to [`HEALTH_TIMEOUT`], until every running member answers
    /// `endpoint health` (a quorum read through the raft log).
    pub fn wait_healthy(&mut self) -> Result<()> {
        self.wait_healthy_within(HEALTH_TIMEOUT)
    }

    /// Waits until every running member is healthy, at most `limit`. Fails
    /// at once, quoting its log, when a member exited.
    pub fn wait_healthy_within(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            for i in 0..self.members.len() {
                if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(|c| c.try_wait()) {
                    self.members[i].child = None;
                    bail!("etcd member {i} exited ({status}):\n{}", self.log_tails());
                }
            }
            let endpoints = self.local_endpoints();
            if endpoints.is_empty() {
                bail!("no etcd member is running");
            }
            let last = match self.etcdctl_at(&endpoints, &["--dial-timeout=500ms", "--command-timeout=1s", "endpoint", "health"]) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!("etcd not healthy after {limit:?}: {last}\n{}", self.log_tails());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the member that leads, asked of the running members.
    pub fn leader(&mut self) -> Result<usize> {
        let endpoints = self.local_endpoints();
        let text = self.etcdctl_at(&endpoints, &["endpoint", "status", "-w", "json"])?;
        let statuses: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("endpoint status: {text}"))?;
        for s in statuses.as_array().into_iter().flatten() {
            let leader = s["Status"]["leader"].as_u64();
            if leader.is_some() && leader == s["Status"]["header"]["member_id"].as_u64() {
                let endpoint = s["Endpoint"].as_str().unwrap_or_default();
                if let Some(i) = self.members.iter().position(|m| endpoint.ends_with(&format!(":{}", m.client_port))) {
                    return Ok(i);
                }
            }
        }
        bail!("no running member leads: {text}")
    }

    /// Connects `ns` to the etcd namespace: a veth, [`MGMT_IF`] on the
    /// other side, `10.77.N.0/24` with etcd on `.1`.
    pub fn connect(&mut self, ns: &Netns) -> Result<MgmtLink> {
        if self.links.iter().any(|(name, _)| name == ns.name()) {
            bail!("{} is already connected to etcd", ns.name());
        }
        let n = self.links.len() as u8 + 1;
        if n > LINK_MAX {
            bail!("at most {LINK_MAX} namespaces connect to one etcd cluster");
        }
        let link = MgmtLink { n, host_addr: Ipv4Addr::new(10, 77, n, 2), etcd_addr: Ipv4Addr::new(10, 77, n, 1) };
        veth_pair(ns, MGMT_IF, &[&format!("{}/24", link.host_addr)], &self.ns, &format!("mgmt{n}"), &[&format!("{}/24", link.etcd_addr)])?;
        self.links.push((ns.name().to_owned(), link));
        Ok(link)
    }

    /// The client URLs of every member as `ns` (connected with
    /// [`Self::connect`]) reaches them: `http://10.77.N.1:2379,...`.
    ///
    /// # Panics
    /// When `ns` was not connected.
    pub fn endpoints_from(&self, ns: &Netns) -> String {
        let (_, link) = self.links.iter().find(|(name, _)| name == ns.name()).unwrap_or_else(|| panic!("{} is not connected to etcd", ns.name()));
        self.endpoints_at(link.etcd_addr)
    }

    fn endpoints_at(&self, addr: Ipv4Addr) -> String {
        let scheme = self.scheme();
        self.members.iter().map(|m| format!("{scheme}://{addr}:{}", m.client_port)).collect::<Vec<_>>().join(",")
    }

    /// The running members' client URLs inside the etcd namespace.
    fn local_endpoints(&mut self) -> String {
        let running: Vec<usize> = (0..self.members.len()).filter(|&i| self.is_running(i)).collect();
        let scheme = self.scheme();
        running.iter().map(|&i| format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)).collect::<Vec<_>>().join(",")
    }

    /// Runs `etcdctl ARGS` (v3 API) inside the etcd namespace against the
    /// running members, with the client certificate and, once auth is on,
    /// root's credentials. Returns stdout; fails with the output otherwise.
    /// Defaults `--dial-timeout=2s --command-timeout=5s` come first, so a
    /// later `--command-timeout=...` in `args` wins.
    pub fn etcdctl(&mut self, args: &[&str]) -> Result<String> {
        let endpoints = self.local_endpoints();
        self.etcdctl_at(&endpoints, args)
    }

    fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Result<String> {
        let mut full: Vec<String> = vec![format!("--endpoints={endpoints}"), "--dial-timeout=2s".into(), "--command-timeout=5s".into()];
        if let Some(tls) = &self.tls {
            full.extend(tls_flags(tls));
        }
        if self.auth {
            full.extend(["--user=root".into(), format!("--password={ROOT_PASSWORD}")]);
        }
        full.extend(args.iter().map(|a| a.to_string()));
        let out = ns_command(self.ns.name(), "etcdctl", &full).output().context("running etcdctl")?;
        if !out.status.success() {
            bail!("etcdctl {args:?} failed ({}): {}", out.status, output_text(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Turns authentication on: user `root` (password [`ROOT_PASSWORD`],
    /// role `root`), then `user` with `password` and a role granting
    /// readwrite on keys under `prefix`, then `auth enable`. Later
    /// [`Self::etcdctl`] calls authenticate as root.
    pub fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) -> Result<()> {
        let role = format!("{user}-rw");
        let steps: [&[&str]; 8] = [
            &["user", "add", "root", "--interactive=false", &format!("--new-user-password={ROOT_PASSWORD}")],
            &["role", "add", "root"],
            &["user", "grant-role", "root", "root"],
            &["role", "add", &role],
            &["role", "grant-permission", &role, "--prefix=true", "readwrite", prefix],
            &["user", "add", user, "--interactive=false", &format!("--new-user-password={password}")],
            &["user", "grant-role", user, &role],
            &["auth", "enable"],
        ];
        for step in steps {
            self.etcdctl(step)?;
        }
        self.auth = true;
        Ok(())
    }

    /// CA, server certificate (SAN: loopback and the etcd side of every
    /// link) and client certificate, all P-256, made with the openssl CLI.
    fn make_certificates(&self) -> Result<TlsFiles> {
        let d = &self.dir.0;
        let p = |name: &str| d.join(name).display().to_string();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["openssl", "req", "-x509"];
        ca.extend(ec);
        let (ca_key, ca_crt) = (p("ca.key"), p("ca.crt"));
        ca.extend(["-keyout", &ca_key, "-out", &ca_crt, "-days", "2", "-subj", "/CN=smtpguard-fleet-test-ca"]);
        ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        run(&ca)?;

        let mut server_san = String::from("subjectAltName=DNS:localhost,IP:127.0.0.1");
        for n in 1..=LINK_MAX {
            server_san += &format!(",IP:10.77.{n}.1");
        }
        // The server certificate also serves etcd's own gateway as a client.
        let leaf = [("server", "etcd-server", server_san.as_str(), "serverAuth,clientAuth", "2"), ("client", CLIENT_CN, "", "clientAuth", "3")];
        for (name, cn, san, usage, serial) in leaf {
            let (key, csr, crt, ext) = (p(&format!("{name}.key")), p(&format!("{name}.csr")), p(&format!("{name}.crt")), p(&format!("{name}.ext")));
            std::fs::write(&ext, format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n{san}\n"))?;
            let mut req = vec!["openssl", "req", "-new"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj"]);
            let subj = format!("/CN={cn}");
            req.push(&subj);
            run(&req)?;
            run(&["openssl", "x509", "-req", "-in", &csr, "-CA", &ca_crt, "-CAkey", &ca_key, "-set_serial", serial, "-days", "2", "-extfile", &ext, "-out", &crt])?;
        }
        Ok(TlsFiles { ca: d.join("ca.crt"), cert: d.join("client.crt"), key: d.join("client.key") })
    }

    /// The last lines of every member's log and stray output.
    fn log_tails(&self) -> String {
        let mut text = String::new();
        for m in &self.members {
            for ext in ["log", "out"] {
                let content = std::fs::read_to_string(self.dir.0.join(format!("{}.{ext}", m.name))).unwrap_or_default();
                let lines: Vec<&str> = content.lines().collect();
                let tail = lines[lines.len().saturating_sub(8)..].join("\n");
                if !tail.is_empty() {
                    text += &format!("--- {}.{ext} ---\n{tail}\n", m.name);
                }
            }
        }
        text
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill9_all();
    }
}

/// etcdctl's flags for a client with these files.
pub fn tls_flags(tls: &TlsFiles) -> Vec<String> {
    vec![format!("--cacert={}", tls.ca.display()), format!("--cert={}", tls.cert.display()), format!("--key={}", tls.key.display())]
}

/// `program ARGS` in namespace `ns` (network only), the v3 API for etcdctl,
/// killed after [`EXEC_TIMEOUT`].
pub fn ns_command(ns: &str, program: &str, args: &[String]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .args(["--", "timeout", "--signal=KILL", &format!("{}", EXEC_TIMEOUT.as_secs()), program])
        .args(args)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::null());
    cmd
}

/// stdout then stderr, as text.
pub fn output_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
