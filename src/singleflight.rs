//! Request coalescing: concurrent callers asking for the same key share one
//! in-flight fetch and all receive its (cloned) result.
//!
//! The fetch runs as a task of its own, not inside any caller: a caller may
//! leave at any time (a client disconnects, a kubelet cancels) without
//! leaving behind a fetch nobody polls, which would hold its upstream slot
//! and its map entry forever. Every fetch ends by its deadline at the
//! latest, and its map entry goes with it, so the map holds at most one
//! entry per fetch running now.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

type Flight<V> = Shared<BoxFuture<'static, Option<V>>>;

pub struct Flights<K, V: Clone> {
    in_flight: Arc<Mutex<HashMap<K, Flight<V>>>>,
    /// How long one fetch may run, waiters or not.
    deadline: Duration,
}

impl<K, V> Flights<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(deadline: Duration) -> Self {
        Self {
            in_flight: Arc::default(),
            deadline,
        }
    }

    /// Runs `work` unless a fetch for `key` is already under way, in which
    /// case this joins it. `None` when the fetch overran its deadline (or
    /// panicked): there is no answer to share.
    pub async fn run<F>(&self, key: K, work: impl FnOnce() -> F) -> Option<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let flight = {
            let mut in_flight = self.in_flight.lock().expect("flights lock");
            match in_flight.get(&key) {
                Some(flight) => {
                    crate::metrics::metrics().coalesced_waiters.inc();
                    flight.clone()
                }
                None => {
                    // Spawned while the lock is held: the task's own removal
                    // of its entry cannot come before this insertion.
                    let flight = self.launch(key.clone(), work());
                    in_flight.insert(key, flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    fn launch<F>(&self, key: K, work: F) -> Flight<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let leaves = LeaveOnDrop {
            in_flight: Arc::clone(&self.in_flight),
            key: Some(key),
        };
        let deadline = self.deadline;
        let task = tokio::spawn(async move {
            let _leaves = leaves;
            tokio::time::timeout(deadline, work).await.ok()
        });
        async move { task.await.ok().flatten() }.boxed().shared()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_flight.lock().expect("flights lock").len()
    }
}

/// Removes a fetch's map entry when its task ends, however it ends
/// (finished, deadline, panic, runtime shutdown).
struct LeaveOnDrop<K: Eq + Hash, V: Clone> {
    in_flight: Arc<Mutex<HashMap<K, Flight<V>>>>,
    key: Option<K>,
}

impl<K: Eq + Hash, V: Clone> Drop for LeaveOnDrop<K, V> {
    fn drop(&mut self) {
        if let (Some(key), Ok(mut in_flight)) = (self.key.take(), self.in_flight.lock()) {
            in_flight.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn flights(deadline: Duration) -> Arc<Flights<&'static str, usize>> {
        Arc::new(Flights::new(deadline))
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights = flights(Duration::from_secs(10));
        let runs = Arc::new(AtomicUsize::new(0));
        let callers = (0..8).map(|_| {
            let flights = flights.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                flights
                    .run("k", move || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            })
        });
        for caller in callers.collect::<Vec<_>>() {
            assert_eq!(caller.await.unwrap(), Some(1));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let again = flights.run("k", || async { 42 }).await;
        assert_eq!(again, Some(42), "a finished flight is not reused");
    }

    #[tokio::test]
    async fn a_fetch_whose_callers_left_still_finishes_and_leaves_the_map() {
        let flights = flights(Duration::from_secs(10));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let caller = tokio::spawn({
            let flights = flights.clone();
            async move {
                flights
                    .run("k", move || async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let _ = done_tx.send(());
                        1
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        caller.abort();
        done_rx
            .await
            .expect("the fetch ran to the end without its caller");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_fetch_past_its_deadline_answers_none_and_leaves_the_map() {
        let flights = flights(Duration::from_millis(50));
        let answer = flights
            .run("k", || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                1
            })
            .await;
        assert_eq!(answer, None);
        assert_eq!(flights.len(), 0);
    }
}
