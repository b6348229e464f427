//! `kura warm IMAGE...`: pre-fetches images through the same cache logic
//! the server uses (routing, auth, verification), printing progress; with
//! them, unless `--no-referrers`, the referrers of every manifest warmed
//! (signatures, SBOMs), so they can be verified with the upstream gone.
//! The warming itself is [`crate::warming::image`], which the server's
//! warming service runs too.

use anyhow::{Context, anyhow};

use super::toolbox::human_bytes;
use crate::config::Config;
use crate::reference::{Reference, RepoName};
use crate::warming::image::{Plan, Step, warm_image, warm_referrers};

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
    let (registries, downloads) = crate::server::build_registries(&config, &storage, None)?;
    let platforms: Vec<String> = platform.into_iter().collect();
    let plan = Plan {
        platforms: &platforms,
        ..Plan::default()
    };
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
        let warmed = warm_image(&routed.cache, &repo, &reference, plan, &mut print_step)
            .await
            .with_context(|| format!("warming {image}"))?;
        if with_referrers {
            warm_referrers(&routed.cache, &repo, warmed, plan, &mut print_step)
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

fn print_step(step: Step<'_>) {
    match step {
        Step::Manifest {
            digest,
            media_type,
            platform: None,
        } => println!("  manifest {digest} ({media_type})"),
        Step::Manifest {
            digest,
            platform: Some(platform),
            ..
        } => println!("  {platform}: manifest {digest}"),
        Step::Referrer {
            subject,
            artifact_type,
        } => println!("  referrer of {subject}: {artifact_type}"),
        Step::BlobCached { digest, size } => {
            let total = size.map_or_else(|| "?".to_owned(), human_bytes);
            println!("    {digest} {total} cached");
        }
        Step::BlobFetched {
            digest,
            bytes,
            took,
        } => {
            let rate = bytes as f64 / took.as_secs_f64().max(1e-3) / (1 << 20) as f64;
            println!(
                "    {digest} {} fetched ({rate:.0} MiB/s)",
                human_bytes(bytes)
            );
        }
    }
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
