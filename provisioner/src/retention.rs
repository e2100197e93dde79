//! Housekeeping: finished instructions leave the journal once older than the retention
//! (`--journal-retention-secs`), a batch at a time, and /metrics says how big the journal is.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Shared;
use crate::journal;

/// Rows deleted per statement: a short transaction, whatever the backlog.
const BATCH: i64 = 5000;

/// How often to prune: once a minute, or as often as the retention itself when it is shorter.
pub fn every(retention: Duration) -> Duration {
    retention.clamp(Duration::from_secs(1), Duration::from_secs(60))
}

pub async fn run(ctx: Arc<Shared>, stop: CancellationToken) {
    loop {
        let mut pruned = 0;
        loop {
            match journal::prune(&ctx.pool, ctx.journal_retention, BATCH).await {
                Ok(n) => {
                    pruned += n;
                    ctx.metrics.journal_pruned.inc_by(n);
                    if n < BATCH as u64 || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), "pruning the journal failed; trying again later");
                    break;
                }
            }
        }
        if pruned > 0 {
            info!(pruned, retention_secs = ctx.journal_retention.as_secs(), "pruned finished instructions");
        }
        match journal::rows(&ctx.pool).await {
            Ok(n) => {
                ctx.metrics.journal_rows.set(n);
            }
            Err(e) => warn!(error = %crate::error_chain(&e), "counting the journal failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every(ctx.journal_retention)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_once_a_minute_or_as_often_as_a_shorter_retention() {
        assert_eq!(every(Duration::from_secs(7 * 24 * 3600)), Duration::from_secs(60));
        assert_eq!(every(Duration::from_secs(2)), Duration::from_secs(2));
        assert_eq!(every(Duration::ZERO), Duration::from_secs(1));
    }
}
