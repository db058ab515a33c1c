//! A private Postfix (Debian's full `smtpd`, not `smtp-sink`) in a test's
//! network namespace: its own configuration, queue and data directories
//! and mail log under one temporary directory, so the machine's
//! `/etc/postfix` and its queue are never touched.
//!
//! `postfix -c DIR` reads `main.cf` and `master.cf` from `DIR` (root may
//! name any directory; `alternate_config_directories` only binds the
//! set-gid commands). The master binds `inet_interfaces` in the namespace
//! it was started in, so every command runs there (`nsenter --net`). No
//! service is chrooted (a chroot would need a copy of `/etc` files in the
//! queue directory). Drop stops the instance, kills what is left of it and
//! removes the directory, also when a test panics; it must go before its
//! namespace (a live master would keep the namespace alive).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::{run, Netns};

/// The domain the discard transport swallows: mail to it is accepted,
/// queued and dropped by Postfix's `discard` service (logged as sent).
pub const DISCARD_DOMAIN: &str = "discard.test";

pub struct Postfix {
    ns_name: String,
    dir: PathBuf,
    master_pid: Option<i32>,
}

impl Postfix {
    /// Starts an instance answering on port 25 of `listen` (addresses of
    /// `ns`), relaying for `clients` (CIDRs) to [`DISCARD_DOMAIN`] only,
    /// with VRFY enabled. Ready when its greeting answers on every address.
    pub fn start(ns: &Netns, tag: &str, listen: &[&str], clients: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("sgpostfix-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut pf = Self { ns_name: ns.name().to_owned(), dir, master_pid: None };
        // The queue's subdirectories are made by `postfix check`
        // (post-install create-missing); the data directory (master.lock,
        // caches) must be the mail owner's.
        run(&["chown", "postfix", &pf.dir.join("data").display().to_string()])?;
        let bracket = |a: &&str| if a.contains(':') { format!("[{a}]") } else { (*a).to_owned() };
        let bracket_net = |c: &&str| match c.split_once('/') {
            Some((a, len)) if a.contains(':') => format!("[{a}]/{len}"),
            _ => (*c).to_owned(),
        };
        let d = pf.dir.display();
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {d}/queue\n\
             data_directory = {d}/data\n\
             maillog_file = {d}/maillog\n\
             maillog_file_prefixes = {d}\n\
             myhostname = lab.test\n\
             mydomain = lab.test\n\
             mydestination = $myhostname, localhost\n\
             inet_interfaces = {listen}\n\
             inet_protocols = all\n\
             mynetworks = {clients}\n\
             smtpd_peername_lookup = no\n\
             smtp_dns_support_level = disabled\n\
             default_transport = error:the lab sends no mail out\n\
             transport_maps = inline:{{{DISCARD_DOMAIN}=discard:}}\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             disable_vrfy_command = no\n\
             # No alias database to build; every local name exists.\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             smtpd_banner = $myhostname ESMTP lab\n\
             biff = no\n",
            listen = listen.iter().map(bracket).collect::<Vec<_>>().join(", "),
            clients = clients.iter().map(bracket_net).collect::<Vec<_>>().join(", "),
        );
        std::fs::write(pf.dir.join("etc/main.cf"), main_cf)?;
        // What smtpd, a delivery to the discard transport and the mail log
        // need, with Debian's process limits (cleanup and bounce insist on
        // 0, unlimited); nothing chrooted.
        let services = [
            ("smtp", "inet", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "1", "verify"),
            ("proxymap", "unix", "-", "-", "-", "proxymap"),
            ("showq", "unix", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "-", "error"),
            ("retry", "unix", "-", "-", "-", "error"),
            ("discard", "unix", "-", "-", "-", "discard"),
            ("anvil", "unix", "-", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "1", "postlogd"),
        ];
        let master_cf: String =
            services.iter().map(|(name, kind, private, wakeup, limit, command)| format!("{name} {kind} {private} - n {wakeup} {limit} {command}\n")).collect();
        std::fs::write(pf.dir.join("etc/master.cf"), master_cf)?;

        let config = pf.config().display().to_string();
        let check = pf.exec(&["postfix", "-c", &config, "check"]).context("postfix check")?;
        let said = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr) + &pf.maillog();
        if said.contains("warning:") || said.contains("fatal:") {
            bail!("postfix check of {config} complains:\n{said}");
        }
        pf.exec(&["postfix", "-c", &config, "start"]).with_context(|| format!("postfix start; its log:\n{}", pf.maillog()))?;
        pf.master_pid = std::fs::read_to_string(pf.dir.join("queue/pid/master.pid")).ok().and_then(|p| p.trim().parse().ok());
        for addr in listen {
            pf.wait_greeting(ns, addr, Duration::from_secs(5)).with_context(|| format!("postfix on {addr}:25\n{}", pf.maillog()))?;
        }
        Ok(pf)
    }

    fn config(&self) -> PathBuf {
        self.dir.join("etc")
    }

    fn exec(&self, args: &[&str]) -> Result<std::process::Output> {
        let net = format!("--net=/run/netns/{}", self.ns_name);
        let mut full = vec!["nsenter", &net, "--"];
        full.extend_from_slice(args);
        run(&full)
    }

    /// From inside the server's namespace (over its loopback, not the
    /// guarded interface).
    fn wait_greeting(&self, ns: &Netns, addr: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let greeted = crate::hvlab::greeting(ns, addr, addr, 25);
            match greeted {
                Ok(g) if g.starts_with("220 ") => return Ok(()),
                Ok(g) => bail!("odd greeting {g:?}"),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Lines of the mail log that say something went wrong in Postfix
    /// itself (a `fatal:`, `panic:` or `warning:`), not in a session.
    pub fn complaints(&self) -> Vec<String> {
        self.maillog().lines().filter(|l| ["fatal:", "panic:", "warning:"].iter().any(|w| l.contains(w))).map(str::to_owned).collect()
    }

    /// The instance's mail log so far.
    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.maillog_path()).unwrap_or_default()
    }

    pub fn maillog_path(&self) -> PathBuf {
        self.dir.join("maillog")
    }

    /// Waits, at most `within`, for a log line containing every one of
    /// `needles`.
    pub fn wait_for_log(&self, needles: &[&str], within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.maillog().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Ok(line.to_owned());
            }
            if Instant::now() > deadline {
                bail!("no line with {needles:?} in {} within {within:?}", self.maillog_path().display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A process that has exited (gone, or a zombie its parent has yet to reap).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let config = self.config().display().to_string();
        let _ = self.exec(&["postfix", "-c", &config, "stop"]);
        if let Some(pid) = self.master_pid {
            // The master takes its children down; bounded, then by force
            // (its process group, as `postfix stop` itself would).
            let deadline = Instant::now() + Duration::from_secs(5);
            while !gone(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !gone(pid) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The queue id in a `250 2.0.0 Ok: queued as ID` reply.
pub fn queue_id(reply: &str) -> Option<&str> {
    reply.strip_prefix("250 ")?.split("queued as ").nth(1).map(str::trim)
}

