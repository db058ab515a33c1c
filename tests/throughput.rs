//! `throughput`: drop rate of the same SYN flood to port 25 on a veth pair,
//! fresh namespaces for each mode: an XDP drop program (the floor),
//! smtpguard XDP (ACL drop and rate-limit drop) and TC, xdp-filter,
//! nftables (netdev ingress, inet prerouting), iptables raw + ipset +
//! hashlimit. The generator is `livegen` on one CPU; only ratios carry
//! over to real NICs.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::OwnedFd,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use policy_common::{direction, hook, reason, verdict};
use smtpguard::{
    dataplane::{Capacities, Dataplane, Hook},
    policy::Compiled,
};
use smtpguard_tests::{
    hvlab::Counters,
    livegen,
    netns::{veth_pair, Netns},
    packet::{TcpFrame, SYN},
    rng::Rng,
    testrun::XdpLink,
};

pub const PACKETS: u32 = 5_000_000;
const ROUNDS: usize = 3;
pub const ACL_ENTRIES: usize = 10_000;
const DUT_ADDR: &str = "10.99.0.2";
/// Never inside a generated CIDR: the rate-limited source.
pub const CLEAN_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);

/// `n` random IPv4 CIDRs of mixed prefix lengths (/8 to /32, weighted to
/// /16-/24 like real block lists), none containing [`CLEAN_SOURCE`].
pub fn random_cidrs(n: usize, seed: u64) -> Vec<ipnet::Ipv4Net> {
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = rng.next_u64();
        let len = [8, 12, 16, 18, 20, 22, 24, 24, 24, 26, 28, 32][(r % 12) as usize];
        let net = ipnet::Ipv4Net::new(Ipv4Addr::from((r >> 32) as u32), len).expect("valid length").trunc();
        if !net.contains(&CLEAN_SOURCE) && !net.contains(&DUT_ADDR.parse::<Ipv4Addr>().expect("address")) {
            out.push(net);
        }
    }
    out
}

/// The realistic policy: a 10,000-CIDR deny list, the whole real geo
/// database with a country block list, rate limits (without bans, so the
/// rate-limit mode keeps dropping by rate limit), VRFY/EXPN filter.
pub fn realistic_policy(dir: &Path, cidrs: &[ipnet::Ipv4Net]) -> Result<Compiled> {
    std::fs::create_dir_all(dir)?;
    let list: String = cidrs.iter().map(|c| format!("{c}\n")).collect();
    std::fs::write(dir.join("deny.txt"), list)?;
    let db = crate::geo_database()?;
    let yaml = format!(
        "version: 1\nports: {{25: smtp}}\ningress:\n  default: {{25: allow}}\n  deny_files: [deny.txt]\n  geo: {{database: {}, field: country_code, block: [KP, IR, SY, CU], unknown: allow}}\n  rate_limit: {{new_per_minute: 60, burst: 20}}\n  smtp_commands: {{block: [VRFY, EXPN]}}\negress:\n  default: {{25: deny}}\n",
        db.display()
    );
    let path = dir.join("policy.yaml");
    std::fs::write(&path, yaml)?;
    crate::compile_file(&path)
}

/// Runs `f` while xdp-tools' xdp-filter drops TCP port 25 on the DUT's
/// d0, then unloads it (and the pin directory libxdp made, if it did).
pub fn with_xdp_filter<T>(bed: &Bed, f: impl FnOnce() -> Result<T>) -> Result<T> {
    // libxdp keeps its dispatcher pins under /sys/fs/bpf/xdp.
    let libxdp_dir = Path::new("/sys/fs/bpf/xdp");
    let had_dir = libxdp_dir.exists();
    let r = bed
        .dut
        .exec(&["xdp-filter", "load", "-m", "native", "-f", "tcp,ipv4", "d0"])
        .and_then(|_| bed.dut.exec(&["xdp-filter", "port", "-p", "tcp", "25"]))
        .and_then(|_| f());
    let _ = bed.dut.exec(&["xdp-filter", "unload", "d0"]);
    if !had_dir {
        let _ = std::fs::remove_dir(libxdp_dir);
    }
    r
}

/// Two namespaces joined by a veth: the generator's g0, the DUT's d0.
pub struct Bed {
    gen: Netns,
    pub dut: Netns,
}

impl Bed {
    /// `gro`: for a DUT without an XDP program, which veth only feeds
    /// redirected frames with GRO on.
    pub fn new(gro: bool) -> Result<Self> {
        let gen = Netns::new("tpgen")?;
        let dut = Netns::new("tpdut")?;
        veth_pair(&gen, "g0", &["10.99.0.1/24"], &dut, "d0", &[&format!("{DUT_ADDR}/24")])?;
        // The frames' MACs (packet.rs): the DUT must see them as its own.
        gen.ip(&["link", "set", "g0", "address", "02:00:00:00:00:01"])?;
        dut.ip(&["link", "set", "d0", "address", "02:00:00:00:00:02"])?;
        dut.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.d0.rp_filter=0"])?;
        if gro {
            dut.exec(&["ethtool", "-K", "d0", "gro", "on"])?;
        }
        Ok(Self { gen, dut })
    }

    /// The generator program, redirecting to g0, warmed up.
    pub fn generator(&self, frame: &[u8]) -> Result<OwnedFd> {
        let ifindex = self.gen.enter(|| {
            // SAFETY: a valid C string.
            unsafe { libc::if_nametoindex(c"g0".as_ptr()) }
        })?;
        let generator = livegen::load_redirect(ifindex)?;
        self.send(&generator, frame, 10_000)?;
        Ok(generator)
    }

    /// Sends `count` frames into the DUT; the wall time it took.
    pub fn send(&self, generator: &OwnedFd, frame: &[u8], count: u32) -> Result<Duration> {
        self.gen.enter(|| livegen::send(generator, frame, count))?
    }

    /// Sends `PACKETS` frames `ROUNDS` times; the median Mpps and the
    /// share the DUT counted as dropped (by `dropped`).
    fn flood(&self, frame: &[u8], mut dropped: impl FnMut(&Bed) -> Result<u64>) -> Result<(f64, f64)> {
        let generator = self.generator(frame)?;
        let mut rates = Vec::new();
        let mut shares = Vec::new();
        for _ in 0..ROUNDS {
            let before = dropped(self)?;
            let took = self.send(&generator, frame, PACKETS)?;
            let after = dropped(self)?;
            rates.push(PACKETS as f64 / took.as_secs_f64() / 1e6);
            shares.push((after - before) as f64 / PACKETS as f64);
        }
        rates.sort_by(f64::total_cmp);
        shares.sort_by(f64::total_cmp);
        Ok((rates[ROUNDS / 2], shares[0]))
    }

    fn ethtool_stat(&self, name: &str) -> Result<u64> {
        let out = self.dut.exec(&["ethtool", "-S", "d0"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':')?.trim().parse::<u64>().ok())
            .reduce(|a, b| a + b)
            .with_context(|| format!("ethtool -S d0 has no {name}"))
    }

    fn xdp_drops(&self) -> Result<u64> {
        self.ethtool_stat("rx_queue_0_xdp_drops")
    }
}

pub fn syn_from(src: Ipv4Addr) -> Vec<u8> {
    TcpFrame::new(IpAddr::V4(src), DUT_ADDR.parse().expect("address"), 25, SYN).build()
}

pub struct Mode {
    pub name: &'static str,
    pub what: &'static str,
    pub mpps: f64,
    /// Lowest share of the sent frames the DUT counted as dropped.
    pub dropped: f64,
}

fn smtpguard_dataplane(compiled: &Compiled) -> Result<Dataplane> {
    let mut dp = Dataplane::load(Capacities::default(), None).context("loading the datapath")?;
    dp.install(0, compiled, 1)?;
    dp.activate(0, 0, 0);
    let (used, room) = dp.acl4_usage()?;
    eprintln!("  IPv4 ACL arrays: {} of {} nodes, {} of {} slots, {} of {} values", used.nodes, room.nodes, used.slots, room.slots, used.values, room.values);
    Ok(dp)
}

fn smtpguard_drops(dp: &mut Dataplane) -> Result<u64> {
    let c = Counters::from(dp.stats()?);
    Ok((0..reason::COUNT as u8).map(|r| c.packets(direction::INGRESS, verdict::DROP, r)).sum())
}

/// Sums `counter packets N` of an nft ruleset.
fn nft_counted(bed: &Bed) -> Result<u64> {
    let out = bed.dut.exec(&["nft", "list", "ruleset"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split("counter packets ").skip(1).filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok()).sum())
}

/// Drops smtpguard's nftables table counted on the ingress side.
fn smtpguard_nft_drops(bed: &Bed) -> Result<u64> {
    let counters = bed.dut.enter(smtpguard::nft::counters)??;
    Ok(smtpguard::nft::ruleset::counter_names()
        .into_iter()
        .filter(|(_, (dir, v, ..))| *dir == direction::INGRESS && *v == verdict::DROP)
        .map(|(name, _)| counters.get(&name).copied().unwrap_or(0))
        .sum())
}

/// The nftables equivalent: `cidrs` as an interval set dropped on port 25
/// and, with `rate`, a dynamic set limiting each source's SYNs to 60 a
/// minute (burst 20); in netdev ingress on d0 or inet prerouting.
pub fn nft_ruleset(family_hook: &str, cidrs: &[ipnet::Ipv4Net], rate: bool) -> String {
    let elements: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
    let (family, hook) = match family_hook {
        "netdev" => ("netdev", "type filter hook ingress device \"d0\" priority 0;"),
        _ => ("inet", "type filter hook prerouting priority -300;"),
    };
    let (rate_set, rate_rule) = if rate {
        (
            "  set rate4 { type ipv4_addr; size 65535; flags dynamic,timeout; timeout 1m; }\n",
            "    tcp dport 25 tcp flags & (syn | ack) == syn add @rate4 { ip saddr limit rate over 60/minute burst 20 packets } counter drop\n",
        )
    } else {
        ("", "")
    };
    format!(
        "table {family} sg {{\n  set deny4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}\n{rate_set}  chain c {{\n    {hook} policy accept;\n    ip saddr @deny4 tcp dport 25 counter drop\n{rate_rule}  }}\n}}\n",
        elements.join(", ")
    )
}

/// The iptables equivalent in `dut`: `cidrs` in an ipset dropped on port 25
/// in the raw table and, with `rate`, hashlimit at 60 SYNs a minute per source.
pub fn iptables_rules(dut: &Netns, work: &Path, cidrs: &[ipnet::Ipv4Net], rate: bool) -> Result<()> {
    let restore: String = std::iter::once("create sgdeny hash:net maxelem 2000000\n".to_owned()).chain(cidrs.iter().map(|c| format!("add sgdeny {c}\n"))).collect();
    let file = work.join("ipset.restore");
    std::fs::write(&file, restore)?;
    dut.exec(&["ipset", "-exist", "restore", "-file", &file.display().to_string()])?;
    dut.exec(&["iptables-legacy", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "25", "-m", "set", "--match-set", "sgdeny", "src", "-j", "DROP"])?;
    if rate {
        dut.exec(&[
            "iptables-legacy", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "25", "--syn", "-m", "hashlimit", "--hashlimit-above", "60/min",
            "--hashlimit-burst", "20", "--hashlimit-mode", "srcip", "--hashlimit-name", "sg25", "-j", "DROP",
        ])?;
    }
    Ok(())
}

fn iptables_counted(bed: &Bed) -> Result<u64> {
    let out = bed.dut.exec(&["iptables-legacy", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().skip(2).filter(|l| l.contains("DROP")).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum())
}

/// Every mode, in one run.
pub fn run_all(work: &Path, only: Option<&str>) -> Result<Vec<Mode>> {
    let cidrs = random_cidrs(ACL_ENTRIES, 0x5eed);
    let acl_source = Ipv4Addr::from(u32::from(cidrs[0].network()) | 1);
    let compiled = realistic_policy(&work.join("throughput"), &cidrs)?;
    let acl_frame = syn_from(acl_source);
    let rate_frame = syn_from(CLEAN_SOURCE);
    let mut modes = Vec::new();
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    let mut push = |name, what, (mpps, dropped): (f64, f64)| {
        eprintln!("  {name}: {mpps:.2} Mpps, {:.1}% dropped", dropped * 100.0);
        modes.push(Mode { name, what, mpps, dropped });
    };

    if wanted("floor") {
        let bed = Bed::new(false)?;
        let prog = livegen::load_xdp_drop()?;
        let link = XdpLink::attach(&bed.dut, "d0", &prog)?;
        push("floor", "XDP program that drops everything", bed.flood(&acl_frame, Bed::xdp_drops)?);
        drop(link);
    }
    for (name, what, frame) in [
        ("smtpguard_xdp_acl", "smtpguard XDP, source in the 10,000-CIDR deny list", &acl_frame),
        ("smtpguard_xdp_rate", "smtpguard XDP, one source over its rate limit", &rate_frame),
    ] {
        if !wanted(name) {
            continue;
        }
        let bed = Bed::new(false)?;
        let mut dp = smtpguard_dataplane(&compiled)?;
        bed.dut.enter(|| dp.attach_unpinned(Hook::XdpIngress, "d0", XdpMode::Driver))??;
        push(name, what, bed.flood(frame, Bed::xdp_drops)?);
        let judged = smtpguard_drops(&mut dp)?;
        if judged == 0 {
            bail!("{name}: smtpguard counted no drops");
        }
    }
    if wanted("smtpguard_tc") {
        let bed = Bed::new(true)?;
        let mut dp = smtpguard_dataplane(&compiled)?;
        let mut rt = dp.runtime();
        rt.hook_direction[hook::TC_INGRESS] = direction::INGRESS;
        dp.set_runtime(rt);
        bed.dut.enter(|| dp.attach_unpinned(Hook::TcIngress, "d0", XdpMode::Driver))??;
        let dp = std::cell::RefCell::new(dp);
        push("smtpguard_tc", "smtpguard TC ingress, source in the deny list", bed.flood(&acl_frame, |_| smtpguard_drops(&mut dp.borrow_mut()))?);
    }
    if wanted("xdp_filter") {
        let bed = Bed::new(false)?;
        let r = with_xdp_filter(&bed, || bed.flood(&acl_frame, Bed::xdp_drops));
        push("xdp_filter", "xdp-filter -f tcp,ipv4, port 25 (drops all of port 25: no ACL, no rate)", r?);
    }
    for (name, family, what) in [
        ("nft_netdev", "netdev", "nftables netdev ingress: interval set + dynamic-set limit"),
        ("nft_prerouting", "inet", "nftables inet prerouting (-300): the same rules"),
    ] {
        if !wanted(name) {
            continue;
        }
        let bed = Bed::new(true)?;
        let file = work.join(format!("{name}.nft"));
        std::fs::write(&file, nft_ruleset(family, &cidrs, true))?;
        bed.dut.exec(&["nft", "-f", &file.display().to_string()])?;
        push(name, what, bed.flood(&acl_frame, nft_counted)?);
    }
    if wanted("smtpguard_nftables") {
        let bed = Bed::new(true)?;
        let devices = smtpguard::nft::Devices { uplinks: vec!["d0".into()], tenants: Vec::new() };
        bed.dut.enter(|| smtpguard::nft::load(&compiled, smtpguard::nft::Sizes { sources: 65_536 }, &devices))??;
        let what = "smtpguard --backend nftables: the whole realistic policy, netdev ingress";
        push("smtpguard_nftables", what, bed.flood(&acl_frame, smtpguard_nft_drops)?);
    }
    if wanted("iptables_raw") {
        let bed = Bed::new(true)?;
        iptables_rules(&bed.dut, work, &cidrs, true)?;
        push("iptables_raw", "iptables-legacy raw: ipset hash:net + hashlimit", bed.flood(&acl_frame, iptables_counted)?);
    }
    Ok(modes)
}

