//! Kura's `cluster:` section: replicas sharing one storage that know each
//! other (heartbeats in the storage), so that one of them fetches each
//! cold blob and one collects garbage. Without the section a replica is
//! a single node, as before.

use std::time::Duration;

use reqwest::Url;

use super::keys::KeyReader;
use super::{ConfigError, Secret};

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `cluster.advertise`: where the other replicas reach this one
    /// (`http://<pod IP>:5000`), the main listener's address as seen
    /// from the peers.
    pub advertise: Url,
    /// `cluster.secret` (or the first line of `cluster.secretfile`): what
    /// peer requests carry as `Authorization: Bearer <secret>`.
    pub secret: Secret,
    /// `cluster.heartbeat`: how often a replica writes its heartbeat and
    /// lists the others.
    pub heartbeat: Duration,
    /// `cluster.expiry`: a replica whose heartbeat is older than this is
    /// not live.
    pub expiry: Duration,
    /// `cluster.peertimeout`: how long a replica waits for a peer's
    /// response headers (connect included) before fetching itself.
    pub peer_timeout: Duration,
    /// `cluster.maxpeerrequests`: peer blob requests a replica serves at
    /// once; more are answered 503 (the asking replica then fetches from
    /// the upstream itself).
    pub max_peer_requests: usize,
}

const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
const DEFAULT_EXPIRY: Duration = Duration::from_secs(15);
const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_MAX_PEER_REQUESTS: usize = 64;

pub fn read_cluster(keys: &mut KeyReader) -> Result<Option<ClusterConfig>, ConfigError> {
    if !keys.exists("cluster") {
        return Ok(None);
    }
    let advertise = keys
        .string("cluster.advertise")?
        .ok_or_else(|| keys.invalid("cluster.advertise", "required with cluster"))?;
    let advertise =
        super::upstreams::parse_http_url("cluster.advertise", &advertise, "cluster.secret")?;
    let secret = read_secret(keys)?;
    let heartbeat = keys
        .duration("cluster.heartbeat")?
        .unwrap_or(DEFAULT_HEARTBEAT);
    let expiry = keys.duration("cluster.expiry")?.unwrap_or(DEFAULT_EXPIRY);
    if heartbeat.is_zero() {
        return Err(keys.invalid("cluster.heartbeat", "must be longer than 0"));
    }
    if expiry < 2 * heartbeat {
        return Err(keys.invalid(
            "cluster.expiry",
            "must be at least twice cluster.heartbeat, or one late heartbeat drops a live replica",
        ));
    }
    Ok(Some(ClusterConfig {
        advertise,
        secret,
        heartbeat,
        expiry,
        peer_timeout: keys
            .duration("cluster.peertimeout")?
            .filter(|t| !t.is_zero())
            .unwrap_or(DEFAULT_PEER_TIMEOUT),
        max_peer_requests: keys
            .count("cluster.maxpeerrequests")?
            .unwrap_or(DEFAULT_MAX_PEER_REQUESTS),
    }))
}

/// `cluster.secret`, or the first line of the file `cluster.secretfile`
/// names (a Kubernetes Secret mounted as a file).
fn read_secret(keys: &mut KeyReader) -> Result<Secret, ConfigError> {
    let inline = keys.string("cluster.secret")?;
    let file = keys.string("cluster.secretfile")?;
    let secret = match (inline, file) {
        (Some(secret), None) => secret,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| keys.invalid("cluster.secretfile", format!("cannot read {path}: {e}")))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        (Some(_), Some(_)) => {
            return Err(keys.invalid(
                "cluster.secret",
                "give cluster.secret or cluster.secretfile, not both",
            ));
        }
        (None, None) => {
            return Err(keys.invalid(
                "cluster.secret",
                "required with cluster (or cluster.secretfile)",
            ));
        }
    };
    if secret.len() < 16 {
        return Err(keys.invalid("cluster.secret", "must be at least 16 characters"));
    }
    Ok(Secret::from(secret))
}
