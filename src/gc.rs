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
//!
//! A collection reads manifests only: the linked ones and the children an
//! index or referrer declares as manifests (`manifests[]`, `subject`), each
//! at most [`MAX_MANIFEST_BYTES`]. Layers, configs and artifact blobs are
//! known from the listing alone (size, last use), so memory grows with the
//! number of blobs, never with their bytes. Each removal is checked again
//! against the blob's latest use right before it happens: whatever was used
//! since the plan was made (or within `cache.gcgrace` of it) is spared, with
//! everything it refers to.
//!
//! Referrers (signatures, SBOMs) are manifests like any other: each is a
//! root with its own last use, and its `subject` keeps the image it refers
//! to. A cached referrers list (the index Kura answers for a subject) is
//! bookkeeping, like a tag: it goes with its subject's link, or, when its
//! repository never had the subject, once it was last confirmed before the
//! plan's cut-off.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::{Duration, SystemTime};

use crate::reference::{Digest, MAX_MANIFEST_BYTES};
use crate::storage::Storage;
use crate::storage::index::{ManifestLink, ReferrersLink};

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
#[derive(Debug)]
pub struct Plan {
    pub drop_links: Vec<ManifestLink>,
    /// Cached referrers lists whose subject their repository does not have.
    pub drop_referrers: Vec<ReferrersLink>,
    /// Every manifest before what it refers to, so that sparing one at
    /// [`apply`] time spares its children before their turn.
    pub delete_blobs: Vec<(Digest, u64)>,
    pub kept_bytes: u64,
    /// Stored blobs that stay.
    pub kept_blobs: HashSet<Digest>,
    /// [`apply`] spares whatever was used after this: the plan's time less
    /// `cache.gcgrace`.
    spare_used_after: SystemTime,
    /// What each cached manifest refers to.
    references: HashMap<Digest, Vec<Digest>>,
}

impl Plan {
    pub fn freed_bytes(&self) -> u64 {
        self.delete_blobs.iter().map(|(_, size)| size).sum()
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
    let spare_used_after = now
        .checked_sub(policy.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let drop_referrers = orphan_referrers(storage, &links, spare_used_after).await?;

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
    let kept_bytes = keep.iter().filter_map(|d| blobs.get(*d)).map(|b| b.0).sum();
    let drop_links = dropped.into_iter().filter_map(|root| root.link).collect();
    let (kept_blobs, dropped_blobs): (Vec<_>, Vec<_>) =
        blobs.iter().partition(|(digest, _)| keep.contains(digest));
    let kept_blobs = kept_blobs.into_iter().map(|(d, _)| d.clone()).collect();
    let delete: Vec<(Digest, u64)> = dropped_blobs
        .into_iter()
        .map(|(digest, (size, _))| (digest.clone(), *size))
        .collect();
    Ok(Plan {
        drop_links,
        drop_referrers,
        delete_blobs: parents_first(delete, &references),
        kept_bytes,
        kept_blobs,
        spare_used_after,
        references,
    })
}

/// Cached referrers lists whose repository does not have their subject
/// (a client listed referrers without pulling the image, or the subject's
/// link went before lists went with it), last confirmed before the cut-off.
async fn orphan_referrers(
    storage: &Storage,
    links: &[ManifestLink],
    confirmed_before: SystemTime,
) -> io::Result<Vec<ReferrersLink>> {
    let linked: HashSet<(&str, &Digest)> = links
        .iter()
        .map(|link| (link.repository.as_str(), &link.digest))
        .collect();
    Ok(storage
        .list_referrers()
        .await?
        .into_iter()
        .filter(|list| {
            !linked.contains(&(list.repository.as_str(), &list.subject))
                && list.confirmed_at <= confirmed_before
        })
        .collect())
}

/// Orders blobs so that every manifest comes before what it refers to
/// (reverse post-order of a depth-first walk; content addressing makes the
/// graph acyclic).
fn parents_first(
    mut blobs: Vec<(Digest, u64)>,
    references: &HashMap<Digest, Vec<Digest>>,
) -> Vec<(Digest, u64)> {
    blobs.sort();
    let sizes: HashMap<Digest, u64> = blobs.iter().cloned().collect();
    let mut visited = HashSet::new();
    let mut finished = Vec::with_capacity(blobs.len());
    for (start, _) in &blobs {
        let mut stack = vec![(start, false)];
        while let Some((digest, children_done)) = stack.pop() {
            if children_done {
                finished.push(digest.clone());
                continue;
            }
            if !sizes.contains_key(digest) || !visited.insert(digest) {
                continue;
            }
            stack.push((digest, true));
            let children = references.get(digest).into_iter().flatten();
            stack.extend(children.map(|child| (child, false)));
        }
    }
    finished
        .into_iter()
        .rev()
        .map(|digest| {
            let size = sizes[&digest];
            (digest, size)
        })
        .collect()
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
/// Reads only manifests: linked ones, and the children their parents
/// declare as manifests; one at a time, none larger than
/// [`MAX_MANIFEST_BYTES`].
async fn manifest_references(
    storage: &Storage,
    links: &[ManifestLink],
    blobs: &HashMap<Digest, (u64, SystemTime)>,
) -> io::Result<HashMap<Digest, Vec<Digest>>> {
    let mut references = HashMap::new();
    let mut pending: Vec<Digest> = links.iter().map(|l| l.digest.clone()).collect();
    while let Some(digest) = pending.pop() {
        let could_be_manifest = blobs
            .get(&digest)
            .is_some_and(|(size, _)| *size <= MAX_MANIFEST_BYTES as u64);
        if references.contains_key(&digest) || !could_be_manifest {
            continue;
        }
        let Some(bytes) = storage
            .read_blob_within(&digest, MAX_MANIFEST_BYTES)
            .await?
        else {
            continue;
        };
        let found = References::of(&bytes);
        pending.extend(found.manifests);
        references.insert(digest, found.all);
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

/// What a manifest or index refers to.
#[derive(Debug, Default)]
pub struct References {
    /// Every descriptor: `config`, `subject`, `layers`, `manifests` (index
    /// children), `blobs` (artifacts), in that order.
    pub all: Vec<Digest>,
    /// Those that are manifests themselves (index children and a
    /// referrer's `subject`): the only ones a collection reads.
    pub manifests: Vec<Digest>,
    /// What the manifest holds: every descriptor but `subject`. A registry
    /// checks these exist in the repository when the manifest is pushed;
    /// a `subject` may name any digest (referrers may be pushed first), so
    /// it proves nothing about what the repository holds.
    pub held: Vec<Digest>,
}

/// The parts of a manifest that refer to content; everything else in it is
/// skipped unparsed.
#[derive(serde::Deserialize)]
struct Descriptors {
    config: Option<Descriptor>,
    subject: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
}

#[derive(serde::Deserialize)]
struct Descriptor {
    digest: Option<String>,
}

impl Descriptor {
    fn digest(&self) -> Option<Digest> {
        Digest::parse(self.digest.as_deref()?).ok()
    }
}

impl References {
    /// Nothing for bytes that are not a manifest or index.
    pub fn of(manifest: &[u8]) -> Self {
        let Ok(found) = serde_json::from_slice::<Descriptors>(manifest) else {
            return Self::default();
        };
        let digests = |descriptors: &[&Descriptor]| -> Vec<Digest> {
            descriptors.iter().filter_map(|d| d.digest()).collect()
        };
        let manifests: Vec<&Descriptor> = found.subject.iter().chain(&found.manifests).collect();
        let all: Vec<&Descriptor> = (found.config.iter())
            .chain(&found.subject)
            .chain(&found.layers)
            .chain(&found.manifests)
            .chain(&found.blobs)
            .collect();
        let held: Vec<&Descriptor> = (found.config.iter())
            .chain(&found.layers)
            .chain(&found.manifests)
            .chain(&found.blobs)
            .collect();
        Self {
            all: digests(&all),
            manifests: digests(&manifests),
            held: digests(&held),
        }
    }
}

/// What [`apply`] removed.
#[derive(Debug, Default)]
pub struct Applied {
    pub dropped_links: usize,
    pub dropped_referrers: usize,
    pub deleted_blobs: usize,
    pub freed_bytes: u64,
    /// Links and blobs the plan would have removed that were used since it
    /// was made (or within `cache.gcgrace` of it), or are reached from one.
    pub spared: usize,
}

/// The server's latest collection, as the dashboard shows it: one value,
/// replaced by each collection.
pub type LastCollection = std::sync::Arc<std::sync::Mutex<Option<CollectionReport>>>;

#[derive(Debug, Clone, serde::Serialize)]
pub struct CollectionReport {
    /// When it ended, in seconds since the Unix epoch.
    pub at: u64,
    pub removed_manifests: usize,
    pub removed_blobs: usize,
    pub freed_bytes: u64,
    /// Why it stopped short, if it did.
    pub error: Option<String>,
}

impl CollectionReport {
    pub fn new(outcome: Result<&Applied, String>) -> Self {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (applied, error) = match outcome {
            Ok(applied) => (applied, None),
            Err(error) => (&Applied::default(), Some(error)),
        };
        Self {
            at,
            removed_manifests: applied.dropped_links,
            removed_blobs: applied.deleted_blobs,
            freed_bytes: applied.freed_bytes,
            error,
        }
    }
}

impl Applied {
    pub fn removed_anything(&self) -> bool {
        self.dropped_links + self.dropped_referrers + self.deleted_blobs > 0
    }
}

/// Carries out a plan: links (and their tags) first, so no index entry
/// ever points at deleted content; then blobs, each manifest before what it
/// refers to; then the access records (S3) are pruned to what is left.
/// Every removal is checked against the latest use first (see [`Recheck`]).
pub async fn apply(
    storage: &Storage,
    plan: &Plan,
    policy: &Policy,
    now: SystemTime,
) -> io::Result<Applied> {
    let mut recheck = Recheck::new(storage, plan).await?;
    let mut applied = Applied::default();
    for link in &plan.drop_links {
        if recheck.spares(&link.digest).await? {
            applied.spared += 1;
            continue;
        }
        storage.remove_manifest_link(link).await?;
        applied.dropped_links += 1;
    }
    for list in &plan.drop_referrers {
        if recheck.spares_referrers(list).await? {
            applied.spared += 1;
            continue;
        }
        storage.remove_referrers(list).await?;
        applied.dropped_referrers += 1;
    }
    for (digest, size) in &plan.delete_blobs {
        if recheck.spares(digest).await? {
            applied.spared += 1;
            continue;
        }
        storage.delete_blob(digest).await?;
        applied.deleted_blobs += 1;
        applied.freed_bytes += size;
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
    let spared = recheck.spared;
    storage
        .prune_access_records(
            |digest| plan.kept_blobs.contains(digest) || spared.contains(digest),
            stale_before,
        )
        .await?;
    Ok(applied)
}

/// The check each removal passes right before it happens: one stat of the
/// blob and a look at this node's recent accesses, plus the other nodes'
/// access records (S3) read once per collection.
struct Recheck<'a> {
    storage: &'a Storage,
    plan: &'a Plan,
    elsewhere: HashMap<Digest, SystemTime>,
    /// Spared so far, with everything they reach.
    spared: HashSet<Digest>,
}

impl<'a> Recheck<'a> {
    async fn new(storage: &'a Storage, plan: &'a Plan) -> io::Result<Self> {
        Ok(Self {
            storage,
            plan,
            elsewhere: storage.flushed_access_times().await?,
            spared: HashSet::new(),
        })
    }

    /// Whether `digest` (a blob, or a link's manifest) must stay: it was
    /// used after the plan's cut-off, or a spared manifest reaches it.
    async fn spares(&mut self, digest: &Digest) -> io::Result<bool> {
        if self.spared.contains(digest) {
            return Ok(true);
        }
        let last_use = self.storage.last_use(digest, &self.elsewhere).await?;
        if last_use.is_none_or(|used| used <= self.plan.spare_used_after) {
            return Ok(false);
        }
        self.spared
            .extend(closure_of(digest, &self.plan.references));
        Ok(true)
    }

    /// Whether a referrers list must stay: confirmed again since the plan,
    /// or its repository has its subject by now.
    async fn spares_referrers(&self, list: &ReferrersLink) -> io::Result<bool> {
        let confirmed = self.storage.referrers_confirmed_at(list).await?;
        if confirmed.is_none_or(|at| at <= self.plan.spare_used_after) {
            return self.storage.has_subject(list).await;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::RepoName;
    use crate::storage::blobs::blob_key;

    const HOUR: Duration = Duration::from_secs(3600);

    async fn local_storage(dir: &tempfile::TempDir) -> Storage {
        Storage::local(dir.path()).open().await.unwrap()
    }

    /// Stores `bytes` as a blob last used `age` ago.
    async fn put(storage: &Storage, bytes: &[u8], age: Duration) -> Digest {
        let digest = Digest::of_bytes(bytes);
        storage.put_blob_bytes(&digest, bytes).await.unwrap();
        set_last_use(storage, &digest, SystemTime::now() - age);
        digest
    }

    fn set_last_use(storage: &Storage, digest: &Digest, time: SystemTime) {
        let path = storage.local_root().join(blob_key(digest));
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(time).unwrap();
    }

    fn descriptor(digest: &Digest) -> serde_json::Value {
        serde_json::json!({ "digest": digest.to_string(), "size": 1 })
    }

    fn image_manifest(config: &Digest, layers: &[&Digest]) -> Vec<u8> {
        let layers: Vec<_> = layers.iter().map(|d| descriptor(d)).collect();
        let manifest = serde_json::json!({ "config": descriptor(config), "layers": layers });
        manifest.to_string().into_bytes()
    }

    fn index(children: &[&Digest]) -> Vec<u8> {
        let children: Vec<_> = children.iter().map(|d| descriptor(d)).collect();
        serde_json::json!({ "manifests": children })
            .to_string()
            .into_bytes()
    }

    async fn link(storage: &Storage, repository: &str, digest: &Digest) {
        let name = RepoName::parse(repository).unwrap();
        storage.link_manifest(&name, digest, "index").await.unwrap();
    }

    /// A blob no one can read without this test noticing: a FIFO, whose
    /// open blocks until a writer appears. The handle returned holds it
    /// open for reading and writing, so a reader gets in but then waits
    /// for data until the handle is dropped (and then reads nothing).
    fn fifo_blob(storage: &Storage, label: &[u8]) -> (Digest, std::fs::File) {
        use rustix::fs::{CWD, FileType, Mode, mknodat};
        let digest = Digest::of_bytes(label);
        let path = storage.local_root().join(blob_key(&digest));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        mknodat(CWD, &path, FileType::Fifo, Mode::from(0o600), 0).unwrap();
        let handle = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (digest, handle)
    }

    #[tokio::test]
    async fn a_collection_reads_manifests_and_never_configs_or_layers() {
        let dir = tempfile::tempdir().unwrap();
        let storage = local_storage(&dir).await;
        let (config, config_handle) = fifo_blob(&storage, b"config");
        let (layer, layer_handle) = fifo_blob(&storage, b"layer");
        let manifest = put(&storage, &image_manifest(&config, &[&layer]), HOUR).await;
        let index = put(&storage, &index(&[&manifest]), HOUR).await;
        link(&storage, "app", &index).await;

        let policy = Policy {
            ttl: None,
            max_size: None,
            grace: Duration::ZERO,
        };
        let collection = async {
            let plan = plan(&storage, &policy, SystemTime::now()).await.unwrap();
            let images = images(&storage).await.unwrap();
            (plan, images)
        };
        let outcome = tokio::time::timeout(Duration::from_secs(10), collection).await;
        drop((config_handle, layer_handle));
        let (plan, images) = outcome.expect("the collection read a config or layer");
        // Reached through the index and its child, though never read.
        for digest in [&index, &manifest, &config, &layer] {
            assert!(plan.kept_blobs.contains(digest), "{digest} not kept");
        }
        assert_eq!(images.len(), 1);
    }

    #[tokio::test]
    async fn content_used_after_planning_survives_apply() {
        let dir = tempfile::tempdir().unwrap();
        let storage = local_storage(&dir).await;
        let config = put(&storage, b"{}", 2 * HOUR).await;
        let layer = put(&storage, b"layer bytes", 2 * HOUR).await;
        let manifest = put(&storage, &image_manifest(&config, &[&layer]), 2 * HOUR).await;
        let index = put(&storage, &index(&[&manifest]), 2 * HOUR).await;
        link(&storage, "app", &index).await;
        let touched = put(&storage, b"used again, flushed to disk", 2 * HOUR).await;
        let unused = put(&storage, b"not used again", 2 * HOUR).await;

        let policy = Policy {
            ttl: Some(HOUR),
            max_size: None,
            grace: Duration::ZERO,
        };
        let now = SystemTime::now();
        let plan = plan(&storage, &policy, now).await.unwrap();
        assert_eq!(plan.drop_links.len(), 1);
        assert_eq!(plan.delete_blobs.len(), 6);

        // After planning, the image is pulled again (an access not yet
        // flushed) and a blob's use reaches its mtime.
        storage.record_access(&index);
        set_last_use(&storage, &touched, SystemTime::now());
        let applied = apply(&storage, &plan, &policy, now).await.unwrap();

        assert_eq!(applied.spared, 6, "{applied:?}");
        assert_eq!(applied.deleted_blobs, 1);
        assert_eq!(applied.dropped_links, 0);
        let links = storage.list_manifest_links().await.unwrap();
        assert_eq!(links.len(), 1, "the image's link was dropped");
        for digest in [&index, &manifest, &config, &layer, &touched] {
            assert!(
                storage.blob_size(digest).await.unwrap().is_some(),
                "{digest} deleted"
            );
        }
        assert!(storage.blob_size(&unused).await.unwrap().is_none());
    }

    /// Stores an (empty) referrers list for `subject` in `repository`,
    /// last confirmed `age` ago.
    async fn referrers_list(storage: &Storage, repository: &str, subject: &Digest, age: Duration) {
        let name = RepoName::parse(repository).unwrap();
        storage
            .set_referrers(&name, subject, br#"{"manifests":[]}"#)
            .await
            .unwrap();
        let path = storage.local_root().join(format!(
            "repositories/{repository}/_referrers/sha256/{}",
            subject.hex()
        ));
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[tokio::test]
    async fn referrers_lists_go_with_their_subject_or_as_orphans_once_unconfirmed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = local_storage(&dir).await;
        let kept = put(&storage, b"kept image", Duration::ZERO).await;
        let expired = put(&storage, b"expired image", 2 * HOUR).await;
        let never_pulled = Digest::of_bytes(b"listed, never pulled");
        link(&storage, "app", &kept).await;
        link(&storage, "app", &expired).await;
        referrers_list(&storage, "app", &kept, 2 * HOUR).await;
        referrers_list(&storage, "app", &expired, 2 * HOUR).await;
        referrers_list(&storage, "app", &never_pulled, 2 * HOUR).await;
        // The same subject in a repository that lacks it: an orphan, but
        // one confirmed within the grace period stays.
        referrers_list(&storage, "other", &kept, 2 * HOUR).await;
        referrers_list(&storage, "recent", &never_pulled, Duration::ZERO).await;

        let policy = Policy {
            ttl: Some(HOUR),
            max_size: None,
            grace: Duration::from_secs(60),
        };
        let now = SystemTime::now();
        let plan = plan(&storage, &policy, now).await.unwrap();
        let mut orphans: Vec<(String, Digest)> = plan
            .drop_referrers
            .iter()
            .map(|l| (l.repository.clone(), l.subject.clone()))
            .collect();
        orphans.sort();
        assert_eq!(
            orphans,
            vec![
                ("app".to_owned(), never_pulled.clone()),
                ("other".to_owned(), kept.clone())
            ]
        );
        let applied = apply(&storage, &plan, &policy, now).await.unwrap();
        assert_eq!(applied.dropped_referrers, 2);
        assert_eq!(applied.dropped_links, 1);

        let mut left: Vec<(String, Digest)> = storage
            .list_referrers()
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.repository, l.subject))
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                ("app".to_owned(), kept.clone()),
                ("recent".to_owned(), never_pulled)
            ],
            "the expired subject's list went with its link"
        );
    }

    #[test]
    fn removals_list_every_manifest_before_what_it_refers_to() {
        let d = |c: char| Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap();
        // a and b are layers sorting first; f an index over e over them.
        let references = HashMap::from([(d('f'), vec![d('e')]), (d('e'), vec![d('a'), d('b')])]);
        let blobs = ['a', 'b', 'e', 'f'].map(|c| (d(c), 1)).to_vec();
        let order: Vec<Digest> = parents_first(blobs, &references)
            .into_iter()
            .map(|(digest, _)| digest)
            .collect();
        let position = |c: char| order.iter().position(|x| *x == d(c)).unwrap();
        assert_eq!(order.len(), 4);
        assert!(position('f') < position('e'));
        assert!(position('e') < position('a') && position('e') < position('b'));
    }

    #[test]
    fn references_cover_every_descriptor_kind_and_tell_manifests_apart() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let manifest = format!(
            r#"{{"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}],"manifests":[{{"digest":"{}"}}],"blobs":[{{"digest":"{}"}}],"subject":{{"digest":"{}"}}}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('d'),
            d('e')
        );
        let found = References::of(manifest.as_bytes());
        let strings =
            |digests: &[Digest]| -> Vec<String> { digests.iter().map(|x| x.to_string()).collect() };
        assert_eq!(
            strings(&found.all),
            vec![d('a'), d('e'), d('b'), d('c'), d('d')]
        );
        assert_eq!(strings(&found.manifests), vec![d('e'), d('c')]);
        assert_eq!(strings(&found.held), vec![d('a'), d('b'), d('c'), d('d')]);
        assert!(References::of(b"not json").all.is_empty());
    }
}
