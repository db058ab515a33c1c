//! Pieces of a test lab: a greeting TCP server in a namespace, and a
//! client that connects from a chosen source address.

use std::{
    io::Read,
    net::{IpAddr, SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
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
    let src: IpAddr = src.parse()?;
    let dst: IpAddr = dst.parse()?;
    ns.enter(|| -> Result<Result<String, std::io::ErrorKind>> {
        let domain = if src.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let socket = Socket::new(domain, Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        if let Err(e) = socket.connect_timeout(&SocketAddr::new(dst, port).into(), CONNECT_TIMEOUT) {
            return Ok(Err(e.kind()));
        }
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
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

