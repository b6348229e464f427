//! `kura::upstream::auth::parse_scheme` on arbitrary `WWW-Authenticate`
//! values: must not panic, and a Bearer realm must be an http(s) URL (Kura
//! sends credentials there, so `file:`, `ftp:` etc. must be refused).
#![no_main]

use kura::upstream::auth::{Scheme, parse_scheme};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(Scheme::Bearer { realm, .. }) = parse_scheme(header) {
        assert!(
            matches!(realm.scheme(), "http" | "https"),
            "Bearer realm with scheme {:?} accepted from {header:?}",
            realm.scheme()
        );
        assert!(realm.has_host(), "Bearer realm without host: {realm}");
    }
});
