//! Admin HTTP server: `/livez`, `/readyz`, `/metrics`.
//!
//! - `/livez` answers 200 while the process serves requests.
//! - `/readyz` answers 200 once every reflector store has synced (a standby replica
//!   is ready too: it can take over at once), 503 before.
//! - `/metrics` is the Prometheus text exposition; per-phase gauges are refreshed from
//!   the stores at scrape time.
//!
//! HTTP/1.1 only, no TLS: it listens on a pod-local admin port.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// State the admin endpoints report.
pub struct AdminState {
    /// Set once caches have synced.
    pub ready: AtomicBool,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Called before encoding `/metrics` (refreshes per-phase gauges).
    pub before_scrape: Box<dyn Fn(&Metrics) + Send + Sync>,
}

/// Status and body for a path.
pub fn respond(path: &str, state: &AdminState) -> (StatusCode, String) {
    match path {
        "/livez" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" if state.ready.load(Ordering::Acquire) => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "caches not synced yet\n".to_owned(),
        ),
        "/metrics" => {
            (state.before_scrape)(&state.metrics);
            (StatusCode::OK, state.metrics.encode())
        }
        _ => (
            StatusCode::NOT_FOUND,
            "not found; try /livez, /readyz or /metrics\n".to_owned(),
        ),
    }
}

/// Serve until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                warn!(%error, "admin accept failed");
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = respond(req.uri().path(), &state);
                let content_type = if req.uri().path() == "/metrics" {
                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                } else {
                    "text/plain"
                };
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", content_type)
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response parts"),
                    )
                }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, %peer, "admin connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn probes_and_metrics_over_http() {
        let state = Arc::new(AdminState {
            ready: AtomicBool::new(false),
            metrics: Metrics::shared(),
            before_scrape: Box::new(|m| m.set_phases("DatasetCache", [tidepool_api::Phase::Ready])),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, state.clone()));
        assert!(get(addr, "/livez").await.starts_with("HTTP/1.1 200"));
        assert!(
            get(addr, "/readyz").await.starts_with("HTTP/1.1 503"),
            "not ready before caches sync"
        );
        state.ready.store(true, Ordering::Release);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(
            metrics.contains(r#"tidepool_objects{kind="DatasetCache",phase="Ready"} 1"#),
            "{metrics}"
        );
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
