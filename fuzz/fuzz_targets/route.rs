//! `kura::api::route::parse` on arbitrary request paths: must not panic, and
//! whatever it returns must be borrowed from the path it was given.
#![no_main]

use kura::api::route::{self, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Some(r) = route::parse(path) else {
        return;
    };
    assert!(
        path.starts_with("/v2"),
        "route from a non-/v2 path {path:?}"
    );
    match r {
        Route::Base | Route::Catalog | Route::Upload => {}
        Route::Tags { name } => assert!(path.contains(name)),
        Route::Manifest { name, reference } => {
            assert!(path.contains(name) && path.ends_with(reference));
            assert!(
                !reference.contains("/manifests/"),
                "not the last /manifests/: {path:?}"
            );
        }
        Route::Referrers { name, digest } => {
            assert!(path.contains(name) && path.ends_with(digest));
            assert!(
                !digest.contains('/'),
                "not the last segment after /referrers/: {path:?}"
            );
        }
        Route::Blob { name, digest } => {
            assert!(path.contains(name) && path.ends_with(digest));
            assert!(
                !digest.contains("/blobs/"),
                "not the last /blobs/: {path:?}"
            );
        }
    }
});
