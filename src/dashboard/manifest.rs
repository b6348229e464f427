//! A stored manifest as the dashboard shows it: an image's size (its
//! config and layers as the manifest declares them), an index's
//! platforms, and for the drill-down each descriptor with whether Kura
//! holds it. Manifests are read from storage only, at most
//! [`MAX_MANIFEST_BYTES`] each; an index's children are read only for the
//! drill-down, at most [`MAX_ENTRIES`] of them.

use std::io;

use serde::{Deserialize, Serialize};

use crate::reference::{Digest, MAX_MANIFEST_BYTES};
use crate::storage::Storage;
use crate::storage::blobs::Budgeted;

/// Descriptors (layers, platforms) listed per manifest in a drill-down;
/// past it the answer says `truncated`.
pub const MAX_ENTRIES: usize = 256;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Parsed {
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// What a tag's line in the dashboard says of its manifest.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub media_type: Option<String>,
    /// Config and layers of an image; `None` for an index (its platforms
    /// differ; the drill-down sizes each).
    pub size: Option<u64>,
    pub layers: usize,
    pub platforms: usize,
}

/// A descriptor and whether its content is stored.
#[derive(Debug, Serialize)]
pub struct Entry {
    #[serde(flatten)]
    pub descriptor: Descriptor,
    pub cached: bool,
    /// For a platform's manifest that is stored: its image's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Detail {
    pub digest: String,
    pub media_type: Option<String>,
    pub bytes: usize,
    pub size: Option<u64>,
    pub config: Option<Entry>,
    pub layers: Vec<Entry>,
    pub platforms: Vec<Entry>,
    /// More layers or platforms than [`MAX_ENTRIES`] exist.
    pub truncated: bool,
}

/// Manifest bytes one request reads at most (a page of tags, or a
/// manifest and its platforms' manifests): real manifests are a few KiB,
/// so this only stops a request over large ones (up to 4 MiB each) from
/// reading hundreds of MiB. Past it, tags are listed without their
/// manifest's summary and platforms without their size.
pub const REQUEST_BUDGET: usize = 16 << 20;

/// A stored manifest, read if it fits the manifest limit and `budget`
/// (what the request has left to read).
pub async fn read(storage: &Storage, digest: &Digest, budget: &mut usize) -> io::Result<Budgeted> {
    storage
        .read_blob_budgeted(digest, MAX_MANIFEST_BYTES, budget)
        .await
}

fn parse(bytes: &[u8]) -> Parsed {
    serde_json::from_slice(bytes).unwrap_or_default()
}

/// An image's size: its config and layers as declared; `None` for an
/// index (or anything that is not an image manifest).
fn image_size(parsed: &Parsed) -> Option<u64> {
    let config = parsed.config.as_ref()?;
    Some(config.size + parsed.layers.iter().map(|l| l.size).sum::<u64>())
}

pub fn summary(bytes: &[u8]) -> Summary {
    let parsed = parse(bytes);
    Summary {
        size: image_size(&parsed),
        layers: parsed.layers.len(),
        platforms: parsed.manifests.len(),
        media_type: parsed.media_type,
    }
}

/// The drill-down of a stored manifest; its platforms' manifests are
/// read within what is left of the request's `budget`.
pub async fn detail(
    storage: &Storage,
    digest: &Digest,
    bytes: &[u8],
    mut budget: usize,
) -> io::Result<Detail> {
    let parsed = parse(bytes);
    let truncated = parsed.layers.len().max(parsed.manifests.len()) > MAX_ENTRIES;
    let config = match &parsed.config {
        Some(config) => Some(blob_entry(storage, config).await?),
        None => None,
    };
    let mut layers = Vec::new();
    for layer in parsed.layers.iter().take(MAX_ENTRIES) {
        layers.push(blob_entry(storage, layer).await?);
    }
    let mut platforms = Vec::new();
    for child in parsed.manifests.iter().take(MAX_ENTRIES) {
        platforms.push(platform_entry(storage, child, &mut budget).await?);
    }
    Ok(Detail {
        digest: digest.to_string(),
        size: image_size(&parsed),
        media_type: parsed.media_type,
        bytes: bytes.len(),
        config,
        layers,
        platforms,
        truncated,
    })
}

async fn blob_entry(storage: &Storage, descriptor: &Descriptor) -> io::Result<Entry> {
    let cached = match Digest::parse(&descriptor.digest) {
        Ok(digest) => storage.blob_size(&digest).await?.is_some(),
        Err(_) => false,
    };
    Ok(Entry {
        descriptor: descriptor.clone(),
        cached,
        image_size: None,
    })
}

/// A platform's manifest: stored or not, and its image's size if `budget`
/// has room for its bytes (they are taken from it).
async fn platform_entry(
    storage: &Storage,
    descriptor: &Descriptor,
    budget: &mut usize,
) -> io::Result<Entry> {
    let Ok(digest) = Digest::parse(&descriptor.digest) else {
        return Ok(Entry {
            descriptor: descriptor.clone(),
            cached: false,
            image_size: None,
        });
    };
    let (cached, image_size) = match read(storage, &digest, budget).await? {
        Budgeted::Read(bytes) => (true, image_size(&parse(&bytes))),
        Budgeted::Skipped => (true, None),
        Budgeted::Missing => (false, None),
    };
    Ok(Entry {
        descriptor: descriptor.clone(),
        cached,
        image_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_sized_by_config_and_layers_and_an_index_is_not() {
        let image = br#"{"mediaType":"m","config":{"digest":"c","size":10},
            "layers":[{"digest":"a","size":100},{"digest":"b","size":1000}]}"#;
        let seen = summary(image);
        assert_eq!((seen.size, seen.layers, seen.platforms), (Some(1110), 2, 0));
        let index = br#"{"manifests":[{"digest":"x","size":5,"platform":{"os":"linux","architecture":"arm64"}}]}"#;
        let seen = summary(index);
        assert_eq!((seen.size, seen.platforms), (None, 1));
        assert_eq!(summary(b"not json").size, None);
    }

    /// An index whose platforms' manifests together pass the request's
    /// budget: the first ones are read and sized, the rest only found
    /// stored (one probe of the first too large, then none read).
    #[tokio::test]
    async fn a_drill_down_reads_platform_manifests_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).open().await.unwrap();
        let padding = "x".repeat(MAX_MANIFEST_BYTES - 1024);
        let mut children = Vec::new();
        for i in 0..REQUEST_BUDGET / MAX_MANIFEST_BYTES + 1 {
            let child = format!(
                r#"{{"config":{{"digest":"c{i}","size":10}},"layers":[],"annotations":{{"pad":"{padding}"}}}}"#
            );
            let digest = Digest::of_bytes(child.as_bytes());
            storage
                .put_blob_bytes(&digest, child.as_bytes())
                .await
                .unwrap();
            children.push(format!(r#"{{"digest":"{digest}","size":{}}}"#, child.len()));
        }
        let index = format!(r#"{{"manifests":[{}]}}"#, children.join(","));
        let digest = Digest::of_bytes(index.as_bytes());

        let budget = REQUEST_BUDGET - index.len();
        let detail = detail(&storage, &digest, index.as_bytes(), budget)
            .await
            .unwrap();
        let sized: Vec<bool> = detail
            .platforms
            .iter()
            .map(|p| p.image_size.is_some())
            .collect();
        let fit = REQUEST_BUDGET / MAX_MANIFEST_BYTES;
        assert_eq!(sized.iter().filter(|s| **s).count(), fit, "{sized:?}");
        assert!(!sized[children.len() - 1], "read past the budget");
        assert!(
            detail.platforms.iter().all(|p| p.cached),
            "a stored manifest shown missing"
        );
    }
}
