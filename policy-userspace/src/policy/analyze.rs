//! Warnings about rules that cannot do what their author meant: a rule
//! covered by a broader one with the same action never decides anything,
//! and an allow overlapping a deny means one of them loses.

use ipnet::IpNet;

use super::{
    diag::{Diagnostics, Severity},
    model::{Policy, RuleRef},
};

fn key(net: &IpNet) -> (bool, u128, u8) {
    match net {
        IpNet::V4(n) => (false, (u32::from(n.network()) as u128) << 96, n.prefix_len()),
        IpNet::V6(n) => (true, u128::from(n.network()), n.prefix_len()),
    }
}

fn covers(outer: &IpNet, inner: &IpNet) -> bool {
    outer.contains(inner)
}

fn ports_text(policy: &Policy, mask: u8) -> String {
    let ports: Vec<String> =
        policy.ports.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, g)| g.port.to_string()).collect();
    ports.join(", ")
}

pub fn warnings(policy: &Policy, diags: &mut Diagnostics) {
    // Only the warnings kept are formatted: a big list file can shadow
    // itself a hundred thousand times.
    let mut keep = |r: &RuleRef, msg: &dyn Fn() -> String| {
        if diags.is_full(Severity::Warning) {
            diags.count_more(Severity::Warning, r.file, 1);
        } else {
            diags.warning(r.file, r.pos, "", msg());
        }
    };
    for (dir_name, d) in [("ingress", &policy.ingress), ("egress", &policy.egress)] {
        for side in [policy_common::side::PEER, policy_common::side::LOCAL] {
            let mut rules: Vec<RuleRef> = d.networks().filter(|r| r.side == side).collect();
            rules.sort_by_key(|r| key(&r.net));
            let mut stack: Vec<RuleRef> = Vec::new();
            for r in rules {
                while stack.last().is_some_and(|a| !covers(&a.net, &r.net)) {
                    stack.pop();
                }
                let same = stack.iter().rev().find(|a| a.kind.is_allow() == r.kind.is_allow() && a.port_mask & r.port_mask == r.port_mask);
                if let Some(a) = same {
                    keep(&r, &|| {
                        format!(
                            "{dir_name} {} `{}` ({}) can never match: {} `{}` ({}) already covers it on the same ports",
                            r.kind.name(),
                            r.id,
                            r.net,
                            a.kind.name(),
                            a.id,
                            a.net
                        )
                    });
                }
                let opposite = stack.iter().rev().find(|a| a.kind.is_allow() != r.kind.is_allow() && a.port_mask & r.port_mask != 0);
                if let Some(a) = opposite {
                    let (allow, deny) = if a.kind.is_allow() { (a, &r) } else { (&r, a) };
                    keep(&r, &|| {
                        format!(
                            "{dir_name} allow `{}` ({}) and deny `{}` ({}) overlap on port {}: the allow wins there",
                            allow.id,
                            allow.net,
                            deny.id,
                            deny.net,
                            ports_text(policy, a.port_mask & r.port_mask)
                        )
                    });
                }
                stack.push(r);
            }
        }
    }
    let ids: std::collections::HashSet<&str> =
        [&policy.ingress, &policy.egress].iter().flat_map(|d| d.rules.iter().map(|r| &*r.id).chain(d.lists.iter().map(|l| &*l.id))).collect();
    if ids.len() >= policy_common::RULE_SLOTS as usize {
        diags.warning(
            &policy.file,
            crate::policy::yaml::Pos { line: 1, col: 1 },
            "",
            format!(
                "{} rule ids: the datapath counts hits for the first {} one by one and the rest together (`_beyond_cap`); list files count as one rule each",
                ids.len(),
                policy_common::RULE_SLOTS - 1
            ),
        );
    }
}
