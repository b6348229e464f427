//! Access rules (`auth.rules.path`): who may pull which repositories.
//!
//! ```yaml
//! rules:
//!   - anonymous: true                 # everyone, logged in or not
//!     pull: ["mirror.example/**"]
//!   - users: [alice]                  # "*" = any logged-in user
//!     groups: [ops]                   # from auth.groups.path
//!     pull: ["docker.io/library/*", "ghcr.io/myorg/**"]
//!     deny: ["ghcr.io/myorg/secrets"]
//! ```
//!
//! Repositories are named `<registry>/<repository>`, the registry being an
//! upstream's configured `name`, or for the default (`proxy:`) upstream
//! `docker.io` when it is Docker Hub, else its `remoteurl` host (and port).
//! Patterns are [`Globs`] (`*` within a segment, `**` across).
//!
//! A rule *applies* to a client when it names the user, one of the user's
//! groups, `*` (any logged-in user), or is `anonymous` (then it applies to
//! everyone: what anonymous clients may pull, logged-in ones may too).
//! A repository may be pulled when an applying rule's `pull` matches it
//! and no applying rule's `deny` does: a deny always wins, and the order of
//! the rules does not matter.

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use super::Identity;
use crate::glob::Globs;

/// `users: ["*"]`: any logged-in user.
const ANY_USER: &str = "*";

/// A parsed rules file.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    users: Vec<String>,
    groups: Vec<String>,
    anonymous: bool,
    pull: Globs,
    deny: Globs,
}

/// The file's shape; unknown keys are errors (a misspelt `deny` must not
/// go unnoticed).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<RuleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    anonymous: bool,
    #[serde(default)]
    pull: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

impl Rules {
    /// Parses a rules file; the error names the rule (by position) and
    /// what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: RulesFile = match serde_yaml_ng::from_str(text) {
            Ok(file) => file,
            // An empty file is a file with no rules (everything denied).
            Err(_) if text.trim().is_empty() => RulesFile { rules: Vec::new() },
            Err(e) => return Err(e.to_string()),
        };
        let rules = file
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, entry)| Rule::from_entry(entry).map_err(|e| format!("rules[{i}]: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// Whether `identity` may pull `repository` (`<registry>/<name>`).
    pub fn may_pull(&self, identity: &Identity, repository: &str) -> bool {
        let applying = || self.rules.iter().filter(|rule| rule.applies_to(identity));
        applying().any(|rule| rule.pull.is_match(repository))
            && !applying().any(|rule| rule.deny.is_match(repository))
    }

    /// Whether some rule grants anonymous clients anything.
    pub fn grant_anonymous(&self) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.anonymous && !rule.pull.is_empty())
    }

    /// The rules as `kura config check` prints them.
    pub fn describe(&self) -> Value {
        Value::Sequence(self.rules.iter().map(Rule::describe).collect())
    }
}

impl Rule {
    fn from_entry(entry: RuleEntry) -> Result<Self, String> {
        if entry.users.is_empty() && entry.groups.is_empty() && !entry.anonymous {
            return Err("applies to no one: name users, groups, or anonymous: true".into());
        }
        if entry.pull.is_empty() && entry.deny.is_empty() {
            return Err("grants and denies nothing: give pull or deny patterns".into());
        }
        if let Some(empty) = entry
            .users
            .iter()
            .chain(&entry.groups)
            .find(|n| n.is_empty())
        {
            return Err(format!("{empty:?} is not a user or group name"));
        }
        let globs = |patterns: &[String]| Globs::new(patterns).map_err(|e| e.to_string());
        Ok(Self {
            pull: globs(&entry.pull)?,
            deny: globs(&entry.deny)?,
            users: entry.users,
            groups: entry.groups,
            anonymous: entry.anonymous,
        })
    }

    fn applies_to(&self, identity: &Identity) -> bool {
        if self.anonymous {
            return true;
        }
        let Some(user) = &identity.user else {
            return false;
        };
        self.users.iter().any(|u| u == user || u == ANY_USER)
            || self.groups.iter().any(|g| identity.groups.contains(g))
    }

    fn describe(&self) -> Value {
        let strings =
            |list: &[String]| Value::Sequence(list.iter().cloned().map(Value::from).collect());
        let mut entry = Mapping::new();
        if self.anonymous {
            entry.insert("anonymous".into(), Value::Bool(true));
        }
        for (key, list) in [("users", &self.users), ("groups", &self.groups)] {
            if !list.is_empty() {
                entry.insert(key.into(), strings(list));
            }
        }
        for (key, globs) in [("pull", &self.pull), ("deny", &self.deny)] {
            if !globs.is_empty() {
                entry.insert(key.into(), strings(globs.patterns()));
            }
        }
        Value::Mapping(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
rules:
  - anonymous: true
    pull: ["mirror.test/**"]
    deny: ["mirror.test/internal/**"]
  - users: [alice]
    pull: ["docker.io/library/*"]
  - groups: [ops]
    pull: ["ghcr.io/myorg/**"]
    deny: ["ghcr.io/myorg/secrets"]
  - users: [bob]
    pull: ["ghcr.io/myorg/secrets", "mirror.test/internal/tools"]
  - users: ["*"]
    pull: ["quay.io/public/*"]
"#;

    fn identity(user: Option<&str>, groups: &[&str]) -> Identity {
        Identity {
            user: user.map(str::to_owned),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn the_matcher_decides_by_subject_glob_and_deny() {
        let rules = Rules::parse(RULES).unwrap();
        let anonymous = identity(None, &[]);
        let alice = identity(Some("alice"), &[]);
        let bob_in_ops = identity(Some("bob"), &["ops"]);
        let carol_in_ops = identity(Some("carol"), &["ops"]);
        let cases: &[(&Identity, &str, bool, &str)] = &[
            (
                &anonymous,
                "mirror.test/library/alpine",
                true,
                "anonymous grant",
            ),
            (&anonymous, "mirror.test/a/b/c", true, "** spans segments"),
            (
                &anonymous,
                "mirror.test/internal/x",
                false,
                "deny beats the grant",
            ),
            (
                &anonymous,
                "docker.io/library/alpine",
                false,
                "not granted to anonymous",
            ),
            (
                &anonymous,
                "quay.io/public/x",
                false,
                "* is logged-in users only",
            ),
            (&alice, "docker.io/library/alpine", true, "her own rule"),
            (
                &alice,
                "docker.io/library/a/b",
                false,
                "* stays in one segment",
            ),
            (&alice, "docker.io/other/alpine", false, "outside her glob"),
            (
                &alice,
                "mirror.test/x",
                true,
                "anonymous grants apply to everyone",
            ),
            (&alice, "quay.io/public/x", true, "any logged-in user"),
            (&alice, "ghcr.io/myorg/app", false, "not in ops"),
            (&carol_in_ops, "ghcr.io/myorg/app", true, "granted by group"),
            (
                &carol_in_ops,
                "ghcr.io/myorg/team/app",
                true,
                "group ** grant",
            ),
            (&carol_in_ops, "ghcr.io/myorg/secrets", false, "group deny"),
            (
                &bob_in_ops,
                "ghcr.io/myorg/secrets",
                false,
                "a deny wins over his own grant",
            ),
            (
                &bob_in_ops,
                "mirror.test/internal/tools",
                false,
                "the anonymous deny applies to him too",
            ),
            (&bob_in_ops, "ghcr.io/myorg/app", true, "his group's grant"),
            (
                &identity(Some("mallory"), &["opsx"]),
                "ghcr.io/myorg/app",
                false,
                "group names match exactly",
            ),
            (
                &identity(Some("alicex"), &[]),
                "docker.io/library/alpine",
                false,
                "user names match exactly",
            ),
        ];
        for (who, repository, expected, why) in cases {
            assert_eq!(
                rules.may_pull(who, repository),
                *expected,
                "{who:?} {repository}: {why}"
            );
        }
        assert!(rules.grant_anonymous());
    }

    #[test]
    fn no_rules_deny_everything() {
        for text in ["", "rules: []\n", "rules:\n"] {
            let rules = Rules::parse(text).unwrap();
            assert!(
                !rules.may_pull(&identity(Some("a"), &[]), "x/y"),
                "{text:?}"
            );
            assert!(!rules.grant_anonymous());
        }
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (
                "rules:\n  - pull: [\"a/*\"]\n",
                "rules[0]: applies to no one",
            ),
            (
                "rules:\n  - users: [a]\n",
                "rules[0]: grants and denies nothing",
            ),
            (
                "rules:\n  - users: [a]\n    pull: [\"a/[\"]\n",
                "rules[0]: invalid glob",
            ),
            (
                "rules:\n  - users: [a]\n    pul: [x]\n",
                "unknown field `pul`",
            ),
            (
                "rules:\n  - users: [\"\"]\n    pull: [x]\n",
                "not a user or group name",
            ),
            ("rule: []\n", "unknown field `rule`"),
            ("rules: 3\n", "invalid type"),
            ("- users: [a]\n", "invalid type"),
        ];
        for (text, expected) in cases {
            let error = Rules::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn describe_shows_what_was_parsed() {
        let rules = Rules::parse(RULES).unwrap();
        let text = serde_yaml_ng::to_string(&rules.describe()).unwrap();
        let again: RulesFile =
            serde_yaml_ng::from_str(&format!("rules:\n{}", indent(&text))).unwrap();
        assert_eq!(again.rules.len(), 5);
        assert!(text.contains("ghcr.io/myorg/secrets"), "{text}");
    }

    fn indent(text: &str) -> String {
        text.lines().map(|l| format!("  {l}\n")).collect()
    }
}
