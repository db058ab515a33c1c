//! The Grafana dashboard (`deploy/grafana/smtpguard.json`) and the
//! Prometheus alerting rules (`deploy/prometheus/smtpguard-alerts.yml`).
//!
//! Without privileges: promtool checks the rules and runs their unit tests,
//! which must exercise every alert both ways; every alert carries `for`, a
//! severity, what to do and a runbook section that exists; the dashboard is
//! Grafana 10 JSON with a data source variable and targets on every panel;
//! every panel's PromQL parses (promtool, as recording rules); every metric
//! name the dashboard and the rules use is one the controller exports (the
//! literals of `metrics.rs` and of the fleet's `fleet/metrics.rs`), and
//! every metric it exports is on the dashboard; the fleet's metrics, which
//! only a host run with `--fleet-etcd` exports, are exactly those of the
//! dashboard's "Fleet" row.
//!
//! Privileged: the hypervisor lab (tests/hvlab.rs) running a policy that
//! gives every panel something to show (deny list, geo-fence, rate limit
//! with bans, VRFY filter, tenant suspects with quarantine, sampled
//! events), bounded traffic of each kind, a rejected and a good reload, and
//! a real Prometheus scraping each second with the rules loaded. Every
//! panel's query, with the dashboard's variables resolved by the real
//! server, must return data; every metric name must be in the real
//! exposition; every rule must load healthy; and exactly the alerts the lab
//! provokes go active. That lab is no fleet: the "Fleet" row is left out.
//!
//! Privileged, the fleet: two hosts and a real etcd (tests/fleetlab.rs), a
//! real Prometheus in etcd's namespace scraping both over their management
//! links. Bans made, propagated and lifted, bad records refused, a revision
//! one host cannot apply, a reconnect: every query of the "Fleet" row
//! returns data that moved, the rules load healthy and the fleet's alerts
//! go active; etcd killed, Prometheus sees both hosts disconnected.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;
use smtpguard::{
    clock::ktime_now_ns,
    dataplane::{bans::source_key, maps::Maps},
};
use smtpguard_tests::{
    fleetlab::{FleetHost, FleetLab},
    hvlab::{lab_policy, repo_root, swaks, Family, Lab, Role, SmtpSession, METRICS_PORT},
    netns::Netns,
    pairlab::{http_get, metric, write_policy, RunningController, CLIENT_DENIED, CLIENT_OK, SERVER},
    peers::{connect_within, url_encode, Prometheus},
    require_root, smtpguard_bin,
};
use socket2::{Domain, Socket, Type};
use yaml_rust2::{Yaml, YamlLoader};

const DASHBOARD: &str = "deploy/grafana/smtpguard.json";
const RULES: &str = "deploy/prometheus/smtpguard-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/smtpguard-alerts.test.yml";
/// The files whose `"smtpguard_..."` literals name every metric the
/// controller exports: its own, and the fleet's.
const METRICS_FILES: [&str; 2] = ["policy-userspace/src/metrics.rs", FLEET_METRICS_RS];
/// The fleet's metrics, registered only by a host run with `--fleet-etcd`:
/// exported only in a fleet.
const FLEET_METRICS_RS: &str = "policy-userspace/src/fleet/metrics.rs";
/// The dashboard row of the panels over those metrics, and only those.
const FLEET_ROW: &str = "Fleet";
const OPERATIONS_MD: &str = "docs/operations.md";

/// Metrics a healthy lab leaves at zero: nothing was lost, no source was
/// displaced (the lab's few sources find free ways).
const ZERO_IN_A_HEALTHY_LAB: [&str; 9] = [
    "smtpguard_events_lost_total",
    "smtpguard_event_write_failures_total",
    "smtpguard_source_evictions_total",
    // The recovery levers, unused in a healthy lab, and no switch to enforce scheduled.
    "smtpguard_bypass",
    "smtpguard_bypass_since_timestamp_seconds",
    "smtpguard_bypass_changes_total",
    "smtpguard_rollbacks_total",
    "smtpguard_promotions_total",
    "smtpguard_enforce_from_timestamp_seconds",
];

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
    /// The title of the row the panel is in ("" above the first row).
    row: String,
    panel: String,
    ref_id: String,
    expr: String,
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every panel, those inside rows included, with the title of its row: a
/// collapsed row holds its panels, an open one is followed by them.
fn panels_by_row(d: &Value) -> Vec<(&str, &Value)> {
    let mut out = Vec::new();
    let mut row = "";
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            row = p["title"].as_str().unwrap_or("?");
        }
        out.push((row, p));
        out.extend(p["panels"].as_array().into_iter().flatten().map(|inner| (row, inner)));
    }
    out
}

/// Every panel, those inside rows included.
fn panels(d: &Value) -> Vec<&Value> {
    panels_by_row(d).into_iter().map(|(_, p)| p).collect()
}

fn targets(d: &Value) -> Vec<Target> {
    panels_by_row(d)
        .into_iter()
        .flat_map(|(row, p)| {
            p["targets"].as_array().into_iter().flatten().map(move |t| Target {
                row: row.to_owned(),
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

/// The families and sample names `files` export: their `"smtpguard_..."`
/// literals, and for histograms their `_bucket`, `_sum` and `_count`.
fn exported_by(files: &[&str]) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut families, mut histograms) = (BTreeSet::new(), BTreeSet::new());
    for rel in files {
        let src = read(rel);
        let literal = |at: usize| -> String { src[at + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
        let found: BTreeSet<String> = src.match_indices("\"smtpguard_").map(|(i, _)| literal(i)).collect();
        assert!(!found.is_empty(), "no \"smtpguard_...\" literal in {rel}");
        families.extend(found);
        histograms.extend(src.match_indices("HistogramOpts::new(\"").map(|(i, m)| literal(i + m.len() - 1)));
    }
    let mut samples: BTreeSet<String> = families.iter().filter(|f| !histograms.contains(*f)).cloned().collect();
    for h in &histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            samples.insert(format!("{h}{suffix}"));
        }
    }
    (families, samples)
}

/// Everything the controller can export, in a fleet or not.
fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
    let (families, samples) = exported_by(&METRICS_FILES);
    assert!(samples.iter().any(|s| s.ends_with("_bucket")), "no histogram found in {METRICS_FILES:?}");
    (families, samples)
}

/// The sample names exported only in a fleet: those of the fleet's metrics
/// file. A host outside a fleet has none of them.
fn exported_only_in_a_fleet() -> BTreeSet<String> {
    exported_by(&[FLEET_METRICS_RS]).1
}

/// Whether a query names a metric only a fleet exports (it has no data
/// outside one).
fn needs_a_fleet(expr: &str, fleet_only: &BTreeSet<String>) -> bool {
    metric_names(expr).iter().any(|n| fleet_only.contains(n))
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

    let (families, samples) = exported();
    let used_by_dashboard: BTreeSet<String> = targets(&d).iter().flat_map(|t| metric_names(&t.expr)).collect();
    let used_by_rules: BTreeSet<String> = alert_rules().iter().flat_map(|(_, e, _)| metric_names(e)).collect();
    for (who, used) in [("the dashboard", &used_by_dashboard), ("the alert rules", &used_by_rules)] {
        let unknown: Vec<&String> = used.iter().filter(|n| !samples.contains(*n)).collect();
        assert!(unknown.is_empty(), "{who} uses metrics {METRICS_FILES:?} do not export: {unknown:?}");
    }
    let shown: BTreeSet<&str> = used_by_dashboard.iter().map(|n| family_of(n)).collect();
    let missing: Vec<&String> = families.iter().filter(|f| !shown.contains(f.as_str())).collect();
    assert!(missing.is_empty(), "exported but on no panel: {missing:?}");
}

#[test]
fn the_fleet_row_holds_exactly_the_panels_over_metrics_only_a_fleet_exports() {
    let fleet_only = exported_only_in_a_fleet();
    let (everywhere, _) = exported_by(&METRICS_FILES[..1]);
    let (fleet_families, _) = exported_by(&[FLEET_METRICS_RS]);
    let both: Vec<&String> = fleet_families.intersection(&everywhere).collect();
    assert!(both.is_empty(), "{both:?}: in {FLEET_METRICS_RS} and {}: exported only in a fleet, or everywhere?", METRICS_FILES[0]);
    let mut problems = Vec::new();
    let mut in_row = 0;
    for t in targets(&dashboard()) {
        let what = format!("{} [{}] {}", t.panel, t.ref_id, t.expr);
        match (t.row == FLEET_ROW, needs_a_fleet(&t.expr, &fleet_only)) {
            (true, true) => in_row += 1,
            (true, false) => problems.push(format!("{what}: in the {FLEET_ROW} row, over no metric only a fleet exports")),
            (false, true) => problems.push(format!("{what}: a fleet's metric outside the {FLEET_ROW} row (no data on a host outside a fleet)")),
            (false, false) => {}
        }
    }
    assert!(in_row > 0, "no {FLEET_ROW} row with targets");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
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

/// Each of `targets` once: its answer, or why it has none.
fn run_targets(prom: &Prometheus, ns: &Netns, targets: &[&Target], vars: &BTreeMap<String, String>) -> Vec<(String, Result<Answer, String>)> {
    targets
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

/// Runs `targets` until all answer, for at most `limit`; prints the report
/// and fails naming those that did not.
fn assert_targets_answer(prom: &Prometheus, ns: &Netns, targets: &[&Target], vars: &BTreeMap<String, String>, limit: Duration, skipped: &[&Target]) {
    let mut answers = Vec::new();
    within(limit, || {
        answers = run_targets(prom, ns, targets, vars);
        answers.iter().all(|(_, a)| a.is_ok()).then_some(())
    });
    let report: Vec<String> = answers
        .iter()
        .map(|(what, a)| match a {
            Ok(a) => format!("ok    {:>2} series, max {:>10.3}  {what}", a.series, a.max),
            Err(e) => format!("FAIL  {e}  {what}"),
        })
        .chain(skipped.iter().map(|t| format!("skip  only a fleet exports it  {} [{}]", t.panel, t.ref_id)))
        .collect();
    eprintln!("{}", report.join("\n"));
    let failed: Vec<&String> = report.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failed.is_empty(), "panels without data, or not showing the lab's traffic:\n{}", failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"));
}

/// The dashboard's query variables as Grafana resolves them from the real
/// server, in order: each variable's values, and the one chosen: the
/// first, or with `all` the "All" value of a variable that has one.
fn resolve_variables(prom: &Prometheus, ns: &Netns, d: &Value, all: bool) -> Vec<(String, Vec<String>, String)> {
    let mut out: Vec<(String, Vec<String>, String)> = Vec::new();
    for var in d["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        let name = var["name"].as_str().unwrap().to_owned();
        let (selector, label) = label_values_query(var);
        let bound: Vec<(&str, &str)> = out.iter().map(|(k, _, v)| (k.as_str(), v.as_str())).collect();
        let selector = substitute(&selector, &variables(&bound));
        let answer = prom.api(ns, &format!("/api/v1/label/{label}/values?match[]={}", url_encode(&selector))).unwrap();
        let values: Vec<String> = answer["data"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect();
        let first = values.first().unwrap_or_else(|| panic!("${name}: {selector} has no {label}: {answer}")).clone();
        let chosen = match var["allValue"].as_str() {
            Some(every) if all && var["includeAll"] == true => every.to_owned(),
            _ => first,
        };
        out.push((name, values, chosen));
    }
    out
}

/// The `smtpguard_*` names `expr`s use.
fn names_in<'e>(exprs: impl IntoIterator<Item = &'e str>) -> BTreeSet<String> {
    exprs.into_iter().flat_map(metric_names).collect()
}

/// The largest value of each sample name in an exposition.
fn max_by_name(exposition: &str) -> BTreeMap<String, f64> {
    let mut max: BTreeMap<String, f64> = BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap();
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap_or(f64::NAN);
        let m = max.entry(name.to_owned()).or_insert(f64::MIN);
        *m = m.max(value);
    }
    max
}

/// The rules Prometheus loaded: each has the name of an alert the file
/// defines, all of them are there, and every one is healthy.
fn assert_rules_load_healthy(prom: &Prometheus, ns: &Netns) {
    let rules = prom.api(ns, "/api/v1/rules").unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let names: BTreeSet<&str> = loaded.iter().filter_map(|r| r["name"].as_str()).collect();
    let defined = alert_rules();
    assert_eq!(names, defined.iter().map(|(n, _, _)| n.as_str()).collect(), "rules loaded");
    let unhealthy: Vec<String> = loaded.iter().filter(|r| r["health"] != "ok").map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"])).collect();
    assert!(unhealthy.is_empty(), "{unhealthy:?}");
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
    // A shadow candidate that would drop what the lab's ingress mail passes
    // on: the shadow's panels have its differences to show.
    let candidate = lab.dir.join("candidate.yaml");
    std::fs::write(&candidate, "version: 1\ningress:\n  default: {25: deny}\n").unwrap();
    lab.run_args = vec!["--shadow".into(), candidate.display().to_string()];
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
    let values = resolve_variables(&prom, &lab.hv, &d, false);
    let bound: Vec<(&str, &str)> = values.iter().map(|(k, _, v)| (k.as_str(), v.as_str())).collect();
    let vars = variables(&bound);
    eprintln!("variables: {bound:?}");

    // Every target answers (bounded: the table scan runs every 5 s, then a
    // scrape), except those over metrics only a fleet exports: this lab is
    // no fleet (the fleet test below runs them).
    let fleet_only = exported_only_in_a_fleet();
    let all = targets(&d);
    let (fleet, here): (Vec<&Target>, Vec<&Target>) = all.iter().partition(|t| needs_a_fleet(&t.expr, &fleet_only));
    assert_targets_answer(&prom, &lab.hv, &here, &vars, Duration::from_secs(20), &fleet);

    // Every metric name the dashboard and the rules use is in the real
    // exposition, and moved, except what a healthy lab leaves at zero and
    // what only a fleet exports (on panels all the same: see above).
    let max = max_by_name(&scrape(&lab));
    let used = names_in(all.iter().map(|t| t.expr.as_str()).chain(alert_rules().iter().map(|(_, e, _)| e.as_str())));
    let used: BTreeSet<&String> = used.iter().filter(|n| !fleet_only.contains(*n)).collect();
    let absent: Vec<&&String> = used.iter().filter(|n| !max.contains_key(n.as_str())).collect();
    assert!(absent.is_empty(), "not in the controller's exposition: {absent:?}");
    let idle: Vec<&&String> = used.iter().filter(|n| max[n.as_str()] <= 0.0 && !ZERO_IN_A_HEALTHY_LAB.contains(&family_of(n))).collect();
    assert!(idle.is_empty(), "the lab left these at zero: {idle:?}");

    // The rules load healthy, and exactly the alert the lab provokes stays
    // active: the quarantined tenant (the rejected reload's alert cleared).
    assert_rules_load_healthy(&prom, &lab.hv);
    let mut active = Vec::new();
    within(Duration::from_secs(10), || {
        active = active_alerts(&prom, &lab.hv);
        (active.len() == 1 && active[0].0 == "SmtpguardTenantSuspect").then_some(())
    });
    assert_eq!(active.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["SmtpguardTenantSuspect"], "active alerts: {active:?}");
    assert_eq!(active[0].1["interface"], "tap-t", "{active:?}");
    eprintln!("Prometheus scraping after {:.1} s; whole test {:.1} s", ready.as_secs_f64(), started.elapsed().as_secs_f64());
}

// ---- The fleet

/// Where each fleet host serves its metrics, and Prometheus' port in the
/// etcd namespace.
const FLEET_METRICS_PORT: u16 = 19650;
const FLEET_PROMETHEUS_PORT: u16 = 19096;
/// A ban or an unban reaching the other host (what docs/fleet.md promises).
const FLEET_PROPAGATION: Duration = Duration::from_secs(2);
/// etcd back: the hosts' next session begins within their reconnect
/// backoff (at most 4 s) plus a start.
const FLEET_RECOVERY: Duration = Duration::from_secs(15);
/// The sources a host's datapath bans, one each round.
const FLEET_SOURCES: [&str; 2] = [CLIENT_DENIED, CLIENT_OK];
/// Bans one burst away (more than 10 new connections in a minute).
const FLEET_POLICY: &str = "version: 1\ningress:\n  default: {25: allow}\n  rate_limit: {new_per_minute: 6000, burst: 1000, ban_above_per_minute: 10, ban: 15m}\n";

/// The metric on a host's own /metrics (read in its namespace).
fn fleet_metric(h: &FleetHost, name: &str, labels: &[&str]) -> Option<f64> {
    metric(&http_get(&h.lab, FLEET_METRICS_PORT, "/metrics").ok()?, name, labels)
}

/// Polls `cond` every 100 ms until it holds, for at most `limit`.
fn fleet_within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    assert!(within(limit, || cond().then_some(())).is_some(), "{what}: not within {limit:?}");
}

/// Whether the host's datapath has `addr` banned now (read from its pins).
fn fleet_banned(h: &FleetHost, addr: &str) -> bool {
    let maps = Maps::open_pinned(&h.pins.pin_dir).expect("the host's pins");
    maps.source_table().banned_until(source_key(addr.parse::<IpAddr>().unwrap()), ktime_now_ns()).is_some()
}

/// New connections from `src` until the host's datapath bans it (bounded):
/// a ban the host's controller publishes (`smtpguard ban` publishes its
/// own, which the published counter does not see).
fn flood_until_banned(h: &FleetHost, src: &str) {
    for _ in 0..200 {
        let _ = connect_within(&h.lab.client, src, SERVER, 25, Duration::from_millis(200));
        if fleet_banned(h, src) {
            return;
        }
    }
    panic!("host {}: 200 connections from {src} did not ban it", h.name);
}

/// `smtpguard fleet push` from `h`: the revision pushed.
fn fleet_push(h: &FleetHost, policy: &Path, extra: &[&str]) -> f64 {
    let mut args = vec!["push", policy.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, said) = h.fleet(&args);
    assert_eq!(code, 0, "{said}");
    said.split_whitespace().nth(2).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("no revision in {said:?}"))
}

/// An etcd put from `h`'s namespace.
fn etcd_put(h: &FleetHost, key: &str, value: &str) {
    let (code, said) = h.etcdctl(&["put", key, value]);
    assert_eq!(code, 0, "{said}");
}

/// A geo database of one network, for the host that has one.
fn write_geo(path: &Path) {
    #[derive(serde::Serialize)]
    struct Record {
        country_code: &'static str,
    }
    let mut w = mmdb_writer::Writer::new("country");
    w.insert("203.0.113.0/24".parse::<ipnet::IpNet>().unwrap(), &Record { country_code: "KP" }).unwrap();
    std::fs::write(path, w.to_bytes().unwrap()).unwrap();
}

/// The value of a one-number PromQL answer (a `count(...)`), if any.
fn prom_number(prom: &Prometheus, ns: &Netns, promql: &str) -> Option<f64> {
    instant(prom, ns, promql).ok()?.first().map(|(_, v)| *v)
}

/// An instant query's value per instance.
fn by_instance(prom: &Prometheus, ns: &Netns, promql: &str) -> BTreeMap<String, f64> {
    instant(prom, ns, promql).unwrap_or_else(|e| panic!("{promql}: {e}")).into_iter().map(|(l, v)| (l["instance"].as_str().unwrap_or_default().to_owned(), v)).collect()
}

/// Polls an instant query until its value per instance is `want`, for at
/// most `limit`.
fn wait_by_instance(prom: &Prometheus, ns: &Netns, promql: &str, want: &[(String, f64)], limit: Duration) {
    let want: BTreeMap<String, f64> = want.iter().cloned().collect();
    let mut seen = BTreeMap::new();
    within(limit, || {
        seen = by_instance(prom, ns, promql);
        (seen == want).then_some(())
    });
    assert_eq!(seen, want, "{promql} per instance in Prometheus, not within {limit:?}");
}

/// The alerts Prometheus holds active: name, state and labels.
fn alert_states(prom: &Prometheus, ns: &Netns) -> Vec<(String, String, Value)> {
    let v = prom.api(ns, "/api/v1/alerts").expect("/api/v1/alerts");
    v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| (a["labels"]["alertname"].as_str().unwrap_or_default().to_owned(), a["state"].as_str().unwrap_or_default().to_owned(), a["labels"].clone()))
        .collect()
}

#[test]
#[ignore = "privileged: needs root, BPF, namespaces and etcd; cargo xtask test runs it"]
fn every_fleet_panel_has_data_in_a_real_prometheus_scraping_two_hosts_and_etcd_lost_shows() {
    require_root();
    let started = Instant::now();
    let mut lab = FleetLab::new(2, 1).expect("fleet lab");
    // The hosts, and etcd apart: killed and restarted while they run.
    let FleetLab { hosts, etcd } = &mut lab;
    let (a, b) = (&hosts[0], &hosts[1]);
    let dir = a.pins.policy_dir();
    let policy = write_policy(&dir, "local.yaml", FLEET_POLICY);
    let geo = dir.join("geo.mmdb");
    write_geo(&geo);
    let geo_arg = geo.display().to_string();
    // Metrics on every address of the host's server namespace: loopback
    // for the checks, the management link for Prometheus. Only a has the
    // geo database revision 2 names.
    let metrics_addr = format!("0.0.0.0:{FLEET_METRICS_PORT}");
    let _controllers: Vec<RunningController> = [(a, vec!["--geo-database", &geo_arg]), (b, vec![])]
        .into_iter()
        .map(|(h, extra)| {
            let mut args = vec!["--fleet-policy", "--metrics-addr", &metrics_addr];
            args.extend(extra);
            h.start(&policy, FLEET_METRICS_PORT, &args).unwrap_or_else(|e| panic!("{e:#}"))
        })
        .collect();
    let instance = |h: &FleetHost| format!("{}:{FLEET_METRICS_PORT}", h.link.host_addr);
    let prom = Prometheus::start_scraping(
        etcd.netns(),
        &std::env::temp_dir().join(format!("sgtest-fleet-prometheus-{}", std::process::id())),
        &[instance(a), instance(b)],
        FLEET_PROMETHEUS_PORT,
        &[repo_root().join(RULES)],
    )
    .expect("prometheus");
    let both_up = within(Duration::from_secs(20), || (prom_number(&prom, etcd.netns(), "count(up{job=\"smtpguard\"} == 1)") == Some(2.0)).then_some(()));
    assert!(both_up.is_some(), "Prometheus did not scrape both hosts over their management links within 20 s");
    let connected = within(Duration::from_secs(10), || (prom_number(&prom, etcd.netns(), "count(smtpguard_fleet_connected == 1)") == Some(2.0)).then_some(()));
    assert!(connected.is_some(), "Prometheus did not see both hosts connected to etcd");
    let ready = started.elapsed();

    // Round 1 makes the labelled series (a series' first appearance is no
    // increase to rate()): revision 1 everywhere, a ban a's datapath makes
    // reaching b, a record nobody can parse. Prometheus then holds each of
    // them above 0 on the hosts that have it.
    let p1 = write_policy(&dir, "fleet.yaml", FLEET_POLICY);
    let rev1 = fleet_push(a, &p1, &["--comment", "revision 1"]);
    for h in [a, b] {
        fleet_within(Duration::from_secs(5), &format!("revision {rev1} on {}", h.name), || fleet_metric(h, "smtpguard_fleet_policy_revision", &[]) == Some(rev1));
    }
    flood_until_banned(a, FLEET_SOURCES[0]);
    fleet_within(FLEET_PROPAGATION, "a's first ban reaching b", || fleet_banned(b, FLEET_SOURCES[0]));
    etcd_put(a, "/smtpguard/bans/junk-1", "not json");
    for h in [a, b] {
        fleet_within(Duration::from_secs(5), &format!("{} refusing the first bad record", h.name), || {
            fleet_metric(h, "smtpguard_fleet_bans_received_total", &["result=\"unparsable\""]) == Some(1.0)
        });
    }
    let series = [
        ("smtpguard_fleet_bans_received_total{result=\"installed\"}", 1.0),
        ("smtpguard_fleet_bans_received_total{result=\"own\"}", 1.0),
        ("smtpguard_fleet_bans_received_total{result=\"unparsable\"}", 2.0),
        ("smtpguard_fleet_bans_published_total{result=\"ok\"}", 1.0),
    ];
    for (selector, n) in series {
        let seen = within(Duration::from_secs(10), || (prom_number(&prom, etcd.netns(), &format!("count({selector} > 0)")) == Some(n)).then_some(()));
        assert!(seen.is_some(), "Prometheus never saw {selector} above 0 on {n} host(s)");
    }

    // Round 2 moves every series within the dashboard's rate window: etcd
    // killed and back (a reconnect on each host), a second ban, the first
    // lifted from b, a second bad record, and revision 2, which needs a geo
    // database only a has.
    let round_2 = Instant::now();
    etcd.kill9_all();
    for h in [a, b] {
        fleet_within(Duration::from_secs(10), &format!("{} noticing etcd is gone", h.name), || fleet_metric(h, "smtpguard_fleet_connected", &[]) == Some(0.0));
    }
    etcd.restart_all().expect("etcd restarted");
    etcd.wait_healthy().expect("etcd healthy");
    for h in [a, b] {
        fleet_within(FLEET_RECOVERY, &format!("{}'s second session", h.name), || {
            fleet_metric(h, "smtpguard_fleet_connected", &[]) == Some(1.0) && fleet_metric(h, "smtpguard_fleet_sessions_total", &[]) >= Some(2.0)
        });
    }
    flood_until_banned(a, FLEET_SOURCES[1]);
    fleet_within(FLEET_PROPAGATION, "a's second ban reaching b", || fleet_banned(b, FLEET_SOURCES[1]));
    let (code, said) = b.smtpguard(&["unban", FLEET_SOURCES[0]]);
    assert_eq!(code, 0, "{said}");
    fleet_within(FLEET_PROPAGATION, "b's unban lifting a's first ban on a", || {
        !fleet_banned(a, FLEET_SOURCES[0]) && fleet_metric(a, "smtpguard_fleet_bans_lifted_total", &[]) == Some(1.0)
    });
    etcd_put(a, "/smtpguard/bans/junk-2", "{}");
    for h in [a, b] {
        fleet_within(Duration::from_secs(5), &format!("{} refusing the second bad record", h.name), || {
            fleet_metric(h, "smtpguard_fleet_bans_received_total", &["result=\"unparsable\""]) == Some(2.0)
        });
    }
    let p2 = write_policy(&dir, "geo.yaml", "version: 1\ningress:\n  default: {25: allow}\n  geo: {database: /nonexistent/fleet-geo.mmdb, field: country_code, block: [KP], unknown: allow}\n");
    let rev2 = fleet_push(a, &p2, &["--geo-database", &geo_arg, "--comment", "revision 2, a geo-fence"]);
    fleet_within(Duration::from_secs(5), &format!("revision {rev2} on a"), || fleet_metric(a, "smtpguard_fleet_policy_revision", &[]) == Some(rev2));
    fleet_within(Duration::from_secs(5), "b rejecting revision 2", || fleet_metric(b, "smtpguard_fleet_policy_rejected_total", &[]) == Some(1.0));
    assert_eq!(fleet_metric(b, "smtpguard_fleet_policy_revision", &[]), Some(rev1), "b keeps revision 1");
    let round_2 = round_2.elapsed();

    // The dashboard as a fleet's operator sees it: every instance ("All").
    let d = dashboard();
    let values = resolve_variables(&prom, etcd.netns(), &d, true);
    let instances = values.iter().find(|(name, _, _)| name == "instance").map(|(_, v, _)| v.clone()).unwrap_or_default();
    assert_eq!(instances, [instance(a), instance(b)], "the $instance variable lists both hosts");
    let bound: Vec<(&str, &str)> = values.iter().map(|(k, _, v)| (k.as_str(), v.as_str())).collect();
    let vars = variables(&bound);
    eprintln!("variables: {bound:?}; round 2 took {:.1} s", round_2.as_secs_f64());
    let all = targets(&d);
    let fleet_row: Vec<&Target> = all.iter().filter(|t| t.row == FLEET_ROW).collect();
    assert_targets_answer(&prom, etcd.netns(), &fleet_row, &vars, Duration::from_secs(20), &[]);
    // Per host where the panel is per host: both hosts connected, b behind
    // (bounded: the last scrape may predate a's revision 2).
    wait_by_instance(&prom, etcd.netns(), "smtpguard_fleet_connected", &[(instance(a), 1.0), (instance(b), 1.0)], Duration::from_secs(5));
    wait_by_instance(&prom, etcd.netns(), "smtpguard_fleet_policy_revision", &[(instance(a), rev2), (instance(b), rev1)], Duration::from_secs(5));

    // Every fleet metric the dashboard and the rules use is in the hosts'
    // real expositions.
    let fleet_only = exported_only_in_a_fleet();
    let mut max = max_by_name(&http_get(&a.lab, FLEET_METRICS_PORT, "/metrics").unwrap());
    max.extend(max_by_name(&http_get(&b.lab, FLEET_METRICS_PORT, "/metrics").unwrap()));
    let used = names_in(all.iter().map(|t| t.expr.as_str()).chain(alert_rules().iter().map(|(_, e, _)| e.as_str())));
    let absent: Vec<&String> = used.iter().filter(|n| fleet_only.contains(*n) && !max.contains_key(n.as_str())).collect();
    assert!(absent.is_empty(), "not in the fleet hosts' expositions: {absent:?}");

    // The rules load healthy, and the alerts this fleet provokes go active:
    // the refused records (one alert for the fleet), b's rejected revision
    // (and b's rejected reload, the same revision refused by its reload).
    assert_rules_load_healthy(&prom, etcd.netns());
    let want = BTreeSet::from([
        ("SmtpguardFleetBansRefused".to_owned(), String::new(), "unparsable".to_owned()),
        ("SmtpguardFleetPolicyRejected".to_owned(), instance(b), String::new()),
        ("SmtpguardReloadRejected".to_owned(), instance(b), String::new()),
    ]);
    let mut active = BTreeSet::new();
    within(Duration::from_secs(10), || {
        active = alert_states(&prom, etcd.netns())
            .into_iter()
            .map(|(n, _, l)| (n, l["instance"].as_str().unwrap_or_default().to_owned(), l["result"].as_str().unwrap_or_default().to_owned()))
            .collect();
        (active == want).then_some(())
    });
    assert_eq!(active, want, "active alerts (name, instance, result)");

    // etcd lost: Prometheus sees both hosts disconnected, and the alert
    // pending for each (its 5 minutes are the unit tests' to cover).
    etcd.kill9_all();
    let lost = Instant::now();
    wait_by_instance(&prom, etcd.netns(), "smtpguard_fleet_connected", &[(instance(a), 0.0), (instance(b), 0.0)], Duration::from_secs(15));
    let noticed = lost.elapsed();
    let mut pending = BTreeSet::new();
    within(Duration::from_secs(10), || {
        pending = alert_states(&prom, etcd.netns())
            .into_iter()
            .filter(|(n, state, _)| n == "SmtpguardFleetDisconnected" && state == "pending")
            .map(|(_, _, l)| l["instance"].as_str().unwrap_or_default().to_owned())
            .collect();
        (pending.len() == 2).then_some(())
    });
    assert_eq!(pending, BTreeSet::from([instance(a), instance(b)]), "SmtpguardFleetDisconnected pending");
    eprintln!(
        "Prometheus scraping both hosts after {:.1} s; etcd's loss in Prometheus after {:.1} s; whole test {:.1} s",
        ready.as_secs_f64(),
        noticed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
