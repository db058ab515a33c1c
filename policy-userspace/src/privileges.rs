//! What `smtpguard run` needs of the kernel's privileges: not uid 0, but
//! the capabilities that load and attach BPF programs. Checked before
//! anything changes, so a unit missing one says which.

/// The capabilities the controller uses, and why: each was shown needed by
/// starting without it (tests/deploy.rs starts it as `nobody` with exactly
/// these, and refused with one less).
pub const NEEDED: [(u32, &str, &str); 3] = [
    (39, "CAP_BPF", "to create the maps and load programs"),
    (12, "CAP_NET_ADMIN", "to load XDP and TC programs and attach them to interfaces"),
    (38, "CAP_PERFMON", "without it the verifier refuses the programs' packet-pointer arithmetic"),
];

/// The effective capability set of this thread, as a bit per capability.
fn effective() -> std::io::Result<u64> {
    // struct __user_cap_header_struct { u32 version; int pid; } and two
    // struct __user_cap_data_struct { u32 effective, permitted, inheritable; }.
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = [VERSION_3, 0u32];
    let mut data = [0u32; 6];
    // SAFETY: both buffers are the sizes capget(2) writes for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, header.as_mut_ptr(), data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(data[0] as u64 | ((data[3] as u64) << 32))
}

/// The needed capabilities this process lacks: (name, why).
pub fn missing() -> std::io::Result<Vec<(&'static str, &'static str)>> {
    let have = effective()?;
    Ok(NEEDED.iter().filter(|(bit, ..)| have & (1 << bit) == 0).map(|(_, name, why)| (*name, *why)).collect())
}

/// Whether this process may change nftables (CAP_NET_ADMIN), all the
/// nftables backend needs.
pub fn has_net_admin() -> std::io::Result<bool> {
    Ok(effective()? & (1 << 12) != 0)
}

/// Readiness for systemd (`Type=notify`): `READY=1` once the policy is
/// enforced, `STATUS=` lines after. Nothing without `NOTIFY_SOCKET`.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    // An abstract socket is written with a leading '@'.
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
    } else {
        socket.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!("notifying systemd ({state:?}): {e}");
    }
}
