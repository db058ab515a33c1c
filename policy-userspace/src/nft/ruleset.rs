//! The compiled policy as one nftables table (`netdev smtpguard`), built
//! with the `nftables` crate's types and loaded as one transaction.
//!
//! Layout (docs/nftables.md): a base chain per device and hook jumps to
//! the direction's chain, which dispatches on the guarded port to one chain
//! per port slot; there the steps of `reference::decide` follow in order,
//! each ending in a named counter per (direction, verdict, reason, slot)
//! and a verdict. Policy sets (allow, deny, geo) are flushed and refilled
//! by a reload; ban sets, rate meters and counters are only ever added to,
//! so a reload or a restart keeps them.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
};

use nftables::{
    expr::{self, BinaryOperation, Expression, NamedExpression, Payload, PayloadBase, PayloadField, PayloadRaw, SetItem, Verdict},
    schema::{self, Chain, NfCmd, NfListObject, Rule, SetFlag, SetType, SetTypeValue, Table},
    types::{NfChainType, NfFamily, NfHook},
    stmt::{self, JumpTarget, Match, Operator, Statement},

};
use policy_common::{direction, mode, profile, reason, reset_worthy, side, smtp_command, verdict, DirectionPolicy, MAX_PORTS};
use serde_json::Value;

use super::ranges::{self, Range};
use crate::policy::Compiled;

pub const TABLE: &str = "smtpguard";
const FAMILY: NfFamily = NfFamily::NetDev;
/// Before any other netdev chain of the host: the earliest netfilter hook.
const PRIORITY: i32 = -500;

/// Where the base chains attach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Devices {
    /// Arriving mail is judged at their ingress (ingress policy), the
    /// host's own at their egress (egress policy).
    pub uplinks: Vec<String>,
    /// What tenants send is judged at their interface's ingress (egress policy).
    pub tenants: Vec<String>,
}

/// Sizes of the sets the datapath fills, set explicitly (nftables caps a
/// set it grows itself at 65,535 elements unless told otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Banned sources per family, and sources followed by each rate meter.
    pub sources: u32,
}

/// The family-specific names of a rule.
#[derive(Clone, Copy, Debug)]
struct Fam {
    proto: &'static str,
    suffix: &'static str,
    addr: SetType,
}

const FAMILIES: [Fam; 2] = [Fam { proto: "ip", suffix: "4", addr: SetType::Ipv4Addr }, Fam { proto: "ip6", suffix: "6", addr: SetType::Ipv6Addr }];

pub fn direction_name(dir: u8) -> &'static str {
    if dir == direction::INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// The named counter of (direction, verdict, reason, slot); `None` slot:
/// no port in sight (a later fragment).
pub fn counter_name(dir: u8, v: u8, why: u8, slot: Option<usize>) -> String {
    let slot = slot.map_or("any".to_owned(), |s| format!("s{s}"));
    format!("{}_{}_{}_{slot}", direction_name(dir), verdict::NAMES[v as usize], reason::NAMES[why as usize])
}

/// What a named counter counts: direction, verdict, reason, port slot.
pub type CounterKey = (u8, u8, u8, Option<usize>);

/// Every counter name, with what it counts.
pub fn counter_names() -> Vec<(String, CounterKey)> {
    let mut out = Vec::new();
    for dir in [direction::INGRESS, direction::EGRESS] {
        for v in 0..verdict::COUNT as u8 {
            for why in 0..reason::COUNT as u8 {
                for slot in (0..MAX_PORTS).map(Some).chain([None]) {
                    out.push((counter_name(dir, v, why, slot), (dir, v, why, slot)));
                }
            }
        }
    }
    out
}

/// Counts resets sent, per direction.
pub fn resets_counter(dir: u8) -> String {
    format!("{}_resets", direction_name(dir))
}

pub fn ban_set(f4: bool) -> &'static str {
    if f4 {
        "ban4"
    } else {
        "ban6"
    }
}

/// The addresses the ban meter banned lately (IPv6 only: the ban set
/// holds the /64), so a ban's event names the address.
pub fn banned_addresses_set(f4: bool) -> &'static str {
    if f4 {
        "banned_addresses4"
    } else {
        "banned_addresses6"
    }
}

pub fn network_ban_set(f4: bool) -> &'static str {
    if f4 {
        "netban4"
    } else {
        "netban6"
    }
}

fn meter_set(dir: u8, kind: &str, f: Fam) -> String {
    format!("{}_{kind}{}", direction_name(dir), f.suffix)
}

/// Every policy set: (name, family), refilled by each reload.
fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_owned()))
}

fn field(protocol: &str, name: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField { protocol: protocol.to_owned().into(), field: name.to_owned().into() })))
}

fn raw_payload(base: PayloadBase, offset: u32, len: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(PayloadRaw { base, offset, len })))
}

fn matches(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// A source as the ban sets and meters key it: an IPv4 address, or an
/// IPv6 /64 (one host's addresses, as the eBPF source table keys them).
fn source_key(f: Fam) -> Expression<'static> {
    if f.suffix == "4" {
        field(f.proto, "saddr")
    } else {
        masked(field(f.proto, "saddr"), s("ffff:ffff:ffff:ffff::"))
    }
}

fn masked(left: Expression<'static>, mask: Expression<'static>) -> Expression<'static> {
    Expression::BinaryOperation(Box::new(BinaryOperation::AND(left, mask)))
}

fn in_set(left: Expression<'static>, set: &str) -> Statement<'static> {
    matches(left, Operator::EQ, s(&format!("@{set}")))
}

fn counter(name: &str) -> Statement<'static> {
    Statement::Counter(stmt::Counter::Named(Cow::Owned(name.to_owned())))
}

fn tcp_flags(mask: &[&str], value: &str) -> Statement<'static> {
    let mask = Expression::List(mask.iter().map(|f| s(f)).collect());
    matches(masked(field("tcp", "flags"), mask), Operator::EQ, s(value))
}

/// A new connection: SYN without ACK.
fn syn() -> Statement<'static> {
    tcp_flags(&["syn", "ack"], "syn")
}

fn ip_elem(f: Fam, a: u128) -> Expression<'static> {
    if f.suffix == "4" {
        s(&std::net::Ipv4Addr::from(a as u32).to_string())
    } else {
        s(&std::net::Ipv6Addr::from(a).to_string())
    }
}

/// A range as the smallest element nftables takes: an address, a prefix or a range.
fn range_elem(f: Fam, r: Range) -> Expression<'static> {
    if r.first == r.last {
        return ip_elem(f, r.first);
    }
    let size = r.last - r.first;
    if size.checked_add(1).is_some_and(|n| n.is_power_of_two() && r.first.is_multiple_of(n)) || (r.first == 0 && size == f_max(f)) {
        let bits = if f.suffix == "4" { 32 } else { 128 };
        let len = bits - (size.count_ones());
        return Expression::Named(NamedExpression::Prefix(expr::Prefix { addr: Box::new(ip_elem(f, r.first)), len }));
    }
    Expression::Range(Box::new(expr::Range { range: [ip_elem(f, r.first), ip_elem(f, r.last)] }))
}

fn f_max(f: Fam) -> u128 {
    if f.suffix == "4" {
        u32::MAX as u128
    } else {
        u128::MAX
    }
}

/// One nftables command, as JSON (see [`update_with_limit`] for why not
/// the crate's command type all the way).
pub type Command = Value;

fn cmd(c: NfCmd<'static>) -> Command {
    serde_json::to_value(c).expect("nftables commands serialize")
}

fn add(o: NfListObject<'static>) -> Command {
    cmd(NfCmd::Add(o))
}

/// `update @set { key limit rate over N/minute burst B packets }`: the
/// crate's set statement has no statement list, so the rule is built with
/// its types and the list added to its JSON.
fn update_with_limit(key: Expression<'static>, set: &str, per_minute: u32, burst: u32) -> (Statement<'static>, Value) {
    let placeholder = Statement::Set(stmt::Set { op: stmt::SetOp::Update, elem: key, set: format!("@{set}").into() });
    let limit = Statement::Limit(stmt::Limit {
        rate: per_minute,
        rate_unit: None,
        per: Some("minute".into()),
        burst: Some(burst),
        burst_unit: None,
        inv: Some(true),
    });
    (placeholder, serde_json::to_value(limit).expect("statements serialize"))
}

struct RuleBuf {
    chain: String,
    stmts: Vec<Statement<'static>>,
    /// Statement lists to add to the set statements, by index.
    limits: Vec<(usize, Value)>,
}

impl RuleBuf {
    fn new(chain: &str) -> Self {
        Self { chain: chain.to_owned(), stmts: Vec::new(), limits: Vec::new() }
    }

    fn push(mut self, s: Statement<'static>) -> Self {
        self.stmts.push(s);
        self
    }

    fn update(mut self, (s, limit): (Statement<'static>, Value)) -> Self {
        self.limits.push((self.stmts.len(), limit));
        self.stmts.push(s);
        self
    }

    fn into_command(self) -> Command {
        let rule = Rule { family: FAMILY, table: TABLE.into(), chain: self.chain.into(), expr: self.stmts.into(), ..Rule::default() };
        let mut v = add(NfListObject::Rule(rule));
        for (i, limit) in self.limits {
            v["add"]["rule"]["expr"][i]["set"]["stmt"] = Value::Array(vec![limit]);
        }
        v
    }
}

fn set_def(name: &str, f: Fam, flags: &[SetFlag]) -> NfListObject<'static> {
    NfListObject::Set(Box::new(schema::Set {
        family: FAMILY,
        table: TABLE.into(),
        name: name.to_owned().into(),
        set_type: SetTypeValue::Single(f.addr),
        flags: (!flags.is_empty()).then(|| flags.iter().copied().collect()),
        ..schema::Set::default()
    }))
}

fn chain_def(name: &str) -> NfListObject<'static> {
    NfListObject::Chain(Chain { family: FAMILY, table: TABLE.into(), name: name.to_owned().into(), ..Chain::default() })
}

fn base_chain_def(name: &str, hook: NfHook, device: &str) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family: FAMILY,
        table: TABLE.into(),
        name: name.to_owned().into(),
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(PRIORITY),
        dev: Some(device.to_owned().into()),
        ..Chain::default()
    })
}

/// The base chain of a device and hook: `ingress_<dev>` or `egress_<dev>`.
pub fn base_chain_name(hook_egress: bool, device: &str) -> String {
    format!("{}_{device}", if hook_egress { "hook_egress" } else { "hook_ingress" })
}

/// The sets the datapath fills (bans, rate meters) that are not `present`
/// yet, as nft's own syntax: they must be made `dynamic`, a flag nft 1.0's
/// JSON does not take (it adds it only to a set made in the same
/// transaction as a rule that fills it, so a later policy that starts
/// rate limiting would be refused). Made once, before the first policy;
/// never changed by a reload.
pub fn state_sets(sizes: Sizes, present: &HashSet<String>) -> Option<String> {
    let mut text = String::new();
    let mut define = |name: &str, f: Fam, flags: &str, timeout: &str| {
        if !present.contains(name) {
            let ty = if f.suffix == "4" { "ipv4_addr" } else { "ipv6_addr" };
            text += &format!("add set netdev {TABLE} {name} {{ type {ty}; size {}; flags {flags};{timeout} }}\n", sizes.sources);
        }
    };
    for f in FAMILIES {
        let v4 = f.suffix == "4";
        define(ban_set(v4), f, "dynamic,timeout", "");
        define(network_ban_set(v4), f, "interval,timeout", "");
        if !v4 {
            define(banned_addresses_set(v4), f, "dynamic,timeout", " timeout 1m;");
        }
        for dir in [direction::INGRESS, direction::EGRESS] {
            // Elements outlive their bucket's refill (a minute at most), then go.
            for kind in ["rate", "banmeter"] {
                define(&meter_set(dir, kind, f), f, "dynamic,timeout", " timeout 2m;");
            }
        }
    }
    (!text.is_empty()).then(|| format!("add table netdev {TABLE}\n{text}"))
}

/// The names of the sets the datapath fills.
pub fn state_set_names() -> Vec<String> {
    let mut out = Vec::new();
    for f in FAMILIES {
        let v4 = f.suffix == "4";
        out.push(ban_set(v4).to_owned());
        out.push(network_ban_set(v4).to_owned());
        if !v4 {
            out.push(banned_addresses_set(v4).to_owned());
        }
        for dir in [direction::INGRESS, direction::EGRESS] {
            for kind in ["rate", "banmeter"] {
                out.push(meter_set(dir, kind, f));
            }
        }
    }
    out
}

/// One way a direction is judged: its hook may reject (answer a denied
/// open connection with a reset) or not (an egress hook).
#[derive(Clone, Copy)]
struct Path {
    dir: u8,
    resets: bool,
}

/// The uplink's ingress and tenants' ingress judge with resets; the
/// uplink's egress (the host's own traffic) without.
const PATHS: [Path; 3] = [
    Path { dir: direction::INGRESS, resets: true },
    Path { dir: direction::EGRESS, resets: true },
    Path { dir: direction::EGRESS, resets: false },
];

impl Path {
    fn prefix(self) -> String {
        format!("{}{}", direction_name(self.dir), if self.resets { "" } else { "_noreset" })
    }

    fn family_chain(self, f: Fam) -> String {
        format!("{}_v{}", self.prefix(), f.suffix)
    }

    fn slot_chain(self, f: Fam, slot: usize) -> String {
        format!("{}_s{slot}", self.family_chain(f))
    }

    /// Where the peer map sends a source the geo-fence drops when the
    /// policy has local-side denies: those outrank the geo-fence.
    fn after_geo(self, f: Fam, slot: usize) -> String {
        format!("{}_geo", self.slot_chain(f, slot))
    }

    /// The chain that counts and applies `why`'s verdict.
    fn verdict_chain(self, f: Fam, slot: usize, why: u8) -> String {
        format!("{}_v_{}", self.slot_chain(f, slot), reason::NAMES[why as usize])
    }

    /// The peer map: address ranges to their class's chain.
    fn peer_map(self, f: Fam) -> String {
        format!("{}_peer", self.family_chain(f))
    }

    fn chains(self) -> Vec<String> {
        let mut out = vec![self.prefix()];
        for f in FAMILIES {
            out.push(self.family_chain(f));
            for slot in 0..MAX_PORTS {
                out.extend([self.slot_chain(f, slot), self.after_geo(f, slot)]);
                out.extend(GOTO_REASONS.iter().map(|why| self.verdict_chain(f, slot, *why)));
            }
        }
        out
    }
}

/// The reasons decided in a chain of their own (reached from a set or map).
const GOTO_REASONS: [u8; 4] = [reason::ALLOW_ACL, reason::BANNED, reason::DENY_ACL, reason::GEO];

/// The local side's allow set of a direction: (address range, guarded
/// port), looked up before the peer map (an allow outranks everything).
/// No verdicts in it: shared by the direction's paths.
fn local_allow_set(dir: u8, f: Fam) -> String {
    format!("{}_v{}_local_allow", direction_name(dir), f.suffix)
}

/// The local side's deny set of a direction and port slot.
fn local_deny_set(dir: u8, f: Fam, slot: usize) -> String {
    format!("{}_v{}_s{slot}_local_deny", direction_name(dir), f.suffix)
}

/// What a policy set or map holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SetKind {
    Addresses,
    AddressesAndPorts,
    VerdictMap,
}

/// Every policy set and map, refilled by each reload.
fn policy_sets() -> Vec<(String, Fam, SetKind)> {
    let mut out = Vec::new();
    for f in FAMILIES {
        for dir in [direction::INGRESS, direction::EGRESS] {
            out.push((local_allow_set(dir, f), f, SetKind::AddressesAndPorts));
            for slot in 0..MAX_PORTS {
                out.push((local_deny_set(dir, f, slot), f, SetKind::Addresses));
            }
        }
        for p in PATHS {
            out.push((p.peer_map(f), f, SetKind::VerdictMap));
        }
    }
    out
}

fn addr_type(f: Fam) -> &'static str {
    if f.suffix == "4" {
        "ipv4_addr"
    } else {
        "ipv6_addr"
    }
}

/// An interval map from addresses to verdicts (the crate's `Map` has no
/// verdict data type).
fn verdict_map_def(name: &str, f: Fam) -> Command {
    serde_json::json!({ "add": { "map": { "family": "netdev", "table": TABLE, "name": name, "type": addr_type(f), "map": "verdict", "flags": ["interval"] } } })
}

/// A set or map keyed by (address, port) intervals. The crate's `Map` has
/// no verdict data type, so these are written as nft's JSON names them.
fn concat_set_def(name: &str, f: Fam, verdicts: bool) -> Command {
    let mut def = serde_json::json!({ "family": "netdev", "table": TABLE, "name": name, "type": [addr_type(f), "inet_service"], "flags": ["interval"] });
    if verdicts {
        def["map"] = "verdict".into();
        serde_json::json!({ "add": { "map": def } })
    } else {
        serde_json::json!({ "add": { "set": def } })
    }
}

fn flush_chain(name: &str) -> Command {
    cmd(NfCmd::Flush(schema::FlushObject::Chain(Chain { family: FAMILY, table: TABLE.into(), name: name.to_owned().into(), ..Chain::default() })))
}

fn goto(target: &str) -> Statement<'static> {
    Statement::Goto(JumpTarget { target: target.to_owned().into() })
}

/// The table, its counters, policy sets, maps and chains, and the base
/// chains: `add` only, so loading it again changes nothing that holds.
pub fn skeleton(devices: &Devices, extra_chains: &[String]) -> Vec<Command> {
    let mut out = vec![add(NfListObject::Table(Table { family: FAMILY, name: TABLE.into(), handle: None }))];
    for (name, _) in counter_names() {
        out.push(add(NfListObject::Counter(schema::Counter { family: FAMILY, table: TABLE.into(), name: name.into(), ..schema::Counter::default() })));
    }
    for dir in [direction::INGRESS, direction::EGRESS] {
        out.push(add(NfListObject::Counter(schema::Counter { family: FAMILY, table: TABLE.into(), name: resets_counter(dir).into(), ..schema::Counter::default() })));
    }
    // Chains before the maps whose elements name them: nft resolves an
    // element's goto against what the batch made before the map.
    for p in PATHS {
        for chain in p.chains() {
            out.push(add(chain_def(&chain)));
        }
    }
    for chain in extra_chains {
        out.push(add(chain_def(chain)));
    }
    for (name, f, kind) in policy_sets() {
        out.push(match kind {
            SetKind::Addresses => add(set_def(&name, f, &[SetFlag::Interval])),
            SetKind::AddressesAndPorts => concat_set_def(&name, f, false),
            SetKind::VerdictMap if f.suffix == "4" => concat_set_def(&name, f, true),
            SetKind::VerdictMap => verdict_map_def(&name, f),
        });
    }
    out.extend(base_chains(devices));
    out
}

/// The base chains of `devices` and their one rule each.
pub fn base_chains(devices: &Devices) -> Vec<Command> {
    let mut out = Vec::new();
    let mut hook = |dev: &str, egress: bool, conditions: Vec<Statement<'static>>, target: String| {
        let name = base_chain_name(egress, dev);
        out.push(add(base_chain_def(&name, if egress { NfHook::Egress } else { NfHook::Ingress }, dev)));
        out.push(flush_chain(&name));
        let mut rule = RuleBuf::new(&name);
        for c in conditions {
            rule = rule.push(c);
        }
        out.push(rule.push(Statement::Jump(JumpTarget { target: target.into() })).into_command());
    };
    for up in &devices.uplinks {
        // The host's own traffic has a local socket; a tenant's, forwarded
        // out of the uplink, has none and was judged on arrival at its tap.
        let own = matches(Expression::Named(NamedExpression::Meta(expr::Meta { key: expr::MetaKey::Skuid })), Operator::GEQ, Expression::Number(0));
        hook(up, true, vec![own], PATHS[2].prefix());
    }
    // The ingress hooks' base chains get their path's entry rules
    // themselves (see `inline_entries`): one jump less per packet.
    for dev in devices.uplinks.iter().chain(&devices.tenants) {
        let name = base_chain_name(false, dev);
        out.push(add(base_chain_def(&name, NfHook::Ingress, dev)));
        out.push(flush_chain(&name));
    }
    out
}

/// Copies of the entry rules of the paths ingress hooks take, into the
/// base chain of each device: the uplinks' (ingress path) and the
/// tenants' (egress path).
fn inline_entries(rules: &[Command], devices: &Devices) -> Vec<Command> {
    let mut out = Vec::new();
    for (path, devs) in [(PATHS[0], &devices.uplinks), (PATHS[1], &devices.tenants)] {
        let entry = path.prefix();
        for rule in rules.iter().filter(|r| r.pointer("/add/rule/chain").and_then(Value::as_str) == Some(entry.as_str())) {
            for dev in devs {
                let mut copy = rule.clone();
                copy["add"]["rule"]["chain"] = base_chain_name(false, dev).into();
                out.push(copy);
            }
        }
    }
    out
}

/// The table, counters, sets, maps and chains made if missing, every chain
/// rewritten, and what each policy set and map must hold.
fn render_parts(c: &Compiled, devices: &Devices) -> (Vec<Command>, Vec<Fill>) {
    let (mut fills, mut classes, mut rules) = (Vec::new(), Vec::new(), Vec::new());
    for p in PATHS {
        rules.extend(path_rules(c, p, &mut fills, &mut classes));
    }
    let mut out = skeleton(devices, &classes);
    for p in PATHS {
        for chain in p.chains() {
            out.push(flush_chain(&chain));
        }
    }
    for chain in &classes {
        out.push(flush_chain(chain));
    }
    let inlined = inline_entries(&rules, devices);
    out.extend(rules);
    out.extend(inlined);
    (out, fills)
}

fn flush_set(name: &str, kind: SetKind) -> Command {
    if kind == SetKind::VerdictMap {
        serde_json::json!({ "flush": { "map": { "family": "netdev", "table": TABLE, "name": name } } })
    } else {
        cmd(NfCmd::Flush(schema::FlushObject::Set(Box::new(schema::Set { family: FAMILY, table: TABLE.into(), name: name.to_owned().into(), ..schema::Set::default() }))))
    }
}

/// The whole policy: the skeleton, then every chain rewritten and every
/// policy set and map flushed and refilled, in one transaction.
/// (The state sets come first, from [`state_sets`].)
pub fn render(c: &Compiled, devices: &Devices) -> Vec<Command> {
    let (mut out, fills) = render_parts(c, devices);
    for (name, _, kind) in policy_sets() {
        out.push(flush_set(&name, kind));
    }
    for fill in &fills {
        out.push(element_cmd("add", &fill.set, fill.family, &fill.items));
    }
    out
}

/// One element of a policy set or map, typed: cheap to compare, so a
/// reload sends only the elements that changed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Item {
    Addresses(Range),
    AddressesAndPort(Range, u32),
    /// A peer map's element: the chain it goes to.
    Goto(Range, std::sync::Arc<str>),
    /// The same, keyed by (address range, port).
    GotoPort(Range, u32, std::sync::Arc<str>),
}

impl Item {
    fn expr(&self, f: Fam) -> Expression<'static> {
        match self {
            Item::Addresses(r) => range_elem(f, *r),
            Item::AddressesAndPort(r, port) => concat_key(f, *r, *port),
            Item::Goto(r, target) => Expression::List(vec![range_elem(f, *r), Expression::Verdict(Verdict::Goto(JumpTarget { target: target.to_string().into() }))]),
            Item::GotoPort(r, port, target) => Expression::List(vec![concat_key(f, *r, *port), Expression::Verdict(Verdict::Goto(JumpTarget { target: target.to_string().into() }))]),
        }
    }
}

/// What one policy set or map is filled with.
#[derive(Clone, Debug)]
struct Fill {
    set: String,
    family: Fam,
    items: Vec<Item>,
}

fn element_cmd(op: &str, set: &str, f: Fam, items: &[Item]) -> Command {
    let elem: Vec<Expression<'static>> = items.iter().map(|i| i.expr(f)).collect();
    let object = NfListObject::Element(schema::Element { family: FAMILY, table: TABLE.into(), name: set.to_owned().into(), elem: elem.into() });
    cmd(if op == "delete" { NfCmd::Delete(object) } else { NfCmd::Add(object) })
}

/// What a step does with the packets it decides.
struct Step {
    dir: u8,
    slot: usize,
    monitor: bool,
    /// Answer a dropped segment of an open connection with a reset.
    resets: bool,
    family: Fam,
}

impl Step {
    /// The rules ending a step: `conditions`, then the counter and the verdict.
    fn decide(&self, chain: &str, conditions: Vec<Statement<'static>>, act: u8, why: u8) -> Vec<RuleBuf> {
        let rule = |extra: Vec<Statement<'static>>| {
            let mut r = RuleBuf::new(chain);
            for c in conditions.iter().cloned().chain(extra) {
                r = r.push(c);
            }
            r
        };
        self.finish(rule, act, why)
    }

    fn finish(&self, rule: impl Fn(Vec<Statement<'static>>) -> RuleBuf, act: u8, why: u8) -> Vec<RuleBuf> {
        let name = |v| counter_name(self.dir, v, why, Some(self.slot));
        if act == verdict::PASS {
            return vec![rule(vec![counter(&name(verdict::PASS)), Statement::Accept(None)])];
        }
        if self.monitor {
            return vec![rule(vec![counter(&name(verdict::WOULD_DROP)), Statement::Accept(None)])];
        }
        let mut out = Vec::new();
        if self.resets && reset_worthy(why) {
            // Not an open connection's segment (a SYN, above all): dropped
            // at once, without the reset rule's checks.
            out.push(rule(vec![
                matches(masked(field("tcp", "flags"), Expression::List(vec![s("syn"), s("rst"), s("ack")])), Operator::NEQ, s("ack")),
                counter(&name(verdict::DROP)),
                Statement::Drop(None),
            ]));
            // Plain headers only, as the eBPF programs: no IPv6 extension
            // header (a fragment's included) between the address and TCP.
            let plain = if self.family.suffix == "4" {
                matches(Expression::Named(NamedExpression::Meta(expr::Meta { key: expr::MetaKey::Protocol })), Operator::EQ, s("ip"))
            } else {
                matches(field("ip6", "nexthdr"), Operator::EQ, s("tcp"))
            };
            out.push(rule(vec![
                plain,
                tcp_flags(&["syn", "rst", "ack"], "ack"),
                counter(&name(verdict::DROP)),
                counter(&resets_counter(self.dir)),
                Statement::Reject(Some(stmt::Reject::new(Some(stmt::RejectType::TCPReset), None))),
            ]));
        }
        out.push(rule(vec![counter(&name(verdict::DROP)), Statement::Drop(None)]));
        out
    }
}

/// An (address range, port) key of a concatenated set.
fn concat_key(f: Fam, r: Range, port: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![range_elem(f, r), Expression::Number(port)]))
}

/// Every chain's rules and every set's elements of one path.
fn path_rules(c: &Compiled, p: Path, fills: &mut Vec<Fill>, class_chains: &mut Vec<String>) -> Vec<Command> {
    let dp = &c.config.direction[p.dir as usize];
    let mut out = Vec::new();
    let (peer_addr, local_addr) = if p.dir == direction::INGRESS { ("saddr", "daddr") } else { ("daddr", "saddr") };
    let peer_scope = policy_common::acl_scope(p.dir, side::PEER);
    let local_scope = policy_common::acl_scope(p.dir, side::LOCAL);
    let slots: Vec<usize> = (0..MAX_PORTS).filter(|&slot| dp.ports[slot] != policy_common::PORT_UNUSED).collect();
    // Only the first path of a direction fills the sets its paths share.
    let fills_shared = p.resets;
    let entry = p.prefix();
    // Each family's rules together, IPv4's first: a packet meets no rule
    // of the other family's beyond a compare.
    for f in FAMILIES {
        // A later fragment: counted, passed for the host to reassemble (its
        // first fragment was judged). First: nftables would read its first
        // bytes as ports.
        let later = if f.suffix == "4" {
            vec![
                matches(masked(field("ip", "frag-off"), Expression::Number(0x1fff)), Operator::NEQ, Expression::Number(0)),
                matches(field("ip", "protocol"), Operator::EQ, s("tcp")),
            ]
        } else {
            let frag = |name: &'static str| Expression::Named(NamedExpression::Exthdr(expr::Exthdr { name: "frag".into(), field: Some(name.into()), offset: None }));
            // The extension header walk only for IPv6 frames.
            let ip6 = matches(Expression::Named(NamedExpression::Meta(expr::Meta { key: expr::MetaKey::Protocol })), Operator::EQ, s("ip6"));
            vec![ip6, matches(frag("frag-off"), Operator::NEQ, Expression::Number(0)), matches(frag("nexthdr"), Operator::EQ, s("tcp"))]
        };
        let mut rule = RuleBuf::new(&entry);
        for c in later {
            rule = rule.push(c);
        }
        out.push(rule.push(counter(&counter_name(p.dir, verdict::PASS, reason::FRAGMENT, None))).push(Statement::Accept(None)).into_command());
        if slots.is_empty() {
            continue;
        }
        let split = |scope| if f.suffix == "4" { ranges::v4(&c.v4, scope) } else { ranges::v6(&c.v6, scope) };
        let (peer, local) = (split(peer_scope), split(local_scope));
        let with_local = dp.acl_sides & side::LOCAL_BIT != 0;
        let key = |addr: &str| Expression::Named(NamedExpression::Concat(vec![field(f.proto, addr), field("tcp", "dport")]));
        // Local allows: one lookup of (local address, port) before anything.
        let mut local_allow = Vec::new();
        for &slot in &slots {
            if with_local {
                for r in ranges::select(&local, |e| e.is_some_and(|e| e.allow_rule[slot] != 0)) {
                    local_allow.push((r, slot));
                }
            }
        }
        if !local_allow.is_empty() {
            if fills_shared {
                fills.push(Fill { set: local_allow_set(p.dir, f), family: f, items: local_allow.iter().map(|(r, slot)| Item::AddressesAndPort(*r, dp.ports[*slot])).collect() });
            }
            // Which slot's allow it was: per slot, a rule with the port.
            for &slot in &slots {
                if local_allow.iter().any(|(_, s)| *s == slot) {
                    out.push(
                        RuleBuf::new(&entry)
                            .push(in_set(key(local_addr), &local_allow_set(p.dir, f)))
                            .push(matches(field("tcp", "dport"), Operator::EQ, Expression::Number(dp.ports[slot])))
                            .push(goto(&p.verdict_chain(f, slot, reason::ALLOW_ACL)))
                            .into_command(),
                    );
                }
            }
        }
        // IPv4: the peer map is keyed by (address range, port), one lookup
        // on the hot path (nftables stores it as pipapo). IPv6: keyed by the
        // address alone, then the port in a class chain: pipapo expands an
        // IPv6 range into up to 254 prefixes (the whole geo database took
        // 299 MiB of kernel memory that way, 6.8 MiB so).
        if f.suffix == "4" {
        // The peer map: one lookup of (peer address, port) says allow, deny
        // or geo. (A denied source that is also banned counts as denied:
        // docs/nftables.md.)
        let country = |e: Option<&policy_common::AclEntry>| e.map_or(0, |e| e.country);
        let mut elements: Vec<(Range, u32, std::sync::Arc<str>)> = Vec::new();
        for &slot in &slots {
            let local_deny = with_local && local.iter().any(|(_, e)| e.is_some_and(|e| e.deny_rule[slot] != 0));
            // Named once per slot: a map of a million ranges names few chains.
            let (allow_to, deny_to): (std::sync::Arc<str>, std::sync::Arc<str>) = (p.verdict_chain(f, slot, reason::ALLOW_ACL).into(), p.verdict_chain(f, slot, reason::DENY_ACL).into());
            let geo_to: std::sync::Arc<str> = if local_deny { p.after_geo(f, slot) } else { p.verdict_chain(f, slot, reason::GEO) }.into();
            let target = |e: Option<&policy_common::AclEntry>| -> Option<&std::sync::Arc<str>> {
                match e {
                    Some(e) if e.allow_rule[slot] != 0 => Some(&allow_to),
                    Some(e) if e.deny_rule[slot] != 0 => Some(&deny_to),
                    _ if dp.geo_enabled != 0 && dp.geo_drops(country(e)) => Some(&geo_to),
                    _ => None,
                }
            };
            let port = dp.ports[slot];
            for (r, e) in &peer {
                let Some(t) = target(e.as_ref()) else { continue };
                match elements.last_mut() {
                    Some((last, lp, lt)) if *lp == port && std::sync::Arc::ptr_eq(lt, t) && last.last.checked_add(1) == Some(r.first) => last.last = r.last,
                    _ => elements.push((*r, port, t.clone())),
                }
            }
        }
        if !elements.is_empty() {
            let map = p.peer_map(f);
            fills.push(Fill { set: map.clone(), family: f, items: elements.into_iter().map(|(r, port, t)| Item::GotoPort(r, port, t)).collect() });
            out.push(RuleBuf::new(&entry).push(Statement::VerdictMap(stmt::VerdictMap { key: key(peer_addr), data: s(&format!("@{map}")) })).into_command());
        }
        } else {
        // The peer map: one lookup of the peer's address sends it to its
        // class: the chain that, by port, names the verdict (allow, deny or
        // geo) or the port's chain. Ranges alike share a class; a policy has
        // few. (A denied source that is also banned counts as denied:
        // docs/nftables.md.)
        let country = |e: Option<&policy_common::AclEntry>| e.map_or(0, |e| e.country);
        type Class = Vec<Option<std::sync::Arc<str>>>;
        let mut per_slot = Vec::new();
        for &slot in &slots {
            let local_deny = with_local && local.iter().any(|(_, e)| e.is_some_and(|e| e.deny_rule[slot] != 0));
            // Named once per slot: a map of a million ranges names few chains.
            let allow_to: std::sync::Arc<str> = p.verdict_chain(f, slot, reason::ALLOW_ACL).into();
            let deny_to: std::sync::Arc<str> = p.verdict_chain(f, slot, reason::DENY_ACL).into();
            let geo_to: std::sync::Arc<str> = if local_deny { p.after_geo(f, slot) } else { p.verdict_chain(f, slot, reason::GEO) }.into();
            per_slot.push((slot, allow_to, deny_to, geo_to));
        }
        let class_of = |e: Option<&policy_common::AclEntry>| -> Class {
            per_slot
                .iter()
                .map(|(slot, allow_to, deny_to, geo_to)| match e {
                    Some(e) if e.allow_rule[*slot] != 0 => Some(allow_to.clone()),
                    Some(e) if e.deny_rule[*slot] != 0 => Some(deny_to.clone()),
                    _ if dp.geo_enabled != 0 && dp.geo_drops(country(e)) => Some(geo_to.clone()),
                    _ => None,
                })
                .collect()
        };
        let mut classes: HashMap<Class, std::sync::Arc<str>> = HashMap::new();
        let mut class_list: Vec<(Class, std::sync::Arc<str>)> = Vec::new();
        let mut elements: Vec<(Range, std::sync::Arc<str>)> = Vec::new();
        for (r, e) in &peer {
            let class = class_of(e.as_ref());
            if class.iter().all(Option::is_none) {
                continue;
            }
            let name = match classes.get(&class) {
                Some(n) => n.clone(),
                None => {
                    let n: std::sync::Arc<str> = format!("{}_c{}", p.family_chain(f), class_list.len()).into();
                    classes.insert(class.clone(), n.clone());
                    class_list.push((class, n.clone()));
                    n
                }
            };
            match elements.last_mut() {
                Some((last, lt)) if std::sync::Arc::ptr_eq(lt, &name) && last.last.checked_add(1) == Some(r.first) => last.last = r.last,
                _ => elements.push((*r, name)),
            }
        }
        for (class, name) in &class_list {
            let by_port = slots
                .iter()
                .zip(class)
                .map(|(&slot, target)| {
                    let to = target.as_ref().map_or_else(|| p.slot_chain(f, slot), |t| t.to_string());
                    SetItem::Mapping(Expression::Number(dp.ports[slot]), Expression::Verdict(Verdict::Goto(JumpTarget { target: to.into() })))
                })
                .collect();
            out.push(
                RuleBuf::new(name)
                    .push(Statement::VerdictMap(stmt::VerdictMap { key: field("tcp", "dport"), data: Expression::Named(NamedExpression::Set(by_port)) }))
                    .into_command(),
            );
            class_chains.push(name.to_string());
        }
        if !elements.is_empty() {
            let map = p.peer_map(f);
            fills.push(Fill { set: map.clone(), family: f, items: elements.into_iter().map(|(r, t)| Item::Goto(r, t)).collect() });
            out.push(RuleBuf::new(&entry).push(Statement::VerdictMap(stmt::VerdictMap { key: field(f.proto, peer_addr), data: s(&format!("@{map}")) })).into_command());
        }
        }
        // Anything else on a guarded port: its slot's chain.
        let targets = slots.iter().map(|&slot| SetItem::Mapping(Expression::Number(dp.ports[slot]), Expression::Verdict(Verdict::Goto(JumpTarget { target: p.slot_chain(f, slot).into() })))).collect();
        let protocol = matches(Expression::Named(NamedExpression::Meta(expr::Meta { key: expr::MetaKey::Protocol })), Operator::EQ, s(f.proto));
        out.push(
            RuleBuf::new(&entry)
                .push(protocol)
                .push(Statement::VerdictMap(stmt::VerdictMap { key: field("tcp", "dport"), data: Expression::Named(NamedExpression::Set(targets)) }))
                .into_command(),
        );
        for &slot in &slots {
            let step = Step { dir: p.dir, slot, monitor: dp.mode == mode::MONITOR, resets: p.resets && dp.established_reset != 0, family: f };
            let local_deny = if with_local { ranges::select(&local, |e| e.is_some_and(|e| e.deny_rule[slot] != 0)) } else { Vec::new() };
            if fills_shared && !local_deny.is_empty() {
                fills.push(Fill { set: local_deny_set(p.dir, f, slot), family: f, items: local_deny.iter().map(|r| Item::Addresses(*r)).collect() });
            }
            out.extend(slot_rules(p, f, slot, dp, &step, !local_deny.is_empty(), local_addr));
        }
    }
    out
}

/// A slot's chains: its verdicts, what follows a geo drop where local
/// denies outrank it, and what a packet with no ACL entry meets.
fn slot_rules(p: Path, f: Fam, slot: usize, dp: &DirectionPolicy, step: &Step, local_deny: bool, local_addr: &str) -> Vec<Command> {
    let chain = p.slot_chain(f, slot);
    let verdict_chain = |why| p.verdict_chain(f, slot, why);
    let mut rules: Vec<RuleBuf> = Vec::new();
    for (why, act) in [(reason::ALLOW_ACL, verdict::PASS), (reason::BANNED, verdict::DROP), (reason::DENY_ACL, verdict::DROP), (reason::GEO, verdict::DROP)] {
        rules.extend(step.decide(&verdict_chain(why), vec![], act, why));
    }
    let local_deny_rule = |chain: &str| {
        local_deny.then(|| RuleBuf::new(chain).push(in_set(field(f.proto, local_addr), &local_deny_set(p.dir, f, slot))).push(goto(&verdict_chain(reason::DENY_ACL))))
    };
    let after_geo = p.after_geo(f, slot);
    rules.extend(local_deny_rule(&after_geo));
    rules.push(RuleBuf::new(&after_geo).push(goto(&verdict_chain(reason::GEO))));
    // No ACL entry: the bans, the local deny, then the rest.
    let v4 = f.suffix == "4";
    rules.push(RuleBuf::new(&chain).push(in_set(field(f.proto, "saddr"), network_ban_set(v4))).push(goto(&verdict_chain(reason::BANNED))));
    rules.push(RuleBuf::new(&chain).push(in_set(source_key(f), ban_set(v4))).push(goto(&verdict_chain(reason::BANNED))));
    rules.extend(local_deny_rule(&chain));
    rules.extend(rest_rules(&chain, f, slot, dp, step));
    rules.into_iter().map(RuleBuf::into_command).collect()
}

/// What follows the ACL, bans and geo-fence: the rate meters on new
/// connections, the first-fragment rule, the command filter, the default.
fn rest_rules(chain: &str, f: Fam, slot: usize, dp: &DirectionPolicy, step: &Step) -> Vec<RuleBuf> {
    let mut rules = Vec::new();
    let dir = step.dir;
    let v4 = f.suffix == "4";
    if dp.rate_enabled != 0 {
        let key = || source_key(f);
        if dp.ban_threshold != 0 {
            let ban = Statement::Set(stmt::Set {
                op: stmt::SetOp::Add,
                elem: Expression::Named(NamedExpression::Elem(expr::Elem { val: Box::new(key()), timeout: Some(dp.ban_base_s.max(1)), ..expr::Elem::default() })),
                set: format!("@{}", ban_set(v4)).into(),
            });
            // The address itself, for the ban's event: the ban set keeps an IPv6 source's /64.
            let seen = Statement::Set(stmt::Set { op: stmt::SetOp::Add, elem: field(f.proto, "saddr"), set: format!("@{}", banned_addresses_set(v4)).into() });
            let rule = |extra: Vec<Statement<'static>>| {
                let mut r = RuleBuf::new(chain).push(syn()).update(update_with_limit(key(), &meter_set(dir, "banmeter", f), dp.ban_threshold, dp.ban_threshold)).push(ban.clone());
                if !v4 {
                    r = r.push(seen.clone());
                }
                for e in extra {
                    r = r.push(e);
                }
                r
            };
            rules.extend(step.finish(rule, verdict::DROP, reason::RATE_BAN));
        }
        if let Some(per_minute) = 60_000_000_000u64.checked_div(dp.rate_interval_ns) {
            let per_minute = per_minute.max(1) as u32;
            let burst = (dp.rate_tolerance_ns / dp.rate_interval_ns + 1) as u32;
            let rule = |extra: Vec<Statement<'static>>| {
                let mut r = RuleBuf::new(chain).push(syn()).update(update_with_limit(key(), &meter_set(dir, "rate", f), per_minute, burst));
                for e in extra {
                    r = r.push(e);
                }
                r
            };
            rules.extend(step.finish(rule, verdict::DROP, reason::RATE_LIMITED));
        }
    }
    let filtered = dp.profile[slot] == profile::SMTP && dp.smtp_block != 0;
    if filtered && dp.fragment_verdict == verdict::DROP && dp.default_verdict[slot] != verdict::DROP {
        // A first fragment: offset 0, more to come.
        let first = if v4 {
            vec![matches(masked(field("ip", "frag-off"), Expression::Number(0x3fff)), Operator::EQ, Expression::Number(0x2000))]
        } else {
            let frag = |name: &'static str| Expression::Named(NamedExpression::Exthdr(expr::Exthdr { name: "frag".into(), field: Some(name.into()), offset: None }));
            vec![matches(frag("frag-off"), Operator::EQ, Expression::Number(0)), matches(frag("more-fragments"), Operator::EQ, Expression::Number(1))]
        };
        rules.extend(step.decide(chain, first, verdict::DROP, reason::FRAGMENT));
    }
    if filtered {
        for (bit, verb) in [(smtp_command::VRFY, *b"VRFY"), (smtp_command::EXPN, *b"EXPN")] {
            if dp.smtp_block & bit == 0 {
                continue;
            }
            // The verb at the payload's start, any case, then a byte that
            // is not a letter or digit.
            let word = matches(masked(raw_payload(PayloadBase::IH, 0, 32), Expression::Number(0xdfdf_dfdf)), Operator::EQ, Expression::Number(u32::from_be_bytes(verb)));
            let alnum = [(0x30, 0x39), (0x41, 0x5a), (0x61, 0x7a)]
                .into_iter()
                .map(|(a, b)| SetItem::Element(Expression::Range(Box::new(expr::Range { range: [Expression::Number(a), Expression::Number(b)] }))))
                .collect();
            let ends = matches(raw_payload(PayloadBase::IH, 32, 8), Operator::NEQ, Expression::Named(NamedExpression::Set(alnum)));
            rules.extend(step.decide(chain, vec![word, ends], verdict::DROP, reason::SMTP_COMMAND));
        }
    }
    if dp.default_verdict[slot] == verdict::DROP {
        rules.extend(step.decide(chain, vec![], verdict::DROP, reason::DEFAULT_DENY));
    } else {
        rules.extend(step.decide(chain, vec![], verdict::PASS, reason::DEFAULT_ALLOW));
    }
    rules
}

/// The commands as one nftables JSON document.
pub fn document(commands: &[Command]) -> String {
    serde_json::json!({ "nftables": commands }).to_string()
}

/// What the policy sets and maps hold after a load, by set.
#[derive(Clone, Debug, Default)]
pub struct Elements(std::collections::BTreeMap<String, Fill>);

impl Elements {
    pub fn len(&self) -> usize {
        self.0.values().map(|f| f.items.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn elements(fills: Vec<Fill>) -> Elements {
    let mut out = Elements::default();
    for f in fills {
        match out.0.get_mut(&f.set) {
            Some(have) => have.items.extend(f.items),
            None => {
                out.0.insert(f.set.clone(), f);
            }
        }
    }
    out
}

/// A reload as an update of what `previous` loaded: chains rewritten as in
/// a full render, but each policy set and map only told what changed
/// (deletes first, so a range that moves never overlaps itself). One
/// transaction still; a one-rule edit of a 100,000-entry policy sends a
/// few elements instead of all of them. Returns the commands and what the
/// sets hold after them.
pub fn render_update(c: &Compiled, devices: &Devices, previous: &Elements) -> (Vec<Command>, Elements) {
    let (mut out, fills) = render_parts(c, devices);
    let next = elements(fills);
    let (mut deletes, mut adds) = (Vec::new(), Vec::new());
    let names: std::collections::BTreeSet<&String> = previous.0.keys().chain(next.0.keys()).collect();
    for name in names {
        let (old, new) = (previous.0.get(name.as_str()), next.0.get(name.as_str()));
        let family = old.or(new).expect("one of them names it").family;
        let old_items: HashSet<&Item> = old.iter().flat_map(|f| &f.items).collect();
        let new_items: HashSet<&Item> = new.iter().flat_map(|f| &f.items).collect();
        let gone: Vec<Item> = old.iter().flat_map(|f| &f.items).filter(|i| !new_items.contains(i)).cloned().collect();
        let came: Vec<Item> = new.iter().flat_map(|f| &f.items).filter(|i| !old_items.contains(i)).cloned().collect();
        if !gone.is_empty() {
            deletes.push(element_cmd("delete", name, family, &gone));
        }
        if !came.is_empty() {
            adds.push(element_cmd("add", name, family, &came));
        }
    }
    out.extend(deletes);
    out.extend(adds);
    (out, next)
}

/// What a full render loads into the sets.
pub fn elements_of(c: &Compiled, devices: &Devices) -> Elements {
    elements(render_parts(c, devices).1)
}

