//! Real clients pulling through Kura from a real Distribution upstream, in
//! each auth variant the upstream can have: skopeo (`copy
//! --preserve-digests`), podman (registries.conf mirror) and containerd's
//! ctr (`--hosts-dir`, which adds `?ns=`). Every digest must equal the
//! upstream's, and `_catalog` must list exactly what was pulled.

mod support;

use std::collections::BTreeSet;

use support::clients::{Containerd, ctr_pull, podman_pull, skopeo_copy};
use support::{
    Kura, KuraOptions, PushedImage, PushedIndex, SeededImages, Upstream, seed_all, seed_large,
};

fn temp_dest() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("image");
    (dir, dest)
}

fn skopeo_pulls_image(kura: &Kura, image: &PushedImage) {
    let (_dir, dest) = temp_dest();
    let landed = skopeo_copy(kura.addr(), &image.reference(), &dest, false);
    assert_eq!(
        landed.top_digest,
        image.digest,
        "skopeo {}",
        image.reference()
    );
    assert_eq!(
        landed.digests,
        image.all_digests(),
        "skopeo {}",
        image.reference()
    );
}

fn skopeo_pulls_index(kura: &Kura, index: &PushedIndex) {
    let (_dir, dest) = temp_dest();
    let landed = skopeo_copy(kura.addr(), &index.reference(), &dest, true);
    assert_eq!(
        landed.top_digest,
        index.digest,
        "skopeo --all {}",
        index.reference()
    );
    assert_eq!(
        landed.digests,
        index.all_digests(),
        "skopeo --all {}",
        index.reference()
    );
}

fn podman_pulls(kura: &Kura, seeded: &SeededImages) {
    let image = &seeded.multilayer;
    let pulled = podman_pull(kura.addr(), &image.reference());
    assert_eq!(pulled.digest, image.digest);
    assert_eq!(pulled.id, image.config.digest);
    assert_eq!(pulled.diff_ids, image.diff_ids);
    for index in [&seeded.oci_index, &seeded.docker_list] {
        let pulled = podman_pull(kura.addr(), &index.reference());
        let child = index.child("amd64");
        assert_eq!(pulled.digest, index.digest, "podman {}", index.reference());
        assert_eq!(
            pulled.id,
            child.config.digest,
            "podman {}",
            index.reference()
        );
        assert_eq!(
            pulled.diff_ids,
            child.diff_ids,
            "podman {}",
            index.reference()
        );
    }
}

fn ctr_pulls(kura: &Kura, seeded: &SeededImages) {
    let containerd = Containerd::start();
    let image = &seeded.multilayer;
    let pulled = ctr_pull(&containerd, kura.addr(), &image.reference());
    assert_eq!(pulled.target_digest, image.digest);
    assert!(pulled.content_digests.is_superset(&image.all_digests()));
    for index in [&seeded.oci_index, &seeded.docker_list] {
        let pulled = ctr_pull(&containerd, kura.addr(), &index.reference());
        assert_eq!(
            pulled.target_digest,
            index.digest,
            "ctr {}",
            index.reference()
        );
        let mut expected: BTreeSet<String> = index.child("amd64").all_digests();
        expected.insert(index.digest.clone());
        assert!(
            pulled.content_digests.is_superset(&expected),
            "ctr {}: missing {:?}",
            index.reference(),
            expected
                .difference(&pulled.content_digests)
                .collect::<Vec<_>>()
        );
    }
}

/// Pulls every seeded image with every client through a fresh Kura.
async fn all_clients_pull_through(upstream: &Upstream, large: Option<&PushedImage>) {
    let seeded = seed_all(upstream).await;
    let kura = Kura::start(KuraOptions::for_upstream(upstream)).await;

    skopeo_pulls_image(&kura, &seeded.multilayer);
    skopeo_pulls_index(&kura, &seeded.oci_index);
    skopeo_pulls_index(&kura, &seeded.docker_list);
    if let Some(large) = large {
        skopeo_pulls_image(&kura, large);
    }
    podman_pulls(&kura, &seeded);
    ctr_pulls(&kura, &seeded);

    let mut expected = vec![
        seeded.multilayer.repository.clone(),
        seeded.oci_index.repository.clone(),
        seeded.docker_list.repository.clone(),
    ];
    expected.extend(large.map(|l| l.repository.clone()));
    expected.sort();
    assert_eq!(kura.catalog().await, expected);

    if let Some((_, password)) = upstream.credentials() {
        assert!(
            !kura.log_text().contains(password),
            "the upstream password reached Kura's log"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_pull_through_an_anonymous_upstream() {
    let upstream = Upstream::anonymous().await;
    let large = seed_large(&upstream).await;
    all_clients_pull_through(&upstream, Some(&large)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_pull_through_an_htpasswd_upstream() {
    let upstream = Upstream::htpasswd("puller", "basic-secret-pw").await;
    all_clients_pull_through(&upstream, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_pull_through_a_token_upstream() {
    let upstream = Upstream::token("puller", "token-secret-pw").await;
    // Distribution refuses every pull without a token from the issuer, so
    // the pulls succeeding is the proof that Kura ran the Bearer flow.
    all_clients_pull_through(&upstream, None).await;
}
