//! The Prometheus metrics endpoint (`GET /metrics`), plus `GET /healthz` for plain HTTP probes.

use crate::run::CoordinatorError;
use crate::service::Shared;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

pub async fn spawn_metrics_server(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>, CoordinatorError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CoordinatorError::Serve(format!("cannot bind the metrics address {addr}: {e}"))
    })?;
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
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    }))
}
