//! The effective configuration as YAML, for `kura config check`: every
//! setting after file, environment and flags, with secrets masked.

use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

use super::{AccessConfig, Config, S3Config, S3Encryption, TokenConfig, UpstreamConfig};
use crate::cache::ContentPolicy;

const MASK: &str = "***";

impl Config {
    pub fn describe(&self) -> String {
        let mut root = Mapping::new();
        let mut http = map([("addr", string(&self.listen))]);
        if let Some(tls) = &self.http.tls {
            let tls = map([
                ("certificate", string(tls.certificate.display())),
                ("key", string(tls.key.display())),
            ]);
            http.insert("tls".into(), Value::Mapping(tls));
        }
        if let Some(addr) = &self.http.debug_addr {
            http.insert(
                "debug".into(),
                Value::Mapping(map([("addr", string(addr))])),
            );
        }
        http.insert("draintimeout".into(), duration(self.http.drain_timeout));
        let limits = &self.http.connections;
        let timeouts = map([
            ("header", duration(limits.header)),
            ("idle", duration(limits.idle)),
        ]);
        http.insert("timeouts".into(), Value::Mapping(timeouts));
        http.insert("maxconnections".into(), Value::from(limits.max as u64));
        root.insert("http".into(), Value::Mapping(http));
        let filesystem = map([("rootdirectory", string(self.storage_root.display()))]);
        let mut storage = map([("filesystem", Value::Mapping(filesystem))]);
        if let Some(s3) = &self.s3 {
            storage.insert("s3".into(), Value::Mapping(s3_map(s3)));
            let redirect = map([("disable", Value::Bool(!s3.redirect))]);
            storage.insert("redirect".into(), Value::Mapping(redirect));
        }
        root.insert("storage".into(), Value::Mapping(storage));
        let mut cache = map([
            ("gcinterval", duration(self.cache.gc_interval)),
            ("gcgrace", duration(self.cache.gc_grace)),
            ("maxdownloads", Value::from(self.cache.max_downloads)),
            ("downloadwait", duration(self.cache.download_wait)),
        ]);
        if let Some(max) = self.cache.max_size {
            cache.insert("maxsize".into(), Value::from(max));
        }
        root.insert("cache".into(), Value::Mapping(cache));
        if let Some(cluster) = &self.cluster {
            let cluster = map([
                ("advertise", string(&cluster.advertise)),
                ("secret", string(MASK)),
                ("heartbeat", duration(cluster.heartbeat)),
                ("expiry", duration(cluster.expiry)),
                ("peertimeout", duration(cluster.peer_timeout)),
                ("maxpeerrequests", Value::from(cluster.max_peer_requests)),
            ]);
            root.insert("cluster".into(), Value::Mapping(cluster));
        }
        if let Some(upstream) = &self.default_upstream {
            let mut proxy = upstream_map(upstream);
            proxy.insert(
                "ttl".into(),
                self.blob_ttl.map_or_else(|| "0".into(), duration),
            );
            root.insert("proxy".into(), Value::Mapping(proxy));
        }
        if !self.upstreams.is_empty() {
            let list = self
                .upstreams
                .iter()
                .map(|u| Value::Mapping(upstream_map(u)))
                .collect();
            root.insert("upstreams".into(), Value::Sequence(list));
        }
        let mut auth = Mapping::new();
        if let Some(htpasswd) = &self.htpasswd {
            let htpasswd = map([
                ("realm", string(&htpasswd.realm)),
                ("path", string(htpasswd.path.display())),
            ]);
            auth.insert("htpasswd".into(), Value::Mapping(htpasswd));
        }
        if let Some(token) = &self.token {
            auth.insert("token".into(), Value::Mapping(token_map(token)));
        }
        if let Some(access) = &self.access {
            access_entries(access, &mut auth);
        }
        if !auth.is_empty() {
            root.insert("auth".into(), Value::Mapping(auth));
        }
        let log = map([
            ("level", string(&self.log.level)),
            (
                "formatter",
                string(if self.log.json { "json" } else { "text" }),
            ),
            (
                "accesslog",
                Value::Mapping(map([("disabled", Value::Bool(!self.log.access_log))])),
            ),
        ]);
        root.insert("log".into(), Value::Mapping(log));
        let mut text = serde_yaml_ng::to_string(&Value::Mapping(root)).unwrap_or_default();
        if !self.ignored_keys.is_empty() {
            text.push_str("# accepted but ignored: ");
            text.push_str(&self.ignored_keys.join(", "));
            text.push('\n');
        }
        text
    }
}

/// `auth.rules` and `auth.groups`: each file's path and, as `effective`,
/// what Kura read from it.
fn access_entries(access: &AccessConfig, auth: &mut Mapping) {
    let rules = map([
        ("path", string(access.rules_path.display())),
        ("effective", access.rules.describe()),
    ]);
    auth.insert("rules".into(), Value::Mapping(rules));
    if let (Some(path), Some(groups)) = (&access.groups_path, &access.groups) {
        let members = groups
            .members()
            .into_iter()
            .map(|(group, users)| (Value::from(group), Value::from(users)))
            .collect();
        let groups = map([
            ("path", string(path.display())),
            ("effective", Value::Mapping(members)),
        ]);
        auth.insert("groups".into(), Value::Mapping(groups));
    }
}

fn s3_map(s3: &S3Config) -> Mapping {
    let mut entry = map([
        ("bucket", string(&s3.bucket)),
        ("region", string(&s3.region)),
        ("rootdirectory", string(&s3.root)),
        ("forcepathstyle", Value::Bool(s3.path_style)),
    ]);
    if let Some(endpoint) = &s3.endpoint {
        entry.insert("regionendpoint".into(), string(endpoint));
    }
    if let Some(key) = &s3.access_key {
        entry.insert("accesskey".into(), string(key));
    }
    if s3.secret_key.is_some() {
        entry.insert("secretkey".into(), string(MASK));
    }
    entry.insert("encrypt".into(), Value::Bool(s3.encryption.is_some()));
    if let Some(S3Encryption::Kms { key_id }) = &s3.encryption {
        entry.insert("keyid".into(), string(key_id));
    }
    entry.insert("connecttimeout".into(), duration(s3.connect_timeout));
    entry.insert("responsetimeout".into(), duration(s3.response_timeout));
    entry
}

fn token_map(token: &TokenConfig) -> Mapping {
    let mut entries = map([
        ("realm", string(&token.realm)),
        ("service", string(&token.service)),
        ("issuer", string(&token.issuer)),
        (
            "autoredirect",
            Value::Bool(token.auto_redirect_path.is_some()),
        ),
    ]);
    let optional = [
        (
            "rootcertbundle",
            token.root_cert_bundle.as_ref().map(|p| string(p.display())),
        ),
        ("jwks", token.jwks.as_ref().map(|p| string(p.display()))),
        (
            "autoredirectpath",
            token.auto_redirect_path.as_ref().map(string),
        ),
        ("groupsclaim", token.groups_claim.as_ref().map(string)),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            entries.insert(key.into(), value);
        }
    }
    if !token.signing_algorithms.is_empty() {
        let algorithms = token.signing_algorithms.iter().map(string).collect();
        entries.insert("signingalgorithms".into(), Value::Sequence(algorithms));
    }
    entries
}

fn upstream_map(upstream: &UpstreamConfig) -> Mapping {
    let mut entry = Mapping::new();
    if let Some(name) = &upstream.name {
        entry.insert("name".into(), string(name));
    }
    entry.insert("remoteurl".into(), string(&upstream.url));
    if let Some(username) = &upstream.username {
        entry.insert("username".into(), string(username));
    }
    if upstream.password.is_some() {
        entry.insert("password".into(), string(MASK));
    }
    if let Some(ca) = &upstream.ca_file {
        entry.insert("cafile".into(), string(ca.display()));
    }
    entry.insert("insecure".into(), Value::Bool(upstream.insecure));
    entry.insert("tagttl".into(), duration(upstream.tag_ttl));
    entry.insert("referrersttl".into(), duration(upstream.referrers_ttl()));
    entry.insert("connecttimeout".into(), duration(upstream.connect_timeout));
    entry.insert(
        "responsetimeout".into(),
        duration(upstream.response_timeout),
    );
    entry.insert("idletimeout".into(), duration(upstream.idle_timeout));
    entry.insert(
        "maxconnections".into(),
        Value::from(upstream.max_connections as u64),
    );
    entry.insert(
        "policy".into(),
        Value::Mapping(policy_map(&upstream.policy)),
    );
    entry
}

/// Every list, empty ones too: an empty `allow` or `tags` means all.
fn policy_map(policy: &ContentPolicy) -> Mapping {
    (policy.lists().into_iter())
        .map(|(key, globs)| {
            let patterns = globs.patterns().iter().map(string).collect();
            (Value::from(key), Value::Sequence(patterns))
        })
        .collect()
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Mapping {
    entries
        .into_iter()
        .map(|(k, v)| (Value::from(k), v))
        .collect()
}

fn string(value: impl std::fmt::Display) -> Value {
    Value::String(value.to_string())
}

/// Go-style, as Distribution's files write durations: `168h`, `1m`, `2500ms`.
fn duration(value: Duration) -> Value {
    let (secs, millis) = (value.as_secs(), value.subsec_millis());
    string(match (secs, millis) {
        (0, 0) => "0".to_owned(),
        (s, 0) if s % 3600 == 0 => format!("{}h", s / 3600),
        (s, 0) if s % 60 == 0 => format!("{}m", s / 60),
        (s, 0) => format!("{s}s"),
        _ => format!("{}ms", value.as_millis()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn shows_s3_encryption_and_its_key() {
        let env = [
            ("REGISTRY_STORAGE_S3_BUCKET".to_owned(), "b".to_owned()),
            ("REGISTRY_STORAGE_S3_ENCRYPT".to_owned(), "true".to_owned()),
            (
                "REGISTRY_STORAGE_S3_KEYID".to_owned(),
                "alias/kura".to_owned(),
            ),
        ];
        let text = Config::load(None, env, &Overrides::default())
            .unwrap()
            .describe();
        let described: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(described["storage"]["s3"]["encrypt"], true, "{text}");
        assert_eq!(described["storage"]["s3"]["keyid"], "alias/kura", "{text}");
        assert!(!text.contains("ignored"), "{text}");
    }

    #[test]
    fn shows_token_auth_as_distribution_spells_it() {
        let env = [
            ("REGISTRY_AUTH_TOKEN_REALM", "https://auth.example/token"),
            ("REGISTRY_AUTH_TOKEN_SERVICE", "registry.example"),
            ("REGISTRY_AUTH_TOKEN_ISSUER", "auth.example"),
            ("REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE", "/certs/bundle.pem"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let text = Config::load(None, env, &Overrides::default())
            .unwrap()
            .describe();
        let reparsed: Value = serde_yaml_ng::from_str(&text).unwrap();
        let token = &reparsed["auth"]["token"];
        assert_eq!(token["realm"], "https://auth.example/token", "{text}");
        assert_eq!(token["service"], "registry.example");
        assert_eq!(token["issuer"], "auth.example");
        assert_eq!(token["rootcertbundle"], "/certs/bundle.pem");
        assert_eq!(token["autoredirect"], false);
    }

    #[test]
    fn shows_each_upstreams_policy() {
        let env = [
            (
                "REGISTRY_PROXY_POLICY_ALLOW".to_owned(),
                "library/*".to_owned(),
            ),
            (
                "REGISTRY_PROXY_POLICY_IMMUTABLETAGS".to_owned(),
                "3.*".to_owned(),
            ),
        ];
        let text = Config::load(None, env, &Overrides::default())
            .unwrap()
            .describe();
        let described: Value = serde_yaml_ng::from_str(&text).unwrap();
        let policy = &described["proxy"]["policy"];
        assert_eq!(policy["allow"][0], "library/*", "{text}");
        assert_eq!(policy["immutabletags"][0], "3.*", "{text}");
        assert_eq!(policy["deny"], Value::Sequence(vec![]), "{text}");
        assert_eq!(policy["tags"], Value::Sequence(vec![]), "{text}");
    }

    #[test]
    fn masks_secrets_and_shows_effective_values() {
        let env = [
            (
                "REGISTRY_PROXY_REMOTEURL".to_owned(),
                "https://up.example".to_owned(),
            ),
            ("REGISTRY_PROXY_USERNAME".to_owned(), "me".to_owned()),
            ("REGISTRY_PROXY_PASSWORD".to_owned(), "hunter2".to_owned()),
            ("REGISTRY_STORAGE_S3_BUCKET".to_owned(), "b".to_owned()),
            (
                "REGISTRY_STORAGE_S3_SECRETKEY".to_owned(),
                "s3cr3t".to_owned(),
            ),
        ];
        let text = Config::load(None, env, &Overrides::default())
            .unwrap()
            .describe();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cr3t"),
            "{text}"
        );
        assert!(text.contains("bucket: b"), "{text}");
        assert!(text.contains("encrypt: false"), "{text}");
        assert!(
            text.contains("password: '***'") || text.contains("password: \"***\""),
            "{text}"
        );
        assert!(text.contains("remoteurl: https://up.example/"), "{text}");
        assert!(text.contains("ttl: 168h"), "{text}");
        assert!(text.contains("responsetimeout: 2500ms"), "{text}");
        assert!(text.contains("maxconnections: 512"), "{text}");
        let reparsed: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(reparsed["proxy"]["username"], "me");
    }

    #[test]
    fn checks_and_shows_the_effective_access_rules() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.yml");
        let groups = dir.path().join("groups");
        std::fs::write(
            &rules,
            "rules:\n  - groups: [ops]\n    pull: [\"docker.io/library/*\"]\n",
        )
        .unwrap();
        std::fs::write(&groups, "ops: alice, bob\n").unwrap();
        let config = dir.path().join("kura.yml");
        let yaml = format!(
            "auth:\n  rules:\n    path: {}\n  groups:\n    path: {}\n",
            rules.display(),
            groups.display()
        );
        std::fs::write(&config, &yaml).unwrap();
        let load = || Config::load(Some(&config), [], &Overrides::default());
        let text = load().unwrap().describe();
        let described: Value = serde_yaml_ng::from_str(&text).unwrap();
        let effective = &described["auth"]["rules"]["effective"][0];
        assert_eq!(effective["groups"][0], "ops", "{text}");
        assert_eq!(effective["pull"][0], "docker.io/library/*", "{text}");
        assert_eq!(described["auth"]["groups"]["effective"]["ops"][1], "bob");
        assert!(!text.contains("ignored"), "{text}");

        std::fs::write(&rules, "rules:\n  - users: [a]\n    pull: [\"x/[\"]\n").unwrap();
        let error = load().unwrap_err().to_string();
        assert!(
            error.contains("auth.rules.path") && error.contains("rules[0]"),
            "{error}"
        );
        for (yaml, key) in [
            ("auth:\n  rules:\n    - users: [a]\n", "auth.rules.path"),
            ("auth:\n  groups:\n    path: /g\n", "auth.groups.path"),
            (
                "auth:\n  rules:\n    path: /nonexistent/rules.yml\n",
                "auth.rules.path",
            ),
        ] {
            std::fs::write(&config, yaml).unwrap();
            let error = load().unwrap_err().to_string();
            assert!(error.contains(key), "{yaml}: {error}");
        }
    }
}
