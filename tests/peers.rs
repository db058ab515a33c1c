//! Real peers for the labs: a greeting TCP server in a namespace, a client
//! that connects from a chosen source address, an HTTP GET, a Prometheus server.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket, Type};

use crate::netns::Netns;

/// Long enough for an answered SYN on a veth many times over.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP server on `[::]:port` that greets and closes every connection.
pub struct Greeter {
    stop: Arc<AtomicBool>,
    port: u16,
    ns_name: String,
    thread: Option<JoinHandle<()>>,
}

impl Greeter {
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        let listener = ns.enter(|| TcpListener::bind(("::", port)))?.context("binding the greeter")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(mut c) = conn {
                    let _ = std::io::Write::write_all(&mut c, b"220 smtpguard-test ESMTP\r\n");
                }
            }
        });
        Ok(Self { stop, port, ns_name: ns.name().to_owned(), thread: Some(thread) })
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop from inside its namespace.
        let _ = std::process::Command::new("nsenter")
            .args([&format!("--net=/run/netns/{}", self.ns_name), "--", "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{}", self.port))
            .status();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from `src` to `dst:port` and reads the greeting.
pub fn connect(ns: &Netns, src: &str, dst: &str, port: u16) -> Result<Result<String, std::io::ErrorKind>> {
    connect_within(ns, src, dst, port, CONNECT_TIMEOUT)
}

/// [`connect`] giving up after `timeout`: a short one still sends a SYN.
pub fn connect_within(ns: &Netns, src: &str, dst: &str, port: u16, timeout: Duration) -> Result<Result<String, std::io::ErrorKind>> {
    let src: IpAddr = src.parse()?;
    let dst: IpAddr = dst.parse()?;
    ns.enter(|| -> Result<Result<String, std::io::ErrorKind>> {
        let domain = if src.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let socket = Socket::new(domain, Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        if let Err(e) = socket.connect_timeout(&SocketAddr::new(dst, port).into(), timeout) {
            return Ok(Err(e.kind()));
        }
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(timeout))?;
        let mut greeting = String::new();
        match stream.read_to_string(&mut greeting) {
            Ok(_) => Ok(Ok(greeting)),
            Err(e) => Ok(Err(e.kind())),
        }
    })?
}

pub fn assert_greeted(r: Result<String, std::io::ErrorKind>, what: &str) {
    match r {
        Ok(g) => assert!(g.starts_with("220 "), "{what}: odd greeting {g:?}"),
        Err(e) => panic!("{what}: expected a greeting, got {e:?}"),
    }
}

pub fn assert_dropped(r: Result<String, std::io::ErrorKind>, what: &str) {
    assert_eq!(r, Err(std::io::ErrorKind::TimedOut), "{what}: expected the SYN to be dropped");
}


/// A GET to `127.0.0.1:port` from inside `ns`: the body of a 200 answer.
pub fn http_get(ns: &Netns, port: u16, path: &str) -> Result<String> {
    ns.enter(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        let (head, rest) = body.split_once("\r\n\r\n").context("no HTTP body")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{head}");
        }
        Ok(rest.to_owned())
    })?
}

/// A Prometheus server in a namespace scraping `127.0.0.1:scrape_port`
/// (or the targets given) each second, job `smtpguard`; killed, and its
/// `dir` removed, on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    pub fn start(ns: &Netns, dir: &Path, scrape_port: u16, port: u16) -> Result<Self> {
        Self::start_with_rules(ns, dir, scrape_port, port, &[])
    }

    /// [`Prometheus::start`] with these rule files loaded, evaluated each second.
    pub fn start_with_rules(ns: &Netns, dir: &Path, scrape_port: u16, port: u16, rule_files: &[PathBuf]) -> Result<Self> {
        Self::start_scraping(ns, dir, &[format!("127.0.0.1:{scrape_port}")], port, rule_files)
    }

    /// [`Prometheus::start_with_rules`] scraping each of `targets`
    /// (`address:port`, as `ns` reaches it; one instance each, job `smtpguard`).
    pub fn start_scraping(ns: &Netns, dir: &Path, targets: &[String], port: u16, rule_files: &[PathBuf]) -> Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("prometheus.yml");
        let rules: Vec<String> = rule_files.iter().map(|f| format!("'{}'", f.display())).collect();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nscrape_configs:\n  - job_name: smtpguard\n    static_configs: [{{targets: [{}]}}]\n",
                rules.join(", "),
                targets.join(", ")
            ),
        )?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name()))
            .args(["--", "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .args([&format!("--web.listen-address=127.0.0.1:{port}"), "--log.level=warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus (Debian package)")?;
        Ok(Self { child, dir: dir.to_owned(), port })
    }

    /// An instant query's first value and its sample time, when there is
    /// one (none before the first scrape, some seconds after start).
    pub fn query(&self, ns: &Netns, promql: &str) -> Option<(f64, f64)> {
        let v = self.api(ns, &format!("/api/v1/query?query={}", url_encode(promql))).ok()?;
        let value = &v["data"]["result"][0]["value"];
        Some((value[0].as_f64()?, value[1].as_str()?.parse().ok()?))
    }

    /// A GET of the HTTP API (`/api/v1/...`), its JSON answer whatever
    /// the status (errors say why in `error`). HTTP/1.0, so that large
    /// answers come whole rather than chunked.
    pub fn api(&self, ns: &Netns, path_and_query: &str) -> Result<serde_json::Value> {
        let port = self.port;
        let text = ns.enter(|| -> Result<String> {
            let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path_and_query} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })??;
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
        serde_json::from_str(body).with_context(|| format!("{head}: not JSON: {body}"))
    }
}

/// Percent-encodes everything but unreserved characters, for a query string.
pub fn url_encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
