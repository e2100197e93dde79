//! Fault injection on the local cloud: restart one of its servers, freeze a process, and an HTTP
//! proxy that puts AWS throttling between the operator and the emulator (and logs what it
//! forwards, so a test can tell one operator's AWS calls from another's).

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderMap, StatusCode, header};

use crate::Cloud;

impl Cloud {
    /// Stops and starts one server of the local cloud, keeping its data (`localcloud restart`).
    pub fn restart(&self, component: &str) -> Result<()> {
        let script = self.vars.get("QDB_LOCALCLOUD").context("QDB_LOCALCLOUD in env (run localcloud up)")?;
        let mut cmd = Command::new(script);
        cmd.args(["restart", component]);
        // The same cloud the env file describes, whatever this process's own environment says.
        for k in ["QDB_RUN", "QDB_CACHE", "QDB_PORT_BASE", "QDB_CLUSTERS"] {
            if let Some(v) = self.vars.get(k) {
                cmd.env(k, v);
            }
        }
        let out = cmd.output().with_context(|| format!("running {script} restart {component}"))?;
        ensure!(out.status.success(), "restart {component} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Freezes a server of the local cloud by the pid file named in the env file.
    pub fn freeze(&self, pid_file_var: &str) -> Result<Frozen> {
        let file = self.vars.get(pid_file_var).with_context(|| format!("{pid_file_var} in env"))?;
        let pid = std::fs::read_to_string(file)?.trim().to_string();
        Frozen::pid(&pid)
    }
}

/// The random choices of a fault test (xorshift64): seeded from `QDB_FAULT_SEED`, else the
/// clock, and the seed printed, so a failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn from_env() -> Rng {
        let seed = std::env::var("QDB_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        println!("QDB_FAULT_SEED={seed}");
        Rng(seed | 1)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A process stopped with SIGSTOP (connections to it hang: the harshest kind of outage),
/// resumed when dropped, even if the test fails.
pub struct Frozen(String);

impl Frozen {
    pub fn pid(pid: &str) -> Result<Frozen> {
        ensure!(Command::new("kill").args(["-STOP", pid]).status()?.success(), "SIGSTOP {pid}");
        Ok(Frozen(pid.to_string()))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

/// An HTTP proxy in front of the AWS emulator that answers a share of requests with the
/// throttling errors AWS gives (EC2 `RequestLimitExceeded`, Route53 `Throttling`, a bare 503)
/// instead of forwarding them.
pub struct FaultProxy {
    pub url: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    upstream: String,
    percent: u64,
    rng: Mutex<Rng>,
    forwarded: AtomicU64,
    injected: AtomicU64,
    client: reqwest::Client,
    calls: Mutex<Vec<AwsCall>>,
}

/// A request the proxy forwarded to the emulator.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsCall {
    /// Seconds since the epoch, when the proxy received it.
    pub t: f64,
    /// EC2's `Action` (e.g. `RunInstances`), or Route53's method and path.
    pub action: String,
    pub route53: bool,
    pub method: http::Method,
}

impl AwsCall {
    fn new(method: &http::Method, path: &str, body: &[u8]) -> AwsCall {
        let route53 = path.starts_with("/2013-04-01/");
        let action = if route53 {
            format!("{method} {path}")
        } else {
            String::from_utf8_lossy(body)
                .split('&')
                .find_map(|kv| kv.strip_prefix("Action="))
                .unwrap_or("?")
                .to_string()
        };
        AwsCall { t: crate::kube_proxy::epoch_secs(), action, route53, method: method.clone() }
    }

    /// Whether it could change something in AWS (an EC2 action that is no Describe, a Route53
    /// request that is no GET).
    pub fn is_write(&self) -> bool {
        if self.route53 { self.method != http::Method::GET } else { !self.action.starts_with("Describe") }
    }
}

impl FaultProxy {
    pub async fn start(upstream: &str, percent: u64, rng: Rng) -> Result<FaultProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_string(),
            percent,
            rng: Mutex::new(rng),
            forwarded: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            client: reqwest::Client::new(),
            calls: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new().fallback(proxy).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FaultProxy { url, state, task })
    }

    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::Relaxed)
    }

    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::Relaxed)
    }

    /// Every request forwarded so far, in the order received.
    pub fn calls(&self) -> Vec<AwsCall> {
        self.state.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy(State(s): State<Arc<ProxyState>>, req: Request) -> Response {
    let roll = s.rng.lock().map(|mut r| r.below(100)).unwrap_or(u64::MAX);
    let route53 = req.uri().path().starts_with("/2013-04-01/");
    if roll < s.percent {
        let n = s.injected.fetch_add(1, Ordering::Relaxed);
        return throttled(route53, n);
    }
    match forward(&s, req).await {
        Ok(r) => {
            s.forwarded.fetch_add(1, Ordering::Relaxed);
            r
        }
        Err(e) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::from(format!("fault proxy: {e:#}")))
            .unwrap_or_default(),
    }
}

fn throttled(route53: bool, n: u64) -> Response {
    let (status, body) = if route53 {
        (
            StatusCode::BAD_REQUEST,
            "<?xml version=\"1.0\"?><ErrorResponse xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\">\
             <Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>\
             <RequestId>fault-proxy</RequestId></ErrorResponse>",
        )
    } else if n.is_multiple_of(2) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "<?xml version=\"1.0\"?><Response><Errors><Error><Code>RequestLimitExceeded</Code>\
             <Message>Request limit exceeded.</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>",
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/xml")
        .body(Body::from(body))
        .unwrap_or_default()
}

async fn forward(s: &ProxyState, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let body = axum::body::to_bytes(body, 64 << 20).await?;
    if let Ok(mut calls) = s.calls.lock() {
        calls.push(AwsCall::new(&parts.method, path, &body));
    }
    let resp = send_upstream(&s.client, &s.upstream, parts.method, path, &parts.headers, body).await?;
    relay(resp).await
}

/// Sends a request on to the emulator as it came. The emulator dispatches on the signed
/// Authorization header, so the headers pass through, less those of the hop itself.
pub(crate) async fn send_upstream(
    client: &reqwest::Client,
    upstream: &str,
    method: http::Method,
    path: &str,
    headers: &HeaderMap,
    body: axum::body::Bytes,
) -> Result<reqwest::Response> {
    let headers: HeaderMap = headers
        .iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "host" | "content-length" | "connection" | "transfer-encoding")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(client.request(method, format!("{upstream}{path}")).headers(headers).body(body).send().await?)
}

/// The emulator's answer as the proxy's own.
pub(crate) async fn relay(resp: reqwest::Response) -> Result<Response> {
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        if !matches!(k.as_str(), "content-length" | "connection" | "transfer-encoding") {
            out = out.header(k, v);
        }
    }
    Ok(out.body(Body::from(resp.bytes().await?))?)
}

/// A TCP proxy that can hold everything in flight: while held, bytes in either direction wait
/// in the proxy (a request sent meanwhile reaches the server only on release), as a network
/// partition between one process and one server would do. TLS passes through untouched.
pub struct TcpHold {
    pub addr: std::net::SocketAddr,
    held: tokio::sync::watch::Sender<bool>,
    waiting: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpHold {
    pub async fn start(upstream: std::net::SocketAddr) -> Result<TcpHold> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (held, rx) = tokio::sync::watch::channel(false);
        let waiting = Arc::new(AtomicU64::new(0));
        let counter = waiting.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (rx, counter) = (rx.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, rx.clone(), counter.clone()), pipe(sr, cw, rx, counter));
                });
            }
        });
        Ok(TcpHold { addr, held, waiting, task })
    }

    /// From now on nothing passes until `release`.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Bytes that arrived while held and have not passed yet.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }
}

impl Drop for TcpHold {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction of a connection, parking each chunk while the proxy is held.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
    waiting: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let parked = *held.borrow();
        if parked {
            waiting.fetch_add(n as u64, Ordering::Relaxed);
            if held.wait_for(|h| !*h).await.is_err() {
                break;
            }
            waiting.fetch_sub(n as u64, Ordering::Relaxed);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_actions_and_route53_requests_are_told_apart_and_writes_found() {
        let run = AwsCall::new(&http::Method::POST, "/", b"Action=RunInstances&Version=2016-11-15");
        assert_eq!((run.action.as_str(), run.is_write()), ("RunInstances", true));
        let describe = AwsCall::new(&http::Method::POST, "/", b"Version=2016-11-15&Action=DescribeVolumes");
        assert_eq!((describe.action.as_str(), describe.is_write()), ("DescribeVolumes", false));
        let list = AwsCall::new(&http::Method::GET, "/2013-04-01/hostedzone", b"");
        assert!(list.route53 && !list.is_write());
        let change = AwsCall::new(&http::Method::POST, "/2013-04-01/hostedzone/Z1/rrset", b"<xml/>");
        assert!(change.route53 && change.is_write());
    }
}
