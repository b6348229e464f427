//! Content policy of one upstream: which of its repositories and tags Kura
//! fetches and serves at all (`policy.allow`, `policy.deny`,
//! `policy.tags`), and which tags, once resolved, keep their digest for
//! good (`policy.immutabletags`).
//!
//! Repositories are matched by the name the *upstream* knows them by
//! (`library/alpine` on Docker Hub, whether the client asked for `alpine`
//! or `library/alpine`), without the registry name: a policy belongs to
//! one upstream, and two spellings of one repository must not get two
//! answers. The decision is pure; `Cache::admit` (in `cache/mod.rs`) asks
//! it first thing on every path that serves content.

use crate::glob::{GlobError, Globs};

#[derive(Debug, Clone)]
pub struct ContentPolicy {
    /// Repositories fetched; empty means all of them.
    allow: Globs,
    /// Repositories never fetched, whatever `allow` says.
    deny: Globs,
    /// Tags resolved; empty means all of them. Digests are not tags: an
    /// allowed repository's content by digest is always fetched.
    tags: Globs,
    /// Tags that, once resolved, are served by the cached digest for good.
    immutable_tags: Globs,
}

/// The policy's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    RepositoryRefused,
    TagRefused,
}

/// The patterns of a policy as configured, one list per key.
#[derive(Debug, Default)]
pub struct PolicyPatterns<'a> {
    pub allow: &'a [String],
    pub deny: &'a [String],
    pub tags: &'a [String],
    pub immutable_tags: &'a [String],
}

impl Default for ContentPolicy {
    /// Everything allowed, nothing immutable: Distribution's behaviour.
    fn default() -> Self {
        Self::new(PolicyPatterns::default()).expect("empty lists compile")
    }
}

impl ContentPolicy {
    /// Compiles each list; the error says which list, for the config key.
    pub fn new(patterns: PolicyPatterns) -> Result<Self, (&'static str, GlobError)> {
        let compile = |key: &'static str, list: &[String]| Globs::new(list).map_err(|e| (key, e));
        Ok(Self {
            allow: compile("allow", patterns.allow)?,
            deny: compile("deny", patterns.deny)?,
            tags: compile("tags", patterns.tags)?,
            immutable_tags: compile("immutabletags", patterns.immutable_tags)?,
        })
    }

    /// Whether `repository` (the upstream's name for it) may be fetched,
    /// and, for a request by tag, `tag` resolved.
    pub fn decide(&self, repository: &str, tag: Option<&str>) -> Verdict {
        let listed = self.allow.is_empty() || self.allow.is_match(repository);
        if !listed || self.deny.is_match(repository) {
            return Verdict::RepositoryRefused;
        }
        match tag {
            Some(tag) if !self.allows_tag(tag) => Verdict::TagRefused,
            _ => Verdict::Allowed,
        }
    }

    /// Whether a tag may be resolved (and so is shown in tag lists).
    pub fn allows_tag(&self, tag: &str) -> bool {
        self.tags.is_empty() || self.tags.is_match(tag)
    }

    /// Whether a resolved tag keeps its digest without revalidation.
    pub fn is_immutable(&self, tag: &str) -> bool {
        self.immutable_tags.is_match(tag)
    }

    /// Each list with its key, as `kura config check` prints them.
    pub fn lists(&self) -> [(&'static str, &Globs); 4] {
        [
            ("allow", &self.allow),
            ("deny", &self.deny),
            ("tags", &self.tags),
            ("immutabletags", &self.immutable_tags),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn policy(allow: &[&str], deny: &[&str], tags: &[&str]) -> ContentPolicy {
        ContentPolicy::new(PolicyPatterns {
            allow: &strings(allow),
            deny: &strings(deny),
            tags: &strings(tags),
            immutable_tags: &[],
        })
        .unwrap()
    }

    #[test]
    fn decisions_follow_allow_then_deny_then_tags() {
        use Verdict::*;
        let open = ContentPolicy::default();
        let official = policy(&["library/*", "myorg/**"], &["library/evil"], &[]);
        let no_private = policy(&[], &["private/**"], &[]);
        let releases = policy(&["app"], &[], &["v*", "latest"]);
        let cases = [
            // No policy: everything, as Distribution.
            (&open, "any/repo", Some("latest"), Allowed),
            (&open, "any/repo", None, Allowed),
            // allow: only what matches; `*` stays in its segment.
            (&official, "library/alpine", Some("3"), Allowed),
            (&official, "library/a/b", None, RepositoryRefused),
            (&official, "other/alpine", None, RepositoryRefused),
            (&official, "myorg/team/app", None, Allowed),
            // deny wins over allow, and applies with an empty allow.
            (&official, "library/evil", None, RepositoryRefused),
            (&no_private, "private/x/y", Some("v1"), RepositoryRefused),
            (&no_private, "public/x", Some("v1"), Allowed),
            // tags: by tag only; digests (no tag) pass; repository first.
            (&releases, "app", Some("v1.2"), Allowed),
            (&releases, "app", Some("latest"), Allowed),
            (&releases, "app", Some("dev"), TagRefused),
            (&releases, "app", None, Allowed),
            (&releases, "other", Some("dev"), RepositoryRefused),
        ];
        for (policy, repository, tag, expected) in cases {
            let verdict = policy.decide(repository, tag);
            assert_eq!(verdict, expected, "{policy:?}: {repository} {tag:?}");
        }
    }

    #[test]
    fn immutable_tags_are_their_own_list() {
        let policy = ContentPolicy::new(PolicyPatterns {
            immutable_tags: &strings(&["3.*", "base-*"]),
            ..PolicyPatterns::default()
        })
        .unwrap();
        assert!(policy.is_immutable("3.20"));
        assert!(policy.is_immutable("base-2024"));
        assert!(!policy.is_immutable("latest"));
        assert!(
            policy.allows_tag("latest"),
            "immutability restricts nothing"
        );
        assert!(!ContentPolicy::default().is_immutable("3.20"));
    }

    /// 1,000x a typical policy: a thousand patterns per list still compile
    /// into one matcher, and a large tag list is decided in one pass.
    #[test]
    fn a_thousand_patterns_decide_many_names() {
        let allow: Vec<String> = (0..1000).map(|i| format!("team-{i}/**")).collect();
        let tags: Vec<String> = (0..1000).map(|i| format!("v{i}.*")).collect();
        let policy = ContentPolicy::new(PolicyPatterns {
            allow: &allow,
            tags: &tags,
            ..PolicyPatterns::default()
        })
        .unwrap();
        let allowed = (0..10_000)
            .filter(|i| {
                let repository = format!("team-{}/app/{i}", i % 2000);
                let tag = format!("v{}.0", i % 1500);
                policy.decide(&repository, Some(&tag)) == Verdict::Allowed
            })
            .count();
        // Teams 0..1000 are allowed, and tags v0.* to v999.*.
        let expected = (0..10_000)
            .filter(|i| i % 2000 < 1000 && i % 1500 < 1000)
            .count();
        assert_eq!(allowed, expected);
    }

    #[test]
    fn a_broken_pattern_names_its_list() {
        let (key, error) = ContentPolicy::new(PolicyPatterns {
            deny: &strings(&["ok", "bad[x"]),
            ..PolicyPatterns::default()
        })
        .unwrap_err();
        assert_eq!(key, "deny");
        assert_eq!(error.pattern, "bad[x");
    }
}
