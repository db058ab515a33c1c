//! The `smtpguard` binary's policy commands, run as an operator would.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[path = "support/crafted_mmdb.rs"]
mod crafted_mmdb;

fn smtpguard(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_smtpguard")).args(args).current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_accepts_a_valid_policy_and_lists_every_error_of_an_invalid_one() {
    let (code, out, _) = smtpguard(&["check", "policies/idc-default.yaml"]);
    assert_eq!(code, 0);
    assert!(out.contains("valid"), "{out}");

    let dir = TempDir::new("invalid");
    let bad = dir.write("bad.yaml", "version: 1\nmode: maybe\negress: {deny: [10.0.0.1/8], colour: red}\n");
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

#[test]
fn generate_assets_writes_a_page_per_command_and_completions_and_stays_hidden() {
    let dir = TempDir::new("assets");
    let (code, out, err) = smtpguard(&["generate-assets", dir.0.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (_, help, _) = smtpguard(&["--help"]);
    assert!(!help.contains("generate-assets"), "{help}");
    // One page per command in --help (but `help`) and the main one; three shells.
    let commands = help.split("Commands:\n").nth(1).unwrap().lines().take_while(|l| !l.trim().is_empty()).filter(|l| !l.trim_start().starts_with("help ")).count();
    assert_eq!(out.lines().filter(|l| l.ends_with(".1")).count(), commands + 1, "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("/completions/")).count(), 3, "{out}");
    let main_page = std::fs::read_to_string(dir.0.join("man/smtpguard.1")).unwrap();
    assert!(main_page.contains("\n.TH smtpguard 1 ") && main_page.matches(".ds Aq").count() == 2, "one title, one preamble: {main_page}");
    for section in [".SH SUBCOMMANDS", ".SH FILES", ".SH \"SEE ALSO\""] {
        assert!(main_page.contains(section), "{section}");
    }
    for command in ["run", "tenants", "reload", "status", "bans", "ban", "unban", "detach", "trace", "check", "schema", "explain"] {
        assert!(dir.0.join(format!("man/smtpguard-{command}.1")).is_file(), "{command}");
        assert!(main_page.contains(&format!("smtpguard\\-{command}(1)")), "{command} in the main page");
    }
    let run_page = std::fs::read_to_string(dir.0.join("man/smtpguard-run.1")).unwrap();
    assert!(run_page.contains("wait\\-for\\-uplinks"), "{run_page}");
    for file in ["completions/smtpguard.bash", "completions/_smtpguard", "completions/smtpguard.fish"] {
        let text = std::fs::read_to_string(dir.0.join(file)).unwrap();
        assert!(text.contains("detach") && text.contains("wait-for-uplinks") && !text.contains("generate-assets"), "{file}");
    }
}

/// A temporary directory, removed when the test ends (passed or not).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("smtpguard-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    fn write(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one run of the binary did, with its own peak memory.
struct Run {
    code: i32,
    stderr: String,
    elapsed: Duration,
    /// ru_maxrss of this child alone (wait4), in KiB.
    max_rss_kib: i64,
}

/// Runs the binary, killing it if it is not done within `limit`.
#[expect(clippy::zombie_processes, reason = "the child is reaped by wait4, which also gives its own rusage")]
fn run_measured(args: &[&str], limit: Duration) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_smtpguard")).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    loop {
        // SAFETY: our own child; the out-pointers are valid.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            // SAFETY: as above; reaps the killed child.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            panic!("smtpguard {args:?} did not finish within {limit:?}; stderr:\n{}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -libc::WTERMSIG(status) };
    Run { code, stderr: reader.join().unwrap(), elapsed: start.elapsed(), max_rss_kib: usage.ru_maxrss }
}

const MAX_RSS_KIB: i64 = 256 * 1024;

#[test]
fn check_refuses_an_alias_bomb_quickly_in_bounded_memory() {
    let dir = TempDir::new("bomb");
    let mut text = String::from("version: 1\na: &a [x, x, x, x, x, x, x, x, x, x]\n");
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for w in names.windows(2) {
        text += &format!("{}: &{} [{}]\n", w[1], w[1], vec![format!("*{}", w[0]); 10].join(", "));
    }
    let path = dir.write("bomb.yaml", &text);
    let run = run_measured(&["check", path.to_str().unwrap()], Duration::from_secs(60));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("bomb.yaml:7:32: error: YAML syntax: this alias makes the document larger than 1000000 nodes"), "{}", run.stderr);
    assert!(run.max_rss_kib < MAX_RSS_KIB, "peak RSS {} KiB", run.max_rss_kib);
    assert!(run.elapsed < Duration::from_secs(10), "{:?}", run.elapsed);
}

#[test]
fn check_returns_at_once_for_a_fifo_device_or_directory_list() {
    let dir = TempDir::new("kinds");
    let fifo = dir.0.join("feed.txt");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::create_dir(dir.0.join("lists.d")).unwrap();
    for (list, what) in [("feed.txt", "is a FIFO (named pipe)"), ("/dev/zero", "is a character device"), ("lists.d", "is a directory")] {
        let path = dir.write("policy.yaml", format!("version: 1\ningress: {{deny_files: [{list}]}}\n"));
        // Nothing ever writes to the FIFO: a blocking open would hang until killed.
        let run = run_measured(&["check", path.to_str().unwrap()], Duration::from_secs(20));
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains("policy.yaml:2:24: error: ingress.deny_files[0]: cannot read list file: ") && run.stderr.contains(what), "{}", run.stderr);
        assert!(run.max_rss_kib < MAX_RSS_KIB, "{list}: peak RSS {} KiB", run.max_rss_kib);
    }
}

#[test]
fn the_list_size_limit_is_raised_by_the_flag_and_by_the_policy() {
    let dir = TempDir::new("limit");
    dir.write("list.txt", (0..100).map(|i| format!("10.{i}.0.0/16\n")).collect::<String>());
    let plain = dir.write("plain.yaml", "version: 1\ningress: {deny_files: [list.txt]}\n");
    let raised = dir.write("raised.yaml", "version: 1\nlimits: {list_file_bytes: 2KiB}\ningress: {deny_files: [list.txt]}\n");
    let (plain, raised) = (plain.to_str().unwrap(), raised.to_str().unwrap());
    let (code, _, err) = smtpguard(&["check", plain, "--max-list-bytes", "1kB"]);
    assert_eq!(code, 1);
    assert!(err.contains("list.txt is 1290 bytes, over 1000 bytes") && err.contains("--max-list-bytes"), "{err}");
    let (code, out, err) = smtpguard(&["check", plain, "--max-list-bytes", "2KiB"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("100 rules"), "{out}");
    let (code, _, err) = smtpguard(&["check", raised, "--max-list-bytes", "1kB"]);
    assert_eq!(code, 0, "the policy's limits override the flag: {err}");
    let (code, _, err) = smtpguard(&["check", plain, "--max-list-bytes", "lots"]);
    assert_eq!(code, 2, "clap refuses a bad size: {err}");
    assert!(err.contains("`lots` is not a size"), "{err}");
}

#[test]
fn check_prints_twenty_of_a_million_bad_lines_and_the_count() {
    let dir = TempDir::new("million");
    dir.write("bad.txt", "junk\n".repeat(1_000_000));
    let path = dir.write("policy.yaml", "version: 1\ningress: {deny_files: [bad.txt]}\n");
    let run = run_measured(&["check", path.to_str().unwrap()], Duration::from_secs(120));
    assert_eq!(run.code, 1);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(errors.len(), 20, "{}", run.stderr);
    assert!(errors[19].contains("bad.txt:20:1: error: `junk` is not a CIDR"), "{}", errors[19]);
    assert!(run.stderr.contains("bad.txt: 999980 more errors not shown"), "{}", run.stderr);
    assert!(run.stderr.contains("policy.yaml: 1000000 error(s); the policy is not valid"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 22, "{}", run.stderr);
    assert!(run.max_rss_kib < MAX_RSS_KIB, "peak RSS {} KiB", run.max_rss_kib);
}

/// The rejected reload of the issue: a list of valid CIDRs just under a
/// limit raised to 64 MiB, then one bad line.
#[test]
fn a_64_mib_list_with_one_bad_line_is_refused_in_bounded_memory() {
    let dir = TempDir::new("big");
    let mut text = String::with_capacity(64 << 20);
    let mut i = 0u32;
    while text.len() < (64 << 20) - 64 {
        let a = i.wrapping_mul(2_654_435_761) & 0xffff_ff00;
        text += &format!("{}/24\n", std::net::Ipv4Addr::from(a));
        i += 1;
    }
    text += "bad-line\n";
    assert!(text.len() <= 64 << 20);
    dir.write("big.txt", &text);
    drop(text);
    let path = dir.write("policy.yaml", "version: 1\nlimits: {list_file_bytes: 64MiB}\ningress: {deny_files: [big.txt]}\n");
    let run = run_measured(&["check", path.to_str().unwrap()], Duration::from_secs(300));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains(&format!("big.txt:{}:1: error: `bad-line` is not a CIDR", i + 1)), "{}", run.stderr);
    assert!(run.stderr.contains("1 error(s)"), "{}", run.stderr);
    assert!(run.max_rss_kib < MAX_RSS_KIB, "peak RSS {} KiB for {i} networks", run.max_rss_kib);
}

#[test]
fn check_refuses_a_crafted_geo_database_naming_it() {
    let dir = TempDir::new("geo");
    let db = dir.write("crafted.mmdb", crafted_mmdb::self_similar_mmdb(32));
    let path = dir.write("policy.yaml", "version: 1\ningress:\n  geo: {database: crafted.mmdb, block: [US]}\n");
    let run = run_measured(&["check", path.to_str().unwrap()], Duration::from_secs(120));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains(&format!("policy.yaml:3:19: error: ingress.geo.database: {} holds more than 4000000 networks", db.display())), "{}", run.stderr);
    assert!(run.max_rss_kib < MAX_RSS_KIB, "peak RSS {} KiB", run.max_rss_kib);
    let run = run_measured(&["check", path.to_str().unwrap(), "--max-geo-networks", "10"], Duration::from_secs(60));
    assert!(run.stderr.contains("holds more than 10 networks"), "{}", run.stderr);
    let run = run_measured(&["check", path.to_str().unwrap(), "--geo-database", "/dev/zero"], Duration::from_secs(20));
    assert!(run.stderr.contains("ingress.geo.database: /dev/zero is a character device, not a regular file"), "{}", run.stderr);
}
