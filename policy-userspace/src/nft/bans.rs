//! Bans in the nftables backend: elements of the table's ban sets (a
//! source in `ban4`/`ban6`, a network in `netban4`/`netban6`), each with
//! its timeout and a comment saying where it came from. The rate meter's
//! rule adds bans without a comment; the controller finds them, counts the
//! source's strikes and writes them back with the escalated length.

use std::{borrow::Cow, net::IpAddr};

use ipnet::IpNet;
use nftables::{
    expr::{self, Expression, NamedExpression},
    schema::{Element, NfCmd, NfListObject},
    types::NfFamily,
};

use super::{apply, list, ruleset, NftError};

/// Where a ban came from, as its element's comment says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Added by the rate meter's rule, not yet seen by the controller.
    Meter,
    /// A rate ban the controller recorded: the source's `strikes`th.
    Auto { strikes: u32 },
    Manual { reason: Option<String> },
}

impl Origin {
    fn comment(&self) -> Option<String> {
        match self {
            Origin::Meter => None,
            Origin::Auto { strikes } => Some(format!("auto {strikes}")),
            Origin::Manual { reason: None } => Some("manual".into()),
            Origin::Manual { reason: Some(r) } => Some(format!("manual: {r}")),
        }
    }

    fn parse(comment: Option<&str>) -> Self {
        match comment {
            None => Origin::Meter,
            Some(c) => match c.strip_prefix("auto ").and_then(|n| n.parse().ok()) {
                Some(strikes) => Origin::Auto { strikes },
                None => Origin::Manual { reason: c.strip_prefix("manual: ").map(str::to_owned) },
            },
        }
    }

    /// The name `bans` and the metrics use.
    pub fn name(&self) -> &'static str {
        match self {
            Origin::Meter => "auto",
            Origin::Auto { strikes } if *strikes > 1 => "escalated",
            Origin::Auto { .. } => "auto",
            Origin::Manual { .. } => "manual",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ban {
    /// A source as an IPv4 /32 or an IPv6 /64; or a network.
    pub net: IpNet,
    /// Seconds left.
    pub expires_s: u64,
    pub origin: Origin,
}

/// A source's prefix length in the ban sets: IPv4 /32, IPv6 /64.
fn source_len(v4: bool) -> u8 {
    if v4 {
        32
    } else {
        64
    }
}

fn is_source(net: &IpNet) -> bool {
    net.prefix_len() == source_len(net.addr().is_ipv4())
}

fn set_of(net: &IpNet) -> &'static str {
    let v4 = net.addr().is_ipv4();
    if is_source(net) {
        ruleset::ban_set(v4)
    } else {
        ruleset::network_ban_set(v4)
    }
}

fn value(net: &IpNet) -> Expression<'static> {
    if is_source(net) {
        Expression::String(net.network().to_string().into())
    } else {
        Expression::Named(NamedExpression::Prefix(expr::Prefix {
            addr: Box::new(Expression::String(net.network().to_string().into())),
            len: net.prefix_len() as u32,
        }))
    }
}

fn element(net: &IpNet, elem: Expression<'static>) -> NfListObject<'static> {
    NfListObject::Element(Element { family: NfFamily::NetDev, table: ruleset::TABLE.into(), name: Cow::Borrowed(set_of(net)), elem: vec![elem].into() })
}

/// The commands that make `net` banned for `seconds` from now, replacing a
/// ban it has (one transaction: never unbanned in between).
fn replace_commands(net: &IpNet, seconds: u64, origin: &Origin, present: bool) -> Vec<ruleset::Command> {
    let mut out = Vec::new();
    if present {
        out.push(serde_json::to_value(NfCmd::Delete(element(net, value(net)))).expect("serializes"));
    }
    let elem = Expression::Named(NamedExpression::Elem(expr::Elem {
        val: Box::new(value(net)),
        timeout: Some(seconds.clamp(1, u32::MAX as u64) as u32),
        comment: origin.comment().map(Cow::Owned),
        ..expr::Elem::default()
    }));
    out.push(serde_json::to_value(NfCmd::Add(element(net, elem))).expect("serializes"));
    out
}

fn parse_net(v: &serde_json::Value) -> Option<IpNet> {
    if let Some(a) = v.as_str() {
        let addr: IpAddr = a.parse().ok()?;
        return IpNet::new(addr, source_len(addr.is_ipv4())).ok();
    }
    let p = v.get("prefix")?;
    let addr: IpAddr = p["addr"].as_str()?.parse().ok()?;
    IpNet::new(addr, p["len"].as_u64()? as u8).ok()
}

/// Every ban in force.
pub fn list_bans() -> Result<Vec<Ban>, NftError> {
    let mut out = Vec::new();
    for set in [ruleset::ban_set(true), ruleset::ban_set(false), ruleset::network_ban_set(true), ruleset::network_ban_set(false)] {
        for o in list(&["list", "set", "netdev", ruleset::TABLE, set])? {
            let Some(elems) = o.get("set").and_then(|s| s["elem"].as_array()) else { continue };
            for e in elems {
                let (val, expires, comment) = match e.get("elem") {
                    Some(el) => (&el["val"], el["expires"].as_u64().unwrap_or(0), el["comment"].as_str()),
                    None => (e, 0, None),
                };
                if let Some(net) = parse_net(val) {
                    out.push(Ban { net, expires_s: expires, origin: Origin::parse(comment) });
                }
            }
        }
    }
    Ok(out)
}

/// The IPv6 addresses the ban meter banned in the last minute.
pub fn recently_banned_v6() -> Result<Vec<std::net::Ipv6Addr>, NftError> {
    let mut out = Vec::new();
    for o in list(&["list", "set", "netdev", ruleset::TABLE, ruleset::banned_addresses_set(false)])? {
        let Some(elems) = o.get("set").and_then(|s| s["elem"].as_array()) else { continue };
        for e in elems {
            let v = e.get("elem").map_or(e, |el| &el["val"]);
            if let Some(a) = v.as_str().and_then(|a| a.parse().ok()) {
                out.push(a);
            }
        }
    }
    Ok(out)
}

/// Bans `net` for `seconds` (a manual or escalated ban), replacing any ban it has.
pub fn ban(net: IpNet, seconds: u64, origin: &Origin) -> Result<(), NftError> {
    let present = list_bans()?.iter().any(|b| b.net == net);
    apply(&replace_commands(&net, seconds, origin, present))
}

/// Writes many bans back at once (the controller's escalation pass).
pub fn rewrite(bans: &[(IpNet, u64, Origin)]) -> Result<(), NftError> {
    let commands: Vec<_> = bans.iter().flat_map(|(net, s, o)| replace_commands(net, *s, o, true)).collect();
    if commands.is_empty() {
        return Ok(());
    }
    apply(&commands)
}

/// Lifts the ban of `net`; `false` when it had none.
pub fn unban(net: IpNet) -> Result<bool, NftError> {
    if !list_bans()?.iter().any(|b| b.net == net) {
        return Ok(false);
    }
    apply(&[serde_json::to_value(NfCmd::Delete(element(&net, value(&net)))).expect("serializes")])?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_round_trip_through_their_comments() {
        for o in [Origin::Meter, Origin::Auto { strikes: 1 }, Origin::Auto { strikes: 3 }, Origin::Manual { reason: None }, Origin::Manual { reason: Some("abuse ticket 7".into()) }] {
            assert_eq!(Origin::parse(o.comment().as_deref()), o);
        }
    }
}
