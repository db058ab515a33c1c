//! Builds the eBPF object (`policy-ebpf`) and leaves it in OUT_DIR for
//! `include_bytes_aligned!`. Needs bpf-linker: `cargo xtask setup` installs
//! it under ~/.cache/smtpguard/tools/bin, or have it on PATH.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

const EBPF_TARGET: &str = "bpfel-unknown-none";

fn tools_dir() -> Option<PathBuf> {
    env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/smtpguard/tools/bin"))
}

fn find_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(tools_dir())
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    for dir in ["policy-ebpf/src", "policy-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("policy-ebpf/Cargo.toml").display());
    println!("cargo:rerun-if-env-changed=PATH");

    let Some(linker) = find_linker() else {
        panic!(
            "bpf-linker not found on PATH or in ~/.cache/smtpguard/tools/bin.\n\
             Run `cargo xtask setup` once; it builds bpf-linker against the toolchain's LLVM."
        );
    };
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let target_dir = out_dir.join("ebpf");
    build_ebpf(&root, &target_dir, &linker);

    let object = target_dir.join(EBPF_TARGET).join("release").join("policy-ebpf");
    std::fs::copy(&object, out_dir.join("policy-ebpf.o"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}

fn build_ebpf(root: &Path, target_dir: &Path, linker: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut path = OsString::from(linker.parent().unwrap());
    path.push(":");
    path.push(env::var_os("PATH").unwrap_or_default());
    let rustflags = ["-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-cpu=v3"].join("\x1f");

    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "-p", "policy-ebpf", "--target", EBPF_TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        // The eBPF build alone needs unstable flags; the userspace build must not see this.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env("PATH", path);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_ENCODED_RUSTFLAGS_BOOTSTRAP",
        "CARGO_LLVM_COV",
        "RUSTDOCFLAGS",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_CFG_") || key.starts_with("CARGO_FEATURE_") || key.starts_with("CARGO_PROFILE_") {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().expect("running cargo for the eBPF object");
    assert!(status.success(), "building policy-ebpf failed (see the errors above)");
}
