//! How a host joins the fleet: the etcd endpoints and credentials, its
//! name, and what it trusts. The same struct is the `--fleet-*` flags and
//! the config file's `[fleet]` table.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

/// The fleet's settings, flags over the config file's `[fleet]`.
#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FleetSettings {
    /// Join the fleet through these etcd endpoints (comma-separated http:// or https:// URLs): bans are shared
    /// with every host, and with --fleet-policy the policy too.
    #[arg(long = "fleet-etcd", value_name = "URL,...", value_delimiter = ',')]
    #[serde(default)]
    pub etcd: Vec<String>,
    /// The fleet's keys live under this prefix. Default /smtpguard.
    #[arg(long = "fleet-prefix", value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// This host's name in the fleet. Default: the hostname.
    #[arg(long = "host-id", value_name = "NAME")]
    pub host_id: Option<String>,
    /// CA certificate (PEM) that signed the etcd servers' certificates.
    #[arg(long = "fleet-ca", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-cert-auth; with --fleet-key.
    #[arg(long = "fleet-cert", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long = "fleet-key", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// etcd user (etcd's auth); its password is read from --fleet-password-file.
    #[arg(long = "fleet-user", value_name = "NAME")]
    pub user: Option<String>,
    /// File holding the etcd user's password (first line), never the command line.
    #[arg(long = "fleet-password-file", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// run: follow the fleet's policy (`smtpguard fleet push`) instead of a local file; --policy, if given, is
    /// enforced until the first fleet revision is applied.
    #[arg(long = "fleet-policy", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub follow_policy: Option<bool>,
    /// run: refuse fleet bans of IPv4 networks wider than this prefix. Default 16.
    #[arg(long = "fleet-min-prefix-v4", value_name = "LEN", value_parser = clap::value_parser!(u8).range(1..=32))]
    pub min_prefix_v4: Option<u8>,
    /// run: refuse fleet bans of IPv6 networks wider than this prefix. Default 32.
    #[arg(long = "fleet-min-prefix-v6", value_name = "LEN", value_parser = clap::value_parser!(u8).range(1..=128))]
    pub min_prefix_v6: Option<u8>,
    /// run: most fleet bans made elsewhere that this host installs; more are refused and counted. Default 250000.
    #[arg(long = "fleet-max-bans", value_name = "N")]
    pub max_bans: Option<u32>,
}

pub const DEFAULT_PREFIX: &str = "/smtpguard";
pub const DEFAULT_MIN_PREFIX_V4: u8 = 16;
pub const DEFAULT_MIN_PREFIX_V6: u8 = 32;
pub const DEFAULT_MAX_BANS: u32 = 250_000;

impl FleetSettings {
    /// These settings where set, `base` where not.
    pub fn over(self, base: FleetSettings) -> FleetSettings {
        FleetSettings {
            etcd: if self.etcd.is_empty() { base.etcd } else { self.etcd },
            prefix: self.prefix.or(base.prefix),
            host_id: self.host_id.or(base.host_id),
            ca: self.ca.or(base.ca),
            cert: self.cert.or(base.cert),
            key: self.key.or(base.key),
            user: self.user.or(base.user),
            password_file: self.password_file.or(base.password_file),
            follow_policy: self.follow_policy.or(base.follow_policy),
            min_prefix_v4: self.min_prefix_v4.or(base.min_prefix_v4),
            min_prefix_v6: self.min_prefix_v6.or(base.min_prefix_v6),
            max_bans: self.max_bans.or(base.max_bans),
        }
    }

    /// Paths in a config file are relative to the file's directory.
    pub fn relative_to(self, dir: &Path) -> FleetSettings {
        let rel = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { dir.join(p) } else { p });
        FleetSettings { ca: rel(self.ca), cert: rel(self.cert), key: rel(self.key), password_file: rel(self.password_file), ..self }
    }

    /// Whether a fleet is named at all.
    pub fn joined(&self) -> bool {
        !self.etcd.is_empty()
    }

    /// What the settings say, checked: `None` when no fleet is named.
    pub fn resolve(&self) -> Result<Option<FleetOptions>> {
        if !self.joined() {
            if self.follow_policy == Some(true) {
                bail!("--fleet-policy needs --fleet-etcd (the fleet's etcd endpoints)");
            }
            return Ok(None);
        }
        let connection = self.connection()?;
        let host_id = match &self.host_id {
            Some(h) => h.clone(),
            None => hostname().context("--host-id not given and the hostname cannot be read")?,
        };
        if host_id.is_empty() || host_id.contains('/') || host_id.len() > 64 {
            bail!("--host-id {host_id:?}: 1 to 64 characters, no '/'");
        }
        Ok(Some(FleetOptions {
            connection,
            host_id,
            follow_policy: self.follow_policy.unwrap_or(false),
            trust: Trust {
                min_prefix_v4: self.min_prefix_v4.unwrap_or(DEFAULT_MIN_PREFIX_V4),
                min_prefix_v6: self.min_prefix_v6.unwrap_or(DEFAULT_MIN_PREFIX_V6),
                max_bans: self.max_bans.unwrap_or(DEFAULT_MAX_BANS),
            },
        }))
    }

    /// How to reach etcd, checked (the files exist; TLS options go with https).
    pub fn connection(&self) -> Result<Connection> {
        if self.etcd.is_empty() {
            bail!("no etcd endpoints: give --fleet-etcd http://HOST:2379[,...] (or `etcd = [...]` under [fleet] in the config file)");
        }
        for e in &self.etcd {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("--fleet-etcd {e}: an endpoint is an http:// or https:// URL");
            }
        }
        let tls = self.ca.is_some() || self.cert.is_some();
        if tls && self.etcd.iter().any(|e| e.starts_with("http://")) {
            bail!("--fleet-ca/--fleet-cert go with https:// endpoints");
        }
        if self.cert.is_some() != self.key.is_some() {
            bail!("--fleet-cert and --fleet-key go together");
        }
        if self.user.is_some() != self.password_file.is_some() {
            bail!("--fleet-user and --fleet-password-file go together");
        }
        for f in [&self.ca, &self.cert, &self.key, &self.password_file].into_iter().flatten() {
            if !f.is_file() {
                bail!("{}: no such file", f.display());
            }
        }
        let prefix = self.prefix.clone().unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.len() < 2 {
            bail!("--fleet-prefix {prefix:?}: begins with '/' and does not end with one, such as /smtpguard");
        }
        Ok(Connection {
            endpoints: self.etcd.clone(),
            prefix,
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            user: self.user.clone(),
            password_file: self.password_file.clone(),
        })
    }
}

fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is as long as we say.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// What `run` does in the fleet.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub connection: Connection,
    pub host_id: String,
    pub follow_policy: bool,
    pub trust: Trust,
}

/// What a host accepts from the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trust {
    pub min_prefix_v4: u8,
    pub min_prefix_v6: u8,
    pub max_bans: u32,
}

impl Default for Trust {
    fn default() -> Self {
        Self { min_prefix_v4: DEFAULT_MIN_PREFIX_V4, min_prefix_v6: DEFAULT_MIN_PREFIX_V6, max_bans: DEFAULT_MAX_BANS }
    }
}

/// How to reach the fleet's etcd. Recorded in the run directory by
/// `run`, so `smtpguard ban`/`unban`/`bans` on the host reach it too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// Each request's bound: a partitioned member must not stall a caller.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Connection {
    /// A client of the first endpoint, from `start` on, whose member
    /// answers a read that needs a leader; returns it and the endpoint's
    /// index. One member at a time, so a dead or cut-off member is passed
    /// over at once rather than chosen again by a balancer. Requests need
    /// a leader (a member cut off from its quorum refuses rather than
    /// serving stale data) and are each bounded by [`REQUEST_TIMEOUT`];
    /// dead connections are noticed by HTTP/2 pings within 4 s.
    pub async fn connect_from(&self, start: usize) -> Result<(Client, usize)> {
        let mut errors = Vec::new();
        for k in 0..self.endpoints.len() {
            let i = (start + k) % self.endpoints.len();
            let endpoint = &self.endpoints[i];
            match self.probe(endpoint).await {
                Ok(client) => return Ok((client, i)),
                Err(e) => errors.push(format!("{endpoint}: {e:#}")),
            }
        }
        bail!("no etcd member answered: {}", errors.join("; "))
    }

    /// A client of the first member that answers, in the order given.
    pub async fn connect(&self) -> Result<Client> {
        Ok(self.connect_from(0).await?.0)
    }

    async fn probe(&self, endpoint: &str) -> Result<Client> {
        let mut client = self.client_of(endpoint).await?;
        let probe = etcd_client::GetOptions::new().with_keys_only().with_limit(1);
        tokio::time::timeout(REQUEST_TIMEOUT, client.get(self.prefix.clone(), Some(probe)))
            .await
            .map_err(|_| anyhow::anyhow!("no answer in {} s", REQUEST_TIMEOUT.as_secs()))??;
        Ok(client)
    }

    async fn client_of(&self, endpoint: &str) -> Result<Client> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(user), Some(file)) = (&self.user, &self.password_file) {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            options = options.with_user(user.clone(), text.lines().next().unwrap_or("").to_owned()).with_auto_token_refresh(true);
        }
        if self.ca.is_some() || self.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        Ok(Client::connect([endpoint], Some(options)).await?)
    }

    /// Where `run` records it for the host's other commands.
    pub fn record_path(run_dir: &Path) -> PathBuf {
        run_dir.join("fleet.json")
    }

    /// Records it (with the host's name) for the host's commands.
    pub fn record(&self, run_dir: &Path, host_id: &str) -> Result<()> {
        let text = serde_json::to_string(&Recorded { connection: self.clone(), host_id: host_id.to_owned() })?;
        std::fs::write(Self::record_path(run_dir), text).with_context(|| format!("writing {}", Self::record_path(run_dir).display()))
    }

    /// What `run` recorded in `run_dir`; `None` when it runs outside a fleet.
    pub fn recorded(run_dir: &Path) -> Option<(Connection, String)> {
        let text = std::fs::read_to_string(Self::record_path(run_dir)).ok()?;
        let r: Recorded = serde_json::from_str(&text).ok()?;
        Some((r.connection, r.host_id))
    }
}

#[derive(Serialize, Deserialize)]
struct Recorded {
    connection: Connection,
    host_id: String,
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}
