//! /metrics, /healthz and /readyz (what they mean: [`crate::health`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::health::{Watches, liveness, readiness};
use crate::leader::{ElectionHealth, Fence};
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub election: Arc<ElectionHealth>,
    pub fence: Arc<Fence>,
    pub watches: Arc<Watches>,
    pub started: Instant,
    /// How long the lease or a watch may fail before `/healthz` says so.
    pub grace: Duration,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        h.metrics.encode(),
    )
}

async fn readyz(State(h): State<Health>) -> (StatusCode, String) {
    let (role, seen) = h.election.snapshot();
    match readiness(role, h.fence.standing(), seen, Instant::now(), h.fence.timing()) {
        Ok(role) => (StatusCode::OK, role.to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn healthz(State(h): State<Health>) -> (StatusCode, String) {
    let (role, seen) = h.election.snapshot();
    match liveness(role, seen, h.started, &h.watches.snapshot(), Instant::now(), h.grace) {
        Ok(()) => (StatusCode::OK, "ok".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
