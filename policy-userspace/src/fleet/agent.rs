//! The fleet's thread: one session with etcd after another. A session
//! reads the fleet's bans whole, installs what this host lacks and lifts
//! what the fleet lifted while it was away, then follows the changes
//! (watches from the revision it read, so nothing falls between), sends
//! this host's new bans, follows the fleet policy and keeps the host's
//! record. When etcd goes, the session ends and the next one begins with a
//! full read again; meanwhile the datapath enforces as before and its new
//! bans wait in the source table, where the next session's scan finds them.
//!
//! It runs on a thread of its own so that etcd never stalls the
//! controller's loop, and works on the pinned maps like an operator
//! command (bans take the ban lock).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchOptions, WatchResponse};
use futures_util::FutureExt;
use ipnet::IpNet;
use policy_common::source::ban_origin;
use tokio::sync::{mpsc, watch, Notify};

use super::{
    bundle::{self, PolicyCache},
    hosts::{HostPolicy, HostRecord},
    metrics::FleetMetrics,
    record::{self, BanRecord, Refusal, Tombstone},
    settings::FleetOptions,
};
use crate::{
    clock::{self, ktime_now_ns},
    commands::state::origin_name,
    dataplane::{
        bans::{key_addr, source_key, BanLock},
        maps::Maps,
        source_table::Install,
    },
    pins::Pins,
};

/// A host's record outlives it by this much.
const HOST_TTL_S: i64 = 10;
/// Keys read per request when reading a prefix whole.
const PAGE: i64 = 5_000;
/// Puts per transaction (etcd allows 128 operations).
const TXN_PUTS: usize = 64;
/// Clocks of two hosts, and the ms a ban spends in flight, differ by less.
const SLACK_MS: u64 = 2_000;
/// Watch responses of bans taken at once, at most (each is a transaction
/// of up to 128 bans, or etcd's batch for a watcher behind).
const DRAIN_RESPONSES: usize = 1_024;

/// A fleet policy revision, stored in the state directory, for the
/// controller to apply.
#[derive(Clone, Debug)]
pub struct PolicyOffer {
    pub revision: i64,
    pub policy_file: std::path::PathBuf,
}

/// What the controller keeps of the fleet's thread.
pub struct FleetLink {
    /// Poked when the datapath started a ban: it is sent at once rather
    /// than at the next scan.
    pub ban_started: Arc<Notify>,
    /// What the controller has in force, for the host's record.
    pub policy: watch::Sender<HostPolicy>,
    pub metrics: Arc<FleetMetrics>,
    pub cache: PolicyCache,
}

/// Starts the fleet's thread; it opens the pinned maps itself. The
/// receiver yields the fleet policy revisions to apply.
pub fn start(
    o: FleetOptions,
    pins: Pins,
    cache: PolicyCache,
    metrics: Arc<FleetMetrics>,
    policy: HostPolicy,
) -> Result<(FleetLink, mpsc::UnboundedReceiver<PolicyOffer>)> {
    let maps = Maps::open_pinned(&pins.dir).context("opening the pinned maps for the fleet")?;
    let (policy_tx, policy_rx) = watch::channel(policy);
    let (offers_tx, offers) = mpsc::unbounded_channel();
    let ban_started = Arc::new(Notify::new());
    let io = Io { ban_started: ban_started.clone(), policy: policy_rx };
    let agent = Agent {
        o,
        pins,
        maps,
        cache: cache.clone(),
        m: metrics.clone(),
        offers: offers_tx,
        fleet: HashMap::new(),
        tombstones: HashMap::new(),
        installed: HashSet::new(),
        leases: HashMap::new(),
        refused: BTreeMap::new(),
        last_refusal: None,
        refused_seen: HashSet::new(),
        offered: None,
        policy_error: None,
        record_due: true,
        member: 0,
    };
    std::thread::Builder::new().name("fleet".into()).spawn(move || agent.run(io)).context("starting the fleet thread")?;
    Ok((FleetLink { ban_started, policy: policy_tx, metrics, cache }, offers))
}

struct Io {
    ban_started: Arc<Notify>,
    policy: watch::Receiver<HostPolicy>,
}

struct Agent {
    o: FleetOptions,
    pins: Pins,
    maps: Maps,
    cache: PolicyCache,
    m: Arc<FleetMetrics>,
    offers: mpsc::UnboundedSender<PolicyOffer>,
    /// When each of the fleet's bans ends (Unix ms), as etcd holds them
    /// (this session's read, then its watch): 40 bytes a ban.
    fleet: HashMap<IpNet, u64>,
    tombstones: HashMap<IpNet, Tombstone>,
    /// Fleet bans of other hosts installed here.
    installed: HashSet<IpNet>,
    /// Leases by the Unix second they end, shared by the bans ending then.
    leases: HashMap<u64, i64>,
    refused: BTreeMap<String, u64>,
    last_refusal: Option<String>,
    /// Refusals counted, by key and revision: a value is counted once,
    /// however many sessions read it.
    refused_seen: HashSet<(String, i64)>,
    /// The fleet policy revision last handed to the controller.
    offered: Option<i64>,
    /// Why the fleet policy revision could not even be offered.
    policy_error: Option<String>,
    record_due: bool,
    /// The etcd member (index in the endpoints) the next session tries first.
    member: usize,
}

/// How a session ended.
enum End {
    /// The controller is gone.
    Stop,
}

fn wall_ms() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

/// The datapath clock's reading at wall time `ms`.
fn ktime_at(ms: u64) -> u64 {
    let (now_k, now_ms) = (ktime_now_ns(), wall_ms());
    if ms >= now_ms {
        now_k.saturating_add((ms - now_ms) * 1_000_000)
    } else {
        now_k.saturating_sub((now_ms - ms) * 1_000_000)
    }
}

/// The wall time (ms) of a datapath clock reading.
fn wall_ms_at(ktime: u64) -> u64 {
    let (now_k, now_ms) = (ktime_now_ns(), wall_ms());
    if ktime >= now_k {
        now_ms + (ktime - now_k) / 1_000_000
    } else {
        now_ms.saturating_sub((now_k - ktime) / 1_000_000)
    }
}

fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).map(clock::rfc3339).unwrap_or_default()
}

/// The key just past every key beginning with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// A watch message, or why the watch ended.
fn watched(m: Result<Option<WatchResponse>, etcd_client::Error>) -> Result<WatchResponse> {
    match m {
        Ok(Some(r)) if r.canceled() => bail!("etcd cancelled a watch: {}", r.cancel_reason()),
        Ok(Some(r)) => Ok(r),
        Ok(None) => bail!("etcd closed a watch"),
        Err(e) => Err(e.into()),
    }
}

/// A ban this host is to install, and where it came from.
struct Incoming {
    net: IpNet,
    record: BanRecord,
    own: bool,
}

/// Fleet bans accepted, not yet installed; `new`: those from elsewhere
/// this host does not hold yet (they count against the cap).
#[derive(Default)]
struct Batch {
    items: Vec<Incoming>,
    new: HashSet<IpNet>,
}

impl Agent {
    fn prefix(&self) -> &str {
        &self.o.connection.prefix
    }

    fn run(mut self, mut io: Io) {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!("fleet: cannot start its runtime: {e}"),
        };
        rt.block_on(async {
            let mut backoff = Duration::from_millis(250);
            let mut failing = false;
            loop {
                let began = Instant::now();
                match self.session(&mut io).await {
                    Ok(End::Stop) => return,
                    Err(e) => {
                        // A session that got going ends a quiet spell: its loss is news.
                        if self.m.connected.get() == 1 {
                            failing = false;
                        }
                        self.m.connected.set(0);
                        if !failing {
                            tracing::warn!(
                                "fleet: {e:#}; enforcement and local bans go on, bans made meanwhile are sent once etcd answers again"
                            );
                        } else {
                            tracing::debug!("fleet: {e:#}");
                        }
                        failing = true;
                    }
                }
                if began.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(250);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    changed = io.policy.changed() => if changed.is_err() { return },
                }
                backoff = (backoff * 2).min(Duration::from_secs(4));
            }
        });
    }

    async fn session(&mut self, io: &mut Io) -> Result<End> {
        let (mut client, member) = self.o.connection.connect_from(self.member).await?;
        // The next session tries the next member first: this one may be
        // what ended this session.
        self.member = member + 1;
        self.leases.clear();
        let host_lease = client.lease_grant(HOST_TTL_S, None).await.context("granting the host's lease")?.id();
        let (mut keeper, mut kept) = client.lease_keep_alive(host_lease).await.context("keeping the host's lease")?;
        let revision = self.resync(&mut client).await?;
        let p = self.prefix().to_owned();
        let from = |o: WatchOptions| Some(o.with_start_revision(revision + 1));
        let mut bans = client.watch(record::bans_prefix(&p), from(WatchOptions::new().with_prefix().with_prev_key())).await?;
        let mut unbans = client.watch(record::unbans_prefix(&p), from(WatchOptions::new().with_prefix())).await?;
        let mut pointer = client.watch(bundle::pointer_key(&p), from(WatchOptions::new())).await?;
        if self.o.follow_policy {
            self.follow_policy(&mut client).await?;
        }
        self.m.sessions.inc();
        self.m.connected.set(1);
        tracing::info!("fleet: connected to etcd at {} as host {} ({} fleet bans, revision {revision})", self.o.connection.endpoints[member], self.o.host_id, self.fleet.len());
        self.publish(&mut client).await?;
        self.put_record(&mut client, host_lease, &io.policy.borrow().clone()).await?;
        let mut keep_alive = tokio::time::interval(Duration::from_secs(HOST_TTL_S as u64 / 3));
        let mut scan = tokio::time::interval(Duration::from_secs(1));
        let mut refresh = tokio::time::interval(Duration::from_secs(HOST_TTL_S as u64));
        loop {
            tokio::select! {
                m = bans.message() => {
                    // The responses that arrived meanwhile go with this one:
                    // installed together, they wait for one RCU grace period
                    // (8-16 ms measured) rather than one each, and a burst of bans
                    // (a response a transaction) cannot queue up behind them.
                    let mut responses = vec![watched(m)?];
                    while responses.len() < DRAIN_RESPONSES {
                        match bans.message().now_or_never() {
                            Some(m) => responses.push(watched(m)?),
                            None => break,
                        }
                    }
                    self.on_bans(responses.iter().flat_map(|r| r.events()));
                }
                m = unbans.message() => {
                    let r = watched(m)?;
                    self.on_unbans(r.events());
                }
                m = pointer.message() => {
                    watched(m)?;
                    if self.o.follow_policy {
                        self.follow_policy(&mut client).await?;
                    }
                }
                _ = keep_alive.tick() => keeper.keep_alive().await.context("renewing the host's lease")?,
                k = kept.message() => match k.context("renewing the host's lease")? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => bail!("the host's lease ended"),
                },
                _ = io.ban_started.notified() => {
                    // The datapath's ban events come in bursts: one scan for the burst.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    self.publish(&mut client).await?;
                }
                _ = scan.tick() => self.publish(&mut client).await?,
                changed = io.policy.changed() => {
                    if changed.is_err() {
                        return Ok(End::Stop);
                    }
                    self.record_due = true;
                }
                _ = refresh.tick() => self.record_due = true,
            }
            if self.record_due {
                let policy = io.policy.borrow().clone();
                self.put_record(&mut client, host_lease, &policy).await?;
            }
        }
    }

    /// Every key under `prefix` at one revision (the first page's, or
    /// `revision` when given), a page at a time.
    async fn read_all(client: &mut Client, prefix: &str, mut revision: i64) -> Result<(Vec<KeyValue>, i64)> {
        let mut out = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let mut options = GetOptions::new().with_range(prefix_end(prefix)).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = client.get(from.clone(), Some(options)).await.with_context(|| format!("reading {prefix}"))?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let mut kvs = resp.kvs().to_vec();
            if let Some(last) = kvs.last() {
                from = last.key().to_vec();
                from.push(0);
            }
            let done = kvs.is_empty() || !more;
            out.append(&mut kvs);
            if done {
                return Ok((out, revision));
            }
        }
    }

    /// Reads the fleet's bans and unbans whole, at one revision, and
    /// brings this host in line: installs what it lacks, lifts its fleet
    /// bans the fleet no longer holds and its bans the fleet lifted.
    async fn resync(&mut self, client: &mut Client) -> Result<i64> {
        let p = self.prefix().to_owned();
        let (bans, revision) = Self::read_all(client, &record::bans_prefix(&p), 0).await?;
        let (unbans, _) = Self::read_all(client, &record::unbans_prefix(&p), revision).await?;
        self.fleet.clear();
        self.installed.clear();
        self.tombstones.clear();
        let mut batch = Batch::default();
        for kv in &bans {
            self.accept(kv, &mut batch);
        }
        self.install(batch.items, false);
        for kv in &unbans {
            if let Ok((net, t)) = record::parse_tombstone(kv.key_str().unwrap_or(""), kv.value(), &p) {
                self.tombstones.insert(net, t);
            }
        }
        // What changed while this host was away.
        let now = ktime_now_ns();
        let mut lift = Vec::new();
        for (key, until, info) in self.maps.source_table().bans_in_force(now) {
            let net = key_net(key);
            if info.origin == ban_origin::FLEET && !self.fleet.contains_key(&net) {
                lift.push((net, wall_ms_at(until)));
            }
        }
        for (net, t) in &self.tombstones {
            lift.push((*net, t.until_ms));
        }
        for (net, until_ms) in lift {
            self.lift(net, until_ms);
        }
        self.m.installed.set(self.installed.len() as i64);
        Ok(revision)
    }

    /// A fleet ban's key and value, checked: added to `batch` (what to
    /// install next) or refused, counted; or already over. The cap counts
    /// the batch too, so a full read is held to it like the watch.
    fn accept(&mut self, kv: &KeyValue, batch: &mut Batch) {
        let key = kv.key_str().unwrap_or("<not UTF-8>").to_owned();
        let (net, record) = match record::parse_ban(&key, kv.value(), self.prefix(), &self.o.trust) {
            Ok(b) => b,
            Err(r) => {
                self.refuse(key, kv.mod_revision(), r);
                return;
            }
        };
        let own = record.origin_host == self.o.host_id;
        if record.until_ms <= wall_ms() {
            self.m.received.with_label_values(&["expired"]).inc();
            return;
        }
        if !own && !self.installed.contains(&net) && !batch.new.contains(&net) {
            if self.installed.len() + batch.new.len() >= self.o.trust.max_bans as usize {
                self.refuse(key, kv.mod_revision(), Refusal::OverCap { cap: self.o.trust.max_bans });
                return;
            }
            batch.new.insert(net);
        }
        self.fleet.insert(net, record.until_ms);
        batch.items.push(Incoming { net, record, own });
    }

    fn refuse(&mut self, key: String, revision: i64, why: Refusal) {
        // A flood of bad keys must not grow this without bound: forgetting
        // means counting some again after the next full read.
        if self.refused_seen.len() >= 100_000 {
            self.refused_seen.clear();
        }
        if !self.refused_seen.insert((key.clone(), revision)) {
            return;
        }
        tracing::warn!("fleet: refused the ban {key}: {why}");
        self.m.received.with_label_values(&[why.label()]).inc();
        *self.refused.entry(why.label().to_owned()).or_default() += 1;
        self.last_refusal = Some(format!("{key}: {why}"));
        self.record_due = true;
    }

    /// Installs fleet bans: sources in one batch (one grace period),
    /// networks one by one. `live`: just made, so its delay is measured.
    fn install(&mut self, mut incoming: Vec<Incoming>, live: bool) {
        // This host's own bans come back as they were sent: installed
        // again only where they are gone here (pins removed meanwhile).
        let now = ktime_now_ns();
        self.m.received.with_label_values(&["own"]).inc_by(incoming.iter().filter(|i| i.own).count() as u64);
        incoming.retain(|i| {
            !i.own
                || if record::is_source(i.net) {
                    self.maps.source_table().banned_until(source_key(i.net.addr()), now).is_none()
                } else {
                    self.maps.network_ban_until(i.net).ok().flatten().is_none_or(|u| u <= now)
                }
        });
        if incoming.is_empty() {
            return;
        }
        let sources: Vec<Install> = incoming
            .iter()
            .filter(|i| record::is_source(i.net))
            .map(|i| Install { key: source_key(i.net.addr()), until_ns: ktime_at(i.record.until_ms), strikes: i.record.strikes })
            .collect();
        self.maps.source_table().install(&sources, ban_origin::FLEET, ktime_now_ns);
        let networks: Vec<&Incoming> = incoming.iter().filter(|i| !record::is_source(i.net)).collect();
        if !networks.is_empty() {
            match BanLock::take(&self.pins.ban_lock_dir()) {
                Ok(lock) => {
                    for i in networks {
                        if let Err(e) = self.maps.install_network_ban(&lock, i.net, ktime_at(i.record.until_ms)) {
                            tracing::error!("fleet: installing the network ban {}: {e}", i.net);
                        }
                    }
                }
                Err(e) => tracing::error!("fleet: {e}"),
            }
        }
        let now = wall_ms();
        for i in &incoming {
            if i.own {
                continue;
            }
            self.installed.insert(i.net);
            self.m.received.with_label_values(&["installed"]).inc();
            if live {
                self.m.propagation.observe(now.saturating_sub(i.record.started_ms) as f64 / 1e3);
                tracing::debug!("fleet: installed {} from {} ({})", i.net, i.record.origin_host, i.record.origin);
            }
        }
        self.m.installed.set(self.installed.len() as i64);
    }

    /// Lifts this host's ban of `net` if it ends by `until_ms` (a longer
    /// one made here since stands).
    fn lift(&mut self, net: IpNet, until_ms: u64) {
        let until = ktime_at(until_ms + SLACK_MS);
        let lifted = if record::is_source(net) {
            self.maps.source_table().unban_ending_by(source_key(net.addr()), until, ktime_now_ns).unwrap_or(false)
        } else {
            BanLock::take(&self.pins.ban_lock_dir()).map_err(anyhow::Error::from).and_then(|lock| Ok(self.maps.unban_network_ending_by(&lock, net, until)?)).unwrap_or(false)
        };
        if lifted {
            self.m.lifted.inc();
            tracing::info!("fleet: lifted the ban of {net}: lifted fleet-wide");
        }
    }

    fn on_bans<'e>(&mut self, events: impl IntoIterator<Item = &'e etcd_client::Event>) {
        let mut batch = Batch::default();
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => self.accept(kv, &mut batch),
                EventType::Delete => {
                    let Ok(net) = record::parse_key_net(kv.key_str().unwrap_or(""), &record::bans_prefix(self.prefix())) else { continue };
                    self.installed.remove(&net);
                    batch.new.remove(&net);
                    batch.items.retain(|i| i.net != net);
                    // Lifted (`unban`, or by hand) well before its end: it
                    // ends here too, unless a longer ban was made here since.
                    // At its end (its lease) it ends here by itself.
                    if let Some(until_ms) = self.fleet.remove(&net) {
                        if until_ms > wall_ms() + SLACK_MS {
                            self.lift(net, until_ms);
                        }
                    }
                }
            }
        }
        self.install(batch.items, true);
        self.m.installed.set(self.installed.len() as i64);
    }

    fn on_unbans(&mut self, events: &[etcd_client::Event]) {
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            let key = kv.key_str().unwrap_or("");
            match ev.event_type() {
                EventType::Put => {
                    if let Ok((net, t)) = record::parse_tombstone(key, kv.value(), self.prefix()) {
                        self.lift(net, t.until_ms);
                        self.tombstones.insert(net, t);
                    }
                }
                EventType::Delete => {
                    if let Ok(net) = record::parse_key_net(key, &record::unbans_prefix(self.prefix())) {
                        self.tombstones.remove(&net);
                    }
                }
            }
        }
    }

    /// Sends this host's bans the fleet does not hold yet (or holds for
    /// less long): those the datapath and operators made, never those the
    /// fleet installed or a quarantine (which is about this host's tenants).
    async fn publish(&mut self, client: &mut Client) -> Result<()> {
        let (now_k, now_ms) = (ktime_now_ns(), wall_ms());
        let mut candidates = Vec::new();
        for (key, until, info) in self.maps.source_table().bans_in_force(now_k) {
            if matches!(info.origin, ban_origin::AUTO | ban_origin::ESCALATED | ban_origin::MANUAL) {
                candidates.push((key_net(key), until, origin_name(info.origin), info.strikes.max(1)));
            }
        }
        for (net, until) in self.maps.network_bans()? {
            candidates.push((net, until, "manual", 1));
        }
        let mut out = Vec::new();
        let mut lift = Vec::new();
        for (net, until, origin, strikes) in candidates {
            let until_ms = now_ms + (until.saturating_sub(now_k)) / 1_000_000;
            if until_ms < now_ms + SLACK_MS || self.fleet.get(&net).is_some_and(|u| u + SLACK_MS >= until_ms) {
                continue;
            }
            if let Some(t) = self.tombstones.get(&net).filter(|t| until_ms <= t.until_ms + SLACK_MS) {
                lift.push((net, t.until_ms));
                continue;
            }
            let reason = match origin {
                "auto" => "over the policy's new-connection ban threshold".to_owned(),
                "escalated" => format!("over the ban threshold again (strike {strikes})"),
                _ => format!("banned by an operator on {}", self.o.host_id),
            };
            let record = BanRecord {
                origin_host: self.o.host_id.clone(),
                origin: origin.to_owned(),
                reason,
                strikes,
                until: rfc3339_ms(until_ms),
                until_ms,
                started_ms: now_ms,
            };
            out.push((net, record));
        }
        for (net, until_ms) in lift {
            self.lift(net, until_ms);
        }
        for chunk in out.chunks(TXN_PUTS) {
            let mut ops = Vec::with_capacity(chunk.len());
            for (net, record) in chunk {
                let lease = self.lease_until(client, record.until_ms).await?;
                let value = serde_json::to_vec(record)?;
                ops.push(TxnOp::put(record::ban_key(self.prefix(), *net), value, Some(PutOptions::new().with_lease(lease))));
            }
            if let Err(e) = client.txn(Txn::new().and_then(ops)).await {
                self.m.published.with_label_values(&["failed"]).inc_by(chunk.len() as u64);
                return Err(e).context("sending bans to the fleet");
            }
            self.m.published.with_label_values(&["ok"]).inc_by(chunk.len() as u64);
            for (net, record) in chunk {
                self.fleet.insert(*net, record.until_ms);
            }
        }
        Ok(())
    }

    /// A lease that ends when a ban ending at `until_ms` does, shared by
    /// every ban ending in the same second.
    async fn lease_until(&mut self, client: &mut Client, until_ms: u64) -> Result<i64> {
        let end_s = until_ms.div_ceil(1000);
        if let Some(id) = self.leases.get(&end_s) {
            return Ok(*id);
        }
        let now_s = wall_ms() / 1000;
        self.leases.retain(|end, _| *end > now_s);
        let ttl = end_s.saturating_sub(now_s).max(2) as i64;
        let id = client.lease_grant(ttl, None).await.context("granting a ban's lease")?.id();
        self.leases.insert(end_s, id);
        Ok(id)
    }

    /// Fetches the fleet policy's current revision, if not offered yet,
    /// and hands it to the controller.
    async fn follow_policy(&mut self, client: &mut Client) -> Result<()> {
        let p = self.prefix().to_owned();
        let Some((revision, pointer)) = bundle::pointer(client, &p).await? else { return Ok(()) };
        if self.offered == Some(revision) {
            return Ok(());
        }
        if self.cache.applied().is_some_and(|(r, _)| r == revision) {
            self.offered = Some(revision);
            return Ok(());
        }
        self.offered = Some(revision);
        let stored = match bundle::fetch(client, &p, &pointer).await? {
            Ok(b) => self.cache.store(revision, &b).map_err(|e| format!("{e:#}")),
            Err(why) => Err(why),
        };
        match stored {
            Ok(policy_file) => {
                self.policy_error = None;
                tracing::info!("fleet: policy revision {revision} (pushed by {} at {}) fetched", pointer.pushed_by, pointer.pushed_at);
                let _ = self.offers.send(PolicyOffer { revision, policy_file });
            }
            Err(why) => {
                tracing::error!("fleet: policy revision {revision} cannot be used: {why}; the policy in force stays");
                self.m.policy_rejected.inc();
                self.policy_error = Some(format!("revision {revision}: {why}"));
            }
        }
        self.record_due = true;
        Ok(())
    }

    async fn put_record(&mut self, client: &mut Client, lease: i64, policy: &HostPolicy) -> Result<()> {
        let now = ktime_now_ns();
        let bans = self.maps.source_table().bans_in_force(now).len() as u64 + self.maps.network_bans().map(|b| b.len() as u64).unwrap_or(0);
        let mut policy = policy.clone();
        if self.policy_error.is_some() {
            policy.last_error = self.policy_error.clone();
        }
        let record = HostRecord {
            host: self.o.host_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            updated: clock::now_rfc3339(),
            policy,
            bans,
            fleet_bans: self.installed.len() as u64,
            refused: self.refused.clone(),
            last_refusal: self.last_refusal.clone(),
        };
        let key = format!("{}{}", record::hosts_prefix(self.prefix()), self.o.host_id);
        client.put(key, serde_json::to_vec(&record)?, Some(PutOptions::new().with_lease(lease))).await.context("writing the host's record")?;
        self.record_due = false;
        // Ended network bans hold room in the tries; this is as good a
        // moment as any to let it go.
        if let Ok(lock) = BanLock::take(&self.pins.ban_lock_dir()) {
            let _ = self.maps.prune_network_bans(&lock);
        }
        Ok(())
    }
}

/// The network a source table key stands for.
fn key_net(key: u64) -> IpNet {
    let (addr, len): (IpAddr, u8) = key_addr(key);
    IpNet::new(addr, len).expect("a source key's prefix is valid")
}
