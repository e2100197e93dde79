//! Health probes. Plain HTTP is a few lines over a socket; the TLS endpoints (the Kubernetes
//! servers' self-signed certificates) go through curl, as no TLS crate is a dependency here.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Something accepts connections on the port.
pub fn tcp(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), TIMEOUT).is_ok()
}

/// `GET http://127.0.0.1:port/path` answers below 400 (what `curl -f` counts as success).
pub fn http(port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), TIMEOUT)
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let _ = s.set_write_timeout(Some(TIMEOUT));
    // HTTP/1.0 and Connection: close, so no server keeps the socket open or chunks the answer.
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    // Only the status line matters; the emulator's data.json can be large.
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        if head[..n].contains(&b'\n') {
            break;
        }
    }
    status_ok(&head[..n])
}

fn status_ok(head: &[u8]) -> bool {
    let line = String::from_utf8_lossy(head);
    let mut parts = line.split_whitespace();
    let proto_ok = parts.next().is_some_and(|p| p.starts_with("HTTP/"));
    let code = parts.next().and_then(|c| c.parse::<u16>().ok());
    proto_ok && code.is_some_and(|c| (200..400).contains(&c))
}

/// `curl -sfk` on an HTTPS URL, with a bearer token when the endpoint needs one.
pub fn https(url: &str, bearer: Option<&str>) -> bool {
    let mut cmd = Command::new("curl");
    cmd.args(["-sfk", "--max-time", "5", "-o", "/dev/null"]);
    if let Some(token) = bearer {
        cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use super::*;

    #[test]
    fn status_lines() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!status_ok(b"HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!status_ok(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!status_ok(b""));
    }

    #[test]
    fn http_against_a_tiny_server() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let server = thread::spawn(move || {
            for answer in ["HTTP/1.1 200 OK\r\n\r\nok", "HTTP/1.1 500 Oops\r\n\r\n"] {
                let (mut s, _) = l.accept().expect("accept");
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                s.write_all(answer.as_bytes()).expect("answer");
            }
        });
        assert!(http(port, "/healthz"));
        assert!(!http(port, "/healthz"));
        server.join().expect("server");
        assert!(!tcp(port));
    }
}
