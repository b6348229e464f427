//! Which upstream serves a request, in this order: containerd's
//! `?ns=<registry>`; a first path segment naming a configured registry
//! (`/v2/ghcr.io/org/app/...`, what a Podman mirror location with a path
//! sends); the default (`proxy:`) upstream.
//!
//! Kura never dials a host taken from client input: a registry name that is
//! not configured is a 404 `NAME_UNKNOWN`. Beside named upstreams, a
//! default-upstream name that starts with a registry is refused
//! (`NAME_INVALID`): the default's storage has no namespace, so it would
//! be a named upstream's repository.

use std::collections::HashMap;
use std::sync::Arc;

use crate::api::error::{ApiError, ErrorCode};
use crate::cache::Cache;
use crate::config::validate_registry_name;

pub struct Registries {
    default: Option<Arc<Cache>>,
    /// Every name a registry answers to (`ns=` values and path prefixes):
    /// configured names, remote hosts, and Docker Hub's aliases.
    by_name: HashMap<String, Arc<Cache>>,
    /// With an `upstreams:` list, unknown registry names are refused; in
    /// Distribution-compatible single-upstream mode, `ns` is ignored (as
    /// Distribution does) and host-like path segments are repository names.
    strict: bool,
}

/// A request's upstream and the repository name within it.
pub struct Routed<'a> {
    pub cache: Arc<Cache>,
    pub name: &'a str,
}

impl Registries {
    /// `named` pairs each cache with the names it answers to.
    pub fn new(
        default: Option<(Arc<Cache>, Vec<String>)>,
        named: Vec<(Arc<Cache>, Vec<String>)>,
    ) -> Self {
        let strict = !named.is_empty();
        let mut by_name = HashMap::new();
        // Named upstreams win over the default's aliases on a clash.
        for (cache, names) in default.iter().chain(&named) {
            for name in names {
                by_name.insert(name.clone(), cache.clone());
            }
        }
        Self {
            default: default.map(|(cache, _)| cache),
            by_name,
            strict,
        }
    }

    /// Labels of every configured upstream, default first.
    pub fn upstream_labels(&self) -> Vec<String> {
        self.caches()
            .iter()
            .map(|cache| cache.upstream_label().to_owned())
            .collect()
    }

    /// Every configured upstream's cache, once each, default first.
    pub fn caches(&self) -> Vec<Arc<Cache>> {
        let mut named: Vec<Arc<Cache>> = Vec::new();
        for cache in self.by_name.values() {
            let known = self.default.iter().chain(&named);
            if !known.into_iter().any(|known| Arc::ptr_eq(known, cache)) {
                named.push(cache.clone());
            }
        }
        named.sort_by(|a, b| a.upstream_label().cmp(b.upstream_label()));
        self.default.iter().cloned().chain(named).collect()
    }

    /// The cache of the upstream labelled `label` (its name, or `proxy`).
    pub fn upstream(&self, label: &str) -> Option<Arc<Cache>> {
        (self.default.iter())
            .chain(self.by_name.values())
            .find(|cache| cache.upstream_label() == label)
            .cloned()
    }

    pub fn route<'a>(&self, name: &'a str, ns: Option<&str>) -> Result<Routed<'a>, ApiError> {
        if let Some(ns) = ns {
            if let Some(cache) = self.by_name.get(ns) {
                return self.within(cache, name);
            }
            if self.strict {
                return Err(not_configured(ns));
            }
        }
        if let Some((first, rest)) = name.split_once('/') {
            if let Some(cache) = self.by_name.get(first) {
                return self.within(cache, rest);
            }
            if self.strict && validate_registry_name(first).is_ok() {
                return Err(not_configured(first));
            }
        }
        match &self.default {
            Some(cache) => self.within(cache, name),
            None => Err(ApiError::new(
                ErrorCode::NameUnknown,
                "no default upstream is configured: name the registry with ?ns= or a path prefix",
            )),
        }
    }

    /// The repository name a client token must grant for `name` asked
    /// with `ns`: the name as sent, except that a request `?ns=` routes to
    /// a named upstream is named as its path-prefixed twin
    /// (`ghcr.io/org/app`), so a token for the default upstream's `org/app`
    /// does not open another registry's.
    pub fn token_name(&self, name: &str, ns: Option<&str>) -> String {
        let named = ns.and_then(|ns| {
            let cache = self.by_name.get(ns)?;
            (!self.is_default(cache)).then_some(ns)
        });
        match named {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_owned(),
        }
    }

    fn is_default(&self, cache: &Arc<Cache>) -> bool {
        self.default.as_ref().is_some_and(|d| Arc::ptr_eq(d, cache))
    }

    /// `name` within `cache`. The default upstream's repositories are
    /// stored without a namespace, so beside named upstreams one whose
    /// first segment is a registry (`ghcr.io/org/app` through `?ns=docker.io`
    /// or `/v2/docker.io/ghcr.io/...`) would be a named upstream's stored
    /// repository, authorized and policed as the default's: refused.
    fn within<'a>(&self, cache: &Arc<Cache>, name: &'a str) -> Result<Routed<'a>, ApiError> {
        if self.is_default(cache)
            && self.strict
            && let Some((first, _)) = name.split_once('/')
            && (self.by_name.contains_key(first) || validate_registry_name(first).is_ok())
        {
            return Err(ApiError::new(
                ErrorCode::NameInvalid,
                format!(
                    "a repository of the default upstream cannot start with a registry name ({first:?})"
                ),
            ));
        }
        Ok(Routed {
            cache: cache.clone(),
            name,
        })
    }
}

fn not_configured(registry: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NameUnknown,
        format!("registry {registry:?} is not configured in this cache"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use crate::storage::Storage;
    use crate::upstream::Upstream;

    fn cache(name: Option<&str>, url: &str) -> (Arc<Cache>, Vec<String>) {
        let config = UpstreamConfig {
            name: name.map(str::to_owned),
            url: url.parse().unwrap(),
            ..crate::config::builtin_defaults()
        };
        let storage = Storage::local(std::path::Path::new("/nonexistent"));
        let admission = crate::cache::Admission::new(1, std::time::Duration::from_secs(1));
        let cache = Cache::new(
            storage,
            Upstream::new(&config).unwrap(),
            config.tag_ttl,
            admission,
        );
        (Arc::new(cache), config.aliases())
    }

    fn label(routed: Result<Routed<'_>, ApiError>) -> Result<(String, String), ErrorCode> {
        routed
            .map(|r| (r.cache.upstream_label().to_owned(), r.name.to_owned()))
            .map_err(|e| e.code)
    }

    #[test]
    fn routes_by_ns_then_path_prefix_then_default() {
        let registries = Registries::new(
            Some(cache(None, "https://registry-1.docker.io")),
            vec![cache(Some("ghcr.io"), "https://ghcr.io")],
        );
        let ok = |upstream: &str, name: &str| Ok((upstream.to_owned(), name.to_owned()));
        assert_eq!(
            label(registries.route("org/app", Some("ghcr.io"))),
            ok("ghcr.io", "org/app")
        );
        assert_eq!(
            label(registries.route("library/alpine", Some("docker.io"))),
            ok("proxy", "library/alpine")
        );
        assert_eq!(
            label(registries.route("ghcr.io/org/app", None)),
            ok("ghcr.io", "org/app")
        );
        assert_eq!(
            label(registries.route("docker.io/library/alpine", None)),
            ok("proxy", "library/alpine")
        );
        assert_eq!(
            label(registries.route("library/alpine", None)),
            ok("proxy", "library/alpine")
        );
        assert_eq!(
            label(registries.route("x", Some("quay.io"))),
            Err(ErrorCode::NameUnknown)
        );
        assert_eq!(
            label(registries.route("quay.io/x/y", None)),
            Err(ErrorCode::NameUnknown)
        );
    }

    #[test]
    fn tokens_name_ns_routed_repositories_as_their_path_prefixed_twins() {
        let registries = Registries::new(
            Some(cache(None, "https://registry-1.docker.io")),
            vec![cache(Some("ghcr.io"), "https://ghcr.io")],
        );
        for (name, ns, scoped) in [
            ("org/app", Some("ghcr.io"), "ghcr.io/org/app"),
            ("ghcr.io/org/app", None, "ghcr.io/org/app"),
            ("library/alpine", Some("docker.io"), "library/alpine"),
            ("library/alpine", None, "library/alpine"),
        ] {
            assert_eq!(registries.token_name(name, ns), scoped, "{name} ns={ns:?}");
        }
    }

    /// The default upstream's storage has no namespace: a name of it that
    /// starts with a registry would read a named upstream's repositories.
    #[test]
    fn the_default_upstream_takes_no_name_that_starts_with_a_registry() {
        let registries = Registries::new(
            Some(cache(None, "https://registry-1.docker.io")),
            vec![cache(Some("ghcr.io"), "https://ghcr.io")],
        );
        for (name, ns) in [
            ("ghcr.io/org/app", Some("docker.io")),
            ("docker.io/ghcr.io/org/app", None),
            ("docker.io/quay.io/org/app", None),
            ("docker.io/docker.io/library/alpine", None),
        ] {
            assert_eq!(
                label(registries.route(name, ns)),
                Err(ErrorCode::NameInvalid),
                "{name} ns={ns:?}"
            );
        }
        // Named upstreams keep theirs apart by namespace.
        assert_eq!(
            label(registries.route("ghcr.io/quay.io/app", None)),
            Ok(("ghcr.io".to_owned(), "quay.io/app".to_owned()))
        );
    }

    #[test]
    fn single_upstream_mode_ignores_ns_like_distribution() {
        let registries = Registries::new(Some(cache(None, "http://127.0.0.1:5000")), vec![]);
        let routed = label(registries.route("my.org/app", Some("upstream.test")));
        assert_eq!(routed, Ok(("proxy".to_owned(), "my.org/app".to_owned())));
    }
}
