//! Repository names, tags and digests, validated with the grammar of the
//! OCI distribution spec before anything touches storage or the upstream.
//!
//! Because the grammar allows only `[a-z0-9._-]` and `/` between non-empty
//! components, a validated name can never contain `..`, `%`, or an absolute
//! path, which is what makes it safe to use as a storage path.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

static NAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$",
    )
    .expect("name grammar")
});
static TAG_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$").expect("tag grammar"));
static DIGEST_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$").expect("digest grammar")
});

/// Longest repository name the spec guarantees to work.
const MAX_NAME_LEN: usize = 255;

/// Largest manifest Kura reads, from the upstream or from storage:
/// Distribution's limit (4 MiB). Anything bigger is no manifest Kura
/// accepts, so nothing larger is ever held in memory as one.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A validated repository name such as `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() <= MAX_NAME_LEN && NAME_RE.is_match(s)).then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated tag such as `3.20`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Option<Self> {
        TAG_RE.is_match(s).then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestError {
    /// Not `algorithm:encoded` per the spec grammar.
    Malformed,
    /// Well-formed, but an algorithm Kura cannot verify.
    UnsupportedAlgorithm,
}

/// A sha256 content digest. Kura verifies every byte it stores, so it only
/// accepts the algorithm it can verify.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        if !DIGEST_RE.is_match(s) {
            return Err(DigestError::Malformed);
        }
        let (algorithm, encoded) = s.split_once(':').ok_or(DigestError::Malformed)?;
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm);
        }
        let is_lower_hex = encoded
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if encoded.len() != 64 || !is_lower_hex {
            return Err(DigestError::Malformed);
        }
        Ok(Self {
            hex: encoded.to_owned(),
        })
    }

    /// Digest of bytes already in memory (manifests).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_sha256(sha2::Sha256::digest(bytes).as_slice())
    }

    pub fn from_sha256(raw: &[u8]) -> Self {
        Self {
            hex: hex::encode(raw),
        }
    }

    /// The encoded part, 64 lowercase hex characters.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// What follows `/manifests/`: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A string containing `:` can only be a digest (tags forbid `:`).
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        Tag::parse(s)
            .map(Reference::Tag)
            .ok_or(DigestError::Malformed)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/app_1",
            "x.y__z",
            "a--b",
        ] {
            assert!(RepoName::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "", "Alpine", "../etc", "a/../b", "a//b", "/a", "a/", "a/%2e%2e", "a..b", "-a", "a_",
            "a b", "a\\b", ".", "a/.",
        ] {
            assert!(RepoName::parse(bad).is_none(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_none());
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        assert!(Tag::parse("latest").is_some());
        assert!(Tag::parse("_v1.2-rc").is_some());
        assert!(Tag::parse(&"a".repeat(128)).is_some());
        for bad in ["", ".hidden", "-x", "a/b", "..", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn digests_are_sha256_lowercase_hex() {
        let hex = "a".repeat(64);
        let d = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        assert_eq!(
            Digest::parse("sha256:totallywrong"),
            Err(DigestError::Malformed)
        );
        assert_eq!(
            Digest::parse(&format!("sha256:{}", "A".repeat(64))),
            Err(DigestError::Malformed)
        );
        assert_eq!(
            Digest::parse(&format!("sha512:{}", "a".repeat(128))),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert_eq!(Digest::parse("sha256:../../x"), Err(DigestError::Malformed));
        assert_eq!(Digest::parse("nocolon"), Err(DigestError::Malformed));
    }

    #[test]
    fn reference_is_tag_or_digest() {
        assert!(matches!(Reference::parse("v1"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse(&format!("sha256:{}", "0".repeat(64))),
            Ok(Reference::Digest(_))
        ));
        assert!(Reference::parse("sha256:zz").is_err());
        assert!(Reference::parse("..").is_err());
    }
}
