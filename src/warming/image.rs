//! Warming one image through a cache, shared by `kura warm` and the
//! warming service: the manifest (by tag or digest), the children of an
//! index for the wanted platforms, their blobs, and the referrers of every
//! manifest warmed. Everything goes through [`Cache`], so a warm coalesces
//! with client pulls of the same content and waits for a download turn
//! (`cache.maxdownloads`) like any of them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use futures_util::StreamExt;

use super::budget::Budget;
use crate::api::error::ApiError;
use crate::cache::{Cache, Manifest};
use crate::gc::References;
use crate::reference::{Digest, Reference, RepoName};

/// Levels of referrers warmed: an image's, and theirs (the signature of an
/// SBOM). Deeper chains are not in use, and each level costs a list
/// request per manifest of the one before.
const REFERRER_LEVELS: usize = 2;

/// How to warm.
#[derive(Clone, Copy, Default)]
pub struct Plan<'a> {
    /// Only these platforms of an index (`os/arch[/variant]`; `linux/arm`
    /// takes every `linux/arm/*`); empty takes all.
    pub platforms: &'a [String],
    /// Ask the upstream where a tag points now, whatever its `tagttl`
    /// freshness (a push event or the schedule says it may have moved).
    pub revalidate: bool,
    /// Manifest GETs are paid from this budget (scheduled sync).
    pub budget: Option<&'a Budget>,
}

/// What a warm did, step by step, for the caller to print or log.
pub enum Step<'a> {
    Manifest {
        digest: &'a Digest,
        media_type: &'a str,
        /// The index entry's platform, for an index's child.
        platform: Option<&'a str>,
    },
    Referrer {
        subject: &'a Digest,
        artifact_type: &'a str,
    },
    BlobCached {
        digest: &'a Digest,
        size: Option<u64>,
    },
    BlobFetched {
        digest: &'a Digest,
        bytes: u64,
        took: Duration,
    },
}

/// Where steps are reported.
pub type Report<'r> = &'r mut (dyn FnMut(Step<'_>) + Send);

/// Warms a manifest, its children (of the plan's platforms) and their
/// blobs; returns the digests of the manifests warmed.
pub async fn warm_image(
    cache: &Arc<Cache>,
    repo: &RepoName,
    reference: &Reference,
    plan: Plan<'_>,
    report: Report<'_>,
) -> anyhow::Result<Vec<Digest>> {
    let manifest = manifest(cache, repo, reference, plan).await?;
    report(Step::Manifest {
        digest: &manifest.digest,
        media_type: &manifest.media_type,
        platform: None,
    });
    let mut warmed = vec![manifest.digest.clone()];
    let Some(children) = index_children(&manifest.bytes, plan.platforms) else {
        warm_blobs(cache, repo, &manifest.bytes, report).await?;
        return Ok(warmed);
    };
    if children.is_empty() && !plan.platforms.is_empty() {
        return Err(anyhow!(
            "no {} manifest in this index",
            plan.platforms.join(" or ")
        ));
    }
    for (digest, child_platform) in children {
        let child = manifest_once(cache, repo, &Reference::Digest(digest), plan).await?;
        report(Step::Manifest {
            digest: &child.digest,
            media_type: &child.media_type,
            platform: Some(&child_platform),
        });
        warm_blobs(cache, repo, &child.bytes, report).await?;
        warmed.push(child.digest);
    }
    Ok(warmed)
}

/// Warms the referrers of `subjects` (their lists, manifests and blobs),
/// then theirs, [`REFERRER_LEVELS`] deep, each manifest once.
pub async fn warm_referrers(
    cache: &Arc<Cache>,
    repo: &RepoName,
    mut subjects: Vec<Digest>,
    plan: Plan<'_>,
    report: Report<'_>,
) -> anyhow::Result<()> {
    let mut seen: HashSet<Digest> = subjects.iter().cloned().collect();
    // A referrer is warmed whole: platforms are an image's, not an SBOM's.
    let plan = Plan {
        platforms: &[],
        ..plan
    };
    for _ in 0..REFERRER_LEVELS {
        let mut next = Vec::new();
        for subject in &subjects {
            let ticket = plan.budget.map(Budget::take).transpose()?;
            let listed = cache.referrers(repo, subject).await?;
            if let Some(ticket) = ticket
                && listed.cache_hit
            {
                ticket.refund();
            }
            for referrer in listed.referrers.iter() {
                if !seen.insert(referrer.digest.clone()) {
                    continue;
                }
                report(Step::Referrer {
                    subject,
                    artifact_type: referrer
                        .artifact_type
                        .as_deref()
                        .unwrap_or("no artifact type"),
                });
                let reference = Reference::Digest(referrer.digest.clone());
                next.extend(warm_image(cache, repo, &reference, plan, report).await?);
            }
        }
        subjects = next;
    }
    Ok(())
}

/// The top manifest: a tag is revalidated when the plan says so.
async fn manifest(
    cache: &Arc<Cache>,
    repo: &RepoName,
    reference: &Reference,
    plan: Plan<'_>,
) -> anyhow::Result<Manifest> {
    let Reference::Tag(tag) = reference else {
        return manifest_once(cache, repo, reference, plan).await;
    };
    if !plan.revalidate {
        return manifest_once(cache, repo, reference, plan).await;
    }
    let ticket = ticket(cache, repo, reference, plan)?;
    let manifest = paid(ticket, cache.manifest_revalidated(repo, tag).await)?;
    // Served stale: the upstream could not say where the tag points now,
    // so nothing was warmed.
    if manifest.stale {
        return Err(anyhow!("the upstream could not confirm tag {tag}"));
    }
    Ok(manifest)
}

/// A manifest through the cache, paid from the budget unless it was there.
async fn manifest_once(
    cache: &Arc<Cache>,
    repo: &RepoName,
    reference: &Reference,
    plan: Plan<'_>,
) -> anyhow::Result<Manifest> {
    let ticket = ticket(cache, repo, reference, plan)?;
    Ok(paid(ticket, cache.manifest(repo, reference).await)?)
}

/// A budget ticket for a manifest request, unless the content policy
/// refuses the reference: the cache then answers DENIED without asking
/// the upstream, and a refused `warm:` entry would otherwise spend the
/// budget on every tick.
fn ticket<'a>(
    cache: &Cache,
    repo: &RepoName,
    reference: &Reference,
    plan: Plan<'a>,
) -> Result<Option<super::budget::Ticket<'a>>, super::budget::BudgetSpent> {
    let tag = match reference {
        Reference::Tag(tag) => Some(tag),
        Reference::Digest(_) => None,
    };
    if !cache.admits(repo, tag) {
        return Ok(None);
    }
    plan.budget.map(Budget::take).transpose()
}

/// Refunds the ticket of a manifest that came from the cache.
fn paid(
    ticket: Option<super::budget::Ticket<'_>>,
    manifest: Result<Manifest, ApiError>,
) -> Result<Manifest, ApiError> {
    if let (
        Some(ticket),
        Ok(Manifest {
            cache_hit: true, ..
        }),
    ) = (ticket, &manifest)
    {
        ticket.refund();
    }
    manifest
}

/// The children of an index or manifest list, filtered by platform
/// (`os/arch[/variant]`); `None` for an image manifest.
fn index_children(bytes: &[u8], platforms: &[String]) -> Option<Vec<(Digest, String)>> {
    let value = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
    let manifests = value.get("manifests")?.as_array()?;
    let children = manifests
        .iter()
        .filter_map(|entry| {
            let digest = Digest::parse(entry.get("digest")?.as_str()?).ok()?;
            let name = platform_name(entry.get("platform"));
            let wanted = platforms.is_empty()
                || platforms
                    .iter()
                    .any(|want| name == *want || name.starts_with(&format!("{want}/")));
            wanted.then_some((digest, name))
        })
        .collect();
    Some(children)
}

/// `os/arch[/variant]` of an index entry's `platform`.
fn platform_name(platform: Option<&serde_json::Value>) -> String {
    let field = |key: &str| {
        platform
            .and_then(|p| p.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or("")
    };
    let name = format!("{}/{}", field("os"), field("architecture"));
    match field("variant") {
        "" => name,
        variant => format!("{name}/{variant}"),
    }
}

/// The blobs a manifest refers to (config, layers, artifact blobs); not
/// the manifests (a referrer's `subject`), which are no blobs upstream.
async fn warm_blobs(
    cache: &Arc<Cache>,
    repo: &RepoName,
    manifest: &[u8],
    report: Report<'_>,
) -> anyhow::Result<()> {
    let references = References::of(manifest);
    let blobs = (references.all.iter()).filter(|digest| !references.manifests.contains(digest));
    for digest in blobs {
        let started = Instant::now();
        let blob = cache.open_blob(repo, digest).await?;
        // A cached blob is there already: reading it back would prove
        // nothing `kura verify` does not (and on S3 costs a download).
        if blob.cache_hit {
            report(Step::BlobCached {
                digest,
                size: blob.size,
            });
            continue;
        }
        let mut stream = blob.into_stream(0, None).await?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            bytes += chunk?.len() as u64;
        }
        report(Step::BlobFetched {
            digest,
            bytes,
            took: started.elapsed(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = r#"{"manifests":[
        {"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","platform":{"os":"linux","architecture":"amd64"}},
        {"digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","platform":{"os":"linux","architecture":"arm","variant":"v7"}},
        {"digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","platform":{"os":"linux","architecture":"arm64"}}]}"#;

    fn platforms_of(wanted: &[&str]) -> Vec<String> {
        let wanted: Vec<String> = wanted.iter().map(|p| p.to_string()).collect();
        index_children(INDEX.as_bytes(), &wanted)
            .unwrap()
            .into_iter()
            .map(|(_, platform)| platform)
            .collect()
    }

    #[test]
    fn platforms_pick_index_children() {
        assert_eq!(platforms_of(&[]).len(), 3);
        assert_eq!(platforms_of(&["linux/amd64"]), ["linux/amd64"]);
        assert_eq!(platforms_of(&["linux/arm"]), ["linux/arm/v7"]);
        assert_eq!(
            platforms_of(&["linux/arm64", "linux/amd64"]),
            ["linux/amd64", "linux/arm64"]
        );
        assert!(platforms_of(&["windows/amd64"]).is_empty());
        assert!(index_children(b"{\"config\":{}}", &[]).is_none());
    }
}
