//! `metrics`: the controller's HTTP endpoint under load, with a full
//! source table (1.3M sources): scrape latency with one scraper and with
//! 20 at once, /healthz with 20 idle connections open, and /healthz while
//! a hostile reload (the largest list the default limit lets in) is
//! compiled and rejected. The real `smtpguard run` (release build) on a veth pair.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData};
use policy_common::source::{ban_origin, source_key_v4, SlotInfo, SourceSet, SourceSlot, WAYS};
use smtpguard::clock::ktime_now_ns;
use smtpguard_tests::{
    netns::Netns,
    pairlab::{distinct_hosts_list, http_get, metric, write_policy, PairLab, RunningController, TestPins, CLIENT_DENIED},
};

const PORT: u16 = 19470;
const SCRAPERS: usize = 20;
const SCRAPES_EACH: usize = 50;

pub struct Figures {
    pub sources: u64,
    pub scrape_bytes: usize,
    pub single: Latency,
    pub concurrent: Latency,
    pub health_idle: Latency,
    pub health_reload: Latency,
    pub reload_ms: f64,
}

/// Milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub count: usize,
}

impl Latency {
    pub fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        Self { p50: at(0.5), p99: at(0.99), max: *ms.last().unwrap_or(&0.0), count: ms.len() }
    }

    pub fn json(&self) -> serde_json::Value {
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        serde_json::json!({"p50_ms": r(self.p50), "p99_ms": r(self.p99), "max_ms": r(self.max), "count": self.count})
    }
}

/// One GET over a fresh connection, as Prometheus does with keep-alive
/// off; the time to the last byte of the answer.
fn timed_get(port: u16, path: &str) -> Result<(Duration, usize)> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    if !body.starts_with(b"HTTP/1.1 200") {
        bail!("{path}: {}", String::from_utf8_lossy(&body[..body.len().min(200)]));
    }
    Ok((start.elapsed(), body.len()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Writes every way of every set with a made-up source (1 in 100 banned):
/// the table as a flood from 1.3M addresses would leave it.
fn fill_sources(state: &TestPins) -> Result<u64> {
    let map = MapData::from_pin(state.pin_dir.join(policy_common::SOURCES)).context("the pinned source table")?;
    let mut sets: Array<MapData, SourceSet> = Array::try_from(Map::Array(map))?;
    let now = ktime_now_ns();
    let mut n = 0u32;
    for index in 0..sets.len() {
        let mut set = SourceSet::default();
        for way in 0..WAYS {
            n += 1;
            let banned = n.is_multiple_of(100);
            set.slots[way] = SourceSlot {
                key: source_key_v4((0x0a00_0000 + n).to_be_bytes()),
                admit_tat_ns: now,
                window: 0,
                ban_until_ns: if banned { now + 3_600_000_000_000 } else { 0 },
                info: SlotInfo { strikes: banned as u16, origin: if banned { ban_origin::AUTO } else { ban_origin::NONE }, flags: 0, last_seen_s: (now / 1_000_000_000) as u32 }.pack(),
            };
        }
        sets.set(index, set, 0)?;
    }
    Ok(n as u64)
}

pub fn run() -> Result<Figures> {
    let lab = PairLab::new()?;
    let state = TestPins::new("benchmetrics");
    let dir = state.policy_dir();
    let list = dir.join("deny.txt");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(&list, format!("{CLIENT_DENIED}/32\n"))?;
    let policy = write_policy(&dir, "policy.yaml", "version: 1\ningress:\n  deny_files: [deny.txt]\n");
    let ctl = RunningController::start(&lab, &state, &policy, PORT)?;
    let sources = fill_sources(&state)?;
    // The gauges follow the next table scan (every 5 s while scraped).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = http_get(&lab, PORT, "/metrics")?;
        if metric(&text, "smtpguard_tracked_sources", &[]) == Some(sources as f64) {
            break;
        }
        if Instant::now() > deadline {
            bail!("smtpguard_tracked_sources never reached {sources}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let server = &lab.server;
    let mut scrape_bytes = 0;
    let single = server.enter(|| -> Result<Latency> {
        let mut t = Vec::new();
        for _ in 0..200 {
            let (d, bytes) = timed_get(PORT, "/metrics")?;
            scrape_bytes = bytes;
            t.push(ms(d));
        }
        Ok(Latency::of(t))
    })??;
    let concurrent = std::thread::scope(|scope| -> Result<Latency> {
        let workers: Vec<_> = (0..SCRAPERS)
            .map(|_| scope.spawn(|| server.enter(|| (0..SCRAPES_EACH).map(|_| timed_get(PORT, "/metrics").map(|(d, _)| ms(d))).collect::<Result<Vec<f64>>>())))
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().map_err(|_| anyhow::anyhow!("a scraper panicked"))???);
        }
        Ok(Latency::of(all))
    })?;
    let health_idle = server.enter(|| -> Result<Latency> {
        let idle: Vec<TcpStream> = (0..SCRAPERS).map(|_| TcpStream::connect(("127.0.0.1", PORT))).collect::<std::io::Result<_>>()?;
        let t = (0..200).map(|_| timed_get(PORT, "/healthz").map(|(d, _)| ms(d))).collect::<Result<Vec<f64>>>()?;
        drop(idle);
        Ok(Latency::of(t))
    })??;
    let (health_reload, reload_ms) = hostile_reload(server, &list, &ctl, &state)?;
    drop(ctl);
    Ok(Figures { sources, scrape_bytes, single, concurrent, health_idle, health_reload, reload_ms })
}

/// /healthz, asked every 5 ms while a reload of the largest list the
/// default limit lets in (8 MiB: 490,000 networks, more than the IPv4 ACL
/// room) is compiled and rejected; those latencies and the reload's time.
fn hostile_reload(server: &Netns, list: &std::path::Path, ctl: &RunningController, state: &TestPins) -> Result<(Latency, f64)> {
    let spoiled = list.with_extension("new");
    let (text, _) = distinct_hosts_list(8 << 20);
    std::fs::write(&spoiled, text)?;
    std::fs::rename(&spoiled, list)?;
    let rejected = |state: &TestPins| {
        state.events_where(|e| e["trigger"] == "SIGHUP" && e["result"] == "rejected").into_iter().next()
    };
    let start = Instant::now();
    // SAFETY: signalling the controller we started.
    unsafe { libc::kill(ctl.pid(), libc::SIGHUP) };
    server.enter(|| -> Result<(Latency, f64)> {
        let mut t = Vec::new();
        while start.elapsed() < Duration::from_secs(120) {
            let (d, _) = timed_get(PORT, "/healthz")?;
            t.push(ms(d));
            if let Some(e) = rejected(state) {
                return Ok((Latency::of(t), e["duration_ms"].as_f64().unwrap_or(f64::NAN)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("the hostile reload was not rejected within 120 s")
    })?
}
