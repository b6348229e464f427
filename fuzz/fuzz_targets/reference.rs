//! Repository names, tags, digests and references from arbitrary UTF-8.
//!
//! Invariants checked (see src/reference.rs):
//! - a parsed `RepoName` is safe as a storage path: no `..`, `//`, `%`, `\`,
//!   no leading or trailing `/`, at most 255 bytes;
//! - a parsed `Digest` prints as `sha256:<64 lowercase hex>` and that string
//!   parses back to an equal digest;
//! - a parsed `Tag` is at most 128 bytes;
//! - `Reference::parse` agrees with `Tag::parse` / `Digest::parse`.
#![no_main]

use kura::reference::{Digest, Reference, RepoName, Tag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    if let Some(name) = RepoName::parse(s) {
        let n = name.as_str();
        assert_eq!(n, s, "RepoName must keep its input verbatim");
        assert!(!n.is_empty(), "empty RepoName");
        assert!(n.len() <= 255, "RepoName longer than 255: {n:?}");
        for bad in ["..", "//", "%", "\\"] {
            assert!(!n.contains(bad), "RepoName {n:?} contains {bad:?}");
        }
        assert!(!n.starts_with('/'), "RepoName {n:?} starts with '/'");
        assert!(!n.ends_with('/'), "RepoName {n:?} ends with '/'");
        assert_eq!(name.to_string(), n);
    }

    let tag = Tag::parse(s);
    if let Some(tag) = &tag {
        let t = tag.as_str();
        assert_eq!(t, s, "Tag must keep its input verbatim");
        assert!(
            !t.is_empty() && t.len() <= 128,
            "Tag length {} out of range",
            t.len()
        );
        assert!(
            !t.contains(':') && !t.contains('/'),
            "Tag {t:?} has ':' or '/'"
        );
        assert_eq!(tag.to_string(), t);
    }

    let digest = Digest::parse(s);
    if let Ok(d) = &digest {
        let printed = d.to_string();
        let again = Digest::parse(&printed)
            .unwrap_or_else(|e| panic!("Digest {printed:?} does not re-parse: {e:?}"));
        assert_eq!(&again, d, "Digest round trip changed the value");
        assert_eq!(again.to_string(), printed);
        assert_eq!(d.hex().len(), 64);
        assert_eq!(printed, s, "Digest is not printed as it was given");
    }

    match Reference::parse(s) {
        Ok(Reference::Tag(t)) => {
            assert_eq!(
                Some(&t),
                tag.as_ref(),
                "Reference::Tag disagrees with Tag::parse"
            );
            assert_eq!(t.to_string(), s);
        }
        Ok(Reference::Digest(d)) => {
            assert_eq!(
                Ok(&d),
                digest.as_ref(),
                "Reference::Digest disagrees with Digest::parse"
            );
            assert_eq!(
                Reference::parse(&d.to_string()),
                Ok(Reference::Digest(d.clone()))
            );
        }
        Err(_) => {
            assert!(tag.is_none(), "Reference refused a valid tag {s:?}");
            assert!(digest.is_err(), "Reference refused a valid digest {s:?}");
        }
    }
});
