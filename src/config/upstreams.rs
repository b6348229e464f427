//! Upstream registries: Distribution's single `proxy:` section (the default
//! upstream) and Kura's `upstreams:` list of named registries, with
//! credentials inline, from a `passwordfile`, or from a Docker
//! `config.json` (`dockerconfig:`), and each with its content `policy:`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::Url;

use super::keys::KeyReader;
use super::warming::{UpstreamWarming, read_upstream_warming};
use super::{ConfigError, DOCKER_HUB_URL, Secret, invalid};
use crate::cache::ContentPolicy;
use crate::cache::policy::PolicyPatterns;

/// Host names under which Docker Hub's registry is known.
pub const DOCKER_HUB_ALIASES: &[&str] = &["docker.io", "registry-1.docker.io", "index.docker.io"];

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The registry name clients use (`ghcr.io`, `registry.example.com:5000`);
    /// `None` for the default (`proxy:`) upstream.
    pub name: Option<String>,
    /// `remoteurl`.
    pub url: Url,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `tagttl`: how long a resolved tag is served without asking upstream.
    pub tag_ttl: Duration,
    /// `referrersttl`: how long a cached referrers list is served without
    /// asking upstream; `None` follows `tag_ttl` (see [`Self::referrers_ttl`]).
    pub referrers_ttl: Option<Duration>,
    /// `cafile`: extra PEM root certificate(s) for a private CA.
    pub ca_file: Option<PathBuf>,
    /// `insecure`: skip TLS certificate verification (test setups only).
    pub insecure: bool,
    /// `connecttimeout`: TCP + TLS connection setup.
    pub connect_timeout: Duration,
    /// `responsetimeout`: longest wait for an upstream's response headers,
    /// so a hung upstream cannot stall a cached tag for longer.
    pub response_timeout: Duration,
    /// `idletimeout`: longest silence while streaming a blob.
    pub idle_timeout: Duration,
    /// `maxconnections`: concurrent upstream requests at most.
    pub max_connections: usize,
    /// `events`, `warm`, `warmbudget`: push events and scheduled sync
    /// (never inherited from `proxy:`).
    pub warming: UpstreamWarming,
    /// `policy`: repositories and tags fetched, tags kept immutable. Never
    /// taken from `proxy:` by the `upstreams:` entries: its globs name
    /// one registry's repositories.
    pub policy: ContentPolicy,
}

impl UpstreamConfig {
    /// Whether this upstream is Docker Hub (for `library/` and `ns=docker.io`).
    pub fn is_docker_hub(&self) -> bool {
        self.url
            .host_str()
            .is_some_and(|host| DOCKER_HUB_ALIASES.contains(&host))
    }

    /// How long a cached referrers list is fresh: `referrersttl`, or like a
    /// tag (a signature is attached to an image much as a tag is moved).
    pub fn referrers_ttl(&self) -> Duration {
        self.referrers_ttl.unwrap_or(self.tag_ttl)
    }

    /// Names under which clients may address this upstream with `ns=`.
    pub fn aliases(&self) -> Vec<String> {
        let mut aliases: Vec<String> = self.name.iter().cloned().collect();
        aliases.push(host_and_port(&self.url));
        if self.is_docker_hub() {
            aliases.extend(DOCKER_HUB_ALIASES.iter().map(|a| a.to_string()));
        }
        aliases
    }
}

fn host_and_port(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        _ => String::new(),
    }
}

/// Reads one upstream's keys, `prefix` being `proxy.` or empty (list
/// items), with anything not given taken from `base`.
pub fn read_upstream(
    keys: &mut KeyReader,
    prefix: &str,
    base: &UpstreamConfig,
) -> Result<UpstreamConfig, ConfigError> {
    let key = |name: &str| format!("{prefix}{name}");
    let url = match keys.string(&key("remoteurl"))? {
        Some(raw) => parse_upstream_url(&keys.label_of(&key("remoteurl")), &raw)?,
        None => base.url.clone(),
    };
    let password = match (
        keys.string(&key("password"))?,
        keys.string(&key("passwordfile"))?,
    ) {
        (Some(password), _) => Some(password),
        (None, Some(path)) => Some(read_password_file(
            &keys.label_of(&key("passwordfile")),
            &path,
        )?),
        (None, None) => None,
    };
    Ok(UpstreamConfig {
        name: None,
        url,
        username: keys.string(&key("username"))?.filter(|u| !u.is_empty()),
        password: password.filter(|p| !p.is_empty()).map(Secret::from),
        tag_ttl: keys.duration(&key("tagttl"))?.unwrap_or(base.tag_ttl),
        referrers_ttl: keys.duration(&key("referrersttl"))?.or(base.referrers_ttl),
        ca_file: keys
            .string(&key("cafile"))?
            .map(PathBuf::from)
            .or_else(|| base.ca_file.clone()),
        insecure: keys.bool(&key("insecure"))?.unwrap_or(base.insecure),
        connect_timeout: keys
            .duration(&key("connecttimeout"))?
            .unwrap_or(base.connect_timeout),
        response_timeout: keys
            .duration(&key("responsetimeout"))?
            .unwrap_or(base.response_timeout),
        idle_timeout: keys
            .duration(&key("idletimeout"))?
            .unwrap_or(base.idle_timeout),
        max_connections: keys
            .count(&key("maxconnections"))?
            .unwrap_or(base.max_connections),
        warming: read_upstream_warming(keys, prefix)?,
        policy: read_policy(keys, &key("policy"))?,
    })
}

/// `<section>.allow`, `.deny`, `.tags`, `.immutabletags`: lists of globs
/// (`crate::glob`); a pattern that does not compile names its key.
fn read_policy(keys: &mut KeyReader, section: &str) -> Result<ContentPolicy, ConfigError> {
    let mut list = |name: &str| {
        let key = format!("{section}.{name}");
        keys.strings(&key).map(Option::unwrap_or_default)
    };
    let (allow, deny, tags, immutable_tags) = (
        list("allow")?,
        list("deny")?,
        list("tags")?,
        list("immutabletags")?,
    );
    refuse_unknown_policy_keys(keys, section)?;
    let patterns = PolicyPatterns {
        allow: &allow,
        deny: &deny,
        tags: &tags,
        immutable_tags: &immutable_tags,
    };
    ContentPolicy::new(patterns)
        .map_err(|(list, error)| keys.invalid(&format!("{section}.{list}"), error.to_string()))
}

/// Anything else under `policy:` (`alow`, a scalar) is an error, not an
/// ignored key: ignoring it would serve what the operator meant to refuse.
fn refuse_unknown_policy_keys(keys: &KeyReader, section: &str) -> Result<(), ConfigError> {
    let own = keys.label_of(section);
    let unknown = keys
        .unread_leaves()
        .into_iter()
        .find(|leaf| leaf == &own || leaf.starts_with(&format!("{own}.")));
    match unknown {
        Some(leaf) => Err(invalid(
            &leaf,
            "not a policy key (expected a map of allow, deny, tags, immutabletags)",
        )),
        None => Ok(()),
    }
}

/// Built-in defaults: Docker Hub, anonymous.
pub fn builtin_defaults() -> UpstreamConfig {
    UpstreamConfig {
        name: None,
        url: Url::parse(DOCKER_HUB_URL).expect("valid built-in URL"),
        username: None,
        password: None,
        tag_ttl: Duration::from_secs(60),
        referrers_ttl: None,
        ca_file: None,
        insecure: false,
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_millis(2500),
        idle_timeout: Duration::from_secs(30),
        max_connections: 32,
        warming: UpstreamWarming::default(),
        policy: ContentPolicy::default(),
    }
}

/// Reads the `upstreams:` list; every entry needs a `name` and `remoteurl`.
pub fn read_upstream_list(
    keys: &mut KeyReader,
    base: &UpstreamConfig,
) -> Result<(Vec<UpstreamConfig>, Vec<String>), ConfigError> {
    let mut upstreams: Vec<UpstreamConfig> = Vec::new();
    let mut ignored = Vec::new();
    for mut item in keys.list("upstreams")? {
        let name = item
            .string("name")?
            .ok_or_else(|| item.invalid("name", "every upstream needs a name"))?;
        validate_registry_name(&name).map_err(|reason| item.invalid("name", reason))?;
        if item.string("remoteurl")?.is_none() {
            return Err(item.invalid("remoteurl", "every upstream needs a remoteurl"));
        }
        if upstreams.iter().any(|u| u.name.as_deref() == Some(&name)) {
            return Err(item.invalid("name", format!("{name:?} is configured twice")));
        }
        let upstream = UpstreamConfig {
            name: Some(name),
            ..read_upstream(&mut item, "", base)?
        };
        ignored.extend(item.unread_leaves());
        upstreams.push(upstream);
    }
    Ok((upstreams, ignored))
}

/// A registry name as clients write it: a lower-case host name with a dot,
/// `localhost`, or either with a port. The dot/port rule (Docker's) is what
/// lets `/v2/<registry>/<repo>` be told apart from a repository path.
pub fn validate_registry_name(name: &str) -> Result<(), String> {
    let (host, port) = match name.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (name, None),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    let looks_like_registry = host.contains('.') || host == "localhost" || port.is_some();
    if host_ok && port_ok && looks_like_registry {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a registry host name (lower-case, with a dot or a port, e.g. ghcr.io or registry.local:5000)"
        ))
    }
}

pub(super) fn parse_upstream_url(key: &str, raw: &str) -> Result<Url, ConfigError> {
    parse_http_url(key, raw, "username and password")
}

/// An http(s) URL with a host and without credentials: a URL is printed
/// (startup log, `kura config check`) where a password must never be, so
/// credentials have keys of their own, `credential_keys`. Errors never
/// repeat what may be a password.
pub(super) fn parse_http_url(
    key: &str,
    raw: &str,
    credential_keys: &str,
) -> Result<Url, ConfigError> {
    let shown = without_user_info(raw);
    let url = Url::parse(raw).map_err(|e| invalid(key, format!("{shown:?} is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            key,
            format!(
                "{shown:?} has credentials in it; take them out of the URL and use the {credential_keys} keys"
            ),
        ));
    }
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            key,
            format!("{shown:?} must be an http(s) URL with a host"),
        ));
    }
    Ok(url)
}

/// `raw` with everything between the scheme and the last `@` masked: what
/// a URL parser may take for user info, whether or not the rest parses.
fn without_user_info(raw: &str) -> String {
    let start = raw.find("://").map_or(0, |i| i + 3);
    match raw[start..].rfind('@') {
        Some(at) => format!("{}***{}", &raw[..start], &raw[start + at..]),
        None => raw.to_owned(),
    }
}

fn read_password_file(key: &str, path: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
        .map_err(|e| invalid(key, format!("cannot read {path}: {e}")))
}

/// Credentials from a Docker `config.json`: `auths.<host>.auth` (base64
/// `user:password`) or `auths.<host>.username`/`password`.
pub fn docker_config_credentials(
    key: &str,
    path: &Path,
) -> Result<HashMap<String, (String, Secret)>, ConfigError> {
    #[derive(serde::Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: HashMap<String, AuthEntry>,
    }
    #[derive(serde::Deserialize)]
    struct AuthEntry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let config: DockerConfig = serde_json::from_str(&text).map_err(|e| {
        invalid(
            key,
            format!("{} is not a Docker config.json: {e}", path.display()),
        )
    })?;
    let mut credentials = HashMap::new();
    for (host, entry) in config.auths {
        let pair = match (entry.auth, entry.username, entry.password) {
            (_, Some(user), Some(pass)) => Some((user, pass)),
            (Some(auth), _, _) => base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()
                .and_then(|raw| String::from_utf8(raw).ok())
                .and_then(|pair| {
                    pair.split_once(':')
                        .map(|(u, p)| (u.to_owned(), p.to_owned()))
                }),
            _ => None,
        };
        if let Some((user, pass)) = pair {
            credentials.insert(normalise_auth_host(&host), (user, Secret::from(pass)));
        }
    }
    Ok(credentials)
}

/// `https://index.docker.io/v1/` and `ghcr.io` alike become a bare host[:port].
fn normalise_auth_host(host: &str) -> String {
    let trimmed = host
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    trimmed.split('/').next().unwrap_or(trimmed).to_owned()
}

/// Fills in credentials for upstreams that have none, by any of their names.
pub fn apply_docker_credentials(
    upstream: &mut UpstreamConfig,
    credentials: &HashMap<String, (String, Secret)>,
) {
    if upstream.username.is_some() {
        return;
    }
    let found = upstream
        .aliases()
        .iter()
        .find_map(|alias| credentials.get(alias));
    if let Some((user, pass)) = found {
        upstream.username = Some(user.clone());
        upstream.password = Some(pass.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_follow_dockers_host_rule() {
        for ok in [
            "ghcr.io",
            "registry.example.com:5000",
            "localhost:5000",
            "localhost",
            "docker.io",
            "127.0.0.1:5000",
        ] {
            assert!(validate_registry_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "library",
            "GHCR.io",
            "a/b",
            "ghcr.io:port",
            "..",
            "a..b",
            "x:",
        ] {
            assert!(validate_registry_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_in_a_url_are_refused_without_being_repeated() {
        for raw in [
            "https://user:hunter2@registry.example",
            "https://hunter2@registry.example",
            "https://user:hunter2@registry.example:bad-port",
            "user:hunter2@registry.example",
        ] {
            let err = parse_upstream_url("proxy.remoteurl", raw)
                .unwrap_err()
                .to_string();
            assert!(err.contains("proxy.remoteurl"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let err = parse_upstream_url("proxy.remoteurl", "https://u:hunter2@up.example/")
            .unwrap_err()
            .to_string();
        assert!(err.contains("username and password keys"), "{err}");
        assert!(err.contains("https://***@up.example/"), "{err}");
    }

    #[test]
    fn docker_config_credentials_are_read_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let encoded = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{encoded}"}},"ghcr.io":{{"username":"u","password":"p"}}}}}}"#),
        )
        .unwrap();
        let credentials = docker_config_credentials("dockerconfig", &path).unwrap();
        let mut hub = builtin_defaults();
        apply_docker_credentials(&mut hub, &credentials);
        assert_eq!(hub.username.as_deref(), Some("bob"));
        assert_eq!(hub.password.unwrap().expose(), "s3cret");
        let mut ghcr = UpstreamConfig {
            name: Some("ghcr.io".into()),
            url: Url::parse("https://ghcr.io").unwrap(),
            ..builtin_defaults()
        };
        apply_docker_credentials(&mut ghcr, &credentials);
        assert_eq!(ghcr.username.as_deref(), Some("u"));
    }
}
