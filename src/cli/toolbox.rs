//! `kura ls`, `du`, `gc` and `verify`: read-mostly tools over a cache
//! directory, safe to run next to serving Kuras: their storage is never
//! opened to write, so they have no staging of their own; `gc` only
//! sweeps the staging of processes that are gone, as a starting server
//! does.

use std::time::SystemTime;

use anyhow::Context;

use crate::config::Config;
use crate::gc;
use crate::storage::Storage;

fn storage(config: &Config) -> anyhow::Result<Storage> {
    let storage = config.storage()?;
    let root = storage.local_root();
    anyhow::ensure!(
        !storage.is_local() || root.join("blobs").is_dir(),
        "storage.filesystem.rootdirectory: {} holds no Kura cache",
        root.display()
    );
    Ok(storage)
}

pub async fn ls(config: Config) -> anyhow::Result<()> {
    let storage = storage(&config)?;
    let images = gc::images(&storage).await.context("listing the cache")?;
    println!(
        "{:<40} {:<20} {:<19} {:>10}  LAST USED",
        "REPOSITORY", "TAGS", "DIGEST", "SIZE"
    );
    for image in images {
        let tags = if image.tags.is_empty() {
            "-".to_owned()
        } else {
            image.tags.join(",")
        };
        println!(
            "{:<40} {:<20} {:<19} {:>10}  {}",
            image.link.repository,
            tags,
            &image.link.digest.to_string()[..19],
            human_bytes(image.size),
            ago(image.last_used)
        );
    }
    Ok(())
}

pub async fn du(config: Config) -> anyhow::Result<()> {
    let storage = storage(&config)?;
    let usage = storage.usage().await.context("measuring the cache")?;
    let links = storage.list_manifest_links().await?;
    let repositories = storage.list_repositories().await?;
    println!("{}\t{} blobs", human_bytes(usage.bytes), usage.blobs);
    println!(
        "{} manifests in {} repositories",
        links.len(),
        repositories.len()
    );
    if let Some(max) = config.cache.max_size {
        println!(
            "cache.maxsize {} ({:.0}% used)",
            human_bytes(max),
            usage.bytes as f64 * 100.0 / max as f64
        );
    }
    Ok(())
}

pub async fn gc(config: Config, dry_run: bool) -> anyhow::Result<()> {
    let storage = storage(&config)?;
    let (policy, now) = (config.gc_policy(), SystemTime::now());
    let plan = gc::plan(&storage, &policy, now)
        .await
        .context("planning the collection")?;
    for link in &plan.drop_links {
        println!("manifest {}@{}", link.repository, link.digest);
    }
    for list in &plan.drop_referrers {
        println!("referrers list {}@{}", list.repository, list.subject);
    }
    for (digest, size) in &plan.delete_blobs {
        println!("blob {digest} ({})", human_bytes(*size));
    }
    if dry_run {
        println!(
            "would free {} in {} blobs and {} manifests; {} kept",
            human_bytes(plan.freed_bytes()),
            plan.delete_blobs.len(),
            plan.drop_links.len(),
            human_bytes(plan.kept_bytes)
        );
        return Ok(());
    }
    let applied = gc::apply(&storage, &plan, &policy, now)
        .await
        .context("removing content")?;
    storage
        .sweep_abandoned_staging()
        .await
        .context("removing the staging of stopped processes")?;
    println!(
        "freed {} in {} blobs and {} manifests; {} kept, {} spared as used meanwhile",
        human_bytes(applied.freed_bytes),
        applied.deleted_blobs,
        applied.dropped_links,
        human_bytes(plan.kept_bytes),
        applied.spared
    );
    Ok(())
}

pub async fn verify(config: Config, dry_run: bool) -> anyhow::Result<()> {
    let storage = storage(&config)?;
    let blobs = storage.list_blobs().await?;
    let mut corrupt = 0;
    for blob in &blobs {
        if storage.verify_blob(&blob.digest).await? {
            continue;
        }
        corrupt += 1;
        if dry_run {
            println!("corrupt {}", blob.digest);
        } else {
            // The next request for it fetches a good copy from upstream.
            storage.delete_blob(&blob.digest).await?;
            println!("corrupt {} (removed)", blob.digest);
        }
    }
    println!("verified {} blobs: {corrupt} corrupt", blobs.len());
    anyhow::ensure!(corrupt == 0 || !dry_run, "{corrupt} corrupt blobs found");
    Ok(())
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn ago(time: SystemTime) -> String {
    let seconds = SystemTime::now()
        .duration_since(time)
        .map_or(0, |d| d.as_secs());
    match seconds {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}
