//! Replicas of one storage acting as one cache (`cluster:`): they know
//! each other through heartbeat records in the storage ([`membership`]),
//! and the owner rule ([`owner`]) gives every key one owner among the live
//! replicas: the owner of `gc` is the one garbage collector, the owner of
//! a digest fetches that blob from the upstream for all of them.
//!
//! Without `cluster:` there is no [`Cluster`] and a replica is a single
//! node that owns everything.

pub mod membership;
pub mod owner;

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::ClusterConfig;
use crate::storage::Storage;
use membership::Membership;
pub use membership::{Member, Members};

/// The key whose owner collects garbage.
pub const GC_KEY: &[u8] = b"gc";

pub struct Cluster {
    me: Arc<Member>,
    view: watch::Receiver<Members>,
}

impl Cluster {
    /// Joins the cluster: a fresh id for this process, heartbeats from
    /// now on (a task of its own, for the life of the process).
    pub fn start(config: &ClusterConfig, storage: &Storage) -> Arc<Self> {
        let me = Arc::new(Member {
            id: uuid::Uuid::new_v4().simple().to_string(),
            address: config.advertise.clone(),
        });
        tracing::info!(id = me.id, advertise = %me.address, "cluster: joining");
        let membership = Arc::new(Membership::new(
            me.clone(),
            storage.clone(),
            config.heartbeat,
            config.expiry,
        ));
        let view = membership.view();
        tokio::spawn(membership.run());
        Arc::new(Self { me, view })
    }

    /// The live replica that owns `key`.
    pub fn owner(&self, key: &[u8]) -> Arc<Member> {
        let members = self.view.borrow().clone();
        let id = owner::owner(members.iter().map(|m| m.id.as_str()), key)
            .expect("this replica is always live");
        members
            .iter()
            .find(|member| member.id == id)
            .cloned()
            .unwrap_or_else(|| self.me.clone())
    }

    /// Whether this replica owns `key`.
    pub fn owns(&self, key: &[u8]) -> bool {
        self.owner(key).id == self.me.id
    }
}
