//! An HTTP proxy between one process and a cluster's apiserver that logs every request it receives
//! and can be frozen: while frozen it takes requests (and logs them) but forwards nothing, and the
//! responses already streaming (watches) stop too, as when a network path goes silent. The
//! process talks plain HTTP to it (a kubeconfig written by [`KubeProxy::kubeconfig`]); the proxy
//! forwards with the identity of the kubeconfig it was started with, so RBAC is unchanged.
//! It can also answer as an apiserver that has just started and not loaded its roles yet: every
//! request is refused with the 403 such an apiserver gives, and `/readyz` fails the check it
//! fails then (both as kube-apiserver 1.37 answered in the second after a restart).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures::StreamExt;
use http::StatusCode;
use serde_json::json;

use crate::kube_client;

/// One request as the proxy received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Seconds since the epoch.
    pub t: f64,
    pub method: http::Method,
    pub path: String,
}

impl Received {
    /// Whether it could change something (anything but GET, HEAD and OPTIONS).
    pub fn is_write(&self) -> bool {
        !matches!(self.method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS)
    }
}

pub struct KubeProxy {
    pub url: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    client: kube::Client,
    frozen: tokio::sync::watch::Sender<bool>,
    starting: std::sync::atomic::AtomicBool,
    log: Mutex<Vec<Received>>,
}

pub fn epoch_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl KubeProxy {
    /// Forwards to the apiserver of `kubeconfig`, as its user.
    pub async fn start(kubeconfig: &Path) -> Result<KubeProxy> {
        let client = kube_client(kubeconfig).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (frozen, _) = tokio::sync::watch::channel(false);
        let state = Arc::new(ProxyState {
            client,
            frozen,
            starting: std::sync::atomic::AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new().fallback(proxy).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(KubeProxy { url, state, task })
    }

    /// Writes a kubeconfig that reaches the apiserver through this proxy, into `dir`.
    pub fn kubeconfig(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{name}.kubeconfig"));
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
            "users": [{"name": "proxy", "user": {}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
            "current-context": "proxy",
        });
        std::fs::write(&path, serde_yaml::to_string(&config)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Stops forwarding: requests are taken and logged but wait, and streaming responses stall.
    pub fn freeze(&self) {
        self.state.frozen.send_replace(true);
    }

    /// Forwards again, including whatever waited.
    pub fn thaw(&self) {
        self.state.frozen.send_replace(false);
    }

    /// Answers as an apiserver still loading its roles (true) or forwards again (false).
    pub fn answer_as_starting(&self, starting: bool) {
        self.state.starting.store(starting, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn thawed(frozen: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = frozen.wait_for(|f| !*f).await;
}

async fn proxy(State(s): State<Arc<ProxyState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    if let Ok(mut log) = s.log.lock() {
        log.push(Received { t: epoch_secs(), method: parts.method.clone(), path: path.clone() });
    }
    if s.starting.load(std::sync::atomic::Ordering::SeqCst) {
        return starting_answer(&path);
    }
    match forward(&s, parts, body, path).await {
        Ok(r) => r,
        Err(e) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::from(format!("kube proxy: {e:#}")))
            .unwrap_or_default(),
    }
}

fn starting_answer(path: &str) -> Response {
    let (status, body) = if path.starts_with("/readyz") {
        let checks = "[+]ping ok\n[+]etcd ok\n[+]informer-sync ok\n\
                      [-]poststarthook/rbac/bootstrap-roles failed: reason withheld\nreadyz check failed\n";
        (StatusCode::INTERNAL_SERVER_ERROR, checks.to_string())
    } else {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("forbidden: User \"qdb-provisioner\" cannot access {path}"),
            "reason": "Forbidden", "code": 403,
        });
        (StatusCode::FORBIDDEN, status.to_string())
    };
    Response::builder().status(status).body(Body::from(body)).unwrap_or_default()
}

async fn forward(s: &ProxyState, parts: http::request::Parts, body: Body, path: String) -> Result<Response> {
    let mut frozen = s.frozen.subscribe();
    thawed(&mut frozen).await;
    let body = axum::body::to_bytes(body, 64 << 20).await?;
    let mut out = http::Request::builder().method(parts.method).uri(path);
    for (k, v) in &parts.headers {
        if !matches!(
            k.as_str(),
            "host" | "content-length" | "connection" | "transfer-encoding" | "authorization"
        ) {
            out = out.header(k, v);
        }
    }
    let resp = s.client.send(out.body(kube::client::Body::from(body))?).await?;
    let (head, body) = resp.into_parts();
    let chunks = Body::new(body).into_data_stream().then(move |chunk| {
        let mut frozen = frozen.clone();
        async move {
            thawed(&mut frozen).await;
            chunk
        }
    });
    let mut out = Response::builder().status(head.status);
    for (k, v) in &head.headers {
        if !matches!(k.as_str(), "content-length" | "connection" | "transfer-encoding") {
            out = out.header(k, v);
        }
    }
    Ok(out.body(Body::from_stream(chunks))?)
}
