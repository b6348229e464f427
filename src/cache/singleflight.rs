//! Request coalescing: concurrent callers asking for the same key share one
//! in-flight future and all receive its (cloned) result.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

pub struct Flights<K, V: Clone> {
    in_flight: Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone + Send + Sync + 'static> Flights<K, V> {
    pub fn new() -> Self {
        Self {
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `work` unless a flight for `key` is already under way, in which
    /// case this joins it. The work runs to completion even if the caller
    /// that started it goes away, as long as one caller is still waiting.
    pub async fn run<F>(&self, key: K, work: impl FnOnce() -> F) -> V
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
                    let flight = work().boxed().shared();
                    in_flight.insert(key.clone(), flight.clone());
                    flight
                }
            }
        };
        let result = flight.clone().await;
        let mut in_flight = self.in_flight.lock().expect("flights lock");
        if in_flight.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
            in_flight.remove(&key);
        }
        result
    }
}

impl<K: Eq + Hash + Clone, V: Clone + Send + Sync + 'static> Default for Flights<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights = Arc::new(Flights::<&str, usize>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let callers = (0..8).map(|_| {
            let flights = flights.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                flights
                    .run("k", move || async move {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            })
        });
        for caller in callers.collect::<Vec<_>>() {
            assert_eq!(caller.await.unwrap(), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let again = flights.run("k", || async { 42 }).await;
        assert_eq!(again, 42, "a finished flight is not reused");
    }
}
