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
pub mod peer;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::{ClusterConfig, Secret};
use crate::storage::Storage;
use membership::Membership;
pub use membership::{Member, Members};
use peer::PeerClient;

/// The key whose owner collects garbage.
pub const GC_KEY: &[u8] = b"gc";

pub struct Cluster {
    me: Arc<Member>,
    view: watch::Receiver<Members>,
    peers: PeerClient,
    /// `Bearer <cluster.secret>`: what a peer request must carry.
    expected_authorization: Secret,
    /// Peer requests served at once (`cluster.maxpeerrequests`).
    serving: Arc<Semaphore>,
    heartbeats: tokio::task::AbortHandle,
    storage: Storage,
}

impl Cluster {
    /// Joins the cluster: a fresh id for this process, heartbeats from
    /// now on (a task of its own, until [`Cluster::leave`]).
    pub fn start(config: &ClusterConfig, storage: &Storage) -> anyhow::Result<Arc<Self>> {
        let me = Arc::new(Member {
            id: uuid::Uuid::new_v4().simple().to_string(),
            address: config.advertise.clone(),
        });
        storage.name_access_records(&me.id);
        tracing::info!(id = %me.id, advertise = %me.address, "cluster: joining");
        let membership = Arc::new(Membership::new(
            me.clone(),
            storage.clone(),
            config.heartbeat,
            config.expiry,
        ));
        let view = membership.view();
        let peers = PeerClient::new(config)?;
        let heartbeats = tokio::spawn(membership.run()).abort_handle();
        Ok(Arc::new(Self {
            me,
            view,
            peers,
            expected_authorization: Secret::from(peer::authorization(config)),
            serving: Arc::new(Semaphore::new(config.max_peer_requests)),
            heartbeats,
            storage: storage.clone(),
        }))
    }

    /// Leaves on shutdown: no more heartbeats, and the record goes, so the
    /// others stop asking this replica at their next round instead of
    /// after `cluster.expiry`.
    pub async fn leave(&self) {
        self.heartbeats.abort();
        match self.storage.delete_heartbeat(&self.me.id).await {
            Ok(()) => tracing::info!("cluster: left"),
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot remove the heartbeat; it expires")
            }
        }
    }

    pub fn peers(&self) -> &PeerClient {
        &self.peers
    }

    /// Whether a peer request's `Authorization` is the cluster's (compared
    /// in constant time).
    pub fn authorizes(&self, authorization: Option<&[u8]>) -> bool {
        authorization.is_some_and(|given| self.expected_authorization.matches(given))
    }

    /// A slot to serve one peer request, if one is free: held until its
    /// response body ends.
    pub fn serving_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.serving.clone().try_acquire_owned().ok()
    }

    pub fn is_me(&self, member: &Member) -> bool {
        member.id == self.me.id
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
        self.is_me(&self.owner(key))
    }
}
