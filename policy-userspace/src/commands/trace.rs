//! `smtpguard trace ADDR`: the datapath's decision about every packet of
//! one address, line by line, from a running datapath.
//!
//! The kernel side (`policy-ebpf/src/trace.rs`) writes one aya-log record
//! per judged TCP segment whose source or destination is the address in
//! the `TRACE` selector, and nothing while the selector is off. This
//! command works on the pinned state, like `status`: it finds the loaded
//! programs from their pins and their maps by id (`dataplane/trace.rs`),
//! sets the selector, and prints each line as it arrives. The controller
//! never reads the ring and needs no logger.
//!
//! The selector holds an expiry (`until_ns`, the coarse kernel clock),
//! which the datapath honours: on Ctrl-C, SIGTERM, SIGHUP, the end of
//! `--for`, a closed stdout or an error, the command turns the selector
//! off itself; if it is killed, tracing stops at the expiry all the same.
//! One trace at a time per pin directory (an `flock` on `lock_trace`
//! there): the selector and the ring's read position are shared.

use std::{
    io::Write,
    net::IpAddr,
    os::fd::AsRawFd,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::Poll,
    time::Duration,
};

use anyhow::{bail, Context};
use aya_log::EbpfLogger;
use policy_common::{direction, reason, trace::TraceSelector, verdict};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{
    clock::{self, ktime_now_ns},
    dataplane::{
        trace::{attach_loggers, pinned_program_ids, TraceSwitch},
        Hook,
    },
    pins::Pins,
};

/// The longest trace `--for` takes. A trace is for watching a few flows
/// now; its expiry bounds one whose command was killed.
pub const MAX_TRACE_S: u64 = 86_400;

/// The length of a trace (`--for`): a duration such as `30s`, `15m`,
/// `2h`, positive and at most [`MAX_TRACE_S`].
pub fn parse_trace_duration(s: &str) -> Result<Duration, String> {
    let secs = crate::policy::time::parse_duration(s)
        .ok_or_else(|| format!("`{s}` is not a duration; write a number and s, m, h or d, such as 30s, 15m, 2h"))?;
    if secs == 0 {
        return Err(format!("`{s}`: a trace must last a while, such as 30s or 15m"));
    }
    if secs > MAX_TRACE_S {
        return Err(format!("`{s}` is longer than the longest trace, 24h (a trace is for watching flows now)"));
    }
    Ok(Duration::from_secs(secs))
}

/// A kernel trace line (numbers) with the hook, direction, verdict and
/// reason named, and `syn`/`reset` as yes/no. Unknown keys and values out
/// of range are left as they are.
pub fn render(message: &str) -> String {
    let name = |key: &str, value: &str| -> Option<String> {
        let n: usize = value.parse().ok()?;
        let named = match key {
            "hook" => Hook::ALL.iter().find(|h| h.index() == n)?.program_name(),
            "dir" => direction::NAMES.get(n)?,
            "verdict" => verdict::NAMES.get(n)?,
            "reason" => reason::NAMES.get(n)?,
            "syn" | "reset" => ["no", "yes"].get(n)?,
            _ => return None,
        };
        Some(named.to_owned())
    };
    message
        .split(' ')
        .map(|field| match field.split_once('=') {
            Some((k, v)) => format!("{k}={}", name(k, v).unwrap_or_else(|| v.to_owned())),
            None => field.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the command's trace lines go: stdout, each line prefixed with
/// the time it was read.
#[derive(Default)]
struct Sink {
    /// Records read while set are dropped (what an earlier trace left).
    muted: AtomicBool,
    /// stdout failed (a closed pipe): the command ends.
    closed: AtomicBool,
    lines: AtomicU64,
}

#[derive(Clone)]
struct SinkRef(Arc<Sink>);

impl log::Log for SinkRef {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let sink = &self.0;
        if sink.muted.load(Ordering::Relaxed) || sink.closed.load(Ordering::Relaxed) {
            return;
        }
        let line = format!("{} {}\n", clock::now_rfc3339(), render(&record.args().to_string()));
        let mut out = std::io::stdout().lock();
        if out.write_all(line.as_bytes()).and_then(|()| out.flush()).is_err() {
            sink.closed.store(true, Ordering::Relaxed);
            return;
        }
        sink.lines.fetch_add(1, Ordering::Relaxed);
    }

    fn flush(&self) {}
}

/// `flock` on the pin directory's `lock_trace` directory, without
/// waiting; held while the file is open.
struct TraceLock {
    _dir: std::fs::File,
}

impl TraceLock {
    fn take(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("lock_trace");
        match std::fs::create_dir(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e).with_context(|| format!("locking {}", path.display())),
            _ => {}
        }
        let file = std::fs::File::open(&path).with_context(|| format!("locking {}", path.display()))?;
        // SAFETY: flock on an fd we own; released when it closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!("another `smtpguard trace` is running on {}; one trace at a time per pin directory", dir.display());
            }
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
        Ok(Self { _dir: file })
    }
}

/// `smtpguard trace ADDR [--port N] [--for DURATION]`.
pub fn run(pins: &Pins, addr: IpAddr, port: Option<u16>, duration: Duration) -> anyhow::Result<()> {
    if crate::nft::commands::enforces(pins) {
        anyhow::bail!("trace follows the eBPF datapath; this host enforces through nftables (use `nft monitor trace` with a meta nftrace rule; docs/nftables.md)");
    }
    // An IPv4-mapped IPv6 address means the IPv4 address: that is how its flows look.
    let addr = addr.to_canonical();
    let programs = pinned_program_ids(pins)?;
    let _lock = TraceLock::take(&pins.dir)?;
    let ids: Vec<u32> = programs.iter().map(|(_, id)| *id).collect();
    let switch = TraceSwitch::open(&ids)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(follow(&switch, &programs, addr, port, duration))
    // `switch` drops here (and on every early return): tracing is off.
}

async fn follow(switch: &TraceSwitch, programs: &[(&str, u32)], addr: IpAddr, port: Option<u16>, duration: Duration) -> anyhow::Result<()> {
    let on = |kind: SignalKind| signal(kind).context("installing signal handlers");
    let (mut int, mut term, mut hup) = (on(SignalKind::interrupt())?, on(SignalKind::terminate())?, on(SignalKind::hangup())?);
    let ids: Vec<u32> = programs.iter().map(|(_, id)| *id).collect();
    let sink = Arc::new(Sink::default());
    let mut loggers = Vec::new();
    for logger in attach_loggers(&ids, SinkRef(sink.clone()))? {
        // SAFETY: the logger owns the ring's fd and keeps it open, the
        // same fd, for as long as it lives: inside the AsyncFd.
        let fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        loggers.push(fd.map_err(|e| anyhow::anyhow!("watching the log ring: {e:?}"))?);
    }
    // An earlier trace's selector off, and what it left in the ring dropped.
    switch.off();
    sink.muted.store(true, Ordering::Relaxed);
    for l in &mut loggers {
        l.get_mut().flush();
    }
    sink.muted.store(false, Ordering::Relaxed);
    let until = u64::try_from(duration.as_nanos()).ok().and_then(|d| ktime_now_ns().checked_add(d)).context("the trace's end does not fit the clock")?;
    switch.set(&TraceSelector::new(addr, port.unwrap_or(0), until));
    let names: Vec<&str> = programs.iter().map(|(n, _)| *n).collect();
    eprintln!(
        "tracing {addr}{} on {} for {} s (Ctrl-C stops); each line: time, hook, direction, flow, verdict, reason, rule id, country index, reset",
        port.map(|p| format!(" port {p}")).unwrap_or_default(),
        names.join(", "),
        duration.as_secs()
    );
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    // A backstop: the ring wakes its reader, but a line is never held up
    // longer than this if a wakeup is missed.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let why = loop {
        if sink.closed.load(Ordering::Relaxed) {
            break "stdout closed";
        }
        tokio::select! {
            r = readable(&mut loggers) => r.context("reading the log ring")?,
            _ = tick.tick() => loggers.iter_mut().for_each(|l| l.get_mut().flush()),
            _ = &mut deadline => break "its time is up",
            _ = int.recv() => break "interrupted",
            _ = term.recv() => break "terminated",
            _ = hup.recv() => break "hung up",
        }
    };
    switch.off();
    // Lines of packets judged before the switch went off.
    for l in &mut loggers {
        l.get_mut().flush();
    }
    eprintln!("trace of {addr} ended ({why}); tracing is off; {} line(s)", sink.lines.load(Ordering::Relaxed));
    Ok(())
}

/// Waits until a ring has records, and prints them.
async fn readable<T: log::Log>(loggers: &mut [AsyncFd<EbpfLogger<T>>]) -> std::io::Result<()> {
    std::future::poll_fn(|cx| {
        let mut read = false;
        for l in loggers.iter_mut() {
            while let Poll::Ready(guard) = l.poll_read_ready_mut(cx) {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
                read = true;
            }
        }
        if read {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_hooks_directions_verdicts_and_reasons() {
        let line = "hook=2 dir=1 src=192.0.2.10 sport=40000 dst=203.0.113.80 dport=25 syn=1 len=0 verdict=1 reason=10 rule=0 country=0 reset=0";
        assert_eq!(
            render(line),
            "hook=tc_egress dir=egress src=192.0.2.10 sport=40000 dst=203.0.113.80 dport=25 syn=yes len=0 verdict=drop reason=default_deny rule=0 country=0 reset=no"
        );
        // IPv6 addresses keep their colons; unknown values stay numbers.
        assert_eq!(render("src=2001:db8::7 reason=99 verdict=x"), "src=2001:db8::7 reason=99 verdict=x");
    }

    #[test]
    fn durations_are_positive_and_at_most_a_day() {
        assert_eq!(parse_trace_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_trace_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_trace_duration("0s").unwrap_err().contains("must last"));
        assert!(parse_trace_duration("25h").unwrap_err().contains("longest trace, 24h"));
        assert!(parse_trace_duration("-5m").unwrap_err().contains("not a duration"));
        assert!(parse_trace_duration("5w").unwrap_err().contains("not a duration"));
    }
}
