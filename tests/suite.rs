//! The suite itself: no test that needs root can pass without running.
//! Such tests are `#[ignore]`d for a plain `cargo test` (reported as
//! ignored) and run by `cargo xtask test` with `--include-ignored`; when
//! they run without root, `require_root` fails them. Needs no privilege.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// `(file, test name, ignored)` of every `#[test]` function in `dir` whose
/// body calls `needs`, and whether an `#[ignore = ...]` sits on it.
fn tests_calling(dir: &str, needs: &str) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join(dir)).unwrap() {
        let path = entry.unwrap().path();
        // This file names the markers it looks for.
        if path.extension().is_none_or(|e| e != "rs") || path.ends_with("tests/suite.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for chunk in text.split("#[test]").skip(1) {
            let Some((attrs, rest)) = chunk.split_once("fn ") else { continue };
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            // The body runs to the next top-level item.
            let body = rest.split("\n}\n").next().unwrap_or(rest);
            if body.contains(needs) {
                out.push((file.clone(), name, attrs.contains("#[ignore")));
            }
        }
    }
    out
}

fn assert_all_ignored(tests: &[(String, String, bool)], what: &str) {
    let silent: Vec<_> = tests.iter().filter(|(_, _, ignored)| !ignored).map(|(f, n, _)| format!("{f}: {n}")).collect();
    assert!(silent.is_empty(), "{what} without #[ignore] would pass unrun under a plain cargo test: {silent:?}");
}

#[test]
fn every_test_that_needs_root_is_ignored_by_a_plain_cargo_test() {
    let tests = tests_calling("tests", "require_root()");
    assert!(tests.len() >= 30, "the privileged tests are found: {}", tests.len());
    assert_all_ignored(&tests, "privileged tests");
}

#[test]
fn every_test_that_needs_the_real_geo_database_is_ignored_by_a_plain_cargo_test() {
    let tests = tests_calling("policy-userspace/tests", "real_db()");
    assert!(tests.len() >= 2, "the real-database tests are found: {}", tests.len());
    assert_all_ignored(&tests, "tests of the real geo database");
}

#[test]
fn require_root_fails_rather_than_returns() {
    let lib = std::fs::read_to_string(root().join("tests/lib.rs")).unwrap();
    let f = lib.split("pub fn require_root()").nth(1).expect("require_root in tests/lib.rs");
    let signature = f.split('{').next().unwrap_or("");
    assert!(!signature.contains("->"), "require_root must not return a flag a test could return on: {signature}");
}

#[test]
fn cargo_xtask_test_runs_the_ignored_tests() {
    let setup = std::fs::read_to_string(root().join("xtask/src/setup.rs")).unwrap();
    assert!(setup.contains("\"--include-ignored\""), "cargo xtask test passes --include-ignored");
}
