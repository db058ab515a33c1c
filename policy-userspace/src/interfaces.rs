//! The interfaces smtpguard enforces on, as VMs come and go: the uplinks
//! and tenant interfaces the operator names or matches with glob patterns
//! (`--tenant 'tap*'`), attached as they appear and detached as they go,
//! followed through rtnetlink link notifications (no polling).
//!
//! Each attachment is a link pinned in the pin directory, so enforcement
//! outlives the controller. A link whose interface was deleted is
//! detached by the kernel; its pin is then stale and is removed, here as
//! the interface goes, or at the next start, where every link pin is
//! checked against the interfaces that exist (a pin of a deleted or
//! recreated interface, or of one no longer selected, is reported and
//! replaced). Tenant interfaces get a slot in `TENANT_STATS`, kept across
//! restarts while the interface lives.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use glob::Pattern;

use crate::{
    controller::XdpModeChoice,
    dataplane::{programs::pinned_link_ifindex, Dataplane, Hook},
    pins::Pins,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Uplink,
    Tenant,
}

impl Role {
    pub const fn name(self) -> &'static str {
        match self {
            Role::Uplink => "uplink",
            Role::Tenant => "tenant",
        }
    }

    /// The link pins an interface of this role holds.
    const fn link_kinds(self) -> &'static [&'static str] {
        match self {
            Role::Uplink => &["xdp", "tcegress"],
            Role::Tenant => &["tcingress"],
        }
    }
}

/// Which interfaces are uplinks and which tenants': names or glob
/// patterns (`*`, `?`, `[...]`). An interface both would select is an uplink.
#[derive(Clone, Debug)]
pub struct Selection {
    uplinks: Vec<Pattern>,
    tenants: Vec<Pattern>,
}

impl Selection {
    pub fn new(uplinks: &[String], tenants: &[String]) -> Result<Self> {
        let compile = |names: &[String], flag: &str| -> Result<Vec<Pattern>> {
            names.iter().map(|n| Pattern::new(n).with_context(|| format!("{flag} {n}: not a name or a glob pattern"))).collect()
        };
        Ok(Self { uplinks: compile(uplinks, "--uplink")?, tenants: compile(tenants, "--tenant")? })
    }

    pub fn role(&self, name: &str) -> Option<Role> {
        if self.uplinks.iter().any(|p| p.matches(name)) {
            Some(Role::Uplink)
        } else if self.tenants.iter().any(|p| p.matches(name)) {
            Some(Role::Tenant)
        } else {
            None
        }
    }

    /// Uplinks named without wildcards: each must be there, and its
    /// absence is an alarm, not a VM that stopped.
    pub fn named_uplinks(&self) -> impl Iterator<Item = &str> {
        self.uplinks.iter().map(Pattern::as_str).filter(|p| !p.contains(['*', '?', '[']))
    }
}

/// What happened to an interface: logged, sent as an event, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Attached { name: String, role: Role, ifindex: u32, adopted: bool },
    Detached { name: String, role: Role, why: &'static str },
    /// A named uplink that is not there: nothing judges what arrives on it.
    UplinkMissing { name: String },
    /// A pin left by an earlier run for an interface that is gone or was
    /// recreated: removed (and the interface, if it is selected, attached again).
    StalePin { pin: String, why: &'static str },
}

struct Attachment {
    ifindex: u32,
    role: Role,
    /// The tenant's `TENANT_STATS` slot (0 for uplinks).
    slot: u32,
}

/// An interface as status and metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceView {
    pub name: String,
    pub role: Role,
    pub ifindex: u32,
    /// 0 for uplinks.
    pub slot: u32,
}

pub struct Interfaces {
    selection: Selection,
    pins: Pins,
    xdp_mode: XdpModeChoice,
    attached: BTreeMap<String, Attachment>,
}

impl Interfaces {
    pub fn new(selection: Selection, pins: Pins, xdp_mode: XdpModeChoice) -> Self {
        Self { selection, pins, xdp_mode, attached: BTreeMap::new() }
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// Reconciles the pins of an earlier run with the interfaces that
    /// exist now (`links`: name, ifindex), then attaches every selected
    /// one. Nothing stale makes the start fail.
    pub fn start(&mut self, dp: &mut Dataplane, links: &[(String, u32)]) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        let name_of = |ifindex: u32| links.iter().find(|(_, i)| *i == ifindex).map(|(n, _)| n.as_str());
        for (kind, iface) in self.pins.links() {
            let path = self.pins.dir.join(format!("link_{kind}_{iface}"));
            let why = match pinned_link_ifindex(&path) {
                Err(_) => Some("it cannot be read"),
                Ok(0) => Some("its interface is gone (deleted, or deleted and created again)"),
                Ok(ifindex) => match name_of(ifindex).map(|n| self.selection.role(n)) {
                    None => Some("its interface is not in this network namespace"),
                    Some(None) => Some("its interface is no longer selected by --uplink or --tenant"),
                    Some(Some(role)) if !role.link_kinds().contains(&kind.as_str()) => Some("its interface now has another role"),
                    Some(Some(_)) => None,
                },
            };
            if let Some(why) = why {
                std::fs::remove_file(&path).with_context(|| format!("removing the stale pin {}", path.display()))?;
                changes.push(Change::StalePin { pin: path.display().to_string(), why });
            }
        }
        // Tenant slots of interfaces that are still tenants are kept, so
        // their counters carry on; the rest are released.
        let mut slots = BTreeMap::new();
        for (ifindex, slot) in dp.maps().tenant_slots()? {
            match name_of(ifindex).filter(|n| self.selection.role(n) == Some(Role::Tenant)) {
                Some(name) => {
                    slots.insert(name.to_owned(), slot);
                }
                None => dp.maps_mut().release_tenant(ifindex)?,
            }
        }
        for (name, ifindex) in links {
            let Some(role) = self.selection.role(name) else { continue };
            let kept = slots.get(name).copied();
            changes.push(self.attach(dp, name, *ifindex, role, kept)?);
        }
        for name in self.selection.named_uplinks() {
            if !self.attached.contains_key(name) {
                changes.push(Change::UplinkMissing { name: name.to_owned() });
            }
        }
        Ok(changes)
    }

    /// An interface appeared, or changed (a link notification).
    pub fn appeared(&mut self, dp: &mut Dataplane, name: &str, ifindex: u32) -> Result<Vec<Change>> {
        let Some(role) = self.selection.role(name) else { return Ok(Vec::new()) };
        let mut changes = Vec::new();
        match self.attached.get(name) {
            Some(a) if a.ifindex == ifindex => return Ok(changes),
            // The same name, another interface: the old one went unseen.
            Some(a) => {
                let old = a.ifindex;
                changes.extend(self.gone(dp, name, old)?);
            }
            None => {}
        }
        changes.push(self.attach(dp, name, ifindex, role, None)?);
        Ok(changes)
    }

    /// An interface went away.
    pub fn gone(&mut self, dp: &mut Dataplane, name: &str, ifindex: u32) -> Result<Option<Change>> {
        if self.attached.get(name).is_none_or(|a| a.ifindex != ifindex) {
            return Ok(None);
        }
        let a = self.attached.remove(name).expect("checked above");
        self.remove_pins(name, a.role)?;
        if a.role == Role::Tenant {
            dp.maps_mut().release_tenant(ifindex)?;
        }
        Ok(Some(match a.role {
            Role::Uplink if self.selection.named_uplinks().any(|n| n == name) => Change::UplinkMissing { name: name.to_owned() },
            role => Change::Detached { name: name.to_owned(), role, why: "the interface went away" },
        }))
    }

    fn remove_pins(&self, name: &str, role: Role) -> Result<()> {
        for kind in role.link_kinds() {
            let pin = self.pins.link(kind, name);
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing {}", pin.display())),
                _ => {}
            }
        }
        Ok(())
    }

    fn attach(&mut self, dp: &mut Dataplane, name: &str, ifindex: u32, role: Role, slot: Option<u32>) -> Result<Change> {
        let adopted = match role {
            Role::Uplink => {
                let adopted = self.attach_xdp(dp, name)?;
                let tc = self.pins.link("tcegress", name);
                dp.attach_tc_pinned(Hook::TcEgress, name, &tc).with_context(|| format!("attaching tc_egress to {name}"))? && adopted
            }
            Role::Tenant => {
                let tc = self.pins.link("tcingress", name);
                dp.attach_tc_pinned(Hook::TcIngress, name, &tc).with_context(|| format!("attaching tc_ingress to {name}"))?
            }
        };
        let slot = match role {
            Role::Uplink => 0,
            Role::Tenant => {
                let slot = slot.unwrap_or_else(|| self.free_slot());
                if slot == 0 {
                    bail!("no tenant slot is free for {name}: {} tenant interfaces at most", policy_common::TENANT_IFACES_CAPACITY);
                }
                dp.maps_mut().assign_tenant(ifindex, slot)?;
                slot
            }
        };
        self.attached.insert(name.to_owned(), Attachment { ifindex, role, slot });
        Ok(Change::Attached { name: name.to_owned(), role, ifindex, adopted })
    }

    /// The lowest slot no tenant holds; 0 when all are taken.
    fn free_slot(&self) -> u32 {
        let mut taken: Vec<u32> = self.attached.values().map(|a| a.slot).filter(|s| *s != 0).collect();
        taken.sort_unstable();
        let mut want = 1;
        for s in taken {
            if s == want {
                want += 1;
            } else if s > want {
                break;
            }
        }
        if want > policy_common::TENANT_IFACES_CAPACITY {
            0
        } else {
            want
        }
    }

    /// `xdp_ingress` on an uplink, natively where it can (in `auto` mode
    /// a failure falls back to generic XDP, loudly). Whether it adopted a
    /// pinned link.
    fn attach_xdp(&self, dp: &mut Dataplane, iface: &str) -> Result<bool> {
        let pin = self.pins.link("xdp", iface);
        let adopt = pin.exists();
        let modes: &[(XdpMode, &str)] = match self.xdp_mode {
            XdpModeChoice::Native => &[(XdpMode::Driver, "native")],
            XdpModeChoice::Generic => &[(XdpMode::Skb, "generic")],
            XdpModeChoice::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        };
        let mut last = None;
        for (mode, name) in modes {
            match dp.attach_xdp_pinned(iface, *mode, &pin) {
                Ok(adopted) => {
                    tracing::debug!("xdp_ingress on {iface} in {name} mode");
                    return Ok(adopted);
                }
                Err(e) if !adopt && self.xdp_mode == XdpModeChoice::Auto && *mode == XdpMode::Driver => {
                    tracing::warn!("native XDP on {iface} failed ({e}); falling back to generic XDP");
                    last = Some(e);
                }
                Err(e) => return Err(e).with_context(|| format!("attaching XDP to {iface}")),
            }
        }
        bail!("attaching XDP to {iface}: {}", last.map(|e| e.to_string()).unwrap_or_default())
    }

    /// The attached interfaces, by name.
    pub fn view(&self) -> Vec<InterfaceView> {
        self.attached.iter().map(|(name, a)| InterfaceView { name: name.clone(), role: a.role, ifindex: a.ifindex, slot: a.slot }).collect()
    }

    /// The name of an attached interface.
    pub fn name_of(&self, ifindex: u32) -> Option<&str> {
        self.attached.iter().find(|(_, a)| a.ifindex == ifindex).map(|(n, _)| n.as_str())
    }
}

/// Link notifications and dumps, as (name, ifindex, appeared) triples.
pub mod netlink {
    use futures_util::{Stream, StreamExt, TryStreamExt};
    use rtnetlink::{
        packet_core::{NetlinkMessage, NetlinkPayload},
        packet_route::{
            link::{LinkAttribute, LinkMessage},
            RouteNetlinkMessage,
        },
        MulticastGroup,
    };

    /// What a link message says: its name and index.
    fn name_index(m: &LinkMessage) -> Option<(String, u32)> {
        let name = m.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })?;
        Some((name, m.header.index))
    }

    /// A link appeared (or changed) or went away.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct LinkChange {
        pub name: String,
        pub ifindex: u32,
        pub present: bool,
    }

    /// Subscribes to link notifications, then lists the links that exist:
    /// a link created in between shows up in both, which the caller
    /// treats as one.
    pub async fn watch() -> std::io::Result<(Vec<(String, u32)>, impl Stream<Item = LinkChange> + Unpin)> {
        let (conn, handle, messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
        tokio::spawn(conn);
        let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(std::io::Error::other)?;
        let existing = links.iter().filter_map(name_index).collect();
        let changes = messages.filter_map(|(m, _): (NetlinkMessage<RouteNetlinkMessage>, _)| async move {
            let (link, present) = match m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => (l, true),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => (l, false),
                _ => return None,
            };
            let (name, ifindex) = name_index(&link)?;
            Some(LinkChange { name, ifindex, present })
        });
        Ok((existing, Box::pin(changes)))
    }
}
