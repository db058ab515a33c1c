//! Warnings about rules that cannot do what their author meant: a rule
//! covered by a broader one with the same action never decides anything,
//! and an allow overlapping a deny means one of them loses.

use ipnet::IpNet;

use super::{
    diag::Diagnostics,
    model::{Policy, Rule},
};

/// Past this many, warnings are summarized in one line.
const MAX_WARNINGS: usize = 100;

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
    // Only the warnings shown are formatted: a big list file can shadow
    // itself a hundred thousand times, and every reload runs this.
    let mut found: Vec<(&Rule, String)> = Vec::new();
    let mut total = 0;
    let mut keep = |r, msg: &dyn Fn() -> String| {
        total += 1;
        if found.len() < MAX_WARNINGS {
            found.push((r, msg()));
        }
    };
    for (dir_name, d) in [("ingress", &policy.ingress), ("egress", &policy.egress)] {
        for side in [policy_common::side::PEER, policy_common::side::LOCAL] {
            let mut rules: Vec<&Rule> = d.rules.iter().filter(|r| r.side == side).collect();
            rules.sort_by_key(|r| key(&r.net));
            let mut stack: Vec<&Rule> = Vec::new();
            for r in rules {
                while stack.last().is_some_and(|a| !covers(&a.net, &r.net)) {
                    stack.pop();
                }
                let same = stack.iter().rev().find(|a| a.kind.is_allow() == r.kind.is_allow() && a.port_mask & r.port_mask == r.port_mask);
                if let Some(a) = same {
                    keep(r, &|| {
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
                    let (allow, deny) = if a.kind.is_allow() { (*a, r) } else { (r, *a) };
                    keep(r, &|| {
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
    for (r, msg) in found {
        diags.warning(&r.origin.file, r.origin.pos, "", msg);
    }
    if total > MAX_WARNINGS {
        diags.warning(&policy.file, Default::default(), "", format!("{} more rule warnings not shown", total - MAX_WARNINGS));
    }
}
