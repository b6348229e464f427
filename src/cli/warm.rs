//! `kura warm IMAGE...`: pre-fetches images through the same cache logic
//! the server uses (routing, auth, verification), printing progress; with
//! them, unless `--no-referrers`, the referrers of every manifest warmed
//! (signatures, SBOMs), so they can be verified with the upstream gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use futures_util::StreamExt;

use super::toolbox::human_bytes;
use crate::cache::Cache;
use crate::config::Config;
use crate::gc::References;
use crate::reference::{Digest, Reference, RepoName};

/// Levels of referrers warmed: an image's, and theirs (the signature of an
/// SBOM). Deeper chains are not in use, and each level costs a list
/// request per manifest of the one before.
const REFERRER_LEVELS: usize = 2;

pub async fn warm(
    config: Config,
    images: Vec<String>,
    platform: Option<String>,
    with_referrers: bool,
) -> anyhow::Result<()> {
    let storage = config.storage()?.open().await.with_context(|| {
        format!(
            "storage.filesystem.rootdirectory: cannot use {}",
            config.storage_root.display()
        )
    })?;
    let (registries, downloads) = crate::server::build_registries(&config, &storage)?;
    for image in &images {
        let (name, reference) = split_image(image)?;
        let routed = registries
            .route(name, None)
            .map_err(|e| anyhow!("{image}: {e}"))?;
        let repo = RepoName::parse(routed.name)
            .ok_or_else(|| anyhow!("{image}: invalid repository name"))?;
        let reference =
            Reference::parse(reference).map_err(|_| anyhow!("{image}: invalid tag or digest"))?;
        println!("{image}");
        let warmed = warm_image(&routed.cache, &repo, &reference, platform.as_deref())
            .await
            .with_context(|| format!("warming {image}"))?;
        if with_referrers {
            warm_referrers(&routed.cache, &repo, warmed)
                .await
                .with_context(|| {
                    format!("warming the referrers of {image} (--no-referrers skips them)")
                })?;
        }
    }
    // The last blob was read once verified; its commit may still run.
    downloads.settled().await;
    Ok(())
}

/// `[registry/]name[:tag|@digest]`, tag defaulting to `latest`.
fn split_image(image: &str) -> anyhow::Result<(&str, &str)> {
    if let Some((name, digest)) = image.split_once('@') {
        return Ok((name, digest));
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(colon) => Ok((
            &image[..last_slash + colon],
            &image[last_slash + colon + 1..],
        )),
        None => Ok((image, "latest")),
    }
}

/// Warms a manifest, its children (of `platform`) and their blobs;
/// returns the digests of the manifests warmed.
async fn warm_image(
    cache: &Arc<Cache>,
    repo: &RepoName,
    reference: &Reference,
    platform: Option<&str>,
) -> anyhow::Result<Vec<Digest>> {
    let manifest = cache.manifest(repo, reference).await?;
    println!("  manifest {} ({})", manifest.digest, manifest.media_type);
    let mut warmed = vec![manifest.digest.clone()];
    let Some(children) = index_children(&manifest.bytes, platform) else {
        warm_blobs(cache, repo, &manifest.bytes).await?;
        return Ok(warmed);
    };
    if let (true, Some(platform)) = (children.is_empty(), platform) {
        return Err(anyhow!("no {platform} manifest in this index"));
    }
    for (digest, child_platform) in children {
        let child = cache.manifest(repo, &Reference::Digest(digest)).await?;
        println!("  {child_platform}: manifest {}", child.digest);
        warm_blobs(cache, repo, &child.bytes).await?;
        warmed.push(child.digest);
    }
    Ok(warmed)
}

/// Warms the referrers of `subjects` (their lists, manifests and blobs),
/// then theirs, [`REFERRER_LEVELS`] deep, each manifest once.
async fn warm_referrers(
    cache: &Arc<Cache>,
    repo: &RepoName,
    mut subjects: Vec<Digest>,
) -> anyhow::Result<()> {
    let mut seen: HashSet<Digest> = subjects.iter().cloned().collect();
    for _ in 0..REFERRER_LEVELS {
        let mut next = Vec::new();
        for subject in &subjects {
            let listed = cache.referrers(repo, subject).await?;
            for referrer in listed.referrers.iter() {
                if !seen.insert(referrer.digest.clone()) {
                    continue;
                }
                let kind = referrer
                    .artifact_type
                    .as_deref()
                    .unwrap_or("no artifact type");
                println!("  referrer of {subject}: {kind}");
                let reference = Reference::Digest(referrer.digest.clone());
                next.extend(warm_image(cache, repo, &reference, None).await?);
            }
        }
        subjects = next;
    }
    Ok(())
}

/// The children of an index or manifest list, filtered by platform
/// (`os/arch[/variant]`); `None` for an image manifest.
fn index_children(bytes: &[u8], platform: Option<&str>) -> Option<Vec<(Digest, String)>> {
    let value = serde_json::from_slice::<serde_json::Value>(bytes).ok()?;
    let manifests = value.get("manifests")?.as_array()?;
    let children = manifests
        .iter()
        .filter_map(|entry| {
            let digest = Digest::parse(entry.get("digest")?.as_str()?).ok()?;
            let p = entry.get("platform");
            let field = |key: &str| {
                p.and_then(|p| p.get(key))
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
            };
            let mut name = format!("{}/{}", field("os"), field("architecture"));
            if !field("variant").is_empty() {
                name = format!("{name}/{}", field("variant"));
            }
            let wanted =
                platform.is_none_or(|want| name == want || name.starts_with(&format!("{want}/")));
            wanted.then_some((digest, name))
        })
        .collect();
    Some(children)
}

/// The blobs a manifest refers to (config, layers, artifact blobs); not
/// the manifests (a referrer's `subject`), which are no blobs upstream.
async fn warm_blobs(cache: &Arc<Cache>, repo: &RepoName, manifest: &[u8]) -> anyhow::Result<()> {
    let references = References::of(manifest);
    let blobs = (references.all.iter()).filter(|digest| !references.manifests.contains(digest));
    for digest in blobs {
        let started = Instant::now();
        let blob = cache.open_blob(repo, digest).await?;
        let size = blob.size;
        // A cached blob is there already: reading it back would prove
        // nothing `kura verify` does not (and on S3 costs a download).
        if blob.cache_hit {
            let total = size.map_or_else(|| "?".to_owned(), human_bytes);
            println!("    {digest} {total} cached");
            continue;
        }
        let mut stream = blob.into_stream(0, None).await?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            bytes += chunk?.len() as u64;
        }
        let rate = bytes as f64 / started.elapsed().as_secs_f64().max(1e-3) / (1 << 20) as f64;
        let total = human_bytes(size.unwrap_or(bytes));
        println!("    {digest} {total} fetched ({rate:.0} MiB/s)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_into_name_and_reference() {
        assert_eq!(split_image("alpine").unwrap(), ("alpine", "latest"));
        assert_eq!(
            split_image("library/alpine:3.20").unwrap(),
            ("library/alpine", "3.20")
        );
        assert_eq!(
            split_image("localhost:5000/app").unwrap(),
            ("localhost:5000/app", "latest")
        );
        assert_eq!(
            split_image("ghcr.io/o/a@sha256:ab").unwrap(),
            ("ghcr.io/o/a", "sha256:ab")
        );
    }
}
