//! What both tiers' processes share beyond the resource itself: the identity a replica holds
//! leases under, how an error is written on one line, and how long their watches stay open.

/// How long the apiserver keeps a watch open before a watcher starts the next one (from the last
/// resourceVersion, no new list). Short enough that a watch client's read timeout (a bit longer,
/// [`watch_read_timeout`]) finds a connection that went silent within a minute or so; a quiet
/// watch sends nothing, so a client with an ordinary request timeout would break it instead.
pub const WATCH_SECS: u32 = 55;

/// The read timeout a client that carries watches needs: longer than a quiet watch lasts.
pub fn watch_read_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(WATCH_SECS) + 10)
}

/// `<hostname>-<pid>`: distinct for two replicas on one host, and telling on-call where the
/// holder of a lease runs.
pub fn process_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// The error and its causes on one line, for logs, events and gossip.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_the_error() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
        assert!(process_identity().ends_with(&format!("-{}", std::process::id())));
    }
}
