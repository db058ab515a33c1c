//! The `smtpguard` binary's policy commands, run as an operator would.

use std::{path::Path, process::Command};

fn smtpguard(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_smtpguard")).args(args).current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_accepts_a_valid_policy_and_lists_every_error_of_an_invalid_one() {
    let (code, out, _) = smtpguard(&["check", "policies/idc-default.yaml"]);
    assert_eq!(code, 0);
    assert!(out.contains("valid"), "{out}");

    let dir = std::env::temp_dir().join(format!("smtpguard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "version: 1\nmode: maybe\negress: {deny: [10.0.0.1/8], colour: red}\n").unwrap();
    let (code, _, err) = smtpguard(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].contains("bad.yaml:2:7: error: mode:"), "{err}");
    assert!(lines[1].contains("bad.yaml:3:17: error: egress.deny[0]:") && lines[1].contains("10.0.0.0/8"), "{err}");
    assert!(lines[2].contains("bad.yaml:3:30: error: egress.colour: unknown field"), "{err}");

    let (code, _, err) = smtpguard(&["check", "/nonexistent/policy.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read the policy"), "{err}");
}

#[test]
fn schema_is_json_and_explain_answers_in_json() {
    let (code, out, _) = smtpguard(&["schema"]);
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(schema["required"][0], "version");

    let (code, out, _) = smtpguard(&[
        "explain", "policies/idc-default.yaml", "--direction", "ingress", "--src", "198.18.0.9", "--dst", "192.0.2.99", "--dport", "25", "--syn", "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["verdict"].as_str(), v["reason"].as_str(), v["rule"].as_str()), (Some("drop"), Some("deny_acl"), Some("drop-list")));
    assert_eq!(v["rule_origin"], "policies/lists/drop.txt:4");
}
