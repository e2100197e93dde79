//! An HTTP proxy in front of the AWS emulator whose answer to each EC2 call a test scripts: pass
//! it on, pass it on and then answer as if it timed out (the call happened, the caller never
//! heard), or answer in the emulator's place (an error EC2 gives that the emulator never does).

use std::sync::Arc;

use anyhow::Result;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{StatusCode, header};

/// What the proxy does with one request.
pub enum Answer {
    Forward,
    /// Forwarded, and the emulator's reply replaced by a 504 (a gateway timeout): what a caller
    /// sees of a call that reached EC2 but whose reply was lost.
    ForwardThenTimeout,
    /// Not forwarded: this status and EC2 error code and message instead.
    Error {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// Not forwarded: this body (XML) with status 200 instead.
    Reply(String),
}

/// A DescribeInstances answer listing nothing: what EC2's eventual consistency may show for a
/// few seconds after a launch.
pub fn no_instances() -> Answer {
    Answer::Reply(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><DescribeInstancesResponse \
         xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>scripted-proxy</requestId>\
         <reservationSet/></DescribeInstancesResponse>"
            .into(),
    )
}

/// A proxy that answers a launch of `image` as EC2 does for an image that does not exist (the
/// emulator launches any image id) and passes everything else on.
pub async fn unknown_image(upstream: &str, image: &'static str) -> Result<ScriptedProxy> {
    ScriptedProxy::start(
        upstream,
        Box::new(move |action, body| match form_value(body, "ImageId") {
            Some(id) if id == image && action == "RunInstances" => Answer::Error {
                status: StatusCode::BAD_REQUEST,
                code: "InvalidAMIID.NotFound",
                message: format!("The image id '[{image}]' does not exist"),
            },
            _ => Answer::Forward,
        }),
    )
    .await
}

/// Decides per request from the EC2 action (`Action=...`) and the whole form body.
pub type Script = dyn Fn(&str, &str) -> Answer + Send + Sync;

pub struct ScriptedProxy {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    upstream: String,
    script: Box<Script>,
    client: reqwest::Client,
}

impl ScriptedProxy {
    pub async fn start(upstream: &str, script: Box<Script>) -> Result<ScriptedProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_string(),
            script,
            client: reqwest::Client::new(),
        });
        let app = axum::Router::new().fallback(handle).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(ScriptedProxy { url, task })
    }
}

impl Drop for ScriptedProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of `key` in a form-encoded body (EC2's query protocol).
pub fn form_value<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn handle(State(s): State<Arc<ProxyState>>, req: Request) -> Response {
    match handle_inner(&s, req).await {
        Ok(r) => r,
        Err(e) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::from(format!("scripted proxy: {e:#}")))
            .unwrap_or_default(),
    }
}

async fn handle_inner(s: &ProxyState, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20).await?;
    let text = String::from_utf8_lossy(&body).to_string();
    let action = form_value(&text, "Action").unwrap_or_default().to_string();
    let answer = (s.script)(&action, &text);
    if let Answer::Error { status, code, message } = &answer {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code>\
             <Message>{message}</Message></Error></Errors><RequestID>scripted-proxy</RequestID></Response>"
        );
        return Ok(Response::builder()
            .status(*status)
            .header(header::CONTENT_TYPE, "text/xml")
            .body(Body::from(xml))?);
    }
    if let Answer::Reply(xml) = answer {
        return Ok(Response::builder().header(header::CONTENT_TYPE, "text/xml").body(Body::from(xml))?);
    }
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let resp = crate::faults::send_upstream(&s.client, &s.upstream, parts.method, path, &parts.headers, body)
        .await?;
    if matches!(answer, Answer::ForwardThenTimeout) {
        let _ = resp.bytes().await;
        return Ok(Response::builder()
            .status(StatusCode::GATEWAY_TIMEOUT)
            .body(Body::from("Gateway Timeout"))?);
    }
    crate::faults::relay(resp).await
}
