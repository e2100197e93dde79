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
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        ctx.metrics.encode(),
    )
}

/// How long the journal may take to answer a probe: kubelet's own probe timeout is 1 s by
/// default, and a journal slower than this is not one to work against.
const JOURNAL_PROBE: std::time::Duration = std::time::Duration::from_millis(900);

/// The journal answers: without it this replica can neither take nor finish anything.
async fn journal_answers(ctx: &Shared) -> Result<(), String> {
    match tokio::time::timeout(JOURNAL_PROBE, sqlx::query("SELECT 1").execute(&ctx.pool)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("journal unreachable: {e}")),
        Err(_) => Err(format!("journal did not answer within {}ms", JOURNAL_PROBE.as_millis())),
    }
}

/// Healthy while the journal answers (a consumer group rebalance is not ill health).
async fn healthz(State(ctx): State<Arc<Shared>>) -> (StatusCode, String) {
    match journal_answers(&ctx).await {
        Ok(()) => (StatusCode::OK, "ok".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Ready when in the consumer group and the journal answers.
async fn readyz(State(ctx): State<Arc<Shared>>) -> (StatusCode, String) {
    if !ctx.consuming.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not in the consumer group yet".into());
    }
    match journal_answers(&ctx).await {
        Ok(()) => (StatusCode::OK, "ready".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
