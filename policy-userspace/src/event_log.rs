//! Where events go: JSON lines appended to a file (or stdout) that
//! survives a full disk and log rotation.
//!
//! A failed write is counted (`smtpguard_event_write_failures_total`) and
//! logged once per episode of failures, not once per event. A line cut
//! short by a full disk is ended before the next one, so a reader loses
//! that line only. The file is reopened when its path names another file
//! than the one open (logrotate moved it away) and on SIGUSR1, so rotation
//! needs no `copytruncate`.

use std::{
    fs::File,
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use prometheus::IntCounter;

pub struct EventLog {
    target: Target,
    failures: IntCounter,
    /// Failed writes in the current episode; 0 when the last write worked.
    failing: u64,
    /// The last write stopped inside a line.
    cut_line: bool,
}

enum Target {
    Stdout,
    File { path: PathBuf, file: Option<File>, identity: Option<(u64, u64)> },
}

fn open_append(path: &Path) -> std::io::Result<(File, (u64, u64))> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let meta = file.metadata()?;
    Ok((file, (meta.dev(), meta.ino())))
}

impl EventLog {
    /// Events to `path` (created if missing), or to stdout.
    pub fn open(path: Option<&Path>, failures: IntCounter) -> std::io::Result<Self> {
        let target = match path {
            None => Target::Stdout,
            Some(p) => {
                let (file, identity) = open_append(p)?;
                Target::File { path: p.to_owned(), file: Some(file), identity: Some(identity) }
            }
        };
        Ok(Self { target, failures, failing: 0, cut_line: false })
    }

    /// Appends one event as a line.
    pub fn emit(&mut self, event: &crate::events::Event) {
        let mut line = Vec::with_capacity(256);
        if self.cut_line {
            line.push(b'\n');
        }
        // Writing JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut line, event);
        line.push(b'\n');
        let (written, result) = match &mut self.target {
            Target::Stdout => write_counted(&mut std::io::stdout().lock(), &line),
            Target::File { file: Some(f), .. } => write_counted(f, &line),
            Target::File { file: None, .. } => (0, Err(std::io::Error::other("the file could not be reopened"))),
        };
        match result {
            Ok(()) => {
                self.cut_line = false;
                if self.failing > 0 {
                    tracing::info!("events: writing to {} works again; {} event(s) were lost", self.name(), self.failing);
                    self.failing = 0;
                }
            }
            Err(e) => {
                self.cut_line = self.cut_line || written > 0;
                self.failures.inc();
                if self.failing == 0 {
                    tracing::error!(
                        "events: writing to {} failed ({e}); counting lost events in smtpguard_event_write_failures_total until it works again",
                        self.name()
                    );
                }
                self.failing += 1;
            }
        }
    }

    fn name(&self) -> String {
        match &self.target {
            Target::Stdout => "stdout".into(),
            Target::File { path, .. } => path.display().to_string(),
        }
    }

    /// Reopens the file if its path now names another file, or none
    /// (rotated away). Cheap: one stat.
    pub fn follow_rotation(&mut self) {
        let Target::File { path, identity, .. } = &self.target else { return };
        let now = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        if now.is_none() || now != *identity {
            self.reopen("the file was rotated");
        }
    }

    /// Closes and reopens the file (SIGUSR1, rotation).
    pub fn reopen(&mut self, why: &str) {
        let Target::File { path, file, identity } = &mut self.target else { return };
        match open_append(path) {
            Ok((f, id)) => {
                *file = Some(f);
                *identity = Some(id);
                // A new file starts on a line of its own.
                self.cut_line = false;
                tracing::info!("events: reopened {} ({why})", path.display());
            }
            Err(e) => {
                // Events go on to the old file, if any; said once, retried each tick.
                if identity.is_some() {
                    tracing::error!("events: cannot reopen {} ({e}); retrying", path.display());
                }
                *identity = None;
            }
        }
    }
}

/// `write_all`, also saying how many bytes got out before an error.
fn write_counted(w: &mut impl Write, mut buf: &[u8]) -> (usize, std::io::Result<()>) {
    let mut written = 0;
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return (written, Err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                written += n;
                buf = &buf[n..];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Err(e)),
        }
    }
    (written, w.flush())
}
