//! /metrics, /healthz and /readyz.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::Shared;

pub fn router(ctx: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        ctx.metrics.encode(),
    )
}

/// Ready when consuming and the journal answers.
async fn readyz(State(ctx): State<Arc<Shared>>) -> (StatusCode, String) {
    if !ctx.consuming.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not consuming".into());
    }
    match sqlx::query("SELECT 1").execute(&ctx.pool).await {
        Ok(_) => (StatusCode::OK, "ready".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("journal unreachable: {e}")),
    }
}
