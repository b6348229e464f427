//! Eviction and garbage collection: which cached content to keep.
//!
//! Roots are the cached manifests (per repository) and the blobs no
//! manifest references, each with its last use. A root unused for longer
//! than `proxy.ttl` expires. Under `cache.maxsize`, the least recently used
//! roots are dropped until what the remaining roots reach fits. Everything
//! reachable from a kept root stays (a blob shared by two images lives as
//! long as either); the rest is deleted. Nothing used within
//! `cache.gcgrace` is ever dropped, which protects pulls in progress (a
//! client fetches the manifest, then its blobs), and a reader that has a
//! blob open keeps reading it even if it is deleted (POSIX unlink).

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::{Duration, SystemTime};

use crate::reference::Digest;
use crate::storage::Storage;
use crate::storage::index::ManifestLink;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// `proxy.ttl`; `None` keeps unused content forever.
    pub ttl: Option<Duration>,
    /// `cache.maxsize` in bytes.
    pub max_size: Option<u64>,
    /// `cache.gcgrace`: content used this recently is never dropped.
    pub grace: Duration,
}

/// What a collection would do.
#[derive(Debug, Default)]
pub struct Plan {
    pub drop_links: Vec<ManifestLink>,
    pub delete_blobs: Vec<(Digest, u64)>,
    pub kept_bytes: u64,
    /// Stored blobs that stay.
    pub kept_blobs: HashSet<Digest>,
}

impl Plan {
    pub fn freed_bytes(&self) -> u64 {
        self.delete_blobs.iter().map(|(_, size)| size).sum()
    }

    pub fn removes_anything(&self) -> bool {
        !(self.delete_blobs.is_empty() && self.drop_links.is_empty())
    }
}

/// Without `proxy.ttl`, how long another node's access record (S3) may go
/// unwritten before it is deleted: its times then only rank blobs for
/// `cache.maxsize`, and a week-old use ranks about as low as none.
const ACCESS_RECORD_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// A root: a manifest link or an unreferenced blob, and what it keeps.
struct Root {
    last_used: SystemTime,
    link: Option<ManifestLink>,
    closure: Vec<Digest>,
}

pub async fn plan(storage: &Storage, policy: &Policy, now: SystemTime) -> io::Result<Plan> {
    let blobs = blob_table(storage).await?;
    let links = storage.list_manifest_links().await?;
    let references = manifest_references(storage, &links, &blobs).await?;

    let mut roots = Vec::new();
    let mut referenced = HashSet::new();
    for link in links {
        let closure = closure_of(&link.digest, &references);
        referenced.extend(closure.iter().skip(1).cloned());
        let last_used = blobs
            .get(&link.digest)
            .map_or(SystemTime::UNIX_EPOCH, |b| b.1);
        roots.push(Root {
            last_used,
            link: Some(link),
            closure,
        });
    }
    let linked: HashSet<Digest> = roots
        .iter()
        .filter_map(|r| r.link.as_ref())
        .map(|l| l.digest.clone())
        .collect();
    for (digest, (_, last_used)) in &blobs {
        if !referenced.contains(digest) && !linked.contains(digest) {
            roots.push(Root {
                last_used: *last_used,
                link: None,
                closure: vec![digest.clone()],
            });
        }
    }

    let age = |root: &Root| now.duration_since(root.last_used).unwrap_or_default();
    let (mut kept, mut dropped): (Vec<Root>, Vec<Root>) = roots.into_iter().partition(|root| {
        policy.ttl.is_none_or(|ttl| age(root) <= ttl) || age(root) <= policy.grace
    });
    if let Some(max_size) = policy.max_size {
        evict_to_fit(&mut kept, &mut dropped, &blobs, max_size, |root| {
            age(root) <= policy.grace
        });
    }

    let keep: HashSet<&Digest> = kept.iter().flat_map(|r| r.closure.iter()).collect();
    let mut plan = Plan {
        kept_bytes: keep.iter().filter_map(|d| blobs.get(*d)).map(|b| b.0).sum(),
        ..Plan::default()
    };
    for root in dropped {
        if let Some(link) = root.link {
            plan.drop_links.push(link);
        }
    }
    let (kept_blobs, dropped_blobs): (Vec<_>, Vec<_>) =
        blobs.iter().partition(|(digest, _)| keep.contains(digest));
    plan.kept_blobs = kept_blobs.into_iter().map(|(d, _)| d.clone()).collect();
    let mut delete: Vec<(Digest, u64)> = dropped_blobs
        .into_iter()
        .map(|(digest, (size, _))| (digest.clone(), *size))
        .collect();
    delete.sort();
    plan.delete_blobs = delete;
    Ok(plan)
}

/// Drops the least recently used kept roots (never `protected` ones) until
/// the blobs the kept roots reach fit in `max_size`.
fn evict_to_fit(
    kept: &mut Vec<Root>,
    dropped: &mut Vec<Root>,
    blobs: &HashMap<Digest, (u64, SystemTime)>,
    max_size: u64,
    protected: impl Fn(&Root) -> bool,
) {
    // How many kept roots reach each blob, and the bytes they reach.
    let mut counts: HashMap<Digest, usize> = HashMap::new();
    for root in kept.iter() {
        for digest in &root.closure {
            *counts.entry(digest.clone()).or_default() += 1;
        }
    }
    let size_of = |d: &Digest| blobs.get(d).map_or(0, |b| b.0);
    let mut total: u64 = counts.keys().map(size_of).sum();
    kept.sort_by_key(|root| std::cmp::Reverse(root.last_used));
    let mut index = kept.len();
    while total > max_size && index > 0 {
        index -= 1;
        if protected(&kept[index]) {
            continue;
        }
        let root = kept.remove(index);
        for digest in &root.closure {
            let count = counts.get_mut(digest).expect("counted above");
            *count -= 1;
            if *count == 0 {
                total -= size_of(digest);
            }
        }
        dropped.push(root);
    }
}

/// The digests each cached manifest refers to (children, config, layers).
async fn manifest_references(
    storage: &Storage,
    links: &[ManifestLink],
    blobs: &HashMap<Digest, (u64, SystemTime)>,
) -> io::Result<HashMap<Digest, Vec<Digest>>> {
    let mut references = HashMap::new();
    let mut pending: Vec<Digest> = links.iter().map(|l| l.digest.clone()).collect();
    while let Some(digest) = pending.pop() {
        if references.contains_key(&digest) || !blobs.contains_key(&digest) {
            continue;
        }
        let Some(bytes) = storage.read_blob(&digest).await? else {
            continue;
        };
        let children = referenced_digests(&bytes);
        pending.extend(children.iter().cloned());
        references.insert(digest, children);
    }
    Ok(references)
}

/// A cached manifest as `kura ls` shows it.
#[derive(Debug)]
pub struct ImageSummary {
    pub link: ManifestLink,
    pub tags: Vec<String>,
    /// Bytes of everything it reaches that is stored (shared blobs count
    /// in every image that uses them).
    pub size: u64,
    pub last_used: SystemTime,
}

pub async fn images(storage: &Storage) -> io::Result<Vec<ImageSummary>> {
    let blobs = blob_table(storage).await?;
    let links = storage.list_manifest_links().await?;
    let references = manifest_references(storage, &links, &blobs).await?;
    let mut images = Vec::new();
    for link in links {
        let size = closure_of(&link.digest, &references)
            .iter()
            .filter_map(|d| blobs.get(d))
            .map(|b| b.0)
            .sum();
        let last_used = blobs
            .get(&link.digest)
            .map_or(SystemTime::UNIX_EPOCH, |b| b.1);
        let tags = storage.tags_of(&link).await?;
        images.push(ImageSummary {
            link,
            tags,
            size,
            last_used,
        });
    }
    images.sort_by(|a, b| (&a.link.repository, &a.tags).cmp(&(&b.link.repository, &b.tags)));
    Ok(images)
}

/// Every stored blob: size and last use (flushed or still in memory).
async fn blob_table(storage: &Storage) -> io::Result<HashMap<Digest, (u64, SystemTime)>> {
    let recent = storage.access_times().await?;
    let mut blobs = HashMap::new();
    for blob in storage.list_blobs().await? {
        let last_used = recent
            .get(&blob.digest)
            .map_or(blob.last_used, |t| (*t).max(blob.last_used));
        blobs.insert(blob.digest, (blob.size, last_used));
    }
    Ok(blobs)
}

/// `digest` first, then everything reachable from it.
fn closure_of(digest: &Digest, references: &HashMap<Digest, Vec<Digest>>) -> Vec<Digest> {
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut pending = vec![digest.clone()];
    while let Some(next) = pending.pop() {
        if !seen.insert(next.clone()) {
            continue;
        }
        if let Some(children) = references.get(&next) {
            pending.extend(children.iter().cloned());
        }
        order.push(next);
    }
    order
}

/// Every descriptor digest in a manifest or index: `config`, `layers`,
/// `manifests` (index children), `blobs` (artifacts), `subject`.
pub fn referenced_digests(manifest: &[u8]) -> Vec<Digest> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(manifest) else {
        return Vec::new();
    };
    let single = ["config", "subject"]
        .into_iter()
        .filter_map(|key| value.get(key));
    let lists = ["layers", "manifests", "blobs"]
        .into_iter()
        .filter_map(|key| value.get(key)?.as_array())
        .flatten();
    single
        .chain(lists)
        .filter_map(|descriptor| descriptor.get("digest")?.as_str())
        .filter_map(|digest| Digest::parse(digest).ok())
        .collect()
}

/// Carries out a plan: links (and their tags) first, so no index entry
/// ever points at deleted content; then blobs; then the access records
/// (S3) are pruned to what is left.
pub async fn apply(
    storage: &Storage,
    plan: &Plan,
    policy: &Policy,
    now: SystemTime,
) -> io::Result<()> {
    for link in &plan.drop_links {
        storage.remove_manifest_link(link).await?;
    }
    for (digest, _) in &plan.delete_blobs {
        storage.delete_blob(digest).await?;
    }
    // A record last written before the TTL holds only expired times: every
    // time in it is older than the record.
    let keep_records_for = policy
        .ttl
        .unwrap_or(ACCESS_RECORD_MAX_AGE)
        .max(policy.grace);
    let stale_before = now
        .checked_sub(keep_records_for)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    storage
        .prune_access_records(&plan.kept_blobs, stale_before)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_cover_every_descriptor_kind() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let manifest = format!(
            r#"{{"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}],"manifests":[{{"digest":"{}"}}],"blobs":[{{"digest":"{}"}}],"subject":{{"digest":"{}"}}}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('d'),
            d('e')
        );
        let found: Vec<String> = referenced_digests(manifest.as_bytes())
            .iter()
            .map(|x| x.to_string())
            .collect();
        assert_eq!(found, vec![d('a'), d('e'), d('b'), d('c'), d('d')]);
        assert!(referenced_digests(b"not json").is_empty());
    }
}
