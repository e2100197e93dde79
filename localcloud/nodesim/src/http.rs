//! Loopback control API, so tests can break machines on purpose:
//! `GET /nodes`, `POST /nodes/{id}/kill`, `POST /nodes/{id}/revive` (id = instance id or node
//! name), `PUT /join-delay/{seconds}`, `GET /containers` (the real processes running: pod,
//! pid, image, address, volume, readiness), `GET /healthz`.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use tracing::info;

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::runtime::Runtime;
use crate::sim::{Shared, SimNode};

pub fn router(state: Shared, runtime: Arc<Mutex<Runtime>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/containers", get(move || containers(runtime.clone())))
        .route("/nodes", get(list))
        .route("/nodes/{id}/kill", post(kill))
        .route("/nodes/{id}/revive", post(revive))
        .route("/join-delay/{seconds}", put(join_delay))
        .with_state(state)
}

async fn list(State(state): State<Shared>) -> Json<Vec<SimNode>> {
    Json(state.lock().expect("state lock").nodes.values().cloned().collect())
}

fn set_killed(state: &Shared, id: &str, killed: bool) -> Result<Json<SimNode>, (StatusCode, String)> {
    let mut st = state.lock().expect("state lock");
    let node = st.find_mut(id).ok_or_else(|| (StatusCode::NOT_FOUND, format!("no simulated node {id}\n")))?;
    node.killed = killed;
    info!(node = node.node_name, instance = node.instance_id, killed, "node power changed on request");
    Ok(Json(node.clone()))
}

async fn kill(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<SimNode>, (StatusCode, String)> {
    set_killed(&state, &id, true)
}

async fn revive(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<SimNode>, (StatusCode, String)> {
    set_killed(&state, &id, false)
}

async fn join_delay(
    State(state): State<Shared>,
    Path(seconds): Path<f64>,
) -> Result<String, (StatusCode, String)> {
    let delay =
        Duration::try_from_secs_f64(seconds).map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    state.lock().expect("state lock").join_delay = delay;
    info!(?delay, "join delay changed");
    Ok(format!("join delay {seconds}s\n"))
}

#[derive(Serialize)]
struct ContainerView {
    pod: String,
    uid: String,
    pid: Option<u32>,
    image: String,
    instance_id: String,
    pod_ip: String,
    volume_id: Option<String>,
    ready: bool,
    restarts: i32,
}

async fn containers(runtime: Arc<Mutex<Runtime>>) -> Json<Vec<ContainerView>> {
    let rt = runtime.lock().expect("runtime lock");
    Json(
        rt.containers
            .iter()
            .map(|(uid, c)| ContainerView {
                pod: c.pod.clone(),
                uid: uid.clone(),
                pid: c.pid(),
                image: c.image.clone(),
                instance_id: c.instance_id.clone(),
                pod_ip: c.pod_ip.clone(),
                volume_id: c.volume_id.clone(),
                ready: c.ready,
                restarts: c.restarts,
            })
            .collect(),
    )
}
