//! The commands about a policy file: `check`, `explain`, `schema`.

use std::{io::Write, net::IpAddr, path::Path, process::ExitCode};

use policy_common::{direction, reason, verdict};

use crate::{
    nft::{self, Backend},
    policy::{self, load_and_compile, Diagnostics, ReadOptions},
    reference::{self, AclIndex, Packet, SourceState},
};

/// The kept diagnostics in file order, then a count of the rest per file.
fn print_diagnostics(diags: &Diagnostics) {
    let mut err = std::io::stderr().lock();
    let mut items: Vec<_> = diags.items.iter().collect();
    items.sort_by(|a, b| (&a.file, a.pos.line, a.pos.col).cmp(&(&b.file, b.pos.line, b.pos.col)));
    for d in items {
        let _ = writeln!(err, "{d}");
    }
    for s in diags.summaries() {
        let _ = writeln!(err, "{s}");
    }
}

pub fn check(path: &Path, options: &ReadOptions, backend: Backend) -> ExitCode {
    let (compiled, mut diags) = load_and_compile(path, options);
    if let (Some((policy, _)), Backend::Nftables) = (&compiled, backend) {
        if let Ok(text) = std::fs::read_to_string(path) {
            nft::differences::check(policy, &text, path, &mut diags);
        }
    }
    print_diagnostics(&diags);
    let Some((policy, c)) = compiled else {
        eprintln!("{}: {} error(s); the policy is not valid", path.display(), diags.error_count());
        return ExitCode::FAILURE;
    };
    let rules = policy.ingress.network_count() + policy.egress.network_count();
    println!(
        "{}: valid, {} warning(s): {} ports, {rules} rules, {} ACL entries ({} IPv4, {} IPv6){}",
        path.display(),
        diags.warning_count(),
        policy.ports.len(),
        c.entries(),
        c.v4.len(),
        c.v6.len(),
        if c.geo.networks_read > 0 {
            format!(", geo: {} networks read, {} kept after merging", c.geo.networks_read, c.geo.networks_kept)
        } else {
            String::new()
        }
    );
    ExitCode::SUCCESS
}

/// The ruleset `backend` would load for the policy at `path`.
pub fn render(path: &Path, options: &ReadOptions, backend: Backend, devices: &nft::Devices, json: bool) -> ExitCode {
    if backend != Backend::Nftables {
        eprintln!("smtpguard: render shows the nftables backend's ruleset; the eBPF backend's maps are shown by `explain` and `status`");
        return ExitCode::FAILURE;
    }
    let (compiled, diags) = policy::load_for_reload(path, options);
    print_diagnostics(&diags);
    let Some((_, c)) = compiled else {
        eprintln!("{}: {} error(s); the policy is not valid", path.display(), diags.error_count());
        return ExitCode::FAILURE;
    };
    let sizes = nft::Sizes { sources: policy_common::DEFAULT_SOURCE_CAPACITY };
    let state = nft::ruleset::state_sets(sizes, &Default::default()).unwrap_or_default();
    let document = nft::ruleset::document(&nft::ruleset::render(&c, devices));
    if json {
        println!("{document}");
        return ExitCode::SUCCESS;
    }
    match nft::print_in_scratch_namespace(&state, &document) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smtpguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The JSON Schema of policies, or of event lines.
pub fn schema(events: bool) -> ExitCode {
    let schema = if events { crate::events::schema() } else { policy::schema::schema() };
    println!("{}", serde_json::to_string_pretty(&schema).expect("schema serializes"));
    ExitCode::SUCCESS
}

pub struct ExplainArgs {
    pub direction: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub syn: bool,
    pub payload: Option<String>,
    pub json: bool,
}

pub fn explain(path: &Path, options: &ReadOptions, args: ExplainArgs) -> ExitCode {
    let (compiled, diags) = load_and_compile(path, options);
    if compiled.is_none() {
        print_diagnostics(&diags);
        return ExitCode::FAILURE;
    }
    let (_, c) = compiled.expect("checked above");
    if args.src.is_ipv4() != args.dst.is_ipv4() {
        eprintln!("--src and --dst must be the same address family");
        return ExitCode::FAILURE;
    }
    let payload = args.payload.clone().map(|p| p.replace("\\r", "\r").replace("\\n", "\n")).unwrap_or_default();
    let packet = Packet::new(args.direction, args.src, args.dst, args.dport, args.syn, payload.into_bytes());
    // A fresh source and the stream's first segment.
    let d = reference::decide(&c, &AclIndex::new(&c), &packet, SourceState::default(), None);
    // The peer is the source on ingress, the destination on egress; a rule
    // of the local side matched the other.
    let (peer, local) = if args.direction == direction::INGRESS { (args.src, args.dst) } else { (args.dst, args.src) };
    let rule = c.matching_network(d.rule, peer).or_else(|| c.matching_network(d.rule, local));
    let (verdict_name, reason_name) = match d.counted {
        Some((v, r)) => (verdict::NAMES[v as usize], reason::NAMES[r as usize]),
        None => ("pass", "not_guarded"),
    };
    if args.json {
        let out = serde_json::json!({
            "direction": direction::NAMES[args.direction as usize],
            "verdict": verdict_name,
            "reason": reason_name,
            "rule": rule.map(|r| &*r.id),
            "rule_origin": rule.map(|r| format!("{}:{}", r.origin.file.display(), r.origin.pos.line)),
            "country": c.country(d.country),
            "reset": d.reset,
            "port": args.dport,
            "assumes": "source not banned, tokens available, under the ban threshold",
        });
        println!("{out}");
    } else {
        println!("verdict: {verdict_name}");
        println!("reason:  {reason_name}");
        if let Some(r) = rule {
            println!("rule:    {} ({} {}, {}:{})", r.id, r.kind.name(), r.net, r.origin.file.display(), r.origin.pos.line);
        }
        if let Some(code) = c.country(d.country) {
            println!("country: {code}");
        }
        if d.reset {
            println!("reset:   the sender gets a TCP reset (a segment of an open connection; `established: reset`)");
        }
        if d.counted.is_none() {
            println!("(port {} is not guarded in this direction: the datapath lets it through uncounted)", args.dport);
        }
        println!("(assuming the source is not banned, has tokens and is under the ban threshold)");
    }
    ExitCode::SUCCESS
}
