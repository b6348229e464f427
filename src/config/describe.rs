//! The effective configuration as YAML, for `kura config check`: every
//! setting after file, environment and flags, with secrets masked.

use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

use super::{Config, S3Config, S3Encryption, UpstreamConfig};

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
        if let Some(htpasswd) = &self.htpasswd {
            let auth = map([
                ("realm", string(&htpasswd.realm)),
                ("path", string(htpasswd.path.display())),
            ]);
            root.insert(
                "auth".into(),
                Value::Mapping(map([("htpasswd", Value::Mapping(auth))])),
            );
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
    entry
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
}
