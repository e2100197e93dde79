//! A token bucket shared by every reconcile: at most `rate` calls per second on average, bursts of
//! up to `rate`. Waiters reserve their token up front (the balance goes negative), so they are
//! served in arrival order and nobody spins.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

struct State {
    /// Tokens available now; negative when callers are already waiting for future ones.
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// `per_sec` of 0 would never let anything through; it is taken as 1.
    pub(crate) fn new(per_sec: u32) -> Self {
        let rate = f64::from(per_sec.max(1));
        Self { rate, burst: rate, state: Mutex::new(State { tokens: rate, at: Instant::now() }) }
    }

    /// Takes one token, waiting until it is due.
    pub(crate) async fn acquire(&self) {
        let wait = {
            // No await while held, and the state is valid after any panic: poisoning is moot.
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
            s.tokens = (s.tokens + elapsed * self.rate).min(self.burst);
            s.at = now;
            s.tokens -= 1.0;
            if s.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-s.tokens / self.rate) }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_paces() {
        let bucket = TokenBucket::new(5);
        let start = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "a full bucket lets a burst through");
        for _ in 0..5 {
            bucket.acquire().await;
        }
        // Five more tokens at 5/s take one second.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(999) && elapsed <= Duration::from_millis(1001),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_share_the_rate() {
        let bucket = std::sync::Arc::new(TokenBucket::new(10));
        let start = Instant::now();
        let tasks: Vec<_> = (0..30)
            .map(|_| {
                let b = bucket.clone();
                tokio::spawn(async move { b.acquire().await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // 10 at once, then 20 more at 10/s.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1999) && elapsed <= Duration::from_millis(2001),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_only_up_to_the_burst() {
        let bucket = TokenBucket::new(2);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..3 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }
}
