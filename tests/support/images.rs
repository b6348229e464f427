//! Synthetic but valid container images (real tar layers, real image configs) and pushing them.
//!
//! Everything is deterministic: the same builder always yields the same digests.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::{Value, json};

use super::registry_client::RegistryClient;
use super::upstream::Upstream;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Every manifest media type, for `Accept` headers.
pub const ALL_MANIFEST_TYPES: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
];

/// Size of the big layer of [`seed_large`].
pub const LARGE_LAYER_SIZE: usize = 256 * 1024 * 1024;
/// Size of the small layer of [`seed_large`].
pub const SMALL_LAYER_SIZE: usize = 3 * 1024 * 1024;
/// Fixed timestamps keep layers and configs reproducible.
const MTIME: u64 = 1_700_000_000;
const CREATED: &str = "2023-11-14T22:13:20Z";
const TAG: &str = "latest";

/// `sha256:<hex>` of `data` (ring: its assembly is fast even in unoptimised test builds, where the
/// pure-Rust sha2 needs seconds for the 256 MiB layer).
pub fn sha256_digest(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    format!("sha256:{}", hex::encode(digest.as_ref()))
}

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl Blob {
    fn of(data: &[u8], media_type: &str) -> Self {
        Self {
            digest: sha256_digest(data),
            size: data.len() as u64,
            media_type: media_type.to_owned(),
        }
    }

    fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn linux(architecture: &str, variant: Option<&str>) -> Self {
        Self {
            architecture: architecture.to_owned(),
            os: "linux".to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    fn to_json(&self) -> Value {
        let mut platform = json!({ "architecture": self.architecture, "os": self.os });
        if let Some(variant) = &self.variant {
            platform["variant"] = json!(variant);
        }
        platform
    }
}

/// An image manifest that was pushed.
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub repository: String,
    /// `None` for the children of an index / manifest list (pushed by digest).
    pub tag: Option<String>,
    /// Digest of the manifest.
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// Uncompressed layer digests, as in the config's `rootfs.diff_ids`.
    pub diff_ids: Vec<String>,
    pub platform: Platform,
}

impl PushedImage {
    /// `repository:tag`, or `repository@digest` for an untagged child.
    pub fn reference(&self) -> String {
        match &self.tag {
            Some(tag) => format!("{}:{tag}", self.repository),
            None => format!("{}@{}", self.repository, self.digest),
        }
    }

    /// Config and layer digests.
    pub fn blob_digests(&self) -> BTreeSet<String> {
        std::iter::once(&self.config)
            .chain(&self.layers)
            .map(|b| b.digest.clone())
            .collect()
    }

    /// Manifest, config and layer digests.
    pub fn all_digests(&self) -> BTreeSet<String> {
        let mut digests = self.blob_digests();
        digests.insert(self.digest.clone());
        digests
    }

    /// Sum of config and layer sizes.
    pub fn blob_bytes(&self) -> u64 {
        self.config.size + self.layers.iter().map(|b| b.size).sum::<u64>()
    }
}

/// An OCI index or Docker manifest list that was pushed, with its children.
#[derive(Clone, Debug)]
pub struct PushedIndex {
    pub repository: String,
    pub tag: String,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub manifests: Vec<PushedImage>,
}

impl PushedIndex {
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }

    /// The child for `architecture` (panics if there is none).
    pub fn child(&self, architecture: &str) -> &PushedImage {
        self.manifests
            .iter()
            .find(|m| m.platform.architecture == architecture)
            .unwrap_or_else(|| panic!("{} has no {architecture} child", self.reference()))
    }

    /// Digests of the child manifests.
    pub fn child_digests(&self) -> BTreeSet<String> {
        self.manifests.iter().map(|m| m.digest.clone()).collect()
    }

    /// The index digest plus every child's manifest, config and layer digests.
    pub fn all_digests(&self) -> BTreeSet<String> {
        let mut digests: BTreeSet<String> = self
            .manifests
            .iter()
            .flat_map(|m| m.all_digests())
            .collect();
        digests.insert(self.digest.clone());
        digests
    }
}

/// What [`seed_all`] pushed.
#[derive(Clone, Debug)]
pub struct SeededImages {
    /// `library/multilayer:latest`: Docker schema 2, amd64, 3 gzip layers.
    pub multilayer: PushedImage,
    /// `multiarch/oci:latest`: OCI index, amd64 + arm64 OCI manifests.
    pub oci_index: PushedIndex,
    /// `multiarch/dockerlist:latest`: Docker manifest list, amd64 + arm64 schema 2 images.
    pub docker_list: PushedIndex,
}

/// Docker schema 2 or OCI: decides every media type of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Docker,
    Oci,
}

impl Flavor {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_MANIFEST,
            Self::Oci => OCI_MANIFEST,
        }
    }

    pub fn index_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_MANIFEST_LIST,
            Self::Oci => OCI_INDEX,
        }
    }

    fn config_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_CONFIG,
            Self::Oci => OCI_CONFIG,
        }
    }

    fn gzip_layer_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_LAYER_GZIP,
            Self::Oci => OCI_LAYER_GZIP,
        }
    }
}

/// One layer ready to push.
#[derive(Clone)]
pub struct Layer {
    pub data: Bytes,
    pub blob: Blob,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
}

impl Layer {
    /// A gzip-compressed layer of `tar`.
    fn gzip(tar: &[u8], media_type: &str) -> Self {
        let data = gzip(tar);
        Self {
            blob: Blob::of(&data, media_type),
            diff_id: sha256_digest(tar),
            data: Bytes::from(data),
        }
    }

    /// An uncompressed layer (blob digest == diff_id).
    pub fn plain(tar: Vec<u8>, media_type: &str) -> Self {
        let blob = Blob::of(&tar, media_type);
        Self {
            diff_id: blob.digest.clone(),
            blob,
            data: Bytes::from(tar),
        }
    }
}

/// An image ready to push: layers, config and manifest bytes.
#[derive(Clone)]
pub struct ImageBuild {
    pub flavor: Flavor,
    pub platform: Platform,
    pub layers: Vec<Layer>,
    pub config: Bytes,
    pub manifest: Bytes,
}

impl ImageBuild {
    pub fn new(flavor: Flavor, platform: Platform, layers: Vec<Layer>) -> Self {
        let config = Bytes::from(config_json(&platform, &layers).to_string());
        let config_blob = Blob::of(&config, flavor.config_type());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": flavor.manifest_type(),
            "config": config_blob.descriptor(),
            "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
        });
        Self {
            flavor,
            platform,
            layers,
            config,
            manifest: Bytes::from(manifest.to_string()),
        }
    }

    /// A small image whose `layer_count` gzip layers hold a few files mentioning `label`.
    pub fn synthetic(flavor: Flavor, platform: Platform, label: &str, layer_count: usize) -> Self {
        let layers = (0..layer_count)
            .map(|i| Layer::gzip(&small_files_tar(label, i), flavor.gzip_layer_type()))
            .collect();
        Self::new(flavor, platform, layers)
    }

    /// Pushes layers, config and manifest; tagged with `tag`, or by digest when `None`.
    pub async fn push(
        &self,
        client: &RegistryClient,
        repo: &str,
        tag: Option<&str>,
    ) -> PushedImage {
        for layer in &self.layers {
            client
                .push_blob_as(repo, &layer.blob.digest, layer.data.clone())
                .await;
        }
        let config = Blob::of(&self.config, self.flavor.config_type());
        client
            .push_blob_as(repo, &config.digest, self.config.clone())
            .await;
        let media_type = self.flavor.manifest_type();
        let digest = sha256_digest(&self.manifest);
        let reference = tag.unwrap_or(&digest);
        client
            .push_manifest(repo, reference, media_type, self.manifest.clone())
            .await;
        PushedImage {
            repository: repo.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
            media_type: media_type.to_owned(),
            size: self.manifest.len() as u64,
            config,
            layers: self.layers.iter().map(|l| l.blob.clone()).collect(),
            diff_ids: self.layers.iter().map(|l| l.diff_id.clone()).collect(),
            platform: self.platform.clone(),
        }
    }
}

/// Pushes `children` by digest, then an index/list (type chosen by `flavor`) over them under `tag`.
pub async fn push_index(
    client: &RegistryClient,
    repo: &str,
    tag: &str,
    flavor: Flavor,
    children: &[ImageBuild],
) -> PushedIndex {
    let mut manifests = Vec::new();
    for child in children {
        manifests.push(child.push(client, repo, None).await);
    }
    let descriptors: Vec<Value> = manifests.iter().map(child_descriptor).collect();
    let media_type = flavor.index_type();
    let body = Bytes::from(
        json!({ "schemaVersion": 2, "mediaType": media_type, "manifests": descriptors })
            .to_string(),
    );
    let digest = client
        .push_manifest(repo, tag, media_type, body.clone())
        .await;
    PushedIndex {
        repository: repo.to_owned(),
        tag: tag.to_owned(),
        digest,
        media_type: media_type.to_owned(),
        size: body.len() as u64,
        manifests,
    }
}

fn child_descriptor(image: &PushedImage) -> Value {
    json!({
        "mediaType": image.media_type,
        "digest": image.digest,
        "size": image.size,
        "platform": image.platform.to_json(),
    })
}

/// A valid image config (Docker and OCI share the fields used here).
fn config_json(platform: &Platform, layers: &[Layer]) -> Value {
    let history: Vec<Value> = (0..layers.len())
        .map(|i| json!({ "created": CREATED, "created_by": format!("kura-test layer {i}") }))
        .collect();
    let mut config = json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": history,
    });
    if let Some(variant) = &platform.variant {
        config["variant"] = json!(variant);
    }
    config
}

/// Builds a tar archive deterministically.
struct TarWriter {
    builder: tar::Builder<Vec<u8>>,
}

impl TarWriter {
    fn with_capacity(capacity: usize) -> Self {
        let mut builder = tar::Builder::new(Vec::with_capacity(capacity));
        builder.mode(tar::HeaderMode::Deterministic);
        Self { builder }
    }

    fn header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(entry_type);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(MTIME);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    fn dir(&mut self, path: &str) {
        let mut header = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.builder
            .append_data(&mut header, path, std::io::empty())
            .expect("tar dir");
    }

    fn file(&mut self, path: &str, contents: &[u8]) {
        let mut header = Self::header(tar::EntryType::Regular, 0o644, contents.len() as u64);
        self.builder
            .append_data(&mut header, path, contents)
            .expect("tar file");
    }

    fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tar")
    }
}

/// Directories plus three small text files under `kura/<label>/layer-<index>/`.
fn small_files_tar(label: &str, index: usize) -> Vec<u8> {
    let slug = label.replace(['/', ':'], "-");
    let base = format!("kura/{slug}/layer-{index}");
    let mut tar = TarWriter::with_capacity(16 * 1024);
    for dir in ["kura".to_owned(), format!("kura/{slug}"), base.clone()] {
        tar.dir(&dir);
    }
    for file in 0..3 {
        let contents = format!("{label} layer {index} file {file}\n").repeat(file + 1);
        tar.file(&format!("{base}/file-{file}.txt"), contents.as_bytes());
    }
    tar.finish()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip finish")
}

/// A tar with one file of `size` pseudo-random (incompressible) bytes from xorshift64*.
fn random_file_tar(path: &str, size: usize, seed: u64) -> Vec<u8> {
    let mut header = TarWriter::header(tar::EntryType::Regular, 0o644, size as u64);
    header.set_path(path).expect("tar path");
    header.set_cksum();
    let padding = size.next_multiple_of(512) - size;
    let mut tar = Vec::with_capacity(512 + size + padding + 1024);
    tar.extend_from_slice(header.as_bytes());
    let start = tar.len();
    tar.resize(start + size, 0);
    fill_pseudo_random(&mut tar[start..], seed);
    tar.resize(tar.len() + padding + 1024, 0);
    tar
}

fn fill_pseudo_random(buffer: &mut [u8], seed: u64) {
    let mut state = seed | 1;
    let mut chunks = buffer.chunks_exact_mut(8);
    for chunk in &mut chunks {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        chunk.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let len = rest.len();
    rest.copy_from_slice(&state.to_le_bytes()[..len]);
}

/// Seeds `library/multilayer`, `multiarch/oci` and `multiarch/dockerlist` (all `:latest`).
pub async fn seed_all(upstream: &Upstream) -> SeededImages {
    seed_all_with(&upstream.client()).await
}

/// [`seed_all`] into any registry.
pub async fn seed_all_with(client: &RegistryClient) -> SeededImages {
    let amd64 = Platform::linux("amd64", None);
    let arm64 = Platform::linux("arm64", Some("v8"));
    let multilayer = ImageBuild::synthetic(Flavor::Docker, amd64.clone(), "library/multilayer", 3)
        .push(client, "library/multilayer", Some(TAG))
        .await;
    let oci_index = seed_index(client, "multiarch/oci", Flavor::Oci, &[&amd64, &arm64]).await;
    let docker_list = seed_index(
        client,
        "multiarch/dockerlist",
        Flavor::Docker,
        &[&amd64, &arm64],
    )
    .await;
    SeededImages {
        multilayer,
        oci_index,
        docker_list,
    }
}

async fn seed_index(
    client: &RegistryClient,
    repo: &str,
    flavor: Flavor,
    platforms: &[&Platform],
) -> PushedIndex {
    let children: Vec<ImageBuild> = platforms
        .iter()
        .map(|p| {
            let label = format!("{repo}/{}", p.architecture);
            ImageBuild::synthetic(flavor, (*p).clone(), &label, 2)
        })
        .collect();
    push_index(client, repo, TAG, flavor, &children).await
}

/// The large image, built once per test process (about 259 MiB kept in memory).
pub fn large_image() -> &'static ImageBuild {
    static LARGE: OnceLock<ImageBuild> = OnceLock::new();
    LARGE.get_or_init(|| {
        let small = random_file_tar("big/small.bin", SMALL_LAYER_SIZE, 0x5EED_0003);
        let big = random_file_tar("big/large.bin", LARGE_LAYER_SIZE, 0x5EED_0256);
        let layers = vec![
            Layer::plain(small, OCI_LAYER_TAR),
            Layer::plain(big, OCI_LAYER_TAR),
        ];
        ImageBuild::new(Flavor::Oci, Platform::linux("amd64", None), layers)
    })
}

/// An OCI image with one uncompressed layer holding a pseudo-random file of
/// `size` bytes; built anew on each call (it holds the whole layer).
pub fn one_layer_image(size: usize, seed: u64) -> ImageBuild {
    let tar = random_file_tar("one/layer.bin", size, seed);
    let layers = vec![Layer::plain(tar, OCI_LAYER_TAR)];
    ImageBuild::new(Flavor::Oci, Platform::linux("amd64", None), layers)
}

/// Seeds `big/blob:latest`: an OCI image with an uncompressed 3 MiB layer and a 256 MiB layer.
pub async fn seed_large(upstream: &Upstream) -> PushedImage {
    large_image()
        .push(&upstream.client(), "big/blob", Some(TAG))
        .await
}
