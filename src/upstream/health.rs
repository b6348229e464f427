//! What the dashboard says of an upstream's health: requests and failures
//! so far, and the last failure with its time. Fed by every upstream
//! request beside the `upstream_requests`/`upstream_up` metrics; fixed
//! size per configured upstream (one failure kept, never a history).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// An answer that says the upstream is in trouble: none at all, a 429 or
/// a 5xx. A 404 or 401 is an answer about content or credentials.
pub fn is_failure(status: Option<u16>) -> bool {
    status.is_none_or(|status| status == 429 || status >= 500)
}

#[derive(Debug, Default)]
pub struct Health {
    requests: AtomicU64,
    failures: AtomicU64,
    last_failure: Mutex<Option<Failure>>,
}

/// The most recent failed upstream request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `HTTP 503`, or `no answer: <reason>` (never a URL's credentials:
    /// Kura sends those in headers).
    pub what: String,
}

/// A copy of [`Health`] for the dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthSnapshot {
    pub requests: u64,
    pub failures: u64,
    pub last_failure: Option<Failure>,
}

impl Health {
    /// One upstream request's end: its status, or why none came.
    pub fn record(&self, status: Result<u16, &str>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !is_failure(status.ok()) {
            return;
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        let what = match status {
            Ok(status) => format!("HTTP {status}"),
            Err(reason) => format!("no answer: {reason}"),
        };
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        *self.last_failure.lock().expect("health lock") = Some(Failure { at, what });
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        HealthSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_failure: self.last_failure.lock().expect("health lock").clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_answers_429_and_5xx_are_failures() {
        let health = Health::default();
        for status in [Ok(200), Ok(404), Ok(401), Ok(503), Ok(429), Err("refused")] {
            health.record(status);
        }
        let seen = health.snapshot();
        assert_eq!((seen.requests, seen.failures), (6, 3));
        assert_eq!(seen.last_failure.unwrap().what, "no answer: refused");
    }
}
