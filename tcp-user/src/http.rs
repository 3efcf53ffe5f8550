//! The exporter's HTTP endpoint: `GET /metrics` and `GET /healthz` (hyper, HTTP/1.1).
//!
//! Every answer is produced by the agent's main loop, which owns the loaded programs and maps:
//! a request handler sends it a [`Request`] and waits (bounded) for the text. The server
//! protects itself from slow or abusive clients: the request head must arrive within
//! [`Limits::header_timeout`] and fit in [`Limits::max_header_bytes`]; a connection lives at
//! most [`Limits::connection_timeout`]; at most [`Limits::max_connections`] are served at once
//! (more are closed at accept); a request body is never read.

use std::{convert::Infallible, sync::Arc, time::Duration};

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
    sync::{Semaphore, mpsc, oneshot},
};

/// What a request handler asks the main loop for.
#[derive(Debug)]
pub enum Request {
    /// The Prometheus text exposition, read from the kernel now.
    Metrics(oneshot::Sender<Result<String, String>>),
    /// A liveness answer (the main loop is running and the programs are attached).
    Health(oneshot::Sender<Result<String, String>>),
}

/// Self-protection limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time allowed for the request line and headers.
    pub header_timeout: Duration,
    /// Longest life of a connection (keep-alive included).
    pub connection_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Longest wait for the main loop's answer.
    pub answer_timeout: Duration,
}

impl Limits {
    /// Defaults: 5 s for the head, 60 s per connection, 64 connections, 16 KiB heads, 10 s
    /// for an answer (Prometheus' default scrape timeout).
    pub const DEFAULT: Self = Self {
        header_timeout: Duration::from_secs(5),
        connection_timeout: Duration::from_secs(60),
        max_connections: 64,
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

async fn handle(
    req: hyper::Request<Incoming>,
    to: mpsc::Sender<Request>,
    limits: Limits,
) -> Result<Response<Full<Bytes>>, Infallible> {
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

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, to: mpsc::Sender<Request>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Connections accepted and not yet served (a task takes its slot only once it runs).
    let waiting = Arc::new(Semaphore::new(2 * limits.max_connections));
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
        let Ok(in_line) = Arc::clone(&waiting).try_acquire_owned() else {
            debug!("{peer}: too many metrics connections, closing");
            drop(stream);
            continue;
        };
        let (to, slots) = (to.clone(), Arc::clone(&slots));
        tokio::spawn(async move {
            // Twice the head timeout: every connection being served when this one arrived
            // has by then sent its head or been cut off, so a slot is free (waiters are
            // served in order, and there are no more of them than slots).
            let Ok(Ok(permit)) =
                tokio::time::timeout(2 * limits.header_timeout, slots.acquire_owned()).await
            else {
                debug!("{peer}: no metrics connection slot freed in time, closing");
                return;
            };
            drop(in_line);
            let service = service_fn(move |req| handle(req, to.clone(), limits));
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("{peer}: metrics connection: {e}"),
                Err(_) => debug!("{peer}: metrics connection timed out"),
            }
            drop(permit);
        });
    }
}
