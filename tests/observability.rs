//! The Grafana dashboard (`deploy/grafana/smtpguard.json`) and the
//! Prometheus alerting rules (`deploy/prometheus/smtpguard-alerts.yml`).
//!
//! Without privileges: promtool checks the rules and runs their unit tests,
//! which must exercise every alert both ways; every alert carries `for`, a
//! severity, what to do and a runbook section that exists; the dashboard is
//! Grafana 10 JSON with a data source variable and targets on every panel;
//! every panel's PromQL parses (promtool, as recording rules); every metric
//! name the dashboard and the rules use is one `metrics.rs` exports, and
//! every metric it exports is on the dashboard.
//!
//! Privileged: the hypervisor lab (tests/hvlab.rs) running a policy that
//! gives every panel something to show (deny list, geo-fence, rate limit
//! with bans, VRFY filter, tenant suspects with quarantine, sampled
//! events), bounded traffic of each kind, a rejected and a good reload, and
//! a real Prometheus scraping each second with the rules loaded. Every
//! panel's query, with the dashboard's variables resolved by the real
//! server, must return data; every metric name must be in the real
//! exposition; every rule must load healthy; and exactly the alerts the lab
//! provokes go active.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;
use smtpguard_tests::{
    hvlab::{lab_policy, repo_root, swaks, Family, Lab, Role, SmtpSession, METRICS_PORT},
    netns::Netns,
    pairlab::metric,
    peers::{url_encode, Prometheus},
    require_root, smtpguard_bin,
};
use socket2::{Domain, Socket, Type};
use yaml_rust2::{Yaml, YamlLoader};

const DASHBOARD: &str = "deploy/grafana/smtpguard.json";
const RULES: &str = "deploy/prometheus/smtpguard-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/smtpguard-alerts.test.yml";
const METRICS_RS: &str = "policy-userspace/src/metrics.rs";
const OPERATIONS_MD: &str = "docs/operations.md";

/// Metrics a healthy lab leaves at zero: nothing was lost, no source was
/// displaced (the lab's few sources find free ways).
const ZERO_IN_A_HEALTHY_LAB: [&str; 3] = ["smtpguard_events_lost_total", "smtpguard_event_write_failures_total", "smtpguard_source_evictions_total"];

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}")).into_iter().next().unwrap_or_else(|| panic!("{rel} is empty"))
}

/// promtool in `dir`; a missing promtool fails the test (`cargo xtask
/// setup` installs Debian's prometheus package, which has it).
fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running promtool: {e}; install Debian's prometheus package (cargo xtask setup does)"))
}

fn assert_success(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

// ---- The rules

/// Each alerting rule: name, expression, and the rule itself.
fn alert_rules() -> Vec<(String, String, Yaml)> {
    let doc = yaml(RULES);
    let mut out = Vec::new();
    for group in doc["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                out.push((name.to_owned(), rule["expr"].as_str().expect("expr").to_owned(), rule.clone()));
            }
        }
    }
    out
}

/// GitHub's anchors for the Markdown headings of a file.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo_root().join("deploy/prometheus");
    let file = |rel: &str| Path::new(rel).file_name().unwrap().to_str().unwrap().to_owned();
    assert_success(&promtool(&dir, &["check", "rules", &file(RULES)]), "promtool check rules");
    assert_success(&promtool(&dir, &["test", "rules", &file(RULE_TESTS)]), "promtool test rules");
}

#[test]
fn every_alert_says_what_to_do_and_its_unit_tests_see_it_fire_and_stay_quiet() {
    let rules = alert_rules();
    assert!(rules.len() >= 10, "{} alerts", rules.len());
    let anchors = heading_anchors(&read(OPERATIONS_MD));
    // Per alert in the unit tests: an evaluation expecting it, one expecting silence.
    let mut seen: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for test in yaml(RULE_TESTS)["tests"].as_vec().expect("tests") {
        for case in test["alert_rule_test"].as_vec().expect("alert_rule_test") {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            let fires = case["exp_alerts"].as_vec().is_some_and(|a| !a.is_empty());
            let e = seen.entry(name).or_default();
            e.0 |= fires;
            e.1 |= !fires;
        }
    }
    let mut problems = Vec::new();
    for (name, _, rule) in &rules {
        if rule["for"].as_str().is_none() {
            problems.push(format!("{name}: no `for`"));
        }
        if !matches!(rule["labels"]["severity"].as_str(), Some("warning" | "critical")) {
            problems.push(format!("{name}: severity is not warning or critical"));
        }
        for a in ["summary", "description"] {
            if rule["annotations"][a].as_str().is_none_or(|t| t.len() < 20) {
                problems.push(format!("{name}: no {a}"));
            }
        }
        match rule["annotations"]["runbook_url"].as_str().and_then(|u| u.strip_prefix("docs/operations.md#")) {
            Some(anchor) if anchors.contains(anchor) => {}
            other => problems.push(format!("{name}: runbook_url {other:?} is not a section of docs/operations.md")),
        }
        match seen.get(name) {
            Some((true, true)) => {}
            other => problems.push(format!("{name}: unit tests (fires, stays quiet) = {other:?}; both are needed")),
        }
    }
    let defined: BTreeSet<&String> = rules.iter().map(|(n, _, _)| n).collect();
    for name in seen.keys().filter(|n| !defined.contains(n)) {
        problems.push(format!("the unit tests name {name}, which the rules do not define"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- The dashboard

struct Target {
    panel: String,
    ref_id: String,
    expr: String,
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every panel, those inside rows included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

fn targets(d: &Value) -> Vec<Target> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            p["targets"].as_array().into_iter().flatten().map(move |t| Target {
                panel: p["title"].as_str().unwrap_or("?").to_owned(),
                ref_id: t["refId"].as_str().unwrap_or("?").to_owned(),
                expr: t["expr"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// A query variable's `label_values(SELECTOR, LABEL)`.
fn label_values_query(var: &Value) -> (String, String) {
    let q = var["query"]["query"].as_str().or(var["query"].as_str()).expect("a query variable's query");
    let inner = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')).unwrap_or_else(|| panic!("{q}: not label_values(...)"));
    let (selector, label) = inner.rsplit_once(',').unwrap_or_else(|| panic!("{q}: no label"));
    (selector.trim().to_owned(), label.trim().to_owned())
}

/// Grafana's interval variables as the lab test resolves them: Prometheus
/// scrapes each second there and the whole lab run fits in a minute.
const LAB_INTERVALS: [(&str, &str); 3] = [("__rate_interval", "1m"), ("__interval", "15s"), ("__range", "2m")];

/// `expr` with `$name` and `${name}` replaced; an undefined variable panics.
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out += &rest[..i];
        let after = &rest[i + 1..];
        let (name, used) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').unwrap_or_else(|| panic!("{expr}: unclosed ${{"));
            (braced[..end].split(':').next().unwrap_or_default(), end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        out += vars.get(name).unwrap_or_else(|| panic!("{expr}: ${name} is not a dashboard variable"));
        rest = &after[used..];
    }
    out + rest
}

/// The variables for a query: the intervals, and the given template values.
fn variables(values: &[(&str, &str)]) -> BTreeMap<String, String> {
    LAB_INTERVALS.iter().chain(values).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `smtpguard_*` metric names in PromQL.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in promql.match_indices("smtpguard_") {
        if promql[..i].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"') {
            continue;
        }
        let name: String = promql[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        out.insert(name);
    }
    out
}

/// The sample names `metrics.rs` exports: its `"smtpguard_..."` literals,
/// and for histograms their `_bucket`, `_sum` and `_count`.
fn exported_by_metrics_rs() -> (BTreeSet<String>, BTreeSet<String>) {
    let src = read(METRICS_RS);
    let literal = |at: usize| -> String { src[at + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let families: BTreeSet<String> = src.match_indices("\"smtpguard_").map(|(i, _)| literal(i)).collect();
    let histograms: BTreeSet<String> = src.match_indices("HistogramOpts::new(\"").map(|(i, m)| literal(i + m.len() - 1)).collect();
    assert!(!histograms.is_empty(), "no histogram found in {METRICS_RS}");
    let mut samples: BTreeSet<String> = families.iter().filter(|f| !histograms.contains(*f)).cloned().collect();
    for h in &histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            samples.insert(format!("{h}{suffix}"));
        }
    }
    (families, samples)
}

/// A histogram's sample name's family.
fn family_of(sample: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|s| sample.strip_suffix(s)).unwrap_or(sample)
}

#[test]
fn the_dashboard_is_grafana_10_json_with_a_data_source_variable_and_targets_on_every_panel() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {} predates Grafana 10", d["schemaVersion"]);
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "uid");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    assert_eq!((var("DS_PROMETHEUS")["type"].as_str(), var("DS_PROMETHEUS")["query"].as_str()), (Some("datasource"), Some("prometheus")));
    for name in ["job", "instance"] {
        assert_eq!(var(name)["type"], "query", "${name}");
        assert_eq!(var(name)["datasource"]["uid"], "${DS_PROMETHEUS}", "${name}'s data source");
        label_values_query(var(name));
    }
    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        if !ids.insert(p["id"].as_u64().expect("panel id")) {
            problems.push(format!("{title}: duplicate id {}", p["id"]));
        }
        let g = &p["gridPos"];
        let b = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or_else(|| panic!("{title}: gridPos.{k}")));
        if b[0] + b[2] > 24 {
            problems.push(format!("{title}: wider than the grid"));
        }
        for (other, o) in &boxes {
            if b[0] < o[0] + o[2] && o[0] < b[0] + b[2] && b[1] < o[1] + o[3] && o[1] < b[1] + b[3] {
                problems.push(format!("{title} overlaps {other}"));
            }
        }
        boxes.push((title.to_owned(), b));
        if p["type"] == "row" {
            continue;
        }
        if p["description"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{title}: no description"));
        }
        if p["datasource"]["uid"] != "${DS_PROMETHEUS}" {
            problems.push(format!("{title}: data source {}", p["datasource"]));
        }
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{title}: no targets"));
        }
        for t in targets {
            if t["expr"].as_str().is_none_or(str::is_empty) || t["refId"].as_str().is_none() || t["datasource"]["uid"] != "${DS_PROMETHEUS}" {
                problems.push(format!("{title}: target {t} lacks expr, refId or the data source"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_dashboard_query_parses_and_uses_only_exported_metrics_and_every_metric_is_shown() {
    let d = dashboard();
    let vars = variables(&[("job", "smtpguard"), ("instance", ".*")]);
    // promtool parses each query with Prometheus' own parser, as a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, t) in targets(&d).iter().enumerate() {
        rules += &format!("      - record: dashboard:target_{i}\n        expr: {}\n", serde_json::to_string(&substitute(&t.expr, &vars)).unwrap());
    }
    for (i, v) in d["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query").enumerate() {
        let (selector, _) = label_values_query(v);
        rules += &format!("      - record: dashboard:variable_{i}\n        expr: {}\n", serde_json::to_string(&substitute(&selector, &vars)).unwrap());
    }
    let dir = std::env::temp_dir().join(format!("sgtest-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard-queries.yml"), &rules).unwrap();
    let out = promtool(&dir, &["check", "rules", "dashboard-queries.yml"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_success(&out, &format!("the dashboard's queries as recording rules:\n{rules}"));

    let (families, samples) = exported_by_metrics_rs();
    let used_by_dashboard: BTreeSet<String> = targets(&d).iter().flat_map(|t| metric_names(&t.expr)).collect();
    let used_by_rules: BTreeSet<String> = alert_rules().iter().flat_map(|(_, e, _)| metric_names(e)).collect();
    for (who, used) in [("the dashboard", &used_by_dashboard), ("the alert rules", &used_by_rules)] {
        let unknown: Vec<&String> = used.iter().filter(|n| !samples.contains(*n)).collect();
        assert!(unknown.is_empty(), "{who} uses metrics {METRICS_RS} does not export: {unknown:?}");
    }
    let shown: BTreeSet<&str> = used_by_dashboard.iter().map(|n| family_of(n)).collect();
    let missing: Vec<&String> = families.iter().filter(|f| !shown.contains(f.as_str())).collect();
    assert!(missing.is_empty(), "exported but on no panel: {missing:?}");
}

// ---- The lab

const PROMETHEUS_PORT: u16 = 19095;
/// How long a burst of connection attempts waits for answers: a veth
/// answers in well under a millisecond, so a SYN unanswered this long was
/// dropped.
const ANSWER_WAIT: Duration = Duration::from_millis(300);
/// Inbound ban threshold for the lab (new connections a minute): above the
/// policy's rate of 60 a minute, reached by one burst.
const BAN_ABOVE: i64 = 64;

/// The lab's policy (the hosting example with the geo-fence), with bans
/// one burst away, every drop sampled into the event stream, and tenant
/// suspects quarantined.
fn policy(lab: &Lab) -> String {
    let base = lab_policy(&repo_root(), &lab.geo_db, "enforce", &[], Some(BAN_ABOVE)).expect("lab policy");
    let mut doc = YamlLoader::load_from_str(&base).unwrap().remove(0);
    let parse = |s: &str| YamlLoader::load_from_str(s).unwrap().remove(0);
    let Yaml::Hash(top) = &mut doc else { panic!("the policy is not a mapping") };
    top.insert(Yaml::String("events".into()), parse("{drop_sample_one_in: 1, per_second: 100}"));
    let Some(Yaml::Hash(egress)) = top.get_mut(&Yaml::String("egress".into())) else { panic!("no egress") };
    egress.insert(Yaml::String("tenant_suspect".into()), parse("{blocked: 5, window: 1m, quarantine: 10m}"));
    let mut out = String::new();
    yaml_rust2::YamlEmitter::new(&mut out).dump(&doc).unwrap();
    out + "\n"
}

/// `n` connection attempts at once from `src` to `dst:port` (one SYN
/// each, back to back); after [`ANSWER_WAIT`] all are aborted (a reset for
/// those that got through). Returns how many got through.
fn burst(ns: &Netns, src: &str, dst: &str, port: u16, n: usize) -> usize {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let sockets = ns
        .enter(|| -> std::io::Result<Vec<Socket>> {
            (0..n)
                .map(|_| {
                    let s = Socket::new(if src.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 }, Type::STREAM, None)?;
                    s.set_nonblocking(true)?;
                    s.set_linger(Some(Duration::ZERO))?;
                    s.bind(&SocketAddr::new(src, 0).into())?;
                    match s.connect(&SocketAddr::new(dst, port).into()) {
                        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
                        _ => Ok(s),
                    }
                })
                .collect()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("connecting from {src} to {dst}:{port}: {e}"));
    std::thread::sleep(ANSWER_WAIT);
    sockets.iter().filter(|s| s.peer_addr().is_ok()).count()
}

/// Polls `f` every 100 ms until it gives `Some`, for at most `limit`.
fn within<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scrape(lab: &Lab) -> String {
    lab.http_get(METRICS_PORT, "/metrics").expect("/metrics")
}

fn wait_for_metric(lab: &Lab, name: &str, labels: &[&str], want: f64, limit: Duration) {
    let mut last = None;
    let ok = within(limit, || {
        last = metric(&scrape(lab), name, labels);
        (last == Some(want)).then_some(())
    });
    assert!(ok.is_some(), "{name}{labels:?} stayed {last:?}, not {want}; controller log:\n{}", lab.controller_log());
}

/// The alerts Prometheus holds active (pending or firing): name and labels.
fn active_alerts(prom: &Prometheus, ns: &Netns) -> Vec<(String, Value)> {
    let v = prom.api(ns, "/api/v1/alerts").expect("/api/v1/alerts");
    v["data"]["alerts"].as_array().into_iter().flatten().map(|a| (a["labels"]["alertname"].as_str().unwrap_or_default().to_owned(), a["labels"].clone())).collect()
}

/// An instant query's result: (labels, value) per series; an error names
/// what Prometheus said.
fn instant(prom: &Prometheus, ns: &Netns, promql: &str) -> Result<Vec<(Value, f64)>, String> {
    let v = prom.api(ns, &format!("/api/v1/query?query={}", url_encode(promql))).map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    let value = |pair: &Value| pair[1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
    match v["data"]["resultType"].as_str() {
        Some("vector") => Ok(v["data"]["result"].as_array().unwrap().iter().map(|s| (s["metric"].clone(), value(&s["value"]))).collect()),
        Some("scalar") => Ok(vec![(Value::Null, value(&v["data"]["result"]))]),
        other => Err(format!("result type {other:?}")),
    }
}

/// The first packet of a kind creates its series (a counter cell, a
/// tenant's cells at the next table scan), and a series' first appearance
/// is no increase to `rate()`: this round creates them, once Prometheus
/// scrapes, and [`traffic`] then moves them.
fn first_round(lab: &Lab) {
    let v4 = |role| Family::V4.addr(role);
    let (tenant, mx) = (v4(Role::Tenant), v4(Role::Mx));
    // Passed: ingress default_allow, egress allow_acl (the exemption), egress default_allow.
    assert!(swaks(&lab.wan, v4(Role::Sender), tenant, 25).unwrap(), "an outside sender mails the tenant");
    assert!(swaks(&lab.exempt, v4(Role::Exempt), mx, 25).unwrap(), "the exempt tenant sends on 25");
    assert!(swaks(&lab.tenant, tenant, mx, 587).unwrap(), "the tenant sends on 587");
    lab.wan.ip(&["addr", "add", DENIED, "dev", "lo"]).unwrap();
    dropped_connections(lab);
    vrfy(lab);
    // Under the suspect threshold (5 blocked in a minute).
    assert_eq!(burst(&lab.tenant, tenant, mx, 25, 3), 0, "the tenant on 25");
}

/// A source on the deny list (198.18.0.0/15 in policies/lists/drop.txt).
const DENIED: &str = "198.18.0.7";

/// Dropped: geo (KP), the deny list, the hypervisor itself on 25.
fn dropped_connections(lab: &Lab) {
    let v4 = |role| Family::V4.addr(role);
    assert_eq!(burst(&lab.wan, v4(Role::Blocked), v4(Role::Tenant), 25, 2), 0, "a source in a blocked country");
    assert_eq!(burst(&lab.wan, DENIED, v4(Role::Tenant), 25, 2), 0, "a source on the deny list");
    assert_eq!(burst(&lab.hv, v4(Role::Host), v4(Role::Mx), 25, 2), 0, "the hypervisor itself on 25");
}

/// The command filter: a segment longer than the scanner reads, then VRFY.
fn vrfy(lab: &Lab) {
    let v4 = |role| Family::V4.addr(role);
    let mut probe = SmtpSession::open(&lab.wan, v4(Role::Prober), v4(Role::Tenant), 25, Duration::from_secs(3)).unwrap();
    assert!(probe.line().unwrap().starts_with("220"));
    assert!(probe.send("EHLO prober.test").unwrap().starts_with("250"));
    probe.set_nodelay().unwrap();
    probe.send(&format!("NOOP {}", "x".repeat(600))).expect("a long line is scanned in part and passed");
    probe.set_timeout(Duration::from_secs(1)).unwrap();
    assert!(probe.send("VRFY postmaster").is_err(), "VRFY is dropped: no answer");
}

/// The second round: the same drops again, a flood to a ban, and a tenant
/// VM that becomes a suspect and is quarantined.
fn traffic(lab: &Lab) {
    let v4 = |role| Family::V4.addr(role);
    let (tenant, mx) = (v4(Role::Tenant), v4(Role::Mx));
    dropped_connections(lab);
    vrfy(lab);
    // A flood over the ban threshold: the burst passes, then rate_limited, rate_ban, banned.
    let spammer = v4(Role::Spammer);
    let through = burst(&lab.wan, spammer, tenant, 25, BAN_ABOVE as usize + 16);
    assert!((15..=25).contains(&through), "about the burst of 20 got through: {through}");
    assert!(lab.smtpguard(&["bans"]).unwrap().contains(spammer), "the spammer is banned");
    // The tenant VM goes on trying 25 while a session on 587 is open: a
    // suspect, quarantined; its open session then gets a reset.
    let mut held = SmtpSession::open(&lab.tenant, tenant, mx, 587, Duration::from_secs(3)).unwrap();
    assert!(held.line().unwrap().starts_with("220"));
    assert!(held.send("EHLO tenant.test").unwrap().starts_with("250"));
    assert_eq!(burst(&lab.tenant, tenant, mx, 25, 7), 0, "the tenant on 25");
    let quarantined = within(Duration::from_secs(5), || lab.smtpguard(&["bans", "--json"]).ok().filter(|b| b.contains("\"origin\":\"quarantine\"")));
    assert!(quarantined.is_some(), "the suspect is quarantined; controller log:\n{}", lab.controller_log());
    held.set_timeout(Duration::from_secs(2)).unwrap();
    let after = held.send("NOOP");
    assert!(after.is_err(), "the quarantined tenant's open session goes on: {after:?}");
}

/// A target over only what a healthy lab leaves at zero.
fn may_be_zero(expr: &str) -> bool {
    metric_names(expr).iter().all(|n| ZERO_IN_A_HEALTHY_LAB.contains(&family_of(n)))
}

/// What a panel target returned, for the report.
struct Answer {
    series: usize,
    max: f64,
}

/// Every target once: its answer, or why it has none.
fn run_targets(prom: &Prometheus, ns: &Netns, d: &Value, vars: &BTreeMap<String, String>) -> Vec<(String, Result<Answer, String>)> {
    targets(d)
        .iter()
        .map(|t| {
            let expr = substitute(&t.expr, vars);
            let answer = match instant(prom, ns, &expr) {
                Err(e) => Err(e),
                Ok(r) if r.is_empty() => Err("no data".into()),
                Ok(r) if r.iter().any(|(_, v)| !v.is_finite()) => Err(format!("not a number: {r:?}")),
                Ok(r) if r.iter().all(|(_, v)| *v <= 0.0) && !may_be_zero(&t.expr) => Err("zero: the lab's traffic does not show".into()),
                Ok(r) => Ok(Answer { series: r.len(), max: r.iter().map(|(_, v)| *v).fold(f64::MIN, f64::max) }),
            };
            (format!("{} [{}] {expr}", t.panel, t.ref_id), answer)
        })
        .collect()
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn every_dashboard_panel_has_data_and_the_alerts_load_and_fire_in_a_real_prometheus_after_lab_traffic() {
    require_root();
    let started = Instant::now();
    let mut lab = Lab::new(&smtpguard_bin(), "obs").expect("lab");
    let policy_path = lab.dir.join("policy.yaml");
    let good_policy = policy(&lab);
    std::fs::write(&policy_path, &good_policy).unwrap();
    lab.start_controller(&policy_path, "native").expect("controller");
    let prom = Prometheus::start_with_rules(&lab.hv, &lab.dir.join("prometheus"), METRICS_PORT, PROMETHEUS_PORT, &[repo_root().join(RULES)]).expect("prometheus");
    // Traffic only once Prometheus scrapes, so that rates see it (the first
    // scrape comes about 6 s after start).
    let up = within(Duration::from_secs(20), || prom.query(&lab.hv, "up{job=\"smtpguard\"}").filter(|(_, v)| *v == 1.0));
    assert!(up.is_some(), "Prometheus did not scrape the controller within 20 s");
    let ready = started.elapsed();

    first_round(&lab);
    // The slowest of the new series: a tenant's cells, from the next table scan.
    let seen = within(Duration::from_secs(15), || prom.query(&lab.hv, "smtpguard_tenant_packets_total{interface=\"tap-t\",reason=\"default_deny\"}"));
    assert!(seen.is_some(), "Prometheus never saw tap-t's blocked packets");
    traffic(&lab);

    // A rejected reload: the alert goes active on the real metric. Then the good policy again.
    let replace = |text: &str| {
        let tmp = policy_path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &policy_path).unwrap();
        lab.smtpguard(&["reload"]).expect("smtpguard reload");
    };
    replace("version: 1\ningress:\n  default: {25: perhaps}\n");
    wait_for_metric(&lab, "smtpguard_last_reload_success", &[], 0.0, Duration::from_secs(10));
    let rejected = within(Duration::from_secs(10), || active_alerts(&prom, &lab.hv).into_iter().find(|(n, _)| n == "SmtpguardReloadRejected"));
    assert!(rejected.is_some(), "SmtpguardReloadRejected did not go active: {:?}", active_alerts(&prom, &lab.hv));
    replace(&good_policy);
    wait_for_metric(&lab, "smtpguard_last_reload_success", &[], 1.0, Duration::from_secs(20));

    // The dashboard's variables as Grafana resolves them, from the real server.
    let d = dashboard();
    let mut values: Vec<(String, String)> = Vec::new();
    for var in d["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        let name = var["name"].as_str().unwrap().to_owned();
        let (selector, label) = label_values_query(var);
        let bound: Vec<(&str, &str)> = values.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let selector = substitute(&selector, &variables(&bound));
        let answer = prom.api(&lab.hv, &format!("/api/v1/label/{label}/values?match[]={}", url_encode(&selector))).unwrap();
        let first = answer["data"][0].as_str().unwrap_or_else(|| panic!("${name}: {selector} has no {label}: {answer}")).to_owned();
        values.push((name, first));
    }
    let bound: Vec<(&str, &str)> = values.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let vars = variables(&bound);

    // Every target answers (bounded: the table scan runs every 5 s, then a scrape).
    let mut answers = Vec::new();
    within(Duration::from_secs(20), || {
        answers = run_targets(&prom, &lab.hv, &d, &vars);
        answers.iter().all(|(_, a)| a.is_ok()).then_some(())
    });
    let report: Vec<String> = answers
        .iter()
        .map(|(what, a)| match a {
            Ok(a) => format!("ok    {:>2} series, max {:>10.3}  {what}", a.series, a.max),
            Err(e) => format!("FAIL  {e}  {what}"),
        })
        .collect();
    eprintln!("variables: {values:?}\n{}", report.join("\n"));
    let failed: Vec<&String> = report.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failed.is_empty(), "panels without data, or not showing the lab's traffic:\n{}", failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"));

    // Every metric name the dashboard and the rules use is in the real
    // exposition, and moved, except what a healthy lab leaves at zero.
    let exposition = scrape(&lab);
    let mut max: BTreeMap<&str, f64> = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap();
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap_or(f64::NAN);
        let m = max.entry(name).or_insert(f64::MIN);
        *m = m.max(value);
    }
    let used: BTreeSet<String> = targets(&d).iter().flat_map(|t| metric_names(&t.expr)).chain(alert_rules().iter().flat_map(|(_, e, _)| metric_names(e))).collect();
    let absent: Vec<&String> = used.iter().filter(|n| !max.contains_key(n.as_str())).collect();
    assert!(absent.is_empty(), "not in the controller's exposition: {absent:?}");
    let idle: Vec<&String> = used.iter().filter(|n| max[n.as_str()] <= 0.0 && !ZERO_IN_A_HEALTHY_LAB.contains(&family_of(n))).collect();
    assert!(idle.is_empty(), "the lab left these at zero: {idle:?}");

    // The rules load healthy, and exactly the alert the lab provokes stays
    // active: the quarantined tenant (the rejected reload's alert cleared).
    let rules = prom.api(&lab.hv, "/api/v1/rules").unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let names: BTreeSet<&str> = loaded.iter().filter_map(|r| r["name"].as_str()).collect();
    let defined = alert_rules();
    assert_eq!(names, defined.iter().map(|(n, _, _)| n.as_str()).collect(), "rules loaded");
    let unhealthy: Vec<String> = loaded.iter().filter(|r| r["health"] != "ok").map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"])).collect();
    assert!(unhealthy.is_empty(), "{unhealthy:?}");
    let mut active = Vec::new();
    within(Duration::from_secs(10), || {
        active = active_alerts(&prom, &lab.hv);
        (active.len() == 1 && active[0].0 == "SmtpguardTenantSuspect").then_some(())
    });
    assert_eq!(active.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["SmtpguardTenantSuspect"], "active alerts: {active:?}");
    assert_eq!(active[0].1["interface"], "tap-t", "{active:?}");
    eprintln!("Prometheus scraping after {:.1} s; whole test {:.1} s", ready.as_secs_f64(), started.elapsed().as_secs_f64());
}
