//! What both tiers' processes share beyond the resource itself: the identity a replica holds
//! leases under, and how an error is written on one line.

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
