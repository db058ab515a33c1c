//! `smtpguard run`: attach, load the policy, reload it on demand, serve
//! metrics and stream events. Enforcement lives in the pinned objects; the
//! controller can stop, crash or restart without a packet going unjudged.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    signal::unix::{signal, SignalKind},
};

use crate::{
    commands::{compile_for_reload, load_and_compile},
    dataplane::{Dataplane, Hook, LoadOptions},
    events,
    metrics::{self, ControllerMetrics},
    pins::Pins,
    policy::{self, time, Compiled, Policy},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeChoice {
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy: PathBuf,
    pub uplinks: Vec<String>,
    pub tenants: Vec<String>,
    pub xdp_mode: XdpModeChoice,
    pub metrics_addr: SocketAddr,
    pub pins: Pins,
    pub events: Option<PathBuf>,
    pub policy_options: policy::LoadOptions,
    pub source_capacity: u32,
    pub acl4_capacity: policy_common::acl4::Capacity,
}

/// The interface's index, 0 when there is none by that name.
fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else { return 0 };
    // SAFETY: a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

fn iface_exists(name: &str) -> bool {
    ifindex(name) != 0
}

/// Everything that can be refused before anything changes.
fn preflight(o: &RunOptions) -> Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("smtpguard run loads BPF programs and attaches them: run it as root (CAP_BPF, CAP_NET_ADMIN)");
    }
    if o.uplinks.is_empty() && o.tenants.is_empty() {
        bail!("name at least one --uplink or --tenant interface");
    }
    for i in o.uplinks.iter().chain(&o.tenants) {
        if !iface_exists(i) {
            bail!("interface {i} does not exist (nothing was changed)");
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let parent = o.pins.dir.parent().unwrap_or(Path::new("/"));
    if !mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (Some(_), Some(mp), Some(fs)) = (f.next(), f.next(), f.next()) else { return false };
        fs == "bpf" && parent.starts_with(mp)
    }) {
        bail!("{} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)", o.pins.dir.display());
    }
    Ok(())
}

struct Controller {
    o: RunOptions,
    dp: Dataplane,
    policy: Policy,
    compiled: Compiled,
    generation: u64,
    watched: Vec<(PathBuf, Option<SystemTime>)>,
    metrics: ControllerMetrics,
    out: Box<dyn Write>,
    /// Modification times at the previous poll, for settling.
    last_seen: Option<Vec<Option<SystemTime>>>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The policy file and every file it reads.
fn watch_list(path: &Path, p: &Policy) -> Vec<(PathBuf, Option<SystemTime>)> {
    let mut files = vec![path.to_path_buf()];
    files.extend(p.input_files());
    files.sort();
    files.dedup();
    files.into_iter().map(|f| {
        let t = mtime(&f);
        (f, t)
    }).collect()
}

impl Controller {
    fn ports(&self) -> Vec<u16> {
        self.policy.ports.iter().map(|g| g.port).collect()
    }

    fn emit(&mut self, v: serde_json::Value) {
        let _ = writeln!(self.out, "{v}");
        let _ = self.out.flush();
    }

    /// Loads the policy into the inactive generation and flips to it. An
    /// invalid policy changes nothing.
    fn reload(&mut self, why: &str) {
        let start = Instant::now();
        self.metrics.last_reload_time.set(events::now_unix_ns() as f64 / 1e9);
        let (compiled, diags) = compile_for_reload(&self.o.policy, &self.o.policy_options);
        let result = match compiled {
            None => Err(diags.errors().map(|d| d.to_string()).collect::<Vec<_>>()),
            Some((policy, compiled)) => self.apply(policy, compiled).map_err(|e| vec![e.to_string()]),
        };
        let seconds = start.elapsed().as_secs_f64();
        let applied = result.is_ok();
        self.metrics.reload_duration.observe(seconds);
        match result {
            Ok(()) => {
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                self.metrics.last_reload_ok.set(1);
                eprintln!("smtpguard: policy generation {} in force ({why}, {:.1} ms)", self.generation, seconds * 1e3);
                let ev = serde_json::json!({"time": events::rfc3339(events::now_unix_ns()), "event": "policy_reload", "result": "ok",
                    "trigger": why, "generation": self.generation, "entries": self.compiled.entries(), "duration_ms": seconds * 1e3});
                self.emit(ev);
            }
            Err(errors) => {
                self.metrics.reloads.with_label_values(&["rejected"]).inc();
                self.metrics.last_reload_ok.set(0);
                for e in &errors {
                    eprintln!("{e}");
                }
                eprintln!("smtpguard: reload rejected ({why}); generation {} stays in force", self.generation);
                let ev = serde_json::json!({"time": events::rfc3339(events::now_unix_ns()), "event": "policy_reload", "result": "rejected",
                    "trigger": why, "generation": self.generation, "errors": errors});
                self.emit(ev);
            }
        }
        // Watch what the policy in force names. After a rejected edit the
        // policy file stays watched, so fixing it triggers the next reload.
        if applied {
            self.watched = watch_list(&self.o.policy, &self.policy);
        } else {
            for w in &mut self.watched {
                w.1 = mtime(&w.0);
            }
        }
    }

    fn apply(&mut self, policy: Policy, compiled: Compiled) -> Result<()> {
        let inactive = self.dp.active_generation()? ^ 1;
        let number = self.generation + 1;
        self.dp.install(inactive, &compiled, number)?;
        self.dp.activate(inactive, compiled.events.drop_sample_one_in, compiled.events.per_second)?;
        // Bring the now idle generation level with the active one (after
        // the grace period `install` waits for), so the next edit is a diff
        // against it; the new policy is already in force.
        if let Err(e) = self.dp.install(inactive ^ 1, &compiled, number) {
            eprintln!("smtpguard: warning: updating the standby generation failed ({e}); the next reload rewrites it");
        }
        self.generation = number;
        self.policy = policy;
        self.compiled = compiled;
        Ok(())
    }

    /// Whether a watched file changed and has since stayed unchanged for
    /// one poll: a file caught half-written is read on the next tick.
    fn changed(&mut self) -> bool {
        let now: Vec<Option<SystemTime>> = self.watched.iter().map(|(p, _)| mtime(p)).collect();
        let differs = self.watched.iter().zip(&now).any(|((_, t), n)| t != n);
        let settled = self.last_seen.as_ref() == Some(&now);
        self.last_seen = Some(now);
        differs && settled
    }

    fn expiry_due(&self) -> bool {
        self.compiled.next_expiry.is_some_and(|day| time::today() >= day)
    }

    fn drain_events(&mut self) {
        let Ok(evs) = self.dp.drain_events() else { return };
        let ports = self.ports();
        for e in evs {
            let v = events::to_json(&e, &self.compiled, &ports);
            self.emit(v);
        }
    }
}

fn attach_all(o: &RunOptions, dp: &mut Dataplane) -> Result<()> {
    for iface in &o.uplinks {
        let pin = o.pins.link("xdp", iface);
        let adopt = pin.exists();
        let modes: &[(XdpMode, &str)] = match o.xdp_mode {
            XdpModeChoice::Native => &[(XdpMode::Driver, "native")],
            XdpModeChoice::Generic => &[(XdpMode::Skb, "generic")],
            XdpModeChoice::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        };
        let mut done = false;
        let mut last = None;
        for (mode, name) in modes {
            match dp.attach_xdp_pinned(iface, *mode, &pin) {
                Ok(adopted) => {
                    eprintln!("smtpguard: xdp_ingress {} {iface} ({name} mode)", if adopted { "adopted on" } else { "attached to" });
                    done = true;
                    break;
                }
                Err(e) if !adopt && o.xdp_mode == XdpModeChoice::Auto && *mode == XdpMode::Driver => {
                    eprintln!("smtpguard: warning: native XDP on {iface} failed ({e}); falling back to generic XDP");
                    last = Some(e);
                }
                Err(e) => return Err(e).with_context(|| format!("attaching XDP to {iface}")),
            }
        }
        if !done {
            bail!("attaching XDP to {iface}: {}", last.map(|e| e.to_string()).unwrap_or_default());
        }
        let tc = o.pins.link("tcegress", iface);
        let adopted = dp.attach_tc_pinned(Hook::TcEgress, iface, &tc).with_context(|| format!("attaching tc_egress to {iface}"))?;
        eprintln!("smtpguard: tc_egress {} {iface}", if adopted { "adopted on" } else { "attached to" });
    }
    for iface in &o.tenants {
        let tc = o.pins.link("tcingress", iface);
        let adopted = dp.attach_tc_pinned(Hook::TcIngress, iface, &tc).with_context(|| format!("attaching tc_ingress to {iface}"))?;
        eprintln!("smtpguard: tc_ingress {} {iface}", if adopted { "adopted on" } else { "attached to" });
    }
    let tenants: Vec<u32> = o.tenants.iter().map(|i| ifindex(i)).collect();
    dp.set_tenant_ifaces(&tenants).context("recording the tenant interfaces")
}

async fn serve(stream: &mut tokio::net::TcpStream, c: &mut Controller) {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let read = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
            match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, ctype, body) = match path {
        "/metrics" => {
            let ports = c.ports();
            match metrics::render(&mut c.dp, &c.compiled, &c.metrics, &ports) {
                Ok(b) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", b),
                Err(e) => ("500 Internal Server Error", "text/plain", e),
            }
        }
        "/healthz" => ("200 OK", "text/plain", format!("ok generation {}\n", c.generation)),
        _ => ("404 Not Found", "text/plain", "try /metrics or /healthz\n".to_owned()),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

pub fn run(o: RunOptions) -> Result<()> {
    preflight(&o)?;
    // The first policy must be valid before anything is touched.
    let (compiled, diags) = load_and_compile(&o.policy, &o.policy_options);
    for d in &diags.items {
        eprintln!("{d}");
    }
    let Some((policy, compiled)) = compiled else { bail!("{}: the policy is not valid; nothing was changed", o.policy.display()) };
    o.pins.create().with_context(|| format!("creating {} and {}", o.pins.dir.display(), o.pins.run_dir.display()))?;
    let adopting = o.pins.exists();
    let mut dp = Dataplane::load(LoadOptions { source_capacity: o.source_capacity, pin_dir: Some(o.pins.dir.clone()), acl4_capacity: o.acl4_capacity })
        .context("loading the datapath")?;
    let active = dp.active_generation()?;
    let generation = if adopting { dp.policy(active)?.generation } else { 0 };
    let out: Box<dyn Write> = match &o.events {
        Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("opening {}", p.display()))?),
        None => Box::new(std::io::stdout()),
    };
    let watched = watch_list(&o.policy, &policy);
    let mut c = Controller { o: o.clone(), dp, policy, compiled, generation, watched, metrics: ControllerMetrics::new(), out, last_seen: None };
    // Load the policy before attaching, so the first packet a new link
    // judges already has it; adopted links judge by the pinned one meanwhile.
    let (p, comp) = (c.policy.clone(), c.compiled.clone());
    let start = Instant::now();
    c.apply(p, comp).context("loading the policy into the datapath")?;
    c.metrics.reload_duration.observe(start.elapsed().as_secs_f64());
    c.metrics.reloads.with_label_values(&["ok"]).inc();
    c.metrics.last_reload_ok.set(1);
    c.metrics.last_reload_time.set(events::now_unix_ns() as f64 / 1e9);
    attach_all(&o, &mut c.dp)?;
    c.dp.pin_programs(&o.pins.dir)?;
    std::fs::write(o.pins.pid_file(), std::process::id().to_string())?;
    eprintln!(
        "smtpguard: {} policy generation {} from {}; pins in {}",
        if adopting { "adopted pinned state;" } else { "enforcing" },
        c.generation,
        o.policy.display(),
        o.pins.dir.display()
    );
    c.emit(serde_json::json!({"time": events::rfc3339(events::now_unix_ns()), "event": "policy_reload", "result": "ok",
        "trigger": if adopting { "restart" } else { "start" }, "generation": c.generation, "entries": c.compiled.entries()}));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(o.metrics_addr).await.with_context(|| format!("binding metrics on {}", o.metrics_addr))?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let ring_fd = c.dp.events_fd()?;
        // SAFETY: the fd is ours (a dup) and stays open while registered.
        let ring = unsafe { AsyncFd::register(ring_fd) }.map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e:?}"))?;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = hup.recv() => c.reload("SIGHUP"),
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    if c.changed() {
                        c.reload("file change");
                    } else if c.expiry_due() {
                        c.reload("exemption expiry");
                    }
                    c.drain_events();
                }
                ready = ring.readable() => {
                    if let Ok(mut guard) = ready {
                        c.drain_events();
                        guard.clear_ready();
                    }
                }
                conn = listener.accept() => {
                    if let Ok((mut stream, _)) = conn {
                        serve(&mut stream, &mut c).await;
                    }
                }
            }
        }
        eprintln!("smtpguard: stopping; enforcement continues from {} (smtpguard detach removes it)", o.pins.dir.display());
        let _ = std::fs::remove_file(o.pins.pid_file());
        Ok(())
    })
}
