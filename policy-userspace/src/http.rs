//! `/metrics` and `/healthz`, served by hyper on a thread of their own, so
//! neither a slow client nor a long reload holds up the other side: the
//! control loop never waits for a scraper, and a scrape never waits for
//! the control loop.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] open at once (more are closed at
//! accept), [`HEADER_TIMEOUT`] to send a request's headers, and
//! [`CONNECTION_LIFETIME`] for a kept-alive connection. Gauges that need
//! a scan of the source table come from a scan run at most every
//! [`TABLE_SCAN_INTERVAL`], and only while someone scrapes.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::{
    metrics::{self, ControllerMetrics, PolicyView, TableGauges},
    dataplane::observer::Observer,
};

pub const MAX_CONNECTIONS: usize = 64;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
pub const TABLE_SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// No scrape for this long: the table scans pause.
const SCRAPE_IDLE: Duration = Duration::from_secs(60);
/// The control loop turns at least once a second; this much silence
/// means it is stuck, and /healthz says so.
pub const STALL_AFTER: Duration = Duration::from_secs(10);

/// What the control loop tells the endpoint.
pub struct State {
    pub metrics: ControllerMetrics,
    source: OnceLock<Source>,
    view: Mutex<PolicyView>,
    tables: Mutex<TableGauges>,
    /// Unix ms of the control loop's last turn.
    heartbeat_ms: AtomicU64,
    /// Unix ms since when a reload runs; 0: none.
    reloading_since_ms: AtomicU64,
    last_scrape_ms: AtomicU64,
    /// The last exposition and when its rendering started: scrapes that
    /// arrive while one renders share the next rendering instead of each
    /// reading the maps (20 scrapers cost about one).
    rendered: tokio::sync::Mutex<Option<(Instant, Rendered)>>,
}

type Rendered = Result<Bytes, String>;

/// What the metrics are read from.
enum Source {
    Ebpf(Observer),
    /// The nftables table (its sets sized so).
    Nftables(crate::nft::Sizes),
}

fn now_ms() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

impl State {
    pub fn new(metrics: ControllerMetrics) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            source: OnceLock::new(),
            view: Mutex::new(PolicyView::default()),
            tables: Mutex::new(TableGauges::default()),
            heartbeat_ms: AtomicU64::new(now_ms()),
            reloading_since_ms: AtomicU64::new(0),
            last_scrape_ms: AtomicU64::new(0),
            rendered: tokio::sync::Mutex::new(None),
        })
    }

    /// The datapath is loaded and enforcing: metrics can be read.
    pub fn ready(&self, observer: Observer) {
        let _ = self.source.set(Source::Ebpf(observer));
        self.scan_tables();
    }

    /// Ready, with the nftables table as what the metrics read.
    pub fn ready_nftables(&self, sizes: crate::nft::Sizes) {
        let _ = self.source.set(Source::Nftables(sizes));
    }

    pub fn set_view(&self, view: PolicyView) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }

    /// The control loop is alive.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn reload_started(&self) {
        self.reloading_since_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn reload_ended(&self) {
        self.reloading_since_ms.store(0, Ordering::Relaxed);
    }

    fn health(&self) -> (StatusCode, String) {
        if self.source.get().is_none() {
            return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
        }
        let now = now_ms();
        let silent = now.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed));
        if silent > STALL_AFTER.as_millis() as u64 {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("stalled: the control loop has not turned for {:.1} s\n", silent as f64 / 1e3));
        }
        let generation = self.view.lock().unwrap_or_else(|p| p.into_inner()).generation;
        let reloading = match self.reloading_since_ms.load(Ordering::Relaxed) {
            0 => String::new(),
            since => format!("; reload running for {} ms", now.saturating_sub(since)),
        };
        (StatusCode::OK, format!("ok generation {generation}{reloading}\n"))
    }

    fn render(&self) -> Result<String, String> {
        self.last_scrape_ms.store(now_ms(), Ordering::Relaxed);
        let Some(source) = self.source.get() else { return Err("starting: the datapath is not loaded yet".into()) };
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match source {
            Source::Ebpf(observer) => {
                let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner()).clone();
                metrics::render(observer, &view, &tables, &self.metrics)
            }
            Source::Nftables(sizes) => crate::nft::metrics::render(&view, *sizes, &self.metrics),
        }
    }

    /// An exposition whose rendering began after `arrived`: never older
    /// than the request, and shared by the requests waiting for it.
    async fn exposition(self: Arc<Self>, arrived: Instant) -> Rendered {
        let mut last = self.rendered.lock().await;
        if let Some((started, r)) = &*last {
            if *started >= arrived {
                return r.clone();
            }
        }
        let started = Instant::now();
        let me = self.clone();
        // Map reads are syscalls: off the accept loop.
        let r = tokio::task::spawn_blocking(move || me.render().map(Bytes::from)).await.unwrap_or_else(|e| Err(e.to_string()));
        *last = Some((started, r.clone()));
        r
    }

    /// Rescans the source table if it is due: never scanned, or scraped
    /// lately.
    fn scan_tables(&self) {
        let Some(Source::Ebpf(observer)) = self.source.get() else { return };
        let never = self.tables.lock().unwrap_or_else(|p| p.into_inner()).scanned_at == 0.0;
        let scraped = now_ms().saturating_sub(self.last_scrape_ms.load(Ordering::Relaxed)) < SCRAPE_IDLE.as_millis() as u64;
        if !never && !scraped {
            return;
        }
        match TableGauges::scan(observer) {
            Ok(g) => *self.tables.lock().unwrap_or_else(|p| p.into_inner()) = g,
            Err(e) => tracing::error!("metrics: scanning the source table failed: {e}"),
        }
    }
}

/// Serves `listener` on a thread of its own until the process ends.
pub fn spawn(listener: std::net::TcpListener, state: Arc<State>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("smtpguard-http".into()).spawn(move || rt.block_on(serve(listener, state)))?;
    Ok(())
}

async fn serve(listener: std::net::TcpListener, state: Arc<State>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: cannot serve: {e}");
            return;
        }
    };
    let scanner = state.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TABLE_SCAN_INTERVAL);
        loop {
            every.tick().await;
            let s = scanner.clone();
            let _ = tokio::task::spawn_blocking(move || s.scan_tables()).await;
        }
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds, say: wait instead of spinning.
                tracing::error!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, state.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(slot);
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    reply(status, content_type, Bytes::from(body))
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

async fn answer(req: Request<hyper::body::Incoming>, state: Arc<State>) -> Result<Response<Full<Bytes>>, Infallible> {
    let arrived = Instant::now();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET /metrics or /healthz\n".into()));
    }
    Ok(match req.uri().path() {
        "/metrics" => match state.exposition(arrived).await {
            Ok(body) => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{e}\n")),
        },
        "/healthz" => {
            let (status, body) = state.health();
            text(status, "text/plain", body)
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "try /metrics or /healthz\n".into()),
    })
}
