//! Heartbeat records of a cluster's replicas (`_kura/replicas/<id>`): each
//! replica rewrites its own every `cluster.heartbeat` with the address its
//! peers reach it at; the storage's modification time says when it was
//! last alive. The cluster secret is never written here.

use std::io;
use std::time::SystemTime;

use super::Storage;

const REPLICAS_PREFIX: &str = "_kura/replicas/";

/// The largest heartbeat record read: an id and an address.
const MAX_RECORD_BYTES: usize = 4096;

/// What a replica writes about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    pub id: String,
    pub address: String,
}

/// A heartbeat record as listed: whose, and when it was last written
/// (by the storage's clock).
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub written: SystemTime,
}

impl Storage {
    /// Rewrites this replica's heartbeat record.
    pub async fn write_heartbeat(&self, heartbeat: &Heartbeat) -> io::Result<()> {
        let body = serde_json::to_vec(heartbeat).map_err(io::Error::other)?;
        self.write_small(&record_key(&heartbeat.id), &body).await
    }

    /// Every heartbeat record, with its last write: one listing.
    pub async fn list_heartbeats(&self) -> io::Result<Vec<Listed>> {
        let listed = self.objects.list(REPLICAS_PREFIX).await?;
        Ok(listed
            .into_iter()
            .filter_map(|(key, meta)| {
                let id = key.strip_prefix(REPLICAS_PREFIX)?;
                valid_id(id).then(|| Listed {
                    id: id.to_owned(),
                    written: meta.modified,
                })
            })
            .collect())
    }

    /// A replica's record; `None` when gone or unreadable.
    pub async fn read_heartbeat(&self, id: &str) -> io::Result<Option<Heartbeat>> {
        let Some(body) = self
            .objects
            .read_within(&record_key(id), MAX_RECORD_BYTES)
            .await?
        else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<Heartbeat>(&body)
            .ok()
            .filter(|heartbeat| heartbeat.id == id))
    }

    /// Removes the record of a replica long gone.
    pub async fn delete_heartbeat(&self, id: &str) -> io::Result<()> {
        self.objects.delete(&record_key(id)).await
    }
}

fn record_key(id: &str) -> String {
    format!("{REPLICAS_PREFIX}{id}")
}

/// Replica ids are what Kura generates (hex and `-`); anything else under
/// the prefix is not a record.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}
