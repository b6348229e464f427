//! Which replicas are live: each rewrites its heartbeat record in the
//! storage every `cluster.heartbeat`, then lists the records (one listing)
//! and takes as live those written within `cluster.expiry` of its own.
//! Comparing with its own record's time, both stamped by the storage,
//! keeps the replicas' clocks out of it.
//!
//! The view is cached between rounds. When the storage cannot be reached,
//! the last view stands until `cluster.expiry` has passed since the last
//! good round; then the replica counts only itself (it fetches cold blobs
//! itself and, alone, would collect garbage, which needs the storage
//! anyway).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reqwest::Url;
use tokio::sync::watch;

use crate::metrics::metrics;
use crate::storage::Storage;
use crate::storage::replicas::{Heartbeat, Listed};

/// Live replicas taken from one listing at most (the newest heartbeats
/// first, this one's own among them); more are not peers of this one. Also bounds the map of known
/// addresses.
pub const MAX_MEMBERS: usize = 256;

/// Records of replicas gone for this many expiries are deleted, by
/// whichever replica sees them first (at most [`MAX_DELETES_PER_ROUND`] a
/// round).
const GONE_EXPIRIES: u32 = 4;
const MAX_DELETES_PER_ROUND: usize = 16;

/// A replica as its peers reach it.
#[derive(Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub address: Url,
}

/// The live replicas, this one always among them, sorted by id.
pub type Members = Arc<Vec<Arc<Member>>>;

pub(super) struct Membership {
    me: Arc<Member>,
    storage: Storage,
    heartbeat: Duration,
    expiry: Duration,
    view: watch::Sender<Members>,
    /// The records read so far of replicas still live: an id's record is
    /// read once (ids are fresh per process start).
    known: Mutex<HashMap<String, Arc<Member>>>,
}

impl Membership {
    pub(super) fn new(
        me: Arc<Member>,
        storage: Storage,
        heartbeat: Duration,
        expiry: Duration,
    ) -> Self {
        let alone = Arc::new(vec![me.clone()]);
        metrics().cluster_replicas.set(1);
        Self {
            me,
            storage,
            heartbeat,
            expiry,
            view: watch::Sender::new(alone),
            known: Mutex::default(),
        }
    }

    pub(super) fn view(&self) -> watch::Receiver<Members> {
        self.view.subscribe()
    }

    /// Heartbeats and listings until the process ends.
    pub(super) async fn run(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_good = Instant::now();
        loop {
            ticks.tick().await;
            // A round never outlasts a heartbeat interval by much: the
            // storage's own timeouts bound each request.
            match self.round().await {
                Ok(()) => last_good = Instant::now(),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot write or list heartbeats");
                    if last_good.elapsed() > self.expiry {
                        self.publish(vec![self.me.clone()]);
                    }
                }
            }
        }
    }

    /// One heartbeat and one listing.
    async fn round(&self) -> std::io::Result<()> {
        let heartbeat = Heartbeat {
            id: self.me.id.clone(),
            address: self.me.address.to_string(),
        };
        self.storage.write_heartbeat(&heartbeat).await?;
        let listed = self.storage.list_heartbeats().await?;
        let now = listed
            .iter()
            .find(|record| record.id == self.me.id)
            .or_else(|| listed.iter().max_by_key(|record| record.written))
            .map_or_else(SystemTime::now, |record| record.written);
        let (live, gone) = split_live(listed, now, self.expiry);
        let mut members = vec![self.me.clone()];
        for record in live.iter().filter(|record| record.id != self.me.id) {
            if let Some(member) = self.member(&record.id).await? {
                members.push(member);
            }
        }
        self.known
            .lock()
            .expect("members lock")
            .retain(|id, _| members.iter().any(|member| &member.id == id));
        self.publish(members);
        self.delete_long_gone(&gone, now).await;
        Ok(())
    }

    /// A live peer's member entry, its record read when first seen.
    async fn member(&self, id: &str) -> std::io::Result<Option<Arc<Member>>> {
        if let Some(member) = self.known.lock().expect("members lock").get(id) {
            return Ok(Some(member.clone()));
        }
        let Some(heartbeat) = self.storage.read_heartbeat(id).await? else {
            return Ok(None);
        };
        let Ok(address) = Url::parse(&heartbeat.address) else {
            tracing::warn!(id, "cluster: a heartbeat record without a usable address");
            return Ok(None);
        };
        let member = Arc::new(Member {
            id: id.to_owned(),
            address,
        });
        self.known
            .lock()
            .expect("members lock")
            .insert(id.to_owned(), member.clone());
        Ok(Some(member))
    }

    fn publish(&self, mut members: Vec<Arc<Member>>) {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let changed = self.view.send_if_modified(|view| {
            let same =
                view.len() == members.len() && view.iter().zip(&members).all(|(a, b)| a.id == b.id);
            if !same {
                *view = Arc::new(members.clone());
            }
            !same
        });
        if changed {
            metrics()
                .cluster_replicas
                .set(i64::try_from(members.len()).unwrap_or(i64::MAX));
            let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
            tracing::info!(live = members.len(), ?ids, "cluster: live replicas changed");
        }
    }

    async fn delete_long_gone(&self, gone: &[Listed], now: SystemTime) {
        let long_gone = self.expiry * GONE_EXPIRIES;
        let stale = gone
            .iter()
            .filter(|record| record.written + long_gone < now)
            .take(MAX_DELETES_PER_ROUND);
        for record in stale {
            if let Err(e) = self.storage.delete_heartbeat(&record.id).await {
                tracing::debug!(id = record.id, error = %e, "cluster: cannot delete an old heartbeat");
            }
        }
    }
}

/// The records written within `expiry` of `now` (at most [`MAX_MEMBERS`],
/// newest first), and the rest.
fn split_live(
    listed: Vec<Listed>,
    now: SystemTime,
    expiry: Duration,
) -> (Vec<Listed>, Vec<Listed>) {
    let (mut live, gone): (Vec<Listed>, Vec<Listed>) = listed
        .into_iter()
        .partition(|record| record.written + expiry >= now);
    live.sort_by_key(|record| std::cmp::Reverse(record.written));
    live.truncate(MAX_MEMBERS);
    (live, gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, port: u16) -> Arc<Member> {
        Arc::new(Member {
            id: id.to_owned(),
            address: Url::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
        })
    }

    fn membership(storage: &Storage, id: &str, port: u16) -> Membership {
        let second = Duration::from_secs(1);
        Membership::new(member(id, port), storage.clone(), second, 3 * second)
    }

    fn ids(view: &Members) -> Vec<&str> {
        view.iter().map(|m| m.id.as_str()).collect()
    }

    #[tokio::test]
    async fn replicas_of_one_storage_find_each_other_and_their_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).open().await.unwrap();
        let a = membership(&storage, "aaaa", 1);
        let b = membership(&storage, "bbbb", 2);
        assert_eq!(ids(&a.view().borrow()), ["aaaa"], "alone before a round");
        a.round().await.unwrap();
        b.round().await.unwrap();
        a.round().await.unwrap();
        for view in [a.view(), b.view()] {
            let view = view.borrow().clone();
            assert_eq!(ids(&view), ["aaaa", "bbbb"]);
            assert_eq!(view[1].address.as_str(), "http://127.0.0.1:2/");
        }
        // Foreign objects under the prefix are no replicas.
        std::fs::write(dir.path().join("_kura/replicas/not a replica"), "{}").unwrap();
        a.round().await.unwrap();
        assert_eq!(ids(&a.view().borrow()), ["aaaa", "bbbb"]);
    }

    #[test]
    fn only_recent_heartbeats_are_live_and_at_most_max_members() {
        let now = SystemTime::now();
        let expiry = Duration::from_secs(15);
        let listed = |age: u64, id: String| Listed {
            id,
            written: now - Duration::from_secs(age),
        };
        let (live, gone) = split_live(
            vec![
                listed(3, "a".into()),
                listed(16, "b".into()),
                listed(15, "c".into()),
            ],
            now,
            expiry,
        );
        let names = |records: &[Listed]| records.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(names(&live), ["a", "c"]);
        assert_eq!(names(&gone), ["b"]);

        let many = (0..(MAX_MEMBERS as u64 + 50))
            .map(|i| listed(i % 10, format!("{i:x}")))
            .collect();
        let (live, _) = split_live(many, now, expiry);
        assert_eq!(live.len(), MAX_MEMBERS);
    }
}
