//! The exporter's HTTP endpoint: `GET /metrics` and `GET /healthz` (hyper, HTTP/1.1).
//!
//! Every answer is produced by the agent's main loop, which owns the loaded programs and maps:
//! a request handler sends it a [`Request`] and waits (bounded) for the text. The server
//! protects itself from slow or abusive clients: the request head must arrive within
//! [`Limits::header_timeout`] and fit in [`Limits::max_header_bytes`]; a connection lives at
//! most [`Limits::connection_timeout`]; a request body is never read. At most
//! [`Limits::max_connections`] connections are open at once, at most
//! [`Limits::max_per_client`] from one address, and a new connection is never queued: when
//! its address or the server is at its limit, the oldest idle connection (of that address,
//! else of the address holding the most) is closed to make room, and only when every
//! connection is busy with a request is the new one closed. Idle means "no request being
//! answered": a keep-alive connection between requests, or one whose head has not arrived.
//! So idle or reconnecting sockets, however many, cannot keep another client's scrape
//! waiting.
//!
//! With a `--web.config.file` ([`WebConfig`]) the connections speak TLS and the requests need
//! basic auth. The TLS handshake counts as idle (it can be closed to make room) and must end
//! within [`Limits::header_timeout`]; the connection's life includes it. Basic auth guards
//! every path, and a request that fails it gets 401 with `WWW-Authenticate: Basic`; a request
//! counts as busy only once it passes (one waiting for its bcrypt check, at most
//! [`Limits::answer_timeout`], is idle and may be closed to make room). The
//! settings can be replaced while serving ([`WebSettings`]): each new connection takes the
//! current ones and keeps them for its life.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Method, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc, oneshot},
};
use tokio_rustls::TlsAcceptor;

use crate::webconfig::WebConfig;

/// What a request handler asks the main loop for.
#[derive(Debug)]
pub enum Request {
    /// The Prometheus text exposition, read from the kernel now.
    Metrics(oneshot::Sender<Result<String, String>>),
    /// A liveness answer (the main loop is running and the programs are attached).
    Health(oneshot::Sender<Result<String, String>>),
}

/// The server's current security settings, replaced whole on reload.
#[derive(Clone, Default)]
pub struct WebSettings(Arc<RwLock<Arc<WebConfig>>>);

impl WebSettings {
    /// Settings that start as `config`.
    pub fn new(config: WebConfig) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(config))))
    }

    /// The settings a new connection gets.
    pub fn current(&self) -> Arc<WebConfig> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces them for the connections to come.
    pub fn replace(&self, config: WebConfig) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
    }
}

/// Self-protection limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time allowed for the request line and headers.
    pub header_timeout: Duration,
    /// Longest life of a connection (keep-alive included).
    pub connection_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_per_client: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Longest wait for the main loop's answer.
    pub answer_timeout: Duration,
}

impl Limits {
    /// Defaults: 5 s for the head, 60 s per connection, 64 connections, 8 per address, 16 KiB
    /// heads, 10 s for an answer (Prometheus' default scrape timeout).
    pub const DEFAULT: Self = Self {
        header_timeout: Duration::from_secs(5),
        connection_timeout: Duration::from_secs(60),
        max_connections: 64,
        max_per_client: 8,
        max_header_bytes: 16 * 1024,
        answer_timeout: Duration::from_secs(10),
    };
}

/// Content type of the Prometheus text format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn ask(
    to: &mpsc::Sender<Request>,
    make: fn(oneshot::Sender<Result<String, String>>) -> Request,
    limits: &Limits,
) -> Result<String, String> {
    let (tx, rx) = oneshot::channel();
    let exchange = async {
        to.send(make(tx))
            .await
            .map_err(|_| "the agent is shutting down".to_owned())?;
        rx.await
            .map_err(|_| "the agent dropped the request".to_owned())?
    };
    tokio::time::timeout(limits.answer_timeout, exchange)
        .await
        .unwrap_or_else(|_| Err("the agent did not answer in time".to_owned()))
}

/// A response body that keeps its connection marked busy until hyper drops it, that is
/// until it is written out (or the connection is gone): a client reading a large `/metrics`
/// slowly is not idle.
struct TrackedBody {
    inner: Full<Bytes>,
    busy: Arc<AtomicBool>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Relaxed);
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    to: mpsc::Sender<Request>,
    limits: Limits,
    busy: Arc<AtomicBool>,
    web: Arc<WebConfig>,
) -> Result<Response<TrackedBody>, Infallible> {
    let Ok(mut answer) = answer(req, to, limits, &web, &busy).await;
    for (name, value) in &web.headers {
        answer.headers_mut().insert(name.clone(), value.clone());
    }
    Ok(answer.map(|inner| TrackedBody { inner, busy }))
}

async fn answer(
    req: hyper::Request<Incoming>,
    to: mpsc::Sender<Request>,
    limits: Limits,
    web: &WebConfig,
    busy: &AtomicBool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // A connection counts as busy only once its credentials pass: requests waiting for a
    // bcrypt check (one at a time) can still be closed to make room, and wait at most
    // `answer_timeout`, so wrong passwords cannot hold every slot.
    let allowed = match &web.auth {
        None => true,
        Some(auth) => tokio::time::timeout(
            limits.answer_timeout,
            auth.allows(req.headers().get(header::AUTHORIZATION)),
        )
        .await
        .unwrap_or(false),
    };
    if !allowed {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "unauthorized\n".to_owned(),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic"),
        );
        return Ok(r);
    }
    busy.store(true, Ordering::Relaxed);
    let make: fn(_) -> Request = match req.uri().path() {
        "/metrics" => Request::Metrics,
        "/healthz" => Request::Health,
        _ => {
            return Ok(reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics or /healthz\n".to_owned(),
            ));
        }
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_owned(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let content_type = if req.uri().path() == "/metrics" {
        TEXT_FORMAT
    } else {
        "text/plain"
    };
    Ok(match ask(&to, make, &limits).await {
        Ok(body) => reply(StatusCode::OK, content_type, body),
        Err(e) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("unavailable: {e}\n"),
        ),
    })
}

/// One open connection, as the accept loop sees it.
struct Conn {
    peer: IpAddr,
    opened: Instant,
    /// A request is being answered.
    busy: Arc<AtomicBool>,
    /// Closes the connection.
    close: Arc<Notify>,
}

/// The open connections, by id.
#[derive(Default)]
struct Conns {
    open: HashMap<u64, Conn>,
    next_id: u64,
}

impl Conns {
    /// Room for a new connection from `peer`: closes the oldest idle connection of `peer`
    /// when it is at `limits.max_per_client`, and the oldest idle one of the address holding
    /// the most when the server is at `limits.max_connections`. `false`: no idle connection
    /// to close, the newcomer must go.
    fn make_room(&mut self, peer: IpAddr, limits: &Limits) -> bool {
        if self.open.values().filter(|c| c.peer == peer).count() >= limits.max_per_client
            && !self.close_oldest_idle(|c| c.peer == peer)
        {
            return false;
        }
        if self.open.len() >= limits.max_connections {
            let mut per_addr: HashMap<IpAddr, usize> = HashMap::new();
            for c in self.open.values() {
                *per_addr.entry(c.peer).or_default() += 1;
            }
            let mut addrs: Vec<(usize, IpAddr)> =
                per_addr.into_iter().map(|(a, n)| (n, a)).collect();
            addrs.sort_unstable_by(|a, b| b.cmp(a));
            return addrs
                .into_iter()
                .any(|(_, addr)| self.close_oldest_idle(|c| c.peer == addr));
        }
        true
    }

    /// Closes the oldest idle connection that `which` selects; `false` if there is none.
    fn close_oldest_idle(&mut self, which: impl Fn(&Conn) -> bool) -> bool {
        let oldest = self
            .open
            .iter()
            .filter(|(_, c)| which(c) && !c.busy.load(Ordering::Relaxed))
            .min_by_key(|(_, c)| c.opened)
            .map(|(id, _)| *id);
        let Some(id) = oldest else { return false };
        if let Some(c) = self.open.remove(&id) {
            debug!("{}: idle metrics connection closed to make room", c.peer);
            c.close.notify_one();
        }
        true
    }
}

/// Serves until the task is dropped, over TLS and with basic auth when the current `web`
/// settings say so.
pub async fn serve(
    listener: TcpListener,
    to: mpsc::Sender<Request>,
    limits: Limits,
    web: WebSettings,
) {
    let conns = Arc::new(Mutex::new(Conns::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                warn!("accepting a metrics connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (busy, close) = (Arc::new(AtomicBool::new(false)), Arc::new(Notify::new()));
        let id = {
            let mut open = conns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !open.make_room(peer.ip(), &limits) {
                debug!("{peer}: every metrics connection is busy, closing");
                continue;
            }
            let id = open.next_id;
            open.next_id += 1;
            open.open.insert(
                id,
                Conn {
                    peer: peer.ip(),
                    opened: Instant::now(),
                    busy: Arc::clone(&busy),
                    close: Arc::clone(&close),
                },
            );
            id
        };
        let (to, conns, web) = (to.clone(), Arc::clone(&conns), web.current());
        let acceptor = web.tls.clone().map(TlsAcceptor::from);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                handle(req, to.clone(), limits, Arc::clone(&busy), Arc::clone(&web))
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes);
            let conn = async {
                let Some(acceptor) = acceptor else {
                    return builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                        .map_err(|e| e.to_string());
                };
                let tls = match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return Err(format!("TLS handshake: {e}")),
                    Err(_) => return Err("TLS handshake timed out".to_owned()),
                };
                builder
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                    .map_err(|e| e.to_string())
            };
            tokio::select! {
                served = tokio::time::timeout(limits.connection_timeout, conn) => match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("{peer}: metrics connection: {e}"),
                    Err(_) => debug!("{peer}: metrics connection timed out"),
                },
                () = close.notified() => {}
            }
            conns
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .open
                .remove(&id);
        });
    }
}
