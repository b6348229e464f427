//! The per-upstream budget of manifest GETs per hour that scheduled sync
//! may spend (`warmbudget`): a token bucket holding at most an hour's
//! allowance, refilled continuously. Docker Hub counts a manifest GET as a
//! pull and a HEAD not, so only GETs (and tag-list GETs) are charged; the
//! schedule's HEADs are free.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

/// What a warm that ran out of budget fails with: not retried, since the
/// next tick of the schedule asks again.
#[derive(Debug, thiserror::Error)]
#[error("the hourly budget of {per_hour} manifest GETs (warmbudget) is spent")]
pub struct BudgetSpent {
    pub per_hour: u32,
}

#[derive(Debug)]
pub struct Budget {
    per_hour: u32,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

/// One GET paid for in advance; [`Ticket::refund`] gives it back when the
/// answer came from the cache and no GET was sent.
#[must_use]
pub struct Ticket<'a> {
    budget: &'a Budget,
}

impl Budget {
    /// A full bucket: a restart may spend an hour's allowance at once,
    /// which is what the operator allowed per hour.
    pub fn per_hour(per_hour: u32) -> Self {
        Self {
            per_hour,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(per_hour),
                refilled_at: Instant::now(),
            }),
        }
    }

    /// Takes one GET, or says the budget is spent.
    pub fn take(&self) -> Result<Ticket<'_>, BudgetSpent> {
        let mut bucket = self.bucket.lock().expect("budget lock");
        self.refill(&mut bucket, Instant::now());
        if bucket.tokens < 1.0 {
            return Err(BudgetSpent {
                per_hour: self.per_hour,
            });
        }
        bucket.tokens -= 1.0;
        Ok(Ticket { budget: self })
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.refilled_at);
        let earned = elapsed.as_secs_f64() / HOUR.as_secs_f64() * f64::from(self.per_hour);
        bucket.tokens = (bucket.tokens + earned).min(f64::from(self.per_hour));
        bucket.refilled_at = now;
    }

    fn give_back(&self) {
        let mut bucket = self.bucket.lock().expect("budget lock");
        bucket.tokens = (bucket.tokens + 1.0).min(f64::from(self.per_hour));
    }
}

impl Ticket<'_> {
    /// The GET was not sent (the answer was cached).
    pub fn refund(self) {
        self.budget.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hours_allowance_then_refused_and_refunds_come_back() {
        let budget = Budget::per_hour(2);
        let first = budget.take().unwrap();
        let _second = budget.take().unwrap();
        assert!(budget.take().is_err());
        first.refund();
        let _again = budget.take().unwrap();
        assert!(budget.take().is_err());
    }

    #[test]
    fn the_bucket_refills_with_time_up_to_one_hour() {
        let budget = Budget::per_hour(3600);
        let mut bucket = budget.bucket.lock().unwrap();
        bucket.tokens = 0.0;
        let start = bucket.refilled_at;
        budget.refill(&mut bucket, start + Duration::from_secs(2));
        assert!((bucket.tokens - 2.0).abs() < 1e-6);
        budget.refill(&mut bucket, start + Duration::from_secs(10 * 3600));
        assert_eq!(bucket.tokens, 3600.0);
    }
}
