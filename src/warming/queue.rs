//! The warming queue: one entry per (upstream, repository, reference),
//! whether queued, running or waiting out a retry's backoff, so a burst of
//! push events for one tag is one warm. An event for a job that is already
//! running marks it to run once more when done (the tag may have moved
//! after the run resolved it); one for a queued job changes nothing (the
//! run resolves the tag when it starts).
//!
//! Bounded: at most `warming.queuelength` entries (a new one beyond is
//! dropped, counted and logged), `warming.workers` runs at once, a
//! failed run retried [`MAX_ATTEMPTS`] times in all with a growing
//! backoff, and the last [`RECENT_JOBS`] outcomes kept for the status view.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};

use super::budget::BudgetSpent;
use crate::api::error::{ApiError, ErrorCode};
use crate::config::WarmingLimits;
use crate::metrics::{WarmLabels, metrics};
use crate::reference::{Reference, RepoName};

/// Attempts of one job, the first included.
pub const MAX_ATTEMPTS: u32 = 4;
/// The wait before the second attempt; it doubles before each next one.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// The longest an upstream's `Retry-After` may delay a retry.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Finished jobs kept for the status view.
pub const RECENT_JOBS: usize = 100;
/// Current jobs listed by the status view (all are counted).
const LISTED_JOBS: usize = 100;

/// Why a job was submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Event,
    Schedule,
}

/// What to warm.
#[derive(Debug, Clone)]
pub struct Job {
    /// The upstream's label: its configured name, or `proxy`.
    pub upstream: String,
    pub repository: RepoName,
    pub reference: Reference,
    pub origin: Origin,
    pub platforms: Arc<[String]>,
}

type Key = (String, RepoName, Reference);

impl Job {
    fn key(&self) -> Key {
        (
            self.upstream.clone(),
            self.repository.clone(),
            self.reference.clone(),
        )
    }
}

/// What became of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    Queued,
    /// Already queued or running: folded into that job.
    Coalesced,
    /// The queue is full.
    Dropped,
}

impl Submitted {
    pub fn as_str(self) -> &'static str {
        match self {
            Submitted::Queued => "queued",
            Submitted::Coalesced => "coalesced",
            Submitted::Dropped => "dropped",
        }
    }
}

/// Runs one job; what the queue's workers call.
pub type Runner =
    Arc<dyn Fn(Job) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum State {
    Queued,
    Running,
    Retrying,
}

impl State {
    const ALL: [State; 3] = [State::Queued, State::Running, State::Retrying];

    fn label(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Retrying => "retrying",
        }
    }
}

struct Entry {
    job: Job,
    state: State,
    attempts: u32,
    /// Submitted again while running: run once more afterwards.
    again: bool,
}

/// A finished job (or a dropped submission), for the status view.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub upstream: String,
    pub repository: String,
    pub reference: String,
    pub origin: Origin,
    /// `done`, `failed` or `dropped`.
    pub outcome: &'static str,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix seconds.
    pub at: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    recent: VecDeque<Record>,
    /// Drops since the queue last took a job: one warning per episode of
    /// fullness, not one per dropped event.
    dropping: bool,
}

pub struct Queue {
    inner: Mutex<Inner>,
    sender: mpsc::Sender<Key>,
    limits: WarmingLimits,
    /// [`FIRST_BACKOFF`], shorter in tests.
    first_backoff: Duration,
}

impl Queue {
    /// A queue and the task that feeds its workers, which call `run`.
    pub fn start(limits: WarmingLimits, run: Runner) -> Arc<Self> {
        Self::start_with_backoff(limits, run, FIRST_BACKOFF)
    }

    fn start_with_backoff(
        limits: WarmingLimits,
        run: Runner,
        first_backoff: Duration,
    ) -> Arc<Self> {
        // Every key in the channel has an entry, and entries are bounded:
        // a send never finds the channel full.
        let (sender, receiver) = mpsc::channel(limits.queue_length);
        let queue = Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            sender,
            limits,
            first_backoff,
        });
        tokio::spawn(queue.clone().dispatch(receiver, run));
        queue
    }

    pub fn submit(&self, job: Job) -> Submitted {
        let submitted = self.try_submit(job);
        metrics()
            .warm_submissions
            .get_or_create(&WarmLabels {
                state: submitted.as_str(),
            })
            .inc();
        submitted
    }

    fn try_submit(&self, job: Job) -> Submitted {
        let key = job.key();
        let mut inner = self.inner.lock().expect("warming queue lock");
        if let Some(entry) = inner.entries.get_mut(&key) {
            if entry.state == State::Running {
                entry.again = true;
            }
            return Submitted::Coalesced;
        }
        if inner.entries.len() >= self.limits.queue_length {
            if !std::mem::replace(&mut inner.dropping, true) {
                tracing::warn!(
                    upstream = job.upstream,
                    repository = %job.repository,
                    reference = %job.reference,
                    limit = self.limits.queue_length,
                    "warming queue full (warming.queuelength); dropping until there is room (counted in kura_warm_submissions_total)"
                );
            }
            let record = record(&job, "dropped", 0, Some("queue full".into()));
            push_recent(&mut inner, record);
            return Submitted::Dropped;
        }
        if self.sender.try_send(key.clone()).is_err() {
            return Submitted::Dropped;
        }
        inner.dropping = false;
        inner.entries.insert(
            key,
            Entry {
                job,
                state: State::Queued,
                attempts: 0,
                again: false,
            },
        );
        update_gauges(&inner);
        Submitted::Queued
    }

    async fn dispatch(self: Arc<Self>, mut receiver: mpsc::Receiver<Key>, run: Runner) {
        let workers = Arc::new(Semaphore::new(self.limits.workers));
        while let Some(key) = receiver.recv().await {
            let permit = workers
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let Some(job) = self.begin(&key) else {
                continue;
            };
            let (this, run) = (self.clone(), run.clone());
            tokio::spawn(async move {
                // Its own task, so a panic is a failed job, not a lost entry.
                let result = tokio::spawn(run(job))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("warming task failed: {e}")));
                this.finish(&key, result);
                drop(permit);
            });
        }
    }

    fn begin(&self, key: &Key) -> Option<Job> {
        let mut inner = self.inner.lock().expect("warming queue lock");
        let entry = inner.entries.get_mut(key)?;
        entry.state = State::Running;
        entry.attempts += 1;
        let job = entry.job.clone();
        update_gauges(&inner);
        Some(job)
    }

    fn finish(self: &Arc<Self>, key: &Key, result: anyhow::Result<()>) {
        let mut inner = self.inner.lock().expect("warming queue lock");
        let Some(entry) = inner.entries.get_mut(key) else {
            return;
        };
        let (job, attempts, again) = (entry.job.clone(), entry.attempts, entry.again);
        let retry = match &result {
            Err(error) if attempts < MAX_ATTEMPTS => retry_delay(
                error,
                job.origin,
                self.first_backoff * 2u32.pow(attempts - 1),
            ),
            _ => None,
        };
        let outcome = match (&result, retry) {
            (Ok(()), _) => Some(record(&job, "done", attempts, None)),
            (Err(error), None) => {
                Some(record(&job, "failed", attempts, Some(format!("{error:#}"))))
            }
            (Err(_), Some(_)) => None,
        };
        if let Some(outcome) = outcome {
            log_outcome(&outcome);
            metrics()
                .warm_jobs_finished
                .get_or_create(&WarmLabels {
                    state: outcome.outcome,
                })
                .inc();
            push_recent(&mut inner, outcome);
        }
        match (retry, again) {
            (Some(delay), _) => {
                if let Err(error) = &result {
                    tracing::info!(upstream = job.upstream, repository = %job.repository, reference = %job.reference, attempt = attempts, retry_in = ?delay, error = format!("{error:#}"), "warming failed; will retry");
                }
                let entry = inner.entries.get_mut(key).expect("entry checked above");
                entry.state = State::Retrying;
                entry.again = false;
                tokio::spawn(self.clone().requeue_after(key.clone(), delay));
            }
            (None, true) => {
                let entry = inner.entries.get_mut(key).expect("entry checked above");
                (entry.state, entry.attempts, entry.again) = (State::Queued, 0, false);
                if self.sender.try_send(key.clone()).is_err() {
                    inner.entries.remove(key);
                }
            }
            (None, false) => {
                inner.entries.remove(key);
            }
        }
        update_gauges(&inner);
    }

    async fn requeue_after(self: Arc<Self>, key: Key, delay: Duration) {
        tokio::time::sleep(delay).await;
        let mut inner = self.inner.lock().expect("warming queue lock");
        if let Some(entry) = inner.entries.get_mut(&key) {
            entry.state = State::Queued;
            if self.sender.try_send(key.clone()).is_err() {
                inner.entries.remove(&key);
            }
        }
        update_gauges(&inner);
    }

    /// The status view: counts, current jobs, recent outcomes (newest
    /// first). Jobs and outcomes are listed where `visible(upstream,
    /// repository)` allows; the counts are of all of them.
    pub fn status(&self, visible: impl Fn(&str, &str) -> bool) -> serde_json::Value {
        // Copied out under the lock (at most `queuelength` jobs and
        // RECENT_JOBS records), filtered after it: `visible` asks the
        // access rules, which may re-read their file.
        let (counts, jobs, recent) = {
            let inner = self.inner.lock().expect("warming queue lock");
            let count = |state: State| inner.entries.values().filter(|e| e.state == state).count();
            let counts = [State::Queued, State::Running, State::Retrying].map(count);
            let jobs: Vec<(Job, State, u32)> = (inner.entries.values())
                .map(|entry| (entry.job.clone(), entry.state, entry.attempts))
                .collect();
            (counts, jobs, inner.recent.clone())
        };
        let jobs: Vec<serde_json::Value> = jobs
            .iter()
            .filter(|(job, ..)| visible(&job.upstream, job.repository.as_str()))
            .take(LISTED_JOBS)
            .map(|(job, state, attempts)| {
                serde_json::json!({
                    "upstream": job.upstream,
                    "repository": job.repository.as_str(),
                    "reference": job.reference.to_string(),
                    "origin": job.origin,
                    "state": state,
                    "attempts": attempts,
                })
            })
            .collect();
        let [queued, running, retrying] = counts;
        serde_json::json!({
            "queued": queued,
            "running": running,
            "retrying": retrying,
            "queuelength": self.limits.queue_length,
            "workers": self.limits.workers,
            "jobs": jobs,
            "recent": recent.iter().rev()
                .filter(|record| visible(&record.upstream, &record.repository))
                .collect::<Vec<_>>(),
        })
    }
}

/// The wait before the next attempt, or `None` when retrying cannot help:
/// the upstream said the image does not exist or is not Kura's to read, or
/// the schedule's budget is spent (its next tick asks again). A pushed tag
/// the upstream does not know yet is retried: Distribution notifies of
/// the manifest before it writes the tag.
fn retry_delay(error: &anyhow::Error, origin: Origin, backoff: Duration) -> Option<Duration> {
    if error.chain().any(|cause| cause.is::<BudgetSpent>()) {
        return None;
    }
    let api = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<ApiError>());
    match api {
        Some(ApiError {
            code: ErrorCode::ManifestUnknown | ErrorCode::NameUnknown,
            ..
        }) if origin == Origin::Event => Some(backoff),
        Some(ApiError {
            code:
                ErrorCode::ManifestUnknown
                | ErrorCode::NameUnknown
                | ErrorCode::BlobUnknown
                | ErrorCode::NameInvalid
                | ErrorCode::DigestInvalid
                | ErrorCode::Denied,
            ..
        }) => None,
        Some(ApiError {
            retry_after: Some(seconds),
            ..
        }) => Some(backoff.max(Duration::from_secs(*seconds).min(MAX_RETRY_AFTER))),
        _ => Some(backoff),
    }
}

fn record(job: &Job, outcome: &'static str, attempts: u32, reason: Option<String>) -> Record {
    Record {
        upstream: job.upstream.clone(),
        repository: job.repository.to_string(),
        reference: job.reference.to_string(),
        origin: job.origin,
        outcome,
        attempts,
        reason,
        at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

fn push_recent(inner: &mut Inner, record: Record) {
    if inner.recent.len() == RECENT_JOBS {
        inner.recent.pop_front();
    }
    inner.recent.push_back(record);
}

fn log_outcome(record: &Record) {
    match &record.reason {
        None => {
            tracing::info!(upstream = record.upstream, repository = record.repository, reference = record.reference, origin = ?record.origin, attempts = record.attempts, "warmed")
        }
        Some(reason) => {
            tracing::warn!(upstream = record.upstream, repository = record.repository, reference = record.reference, origin = ?record.origin, attempts = record.attempts, reason, "warming failed")
        }
    }
}

fn update_gauges(inner: &Inner) {
    for state in State::ALL {
        let count = inner.entries.values().filter(|e| e.state == state).count();
        metrics()
            .warm_jobs
            .get_or_create(&WarmLabels {
                state: state.label(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    fn job(tag: &str) -> Job {
        Job {
            upstream: "proxy".into(),
            repository: RepoName::parse("team/api").unwrap(),
            reference: Reference::parse(tag).unwrap(),
            origin: Origin::Event,
            platforms: Arc::from(Vec::new()),
        }
    }

    /// A runner that counts its runs and holds each until released.
    fn gated(runs: Arc<AtomicUsize>, gate: Arc<Notify>) -> Runner {
        Arc::new(move |_job| {
            let (runs, gate) = (runs.clone(), gate.clone());
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
                Ok(())
            })
        })
    }

    /// A runner that counts its runs and fails each with `code`.
    fn failing(runs: Arc<AtomicUsize>, code: ErrorCode, message: &'static str) -> Runner {
        Arc::new(move |_job| {
            let runs = runs.clone();
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Err(ApiError::new(code, message).into())
            })
        })
    }

    /// Waits (bounded) for the queue to empty, releasing gated runs.
    async fn settle(queue: &Queue, gate: &Notify) {
        for _ in 0..300 {
            if queue.inner.lock().unwrap().entries.is_empty() {
                return;
            }
            gate.notify_waiters();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the queue did not empty");
    }

    #[tokio::test]
    async fn a_burst_for_one_tag_is_one_run_and_one_rerun() {
        let (runs, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let limits = WarmingLimits {
            queue_length: 8,
            workers: 2,
        };
        let queue = Queue::start(limits, gated(runs.clone(), gate.clone()));
        assert_eq!(queue.submit(job("v1")), Submitted::Queued);
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..1000 {
            assert_eq!(queue.submit(job("v1")), Submitted::Coalesced);
        }
        settle(&queue, &gate).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "one run, then one more");
        assert_eq!(queue.inner.lock().unwrap().recent.len(), 2);
    }

    #[tokio::test]
    async fn a_thousand_distinct_tags_fill_the_queue_and_the_rest_is_dropped() {
        let (runs, gate) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let limits = WarmingLimits {
            queue_length: 16,
            workers: 2,
        };
        let queue = Queue::start(limits, gated(runs.clone(), gate.clone()));
        let submitted: Vec<Submitted> = (0..1000)
            .map(|i| queue.submit(job(&format!("t{i}"))))
            .collect();
        let queued = submitted
            .iter()
            .filter(|s| **s == Submitted::Queued)
            .count();
        assert_eq!(queued, 16);
        assert_eq!(queue.inner.lock().unwrap().entries.len(), 16);
        assert_eq!(queue.inner.lock().unwrap().recent.len(), RECENT_JOBS);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "two workers at once");
        settle(&queue, &gate).await;
        assert_eq!(runs.load(Ordering::SeqCst), 16);
    }

    #[tokio::test]
    async fn failures_are_retried_with_backoff_then_recorded_with_the_reason() {
        let runs = Arc::new(AtomicUsize::new(0));
        let run = failing(runs.clone(), ErrorCode::Unavailable, "upstream down");
        let backoff = Duration::from_millis(200);
        let queue = Queue::start_with_backoff(WarmingLimits::default(), run, backoff);
        queue.submit(job("v1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "no retry before the backoff"
        );
        assert_eq!(queue.status(|_, _| true)["retrying"], 1);
        // 200 + 400 + 800 ms of backoff in all.
        settle(&queue, &Notify::new()).await;
        assert_eq!(runs.load(Ordering::SeqCst), MAX_ATTEMPTS as usize);
        let status = queue.status(|_, _| true);
        assert_eq!(status["recent"][0]["outcome"], "failed");
        assert!(
            status["recent"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("upstream down")
        );
        assert_eq!(status["queued"], 0);
        // A client who may not pull the repository sees no job of it.
        let hidden = queue.status(|_, _| false);
        assert_eq!(hidden["recent"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn an_unknown_manifest_on_the_schedule_is_not_retried() {
        let runs = Arc::new(AtomicUsize::new(0));
        let run = failing(runs.clone(), ErrorCode::ManifestUnknown, "gone");
        let queue = Queue::start(WarmingLimits::default(), run);
        queue.submit(Job {
            origin: Origin::Schedule,
            ..job("v1")
        });
        settle(&queue, &Notify::new()).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
