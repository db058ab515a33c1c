//! The Debian package (issue 15), as an operator meets it on this
//! machine: `dpkg -i`, `smtpguard check` of the shipped policy, `man
//! smtpguard`, the completions and unit where the shells and systemd look
//! and accepted by `systemd-analyze verify`, an edited conffile kept when
//! the package is installed over itself, and a purge that leaves nothing:
//! binary, configuration, unit, pages, completions, user, logs, and pins
//! that no controller holds (pins a controller holds are kept).
//!
//! `cargo xtask test` builds the .deb first (`cargo xtask package`) and
//! names it in `SMTPGUARD_DEB`; run alone, the test takes the newest
//! `target/debian/smtpguard_*.deb`. It refuses to start on a machine that
//! has anything of smtpguard's installed, and a guard purges whatever it
//! installed, also when it fails.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

use smtpguard_tests::require_root;

/// Every file the package installs (man pages beyond the main one and the
/// docs are checked by pattern below).
const FILES: &[&str] = &[
    "/usr/bin/smtpguard",
    "/lib/systemd/system/smtpguard.service",
    "/etc/smtpguard/smtpguard.toml",
    "/etc/smtpguard/policy.yaml",
    "/etc/smtpguard/lists/drop.txt",
    "/usr/share/man/man1/smtpguard.1.gz",
    "/usr/share/man/man1/smtpguard-run.1.gz",
    "/usr/share/man/man1/smtpguard-check.1.gz",
    "/usr/share/bash-completion/completions/smtpguard",
    "/usr/share/zsh/vendor-completions/_smtpguard",
    "/usr/share/fish/vendor_completions.d/smtpguard.fish",
    "/usr/share/doc/smtpguard/README.md",
    "/usr/share/doc/smtpguard/operations.md",
    "/usr/share/doc/smtpguard/packaging.md",
    "/usr/share/doc/smtpguard/copyright",
    "/usr/share/doc/smtpguard/examples/idc-default.yaml",
    "/usr/share/doc/smtpguard/examples/lists/drop.txt",
];

/// What the package's scripts or the service create, and a purge removes.
const STATE: &[&str] = &["/etc/smtpguard", "/var/log/smtpguard", "/run/smtpguard", PINS];
const PINS: &str = "/sys/fs/bpf/smtpguard";
const CONFFILES: &[&str] = &["/etc/smtpguard/smtpguard.toml", "/etc/smtpguard/policy.yaml", "/etc/smtpguard/lists/drop.txt"];

/// The .deb to test: `$SMTPGUARD_DEB`, else the newest built one.
fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("SMTPGUARD_DEB") {
        return PathBuf::from(p);
    }
    // This test runs as target/<profile>/deps/package-<hash>.
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).expect("the target directory").to_owned();
    let dir = target.join("debian");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("smtpguard_")) && p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no smtpguard_*.deb in {}: run `cargo xtask package` (cargo xtask test does)", dir.display()))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).env("DEBIAN_FRONTEND", "noninteractive").output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn said(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs a command that must succeed; its stdout and stderr.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, said(&out));
    said(&out)
}

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "smtpguard"])).stdout.starts_with(b"install ok installed")
}

fn known(db: &str, name: &str) -> bool {
    run(Command::new("getent").args([db, name])).status.success()
}

/// Purges the package, and what it or the test left, when dropped: the
/// test started on a machine without any of it (checked), so all of it is
/// the test's.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = run(Command::new("dpkg").args(["--purge", "smtpguard"]));
        for path in STATE {
            let _ = std::fs::remove_dir_all(path);
        }
        if known("passwd", "smtpguard") {
            let _ = run(Command::new("userdel").arg("smtpguard"));
        }
        if known("group", "smtpguard") {
            let _ = run(Command::new("groupdel").arg("smtpguard"));
        }
    }
}

/// Holds an exclusive `flock` on a directory as a running controller
/// holds its pin directory.
fn lock_like_a_controller(dir: &Path) -> File {
    let f = File::open(dir).unwrap();
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    f
}

/// `man` as a reader runs it, rendered to plain text, wide enough that
/// no option is hyphenated.
fn man(page: &str) -> String {
    let out = run(Command::new("man").arg(page).env("MANPAGER", "cat").env("MANWIDTH", "200").env_remove("MAN_KEEP_FORMATTING"));
    assert!(out.status.success(), "man {page}: {}", said(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "privileged: installs and purges a Debian package as root; cargo xtask test runs it"]
fn the_package_installs_upgrades_over_itself_and_purges_clean() {
    require_root();
    let started = Instant::now();
    // Nothing of smtpguard's may be here: the purge would take it.
    assert!(!installed(), "the smtpguard package is installed on this machine; this test would purge it");
    for path in STATE {
        assert!(!Path::new(path).exists(), "{path} exists; this test would remove it with the purge");
    }
    assert!(!known("passwd", "smtpguard") && !known("group", "smtpguard"), "a user or group smtpguard exists; this test would remove it");
    let deb = deb();
    eprintln!("testing {}", deb.display());

    let _purge = Purge;
    ok(Command::new("dpkg").arg("--install").arg(&deb));
    assert!(installed());
    for file in FILES {
        assert!(Path::new(file).is_file(), "{file} was not installed");
    }
    // The main page and one per subcommand in --help (not the hidden generate-assets).
    let help = ok(Command::new("/usr/bin/smtpguard").arg("--help"));
    let commands: Vec<&str> = help
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands: section")
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 12 && commands.contains(&"run") && !commands.contains(&"generate-assets"), "{help}");
    let mut wanted: Vec<String> = commands.iter().map(|c| format!("/usr/share/man/man1/smtpguard-{c}.1.gz")).collect();
    wanted.push("/usr/share/man/man1/smtpguard.1.gz".to_owned());
    wanted.sort();
    let listed = ok(Command::new("dpkg").args(["--listfiles", "smtpguard"]));
    let mut pages: Vec<String> = listed.lines().filter(|l| l.starts_with("/usr/share/man/") && !l.ends_with("/man1") && l.contains('.')).map(str::to_owned).collect();
    pages.sort();
    assert_eq!(pages, wanted, "one page per command");
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "smtpguard"]));
    for file in CONFFILES {
        assert!(conffiles.lines().any(|l| l.split_whitespace().next() == Some(file)), "{file} is not a conffile: {conffiles}");
    }

    // The user the unit runs as: a system account without a home.
    let user = ok(Command::new("getent").args(["passwd", "smtpguard"]));
    let fields: Vec<&str> = user.trim().split(':').collect();
    assert!(fields[2].parse::<u32>().unwrap() < 1000, "a system uid: {user}");
    assert_eq!((fields[5], fields[6]), ("/nonexistent", "/usr/sbin/nologin"), "{user}");
    assert!(known("group", "smtpguard"));
    assert!(!Path::new("/nonexistent").exists());

    // The shipped policy and settings are valid as they are.
    let checked = ok(Command::new("/usr/bin/smtpguard").args(["check", "/etc/smtpguard/policy.yaml"]));
    assert!(checked.contains("valid"), "{checked}");
    let settings = smtpguard::settings::Settings::load(Path::new("/etc/smtpguard/smtpguard.toml")).expect("the shipped settings load");
    let options = settings.resolve().expect("and resolve");
    assert_eq!(options.policy, Path::new("/etc/smtpguard/policy.yaml"));

    // The manual, from the clap definitions.
    let page = man("smtpguard");
    for wanted in ["smtpguard-run(1)", "smtpguard-check(1)", "smtpguard-detach(1)", "/etc/smtpguard/policy.yaml", "/sys/fs/bpf/smtpguard"] {
        assert!(page.contains(wanted), "man smtpguard lacks {wanted}:\n{page}");
    }
    assert!(!page.contains("generate-assets"), "{page}");
    let run_page = man("smtpguard-run");
    for wanted in ["--config", "--policy", "--uplink", "--tenant", "--wait-for-uplinks"] {
        assert!(run_page.contains(wanted), "man smtpguard-run lacks {wanted}:\n{run_page}");
    }

    // Completions where bash-completion, zsh and fish look, for the subcommands.
    let bash = ok(Command::new("bash").args(["-c", "source /usr/share/bash-completion/completions/smtpguard && complete -p smtpguard"]));
    assert!(bash.contains("smtpguard"), "{bash}");
    for (file, wanted) in [
        ("/usr/share/bash-completion/completions/smtpguard", "--wait-for-uplinks"),
        ("/usr/share/zsh/vendor-completions/_smtpguard", "#compdef smtpguard"),
        ("/usr/share/fish/vendor_completions.d/smtpguard.fish", "complete -c smtpguard"),
    ] {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(text.contains(wanted) && text.contains("detach"), "{file} lacks {wanted} or detach");
    }

    // The unit, now that its binary, user and man page exist.
    let verify = ok(Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/smtpguard.service"]));
    assert!(!verify.contains("smtpguard.service"), "systemd-analyze verify complains about the unit: {verify}");

    // An operator's edit of a conffile survives installing the package over itself.
    let edited = std::fs::read_to_string("/etc/smtpguard/policy.yaml").unwrap() + "# kept across upgrades (tests/package.rs)\n";
    std::fs::write("/etc/smtpguard/policy.yaml", &edited).unwrap();
    let uid = fields[2].to_owned();
    ok(Command::new("dpkg").args(["--install", "--force-confold"]).arg(&deb));
    assert!(installed());
    assert_eq!(std::fs::read_to_string("/etc/smtpguard/policy.yaml").unwrap(), edited, "the edited conffile was replaced");
    assert!(!Path::new("/etc/smtpguard/policy.yaml.dpkg-dist").exists() && !Path::new("/etc/smtpguard/policy.yaml.dpkg-old").exists());
    let user_after = ok(Command::new("getent").args(["passwd", "smtpguard"]));
    assert_eq!(user_after.split(':').nth(2), Some(uid.as_str()), "the same user after the upgrade");
    ok(Command::new("/usr/bin/smtpguard").args(["check", "/etc/smtpguard/policy.yaml"]));

    // What the service would have made, and an operator's own list.
    std::fs::create_dir_all("/var/log/smtpguard").unwrap();
    std::fs::write("/var/log/smtpguard/events.jsonl", "{}\n").unwrap();
    std::fs::write("/etc/smtpguard/lists/local.txt", "192.0.2.1/32\n").unwrap();

    // Purge while a controller holds the pins: they are kept, and named.
    std::fs::create_dir_all(Path::new(PINS).join("lock_bans")).unwrap();
    let lock = lock_like_a_controller(Path::new(PINS));
    let purge = ok(Command::new("dpkg").args(["--purge", "smtpguard"]));
    assert!(purge.contains("its pins are kept") && !purge.contains("could not remove"), "{purge}");
    assert!(Path::new(PINS).join("lock_bans").is_dir(), "a running controller's pins were removed");
    drop(lock);
    assert_gone(&deb);

    // Installed again and purged with nobody holding the pins: they go too.
    ok(Command::new("dpkg").arg("--install").arg(&deb));
    assert!(Path::new(PINS).is_dir());
    let purge = ok(Command::new("dpkg").args(["--purge", "smtpguard"]));
    assert!(!purge.contains("could not remove") && !purge.contains("pins are kept"), "{purge}");
    assert!(!Path::new(PINS).exists(), "pins no controller held were left after the purge");
    assert_gone(&deb);
    eprintln!("installed, upgraded and purged in {:.1} s", started.elapsed().as_secs_f64());
}

/// Nothing of the package is left but pins a running controller holds.
fn assert_gone(deb: &Path) {
    assert!(!installed(), "still installed after the purge");
    let status = run(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", "smtpguard"]));
    assert!(!status.status.success() || String::from_utf8_lossy(&status.stdout).trim().is_empty(), "dpkg still knows smtpguard: {}", said(&status));
    let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(deb));
    for line in contents.lines() {
        // ./usr/bin/smtpguard -> /usr/bin/smtpguard; directories shared with other packages stay.
        let path = line.split_whitespace().last().unwrap().trim_start_matches('.');
        if !path.ends_with('/') {
            assert!(!Path::new(path).exists(), "{path} is left after the purge");
        }
    }
    for path in FILES.iter().chain(&["/etc/smtpguard", "/var/log/smtpguard", "/run/smtpguard", "/etc/systemd/system/multi-user.target.wants/smtpguard.service"]) {
        assert!(!Path::new(path).exists(), "{path} is left after the purge");
    }
    assert!(!known("passwd", "smtpguard"), "the user smtpguard is left after the purge");
    assert!(!known("group", "smtpguard"), "the group smtpguard is left after the purge");
}
