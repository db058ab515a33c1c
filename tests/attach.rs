//! Attach tests: the programs on real veth interfaces between two network
//! namespaces, judged by real TCP connections to port 25.
//!
//! A client namespace holds an allowed and a denied source address; the
//! server namespace runs a TCP listener that greets every connection.
//! A connection succeeds when the greeting arrives; a dropped SYN shows as
//! a connect timeout, and the counters say why.

use std::net::IpAddr;

use anyhow::Result;
use aya::programs::XdpMode;
use policy_common::{direction, reason, side, stats_index, verdict};
use smtpguard::dataplane::Hook;
use smtpguard_tests::{
    fixtures::{entry, Harness},
    peers::{assert_dropped, assert_greeted, connect, Greeter},
    netns::{veth_pair, Netns},
    require_root,
};

const CLIENT_OK_V4: &str = "192.0.2.1";
const CLIENT_DENIED_V4: &str = "192.0.2.3";
const SERVER_V4: &str = "192.0.2.2";
const CLIENT_OK_V6: &str = "2001:db8::1";
const CLIENT_DENIED_V6: &str = "2001:db8::3";
const SERVER_V6: &str = "2001:db8::2";

/// Fields drop in order: the greeters stop while their namespace exists.
struct Lab {
    /// Held for their Drop, which stops them.
    _listeners: Vec<Greeter>,
    client: Netns,
    server: Netns,
}

fn lab() -> Result<Lab> {
    let client = Netns::new("cli")?;
    let server = Netns::new("srv")?;
    veth_pair(
        &client,
        "a0",
        &[&format!("{CLIENT_OK_V4}/24"), &format!("{CLIENT_DENIED_V4}/24"), &format!("{CLIENT_OK_V6}/64"), &format!("{CLIENT_DENIED_V6}/64")],
        &server,
        "b0",
        &[&format!("{SERVER_V4}/24"), &format!("{SERVER_V6}/64")],
    )?;
    let listeners = [25, 587].into_iter().map(|port| Greeter::start(&server, port)).collect::<Result<_>>()?;
    Ok(Lab { _listeners: listeners, client, server })
}

fn cell(h: &mut Harness, dir: u8, v: u8, r: u8, slot: usize) -> u64 {
    h.dp.stats().expect("stats")[stats_index(dir, v, r, slot) as usize].packets
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn xdp_ingress_judges_real_connections_by_map_contents() {
    require_root();
    let lab = lab().expect("building the lab");
    let mut h = Harness::load().expect("loading the datapath");
    for denied in [CLIENT_DENIED_V4, CLIENT_DENIED_V6] {
        let addr: IpAddr = denied.parse().unwrap();
        let len = if addr.is_ipv4() { 32 } else { 128 };
        h.add_acl(direction::INGRESS, side::PEER, addr, len, entry(0, 0, 22, 0)).unwrap();
    }
    lab.server.enter(|| h.dp.attach_unpinned(Hook::XdpIngress, "b0", XdpMode::Default)).unwrap().expect("attaching XDP");

    for (ok, denied, server) in [(CLIENT_OK_V4, CLIENT_DENIED_V4, SERVER_V4), (CLIENT_OK_V6, CLIENT_DENIED_V6, SERVER_V6)] {
        let denies = cell(&mut h, direction::INGRESS, verdict::DROP, reason::DENY_ACL, 0);
        let passes = cell(&mut h, direction::INGRESS, verdict::PASS, reason::DEFAULT_ALLOW, 0);
        assert_greeted(connect(&lab.client, ok, server, 25).unwrap(), &format!("{ok} -> {server}:25"));
        assert_dropped(connect(&lab.client, denied, server, 25).unwrap(), &format!("{denied} -> {server}:25"));
        assert!(cell(&mut h, direction::INGRESS, verdict::DROP, reason::DENY_ACL, 0) > denies, "deny not counted");
        assert!(cell(&mut h, direction::INGRESS, verdict::PASS, reason::DEFAULT_ALLOW, 0) > passes, "pass not counted");
    }

    // Remove the deny entries: the same source now gets through.
    h.reset().unwrap();
    assert_greeted(connect(&lab.client, CLIENT_DENIED_V4, SERVER_V4, 25).unwrap(), "after removing the deny (IPv4)");
    assert_greeted(connect(&lab.client, CLIENT_DENIED_V6, SERVER_V6, 25).unwrap(), "after removing the deny (IPv6)");
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn tc_egress_judges_real_connections_by_map_contents() {
    require_root();
    let lab = lab().expect("building the lab");
    let mut h = Harness::load().expect("loading the datapath");
    // The base egress policy denies 25; the first client holds an exemption.
    for ok in [CLIENT_OK_V4, CLIENT_OK_V6] {
        let addr: IpAddr = ok.parse().unwrap();
        let len = if addr.is_ipv4() { 32 } else { 128 };
        h.add_acl(direction::EGRESS, side::LOCAL, addr, len, entry(0, 11, 0, 0)).unwrap();
    }
    lab.client.enter(|| h.dp.attach_unpinned(Hook::TcEgress, "a0", XdpMode::Default)).unwrap().expect("attaching TC egress");

    for (ok, denied, server) in [(CLIENT_OK_V4, CLIENT_DENIED_V4, SERVER_V4), (CLIENT_OK_V6, CLIENT_DENIED_V6, SERVER_V6)] {
        let denies = cell(&mut h, direction::EGRESS, verdict::DROP, reason::DEFAULT_DENY, 0);
        let allows = cell(&mut h, direction::EGRESS, verdict::PASS, reason::ALLOW_ACL, 0);
        assert_greeted(connect(&lab.client, ok, server, 25).unwrap(), &format!("exempt {ok} -> {server}:25"));
        assert_dropped(connect(&lab.client, denied, server, 25).unwrap(), &format!("{denied} -> {server}:25"));
        assert_greeted(connect(&lab.client, denied, server, 587).unwrap(), &format!("{denied} -> {server}:587"));
        assert!(cell(&mut h, direction::EGRESS, verdict::DROP, reason::DEFAULT_DENY, 0) > denies, "deny not counted");
        assert!(cell(&mut h, direction::EGRESS, verdict::PASS, reason::ALLOW_ACL, 0) > allows, "exemption not counted");
    }

    // Take the exemption away: the first client is blocked too.
    h.reset().unwrap();
    assert_dropped(connect(&lab.client, CLIENT_OK_V4, SERVER_V4, 25).unwrap(), "after removing the exemption");
}
