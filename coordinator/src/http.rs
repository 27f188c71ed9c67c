//! The Prometheus metrics endpoint (`GET /metrics`), plus `GET /healthz` for plain HTTP probes.

use crate::run::CoordinatorError;
use crate::service::Shared;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

/// Binds the metrics address (before anything is written to the output directory, so that a
/// taken port leaves nothing behind).
pub async fn bind_metrics(addr: SocketAddr) -> Result<tokio::net::TcpListener, CoordinatorError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CoordinatorError::Metrics(format!(
            "cannot bind the metrics address {addr}: {e}; pick another --metrics-listen port"
        ))
    })
}

pub fn spawn_metrics_server(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
) -> tokio::task::JoinHandle<()> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let shared = shared.clone();
                async move {
                    let p = shared.scheduler().progress();
                    shared.metrics.set_progress(&p);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        shared.metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    })
}
