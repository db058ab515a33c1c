//! What the `smtpguard` subcommands do; `main.rs` only parses arguments.

use std::{io::Write, net::IpAddr, path::Path, process::ExitCode};

use policy_common::{direction, reason, verdict};

use crate::{
    model::{self, AclIndex, Packet, SourceState},
    policy::{self, analyze, time, Compiled, Diagnostics, LoadOptions, Policy},
};

/// Loads, validates, analyzes and compiles a policy: everything `check` does.
pub fn load_and_compile(path: &Path, options: &LoadOptions) -> (Option<(Policy, Compiled)>, Diagnostics) {
    let (policy, mut diags) = policy::load_file(path, options);
    let Some(policy) = policy else { return (None, diags) };
    analyze::warnings(&policy, &mut diags);
    let today = options.today.unwrap_or_else(time::today);
    match policy::compile(&policy, today) {
        Ok(c) => (Some((policy, c)), diags),
        Err(e) => {
            diags.error(path, Default::default(), "", e.to_string());
            (None, diags)
        }
    }
}

fn print_diagnostics(diags: &Diagnostics) {
    let mut err = std::io::stderr().lock();
    let mut items: Vec<_> = diags.items.iter().collect();
    items.sort_by(|a, b| (&a.file, a.pos.line, a.pos.col).cmp(&(&b.file, b.pos.line, b.pos.col)));
    for d in items {
        let _ = writeln!(err, "{d}");
    }
}

pub fn check(path: &Path, options: &LoadOptions) -> ExitCode {
    let (compiled, diags) = load_and_compile(path, options);
    print_diagnostics(&diags);
    let Some((policy, c)) = compiled else {
        eprintln!("{}: {} error(s); the policy is not valid", path.display(), diags.errors().count());
        return ExitCode::FAILURE;
    };
    let rules = policy.ingress.rules.len() + policy.egress.rules.len();
    println!(
        "{}: valid, {} warning(s): {} ports, {rules} rules, {} ACL entries ({} IPv4, {} IPv6){}",
        path.display(),
        diags.warnings().count(),
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

pub fn schema() -> ExitCode {
    println!("{}", serde_json::to_string_pretty(&policy::schema::schema()).expect("schema serializes"));
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

pub fn explain(path: &Path, options: &LoadOptions, args: ExplainArgs) -> ExitCode {
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
    let packet = Packet { direction: args.direction, src: args.src, dst: args.dst, dport: args.dport, syn: args.syn, payload: payload.into_bytes() };
    let d = model::decide(&c, &AclIndex::new(&c), &packet, SourceState::default());
    let rule = c.rule(d.rule);
    let (verdict_name, reason_name) = match d.counted {
        Some((v, r)) => (verdict::NAMES[v as usize], reason::NAMES[r as usize]),
        None => ("pass", "not_guarded"),
    };
    if args.json {
        let out = serde_json::json!({
            "direction": direction::NAMES[args.direction as usize],
            "verdict": verdict_name,
            "reason": reason_name,
            "rule": rule.map(|r| r.id.clone()),
            "rule_origin": rule.map(|r| format!("{}:{}", r.origin.file.display(), r.origin.pos.line)),
            "country": c.country(d.country),
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
        if d.counted.is_none() {
            println!("(port {} is not guarded in this direction: the datapath lets it through uncounted)", args.dport);
        }
        println!("(assuming the source is not banned, has tokens and is under the ban threshold)");
    }
    ExitCode::SUCCESS
}
