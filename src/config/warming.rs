//! Warming keys: per upstream, which pushed images its events warm
//! (`events:`), its scheduled sync (`warm:`) and that schedule's budget of
//! manifest GETs per hour (`warmbudget`); process-wide, the warming
//! queue's length and workers (`warming:`).

use std::time::Duration;

use super::keys::KeyReader;
use super::{ConfigError, Secret};
use crate::glob::Globs;
use crate::reference::{Reference, RepoName};

/// The shortest `interval` of a `warm:` entry: more often is a poll loop,
/// not a schedule.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// One upstream's warming.
#[derive(Debug, Clone)]
pub struct UpstreamWarming {
    /// `events.secret`: the exact `Authorization` header value push events
    /// for this upstream carry; without it the upstream takes no events.
    pub events_secret: Option<Secret>,
    /// `events.repositories`, `events.tags`, `events.platforms`: what a
    /// push event warms.
    pub events: WarmFilter,
    /// `warm:`: the scheduled sync.
    pub schedule: Vec<WarmRule>,
    /// `warmbudget`: manifest GETs (and tag-list GETs) per hour the
    /// schedule may send to this upstream.
    pub budget_per_hour: u32,
}

/// Which pushed repositories and tags are warmed, and for which platforms.
#[derive(Debug, Clone)]
pub struct WarmFilter {
    pub repositories: Globs,
    pub tags: Globs,
    /// `os/arch[/variant]`; empty: every platform.
    pub platforms: Vec<String>,
}

/// One `warm:` entry.
#[derive(Debug, Clone)]
pub struct WarmRule {
    pub repository: RepoName,
    /// `tags`: globs resolved against the upstream's tag list each interval.
    pub tags: Option<Globs>,
    /// `references`: fixed tags or digests.
    pub references: Vec<Reference>,
    pub platforms: Vec<String>,
    pub interval: Duration,
}

/// `warming:`: the queue all upstreams share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmingLimits {
    /// `warming.queuelength`: distinct images queued, running or waiting
    /// to retry, at most; more are dropped (and counted).
    pub queue_length: usize,
    /// `warming.workers`: images warmed at once.
    pub workers: usize,
}

impl Default for WarmingLimits {
    fn default() -> Self {
        Self {
            queue_length: 1024,
            workers: 2,
        }
    }
}

impl Default for UpstreamWarming {
    fn default() -> Self {
        Self {
            events_secret: None,
            events: WarmFilter {
                repositories: globs(&["**"]),
                tags: globs(&["*"]),
                platforms: Vec::new(),
            },
            schedule: Vec::new(),
            budget_per_hour: 60,
        }
    }
}

fn globs(patterns: &[&str]) -> Globs {
    Globs::new(patterns).expect("built-in globs compile")
}

pub fn read_limits(keys: &mut KeyReader) -> Result<WarmingLimits, ConfigError> {
    let defaults = WarmingLimits::default();
    Ok(WarmingLimits {
        queue_length: keys
            .count("warming.queuelength")?
            .unwrap_or(defaults.queue_length),
        workers: keys.count("warming.workers")?.unwrap_or(defaults.workers),
    })
}

/// Reads an upstream's warming keys; `prefix` is `proxy.` or empty (items
/// of `upstreams:`).
pub fn read_upstream_warming(
    keys: &mut KeyReader,
    prefix: &str,
) -> Result<UpstreamWarming, ConfigError> {
    let key = |name: &str| format!("{prefix}{name}");
    let defaults = UpstreamWarming::default();
    let budget = match keys.count(&key("warmbudget"))? {
        None => defaults.budget_per_hour,
        Some(n) => u32::try_from(n)
            .map_err(|_| keys.invalid(&key("warmbudget"), "too large for a budget per hour"))?,
    };
    Ok(UpstreamWarming {
        events_secret: keys
            .string(&key("events.secret"))?
            .filter(|s| !s.is_empty())
            .map(Secret::from),
        events: WarmFilter {
            repositories: read_globs(keys, &key("events.repositories"))?
                .unwrap_or(defaults.events.repositories),
            tags: read_globs(keys, &key("events.tags"))?.unwrap_or(defaults.events.tags),
            platforms: read_platforms(keys, &key("events.platforms"))?,
        },
        schedule: read_schedule(keys, &key("warm"))?,
        budget_per_hour: budget,
    })
}

fn read_schedule(keys: &mut KeyReader, key: &str) -> Result<Vec<WarmRule>, ConfigError> {
    let mut rules = Vec::new();
    for mut item in keys.list(key)? {
        let repository = item
            .string("repository")?
            .ok_or_else(|| item.invalid("repository", "every warm entry names a repository"))?;
        let repository = RepoName::parse(&repository).ok_or_else(|| {
            item.invalid(
                "repository",
                format!("{repository:?} is not a repository name"),
            )
        })?;
        let tags = read_globs(&mut item, "tags")?;
        let references = item
            .strings("references")?
            .unwrap_or_default()
            .iter()
            .map(|raw| {
                Reference::parse(raw).map_err(|_| {
                    item.invalid("references", format!("{raw:?} is not a tag or digest"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if tags.is_none() && references.is_empty() {
            return Err(item.invalid("tags", "a warm entry needs tags (globs) or references"));
        }
        let interval = item
            .duration("interval")?
            .ok_or_else(|| item.invalid("interval", "every warm entry needs an interval"))?;
        if interval < MIN_INTERVAL {
            return Err(item.invalid("interval", "must be at least 1s"));
        }
        let platforms = read_platforms(&mut item, "platforms")?;
        rules.push(WarmRule {
            repository,
            tags,
            references,
            platforms,
            interval,
        });
    }
    Ok(rules)
}

fn read_globs(keys: &mut KeyReader, key: &str) -> Result<Option<Globs>, ConfigError> {
    let Some(patterns) = keys.strings(key)? else {
        return Ok(None);
    };
    Globs::new(&patterns)
        .map(Some)
        .map_err(|e| keys.invalid(key, e.to_string()))
}

/// `os/arch[/variant]` each.
fn read_platforms(keys: &mut KeyReader, key: &str) -> Result<Vec<String>, ConfigError> {
    let platforms = keys.strings(key)?.unwrap_or_default();
    for platform in &platforms {
        let parts = platform.split('/').collect::<Vec<_>>();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(keys.invalid(
                key,
                format!("{platform:?} is not a platform like linux/amd64 or linux/arm/v7"),
            ));
        }
    }
    Ok(platforms)
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Overrides};

    fn load(yaml: &str) -> Result<Config, super::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yml");
        std::fs::write(&path, yaml).unwrap();
        Config::load(Some(&path), [], &Overrides::default())
    }

    #[test]
    fn reads_events_schedule_and_budget_per_upstream() {
        let config = load(
            "proxy:\n  remoteurl: http://up:5000\n  events:\n    secret: Bearer s3cret\n    \
             repositories: [\"team/**\"]\n    platforms: [linux/amd64]\n  warmbudget: 10\n  warm:\n    \
             - repository: team/api\n      tags: [\"v1.*\", latest]\n      interval: 10m\n    \
             - repository: team/db\n      references: [\"15\"]\n      platforms: [linux/arm64]\n      interval: 1h\n\
             warming:\n  queuelength: 16\n  workers: 3\n",
        )
        .unwrap();
        assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);
        let warming = &config.default_upstream.unwrap().warming;
        assert_eq!(
            warming.events_secret.as_ref().unwrap().expose(),
            "Bearer s3cret"
        );
        assert!(warming.events.repositories.is_match("team/a/b"));
        assert!(!warming.events.repositories.is_match("other/a"));
        assert!(warming.events.tags.is_match("v2"), "default: every tag");
        assert_eq!(warming.events.platforms, ["linux/amd64"]);
        assert_eq!(warming.budget_per_hour, 10);
        assert_eq!(warming.schedule.len(), 2);
        assert!(warming.schedule[0].tags.as_ref().unwrap().is_match("v1.2"));
        assert_eq!(warming.schedule[1].references[0].to_string(), "15");
        assert_eq!(warming.schedule[1].interval.as_secs(), 3600);
        assert_eq!(config.warming.queue_length, 16);
        assert_eq!(config.warming.workers, 3);
    }

    #[test]
    fn invalid_warming_values_name_the_key() {
        let cases = [
            (
                "proxy:\n  warm:\n    - tags: [a]\n      interval: 1m\n",
                "proxy.warm[0].repository",
            ),
            (
                "proxy:\n  warm:\n    - repository: a\n      interval: 1m\n",
                "proxy.warm[0].tags",
            ),
            (
                "proxy:\n  warm:\n    - repository: a\n      tags: [x]\n",
                "proxy.warm[0].interval",
            ),
            (
                "proxy:\n  warm:\n    - repository: a\n      tags: [x]\n      interval: 10ms\n",
                "proxy.warm[0].interval",
            ),
            (
                "proxy:\n  warm:\n    - repository: a\n      references: [\"sha256:zz\"]\n      interval: 1m\n",
                "proxy.warm[0].references",
            ),
            (
                "proxy:\n  events:\n    tags: [\"[a\"]\n",
                "proxy.events.tags",
            ),
            (
                "proxy:\n  events:\n    platforms: [amd64]\n",
                "proxy.events.platforms",
            ),
            ("proxy:\n  warmbudget: 0\n", "proxy.warmbudget"),
            ("warming:\n  workers: 0\n", "warming.workers"),
        ];
        for (yaml, key) in cases {
            let err = load(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }
}
