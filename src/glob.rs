//! Repository and tag globs, the one pattern language of access rules and
//! content policy: `*` and `?` stay inside one path segment, `**` spans
//! segments (`docker.io/library/*` is every official image but not
//! `docker.io/library/a/b`; `ghcr.io/myorg/**` is everything below `myorg`).
//!
//! Built on `globset` (ripgrep's matcher) rather than by hand: it compiles a
//! whole list into one automaton, so a rule with many patterns costs one
//! match per request, not one per pattern.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A list of glob patterns that matches a name when any of its patterns does.
#[derive(Debug, Clone)]
pub struct Globs {
    set: GlobSet,
    patterns: Vec<String>,
}

/// A pattern that does not compile, named so the operator can find it.
#[derive(Debug, thiserror::Error)]
#[error("invalid glob {pattern:?}: {reason}")]
pub struct GlobError {
    pub pattern: String,
    pub reason: String,
}

impl Globs {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, GlobError> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            builder.add(compile(pattern.as_ref())?);
        }
        let set = builder.build().map_err(|error| GlobError {
            pattern: String::new(),
            reason: error.to_string(),
        })?;
        let patterns = patterns.iter().map(|p| p.as_ref().to_owned()).collect();
        Ok(Self { set, patterns })
    }

    pub fn is_match(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as configured, for `kura config check` and logs.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

fn compile(pattern: &str) -> Result<globset::Glob, GlobError> {
    GlobBuilder::new(pattern)
        // `*` must not cross `/`: `library/*` grants official images only.
        .literal_separator(true)
        // `\` escapes nothing in a repository name; keep it literal.
        .backslash_escape(false)
        .build()
        .map_err(|error| GlobError {
            pattern: pattern.to_owned(),
            reason: error.kind().to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(patterns: &[&str], name: &str) -> bool {
        Globs::new(patterns).unwrap().is_match(name)
    }

    #[test]
    fn a_star_stays_inside_one_segment() {
        assert!(matches(
            &["docker.io/library/*"],
            "docker.io/library/alpine"
        ));
        assert!(!matches(&["docker.io/library/*"], "docker.io/library/a/b"));
        assert!(!matches(&["docker.io/library/*"], "docker.io/other/alpine"));
    }

    #[test]
    fn a_double_star_spans_segments() {
        assert!(matches(&["ghcr.io/myorg/**"], "ghcr.io/myorg/a"));
        assert!(matches(&["ghcr.io/myorg/**"], "ghcr.io/myorg/a/b/c"));
        assert!(!matches(&["ghcr.io/myorg/**"], "ghcr.io/myorgx/a"));
        assert!(matches(&["**"], "anything/at/all"));
    }

    #[test]
    fn tags_match_with_the_same_language() {
        assert!(matches(&["v1.*", "latest"], "v1.2.3"));
        assert!(matches(&["v1.*", "latest"], "latest"));
        assert!(!matches(&["v1.*", "latest"], "v2.0"));
        assert!(matches(&["1.2?"], "1.25"));
    }

    #[test]
    fn an_empty_list_matches_nothing() {
        let none: &[&str] = &[];
        assert!(!matches(none, "x"));
        assert!(Globs::new(none).unwrap().is_empty());
    }

    #[test]
    fn a_broken_pattern_is_named_in_the_error() {
        let error = Globs::new(&["ok/*", "bad/[a"]).unwrap_err();
        assert_eq!(error.pattern, "bad/[a");
        assert!(error.to_string().contains("bad/[a"));
    }
}
