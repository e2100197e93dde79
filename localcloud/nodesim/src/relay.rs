//! The `kubernetes` Service of a node: pods on a node reach the apiserver at 127.0.0.1:6443
//! inside the node's network namespace, relayed to the apiserver on the machine's loopback (what
//! kube-proxy's rules for the `kubernetes` Service do on a real node). The listening socket is
//! made inside the namespace; the relay's own connections leave from the machine's.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use thiserror::Error;
use tracing::{debug, warn};

/// Where pods of a node find the apiserver (the certificate names 127.0.0.1).
pub const IN_NODE: &str = "127.0.0.1:6443";

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("opening network namespace {ns}: {source}")]
    Open { ns: String, source: std::io::Error },
    #[error("entering network namespace {ns}: {source}")]
    Enter { ns: String, source: std::io::Error },
    #[error("listening on {IN_NODE} in {ns}: {source}")]
    Listen { ns: String, source: std::io::Error },
    #[error("the relay thread for {0} died")]
    Thread(String),
}

/// Starts relaying `IN_NODE` inside network namespace `ns` to `apiserver`; the task ends when
/// the namespace goes (its listener then fails).
pub fn start(ns: &str, apiserver: SocketAddr) -> Result<tokio::task::JoinHandle<()>, RelayError> {
    let listener = listen_in(ns)?;
    listener.set_nonblocking(true).map_err(|source| RelayError::Listen { ns: ns.to_string(), source })?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| RelayError::Listen { ns: ns.to_string(), source })?;
    let ns = ns.to_string();
    Ok(tokio::spawn(async move {
        loop {
            let (mut inbound, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(netns = ns, error = %e, "apiserver relay stopped");
                    return;
                }
            };
            tokio::spawn(async move {
                match tokio::net::TcpStream::connect(apiserver).await {
                    Ok(mut outbound) => {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    Err(e) => debug!(error = %e, "apiserver unreachable from the relay"),
                }
            });
        }
    }))
}

/// Binds in `ns` from a thread of its own: a socket belongs to the namespace it was made in,
/// and the thread (which alone changed namespace) ends right after.
fn listen_in(ns: &str) -> Result<std::net::TcpListener, RelayError> {
    let path = format!("/var/run/netns/{ns}");
    let file =
        std::fs::File::open(&path).map_err(|source| RelayError::Open { ns: ns.to_string(), source })?;
    let name = ns.to_string();
    std::thread::spawn(move || {
        // SAFETY: setns(2) on this thread only, with a descriptor we own; the thread does
        // nothing else in the namespace but bind.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(RelayError::Enter { ns: name, source: std::io::Error::last_os_error() });
        }
        std::net::TcpListener::bind(IN_NODE).map_err(|source| RelayError::Listen { ns: name, source })
    })
    .join()
    .map_err(|_| RelayError::Thread(ns.to_string()))?
}
