//! Asking the owner replica for a cold blob (the client side of
//! `GET /kura/peer/blobs/<upstream>/<name>/<digest>`, served by
//! `api/peer.rs`). A peer's answer is a source like the upstream's: the
//! asking replica stages it, verifies the digest and commits it as it does
//! any download, so nothing a peer sends is trusted.
//!
//! The owner must answer promptly (`cluster.peertimeout` to connect and
//! send its headers) and keep its body moving (no read waits longer than
//! [`PEER_IDLE_TIMEOUT`]); otherwise the asking replica fetches from the
//! upstream itself.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};

use super::Member;
use crate::config::ClusterConfig;
use crate::metrics::{PeerLabels, metrics};
use crate::reference::{Digest, RepoName};

/// The longest a peer's body may be silent: the owner streams as its own
/// download progresses, which its upstream's idle timeout (30 s by
/// default) bounds in turn.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PeerClient {
    http: reqwest::Client,
    /// `Bearer <cluster.secret>`, marked sensitive.
    authorization: HeaderValue,
    timeout: Duration,
}

/// Why a peer did not serve a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFailure {
    /// No response headers within `cluster.peertimeout`.
    Timeout,
    /// Unreachable, or the connection failed.
    Failed,
    /// It answered, but not 200 (busy, refused, upstream failure).
    Refused(u16),
}

impl PeerFailure {
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Failed => "failed",
            Self::Refused(_) => "refused",
        }
    }
}

/// The `Authorization` value peers send and check: the cluster secret as
/// a Bearer token.
pub fn authorization(config: &ClusterConfig) -> String {
    format!("Bearer {}", config.secret.expose())
}

impl PeerClient {
    pub fn new(config: &ClusterConfig) -> anyhow::Result<Self> {
        // Peers are addressed directly, never through HTTP_PROXY.
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.peer_timeout)
            .read_timeout(PEER_IDLE_TIMEOUT)
            .user_agent(concat!("kura/", env!("CARGO_PKG_VERSION"), " peer"))
            .build()?;
        let mut authorization = HeaderValue::from_str(&authorization(config))
            .map_err(|_| anyhow::anyhow!("cluster.secret: not usable in an HTTP header"))?;
        authorization.set_sensitive(true);
        Ok(Self {
            http,
            authorization,
            timeout: config.peer_timeout,
        })
    }

    /// The owner's response for a blob, once its headers are in (200
    /// only); the body follows as the owner's download progresses.
    pub async fn blob(
        &self,
        owner: &Member,
        upstream: &str,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<reqwest::Response, PeerFailure> {
        let url = peer_blob_url(owner, upstream, name, digest);
        let request = self
            .http
            .get(url)
            .header(AUTHORIZATION, self.authorization.clone())
            .send();
        let outcome = match tokio::time::timeout(self.timeout, request).await {
            Err(_) => Err(PeerFailure::Timeout),
            Ok(Err(_)) => Err(PeerFailure::Failed),
            Ok(Ok(response)) if response.status() == reqwest::StatusCode::OK => Ok(response),
            Ok(Ok(response)) => Err(PeerFailure::Refused(response.status().as_u16())),
        };
        let label = outcome.as_ref().map_or_else(|e| e.outcome(), |_| "served");
        count(label);
        outcome
    }
}

pub fn count(outcome: &'static str) {
    metrics()
        .peer_requests
        .get_or_create(&PeerLabels { outcome })
        .inc();
}

/// `<owner>/kura/peer/blobs/<upstream>/<name>/<digest>`: the upstream's
/// label, then names and digests as validated (safe path segments).
fn peer_blob_url(owner: &Member, upstream: &str, name: &RepoName, digest: &Digest) -> String {
    let base = owner.address.as_str().trim_end_matches('/');
    format!("{base}/kura/peer/blobs/{upstream}/{name}/{digest}")
}
