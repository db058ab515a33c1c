//! What a policy asks that the nftables backend does only approximately,
//! named at the field that asks it (docs/nftables.md lists each, with the
//! test that shows it).

use std::path::Path;

use crate::policy::{
    model::Direction,
    yaml::{self, Kind, Node, Pos},
    Diagnostics, Policy,
};

/// The position of `path` (keys from the root), or of the deepest key on
/// the way that is written; the file's start when none is.
fn position(root: &Node, path: &[&str]) -> Pos {
    let mut node = root;
    let mut pos = Pos { line: 1, col: 1 };
    for key in path {
        let Kind::Map(fields) = &node.kind else { break };
        let Some((_, at, value)) = fields.iter().find(|(k, ..)| k == key) else { break };
        pos = *at;
        node = value;
    }
    pos
}

/// One difference per field of `policy` (read from `text`) that nftables
/// enforces differently, as warnings.
pub fn check(policy: &Policy, text: &str, file: &Path, diags: &mut Diagnostics) {
    let Ok(root) = yaml::parse(text) else { return };
    let mut say = |path: &[&str], message: &str| diags.warning(file, position(&root, path), &path.join("."), format!("nftables backend: {message}"));
    for (name, d) in [("ingress", &policy.ingress), ("egress", &policy.egress)] {
        direction(name, d, &mut say);
    }
    if policy.events.drop_sample_one_in != 0 {
        say(
            &["events", "drop_sample_one_in"],
            "no drop samples or rate-limit trip events (nftables has no per-packet event stream); bans started by the rate \
             meter are found by the controller within a second and reported as ban events",
        );
    }
}

fn direction(name: &str, d: &Direction, say: &mut impl FnMut(&[&str], &str)) {
    if d.smtp_block != 0 {
        say(
            &[name, "smtp_commands"],
            "a blocked command is matched only at the start of a segment's payload (VRFY or EXPN in any case, then a byte that \
             is not a letter or digit): a command after another in the same segment (pipelined), after leading spaces, split \
             across segments, or alone in a 4-byte segment passes; segments are not held back for order",
        );
    }
    if let Some(r) = &d.rate_limit {
        if r.ban_above_per_minute != 0 {
            say(
                &[name, "rate_limit", "ban_above_per_minute"],
                "the ban threshold is a token bucket per source (the threshold a minute, bursting to the threshold) instead of a \
                 sliding minute's count: a source that spreads its connections can send up to twice the threshold in its first minute",
            );
            if r.escalate_factor > 1 {
                say(
                    &[name, "rate_limit", "escalate"],
                    "a repeat offender's ban starts at the first length and is lengthened by the controller when it sees it (within a second)",
                );
            }
        }
    }
    say(
        &[name, "malformed"],
        "frames cut inside their IP or TCP header are not judged by nftables (they pass uncounted, and the host's stack drops them)",
    );
    if name == "egress" && d.established_reset {
        say(
            &[name, "established"],
            "the host's own connections (judged at the uplink's egress hook, where nftables cannot reject) are dropped, not reset; \
             tenants' are reset",
        );
    }
    if d.tenant_suspect.is_some() {
        say(&[name, "tenant_suspect"], "tenant suspects are not detected by the nftables backend (no per-source blocked-attempt windows)");
    }
}
