//! Configuration, read the way Distribution reads it: a YAML file, then
//! `REGISTRY_*` environment overrides (`REGISTRY_` + the upper-case key path
//! joined by `_`), then Kura's command-line flags on top.
//!
//! Keys Kura does not implement are accepted and reported once as ignored;
//! a key it does implement with an invalid value is a startup error naming
//! the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

use crate::auth::groups::Groups;
use crate::auth::rules::Rules;

mod cluster;
mod describe;
mod keys;
mod upstreams;
mod warming;

pub use cluster::ClusterConfig;
pub use keys::parse_duration;
use keys::{KeyReader, apply_env_overrides};
pub use upstreams::{UpstreamConfig, builtin_defaults, validate_registry_name};
use upstreams::{
    apply_docker_credentials, docker_config_credentials, parse_upstream_url, read_upstream,
    read_upstream_list,
};
pub use warming::{UpstreamWarming, WarmFilter, WarmRule, WarmingLimits};

/// Docker Hub's registry API host: what Kura mirrors with no configuration.
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";

/// Storage drivers of Distribution that Kura does not offer (yet); naming
/// one is an error rather than silently caching somewhere else.
const UNSUPPORTED_DRIVERS: &[&str] = &["azure", "gcs", "swift", "oss", "inmemory"];

#[derive(Debug, Clone)]
pub struct Config {
    /// `http.addr`, normalised so `:5000` means all interfaces.
    pub listen: String,
    /// `storage.filesystem.rootdirectory`: the cache, or with S3 only the
    /// downloads in progress.
    pub storage_root: PathBuf,
    /// `storage.s3`: keep the cache in an S3-compatible bucket.
    pub s3: Option<S3Config>,
    /// `proxy:`: the upstream for requests that name no registry. `None`
    /// when only `upstreams:` are configured.
    pub default_upstream: Option<UpstreamConfig>,
    /// `upstreams:`: named registries, addressed by `?ns=` or a path prefix.
    pub upstreams: Vec<UpstreamConfig>,
    /// `proxy.ttl`: how long unused content is kept; `None` disables expiry.
    pub blob_ttl: Option<Duration>,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub cache: CacheConfig,
    /// `auth.htpasswd`: Basic authentication of clients; `None` = anonymous.
    pub htpasswd: Option<HtpasswdConfig>,
    /// `auth.token`: Bearer tokens from an external token service.
    pub token: Option<TokenConfig>,
    /// `warming:`: the warming queue shared by every upstream.
    pub warming: WarmingLimits,
    /// `auth.rules` and `auth.groups`: who may pull what; `None` = anyone
    /// who passes authentication pulls everything.
    pub access: Option<AccessConfig>,
    /// `cluster:`: replicas of one storage that know each other; `None`
    /// for a single node.
    pub cluster: Option<ClusterConfig>,
    /// Paths of configured keys that Kura accepts but does not implement.
    pub ignored_keys: Vec<String>,
}

/// Distribution's `storage.s3` keys.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// `regionendpoint`: a non-AWS endpoint (MinIO, Ceph, ...).
    pub endpoint: Option<String>,
    /// `accesskey`/`secretkey`; without them the AWS environment and
    /// profile chain applies.
    pub access_key: Option<String>,
    pub secret_key: Option<Secret>,
    /// `rootdirectory`: a key prefix inside the bucket.
    pub root: String,
    /// `forcepathstyle`: path-style URLs (default when an endpoint is set).
    pub path_style: bool,
    /// Not `storage.redirect.disable`: answer blob GETs with a redirect to
    /// a presigned URL, so clients download from the bucket directly.
    pub redirect: bool,
    /// `encrypt` and `keyid`: server-side encryption of what Kura writes.
    pub encryption: Option<S3Encryption>,
    /// `connecttimeout`: TCP + TLS connection setup to the bucket.
    pub connect_timeout: Duration,
    /// `responsetimeout`: longest wait for the bucket's answer to one
    /// request (an upload part included) and between reads of a body, so a
    /// hung bucket fails requests instead of holding them forever.
    pub response_timeout: Duration,
}

/// Server-side encryption as Distribution's S3 driver asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Encryption {
    /// `encrypt: true`: SSE-S3 (`AES256`), keys managed by S3.
    S3Managed,
    /// `encrypt: true` with `keyid`: SSE-KMS with that KMS key.
    Kms { key_id: String },
}

/// Kura's `cache:` section: eviction beyond `proxy.ttl`.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `cache.maxsize` (`200GiB`, `500MB`, bytes): evict least recently used first.
    pub max_size: Option<u64>,
    /// `cache.gcinterval`: how often eviction runs.
    pub gc_interval: Duration,
    /// `cache.gcgrace`: content used this recently is never evicted.
    pub gc_grace: Duration,
    /// `cache.maxdownloads`: blob downloads running at once, process-wide.
    pub max_downloads: usize,
    /// `cache.downloadwait`: how long a request waits for a download turn
    /// before it is answered 503 with `Retry-After`.
    pub download_wait: Duration,
}

/// The rest of Distribution's `http:` section, and Kura's connection limits.
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// `http.tls.certificate` and `http.tls.key` (PEM files).
    pub tls: Option<TlsConfig>,
    /// `http.debug.addr`: a second, plain-HTTP listener for /metrics and health.
    pub debug_addr: Option<String>,
    /// `http.draintimeout`: how long in-flight responses may finish on SIGTERM.
    pub drain_timeout: Duration,
    /// `http.timeouts.*` and `http.maxconnections`.
    pub connections: ConnectionLimits,
}

/// How long and how many client connections may hold Kura's resources.
/// Distribution has no such keys (Go's server runs without limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// `http.timeouts.header`: a TLS handshake, and then each request head
    /// (the first one, and on HTTP/1.1 the next one after a response), must
    /// be complete within this.
    pub header: Duration,
    /// `http.timeouts.idle`: a connection that moves no byte in either
    /// direction for this long, while Kura is not itself waiting on an
    /// upstream for it, is closed.
    pub idle: Duration,
    /// `http.maxconnections`: open client connections per listener; further
    /// ones wait in the kernel's accept queue until one closes.
    pub max: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header: Duration::from_secs(20),
            idle: Duration::from_secs(60),
            max: 512,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct HtpasswdConfig {
    pub realm: String,
    pub path: PathBuf,
}

/// Distribution's `auth.token`: clients bring a JWT from the token service
/// at `realm`, signed by a key of `rootcertbundle` or `jwks`.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub realm: String,
    /// The `service` of the challenge, and the audience tokens must name.
    pub service: String,
    /// The `iss` tokens must carry.
    pub issuer: String,
    /// PEM certificates whose keys may sign tokens (directly, or as roots
    /// of the token's `x5c` chain).
    pub root_cert_bundle: Option<PathBuf>,
    /// A JWKS file whose keys, by `kid`, may sign tokens (Distribution 3).
    pub jwks: Option<PathBuf>,
    /// `autoredirect` with `autoredirectpath`: the challenge's realm is this
    /// path on the host the client asked for.
    pub auto_redirect_path: Option<String>,
    /// `signingalgorithms`: the JWS algorithms accepted; empty = every
    /// asymmetric one Kura supports.
    pub signing_algorithms: Vec<String>,
    /// Kura's `groupsclaim`: a token claim listing the subject's groups.
    pub groups_claim: Option<String>,
}

/// Kura's access rules: files re-read when they change, parsed here too
/// so that a broken one stops startup and `kura config check` shows them.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// `auth.rules.path`.
    pub rules_path: PathBuf,
    pub rules: Rules,
    /// `auth.groups.path`.
    pub groups_path: Option<PathBuf>,
    pub groups: Option<Groups>,
}

/// Security-relevant Distribution keys Kura does not implement: ignoring
/// them would silently weaken what the operator configured.
const REFUSED_SECURITY_KEYS: &[&str] =
    &["auth.silly", "http.tls.clientcas", "http.tls.letsencrypt"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `log.level`: error, warn, info or debug (Distribution's names).
    pub level: String,
    /// `log.formatter: json` (or `logstash`) selects JSON lines.
    pub json: bool,
    /// `log.accesslog.disabled` inverted.
    pub access_log: bool,
}

/// A credential: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is exactly the secret. Compares SHA-256 digests of
    /// both, every byte, so neither the secret's bytes nor its length show
    /// in how long a refusal takes.
    pub fn matches(&self, given: &[u8]) -> bool {
        use sha2::{Digest as _, Sha256};
        let given = Sha256::digest(given);
        let expected = Sha256::digest(self.0.as_bytes());
        let difference = given
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(difference) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Command-line flags, which override file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub cache_dir: Option<PathBuf>,
}

/// Where a server's configuration came from, to read it again as it was
/// read at startup (file, then `REGISTRY_*` variables, then flags).
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub overrides: Overrides,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(Some(&self.path), std::env::vars(), &self.overrides)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("invalid value for {key}: {reason}")]
    Invalid { key: String, reason: String },
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

impl Config {
    /// Loads `file` (if any), applies `REGISTRY_*` variables from `env`, then
    /// `overrides`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut tree = match file {
            Some(path) => read_yaml(path)?,
            None => Value::Mapping(Mapping::new()),
        };
        apply_env_overrides(&mut tree, env);
        let mut keys = KeyReader::new(&tree);
        let mut config = Self::from_keys(&mut keys)?;
        config.ignored_keys.extend(keys.unread_leaves());
        config.apply(overrides)?;
        Ok(config)
    }

    fn from_keys(keys: &mut KeyReader) -> Result<Self, ConfigError> {
        reject_unsupported_drivers(keys)?;
        for key in REFUSED_SECURITY_KEYS {
            if keys.exists(key) {
                return Err(invalid(
                    key,
                    "not supported by Kura; remove it or use auth.htpasswd, auth.token or http.tls",
                ));
            }
        }
        let listen = normalise_listen(&keys.string("http.addr")?.unwrap_or_else(|| ":5000".into()));
        let storage_root = keys
            .string("storage.filesystem.rootdirectory")?
            .map(PathBuf::from)
            .unwrap_or_else(default_storage_root);
        let s3 = read_s3(keys)?;
        let has_proxy = keys.string("proxy.remoteurl")?.is_some();
        let proxy = read_upstream(keys, "proxy.", &builtin_defaults())?;
        let (mut upstreams, ignored_in_list) = read_upstream_list(keys, &proxy)?;
        // With no registry configured at all, Kura is a Docker Hub mirror.
        let mut default_upstream = (has_proxy || upstreams.is_empty()).then_some(proxy);
        if let Some(path) = keys.string("dockerconfig")? {
            let credentials = docker_config_credentials("dockerconfig", Path::new(&path))?;
            for upstream in upstreams.iter_mut().chain(default_upstream.as_mut()) {
                apply_docker_credentials(upstream, &credentials);
            }
        }
        let blob_ttl = keys
            .duration("proxy.ttl")?
            .unwrap_or(Duration::from_secs(168 * 3600));
        Ok(Self {
            listen,
            storage_root,
            s3,
            default_upstream,
            upstreams,
            blob_ttl: (!blob_ttl.is_zero()).then_some(blob_ttl),
            log: LogConfig {
                level: parse_log_level(keys.string("log.level")?)?,
                json: parse_formatter(keys.string("log.formatter")?)?,
                access_log: !keys.bool("log.accesslog.disabled")?.unwrap_or(false),
            },
            http: read_http(keys)?,
            cache: CacheConfig {
                max_size: keys
                    .string("cache.maxsize")?
                    .map(|raw| parse_size("cache.maxsize", &raw))
                    .transpose()?,
                gc_interval: keys
                    .duration("cache.gcinterval")?
                    .unwrap_or(Duration::from_secs(600)),
                gc_grace: keys
                    .duration("cache.gcgrace")?
                    .unwrap_or(Duration::from_secs(600)),
                max_downloads: keys.count("cache.maxdownloads")?.unwrap_or(16),
                download_wait: keys
                    .duration("cache.downloadwait")?
                    .unwrap_or(Duration::from_secs(30)),
            },
            htpasswd: read_htpasswd(keys)?,
            token: read_token(keys)?,
            warming: warming::read_limits(keys)?,
            access: read_access(keys)?,
            cluster: cluster::read_cluster(keys)?,
            ignored_keys: ignored_in_list,
        })
    }

    fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        if let Some(listen) = &overrides.listen {
            self.listen = normalise_listen(listen);
        }
        if let Some(url) = &overrides.upstream {
            let url = parse_upstream_url("--upstream", url)?;
            let upstream = self.default_upstream.get_or_insert_with(builtin_defaults);
            upstream.url = url;
        }
        if let Some(dir) = &overrides.cache_dir {
            self.storage_root = dir.clone();
        }
        Ok(())
    }
}

impl Config {
    /// The configured storage, without I/O (see `Storage::open`).
    pub fn storage(&self) -> std::io::Result<crate::storage::Storage> {
        let objects = match &self.s3 {
            Some(s3) => crate::storage::Objects::s3(s3)?,
            None => crate::storage::Objects::Fs {
                root: self.storage_root.clone(),
            },
        };
        Ok(crate::storage::Storage::new(&self.storage_root, objects))
    }

    /// What eviction keeps, from `proxy.ttl` and `cache.*`.
    pub fn gc_policy(&self) -> crate::gc::Policy {
        crate::gc::Policy {
            ttl: self.blob_ttl,
            max_size: self.cache.max_size,
            grace: self.cache.gc_grace,
        }
    }

    /// What a server's collector keeps: [`Config::gc_policy`] with a grace
    /// of at least two access flush intervals, as a use on another replica
    /// reaches the storage within one, so the collector never plans without
    /// the uses it must spare. (`kura gc` takes `cache.gcgrace` as given.)
    pub fn collector_policy(&self) -> crate::gc::Policy {
        let policy = self.gc_policy();
        crate::gc::Policy {
            grace: policy.grace.max(2 * self.access_flush_interval()),
            ..policy
        }
    }

    /// How often a server writes its access times out: every minute, or
    /// four times per `cache.gcinterval` when that is shorter.
    pub fn access_flush_interval(&self) -> Duration {
        const LONGEST: Duration = Duration::from_secs(60);
        LONGEST
            .min(self.cache.gc_interval / 4)
            .max(Duration::from_millis(100))
    }
}

/// Sizes like `200GiB`, `500MB`, `1.5TiB` or plain bytes.
pub fn parse_size(key: &str, raw: &str) -> Result<u64, ConfigError> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "mb" | "m" => 1000_u64.pow(2),
        "gb" | "g" => 1000_u64.pow(3),
        "tb" | "t" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(invalid(
                key,
                format!("{raw:?}: unknown unit (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| invalid(key, format!("{raw:?} is not a size like 200GiB")))?;
    Ok((value * multiplier as f64) as u64)
}

/// Default `storage.s3.connecttimeout`.
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `storage.s3.responsetimeout`: a 5 MiB part at 170 KiB/s.
const S3_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

fn read_s3(keys: &mut KeyReader) -> Result<Option<S3Config>, ConfigError> {
    if !keys.exists("storage.s3") {
        return Ok(None);
    }
    let bucket = keys
        .string("storage.s3.bucket")?
        .ok_or_else(|| invalid("storage.s3.bucket", "required with storage.s3"))?;
    let endpoint = keys.string("storage.s3.regionendpoint")?;
    if let Some(endpoint) = &endpoint {
        upstreams::parse_http_url(
            "storage.s3.regionendpoint",
            endpoint,
            "storage.s3.accesskey and secretkey",
        )?;
    }
    Ok(Some(S3Config {
        bucket,
        region: keys
            .string("storage.s3.region")?
            .unwrap_or_else(|| "us-east-1".to_owned()),
        path_style: keys
            .bool("storage.s3.forcepathstyle")?
            .unwrap_or(endpoint.is_some()),
        endpoint,
        access_key: keys.string("storage.s3.accesskey")?,
        secret_key: keys.string("storage.s3.secretkey")?.map(Secret::from),
        root: keys
            .string("storage.s3.rootdirectory")?
            .unwrap_or_else(|| "/".to_owned()),
        redirect: !keys.bool("storage.redirect.disable")?.unwrap_or(false),
        encryption: read_s3_encryption(keys)?,
        connect_timeout: keys
            .duration("storage.s3.connecttimeout")?
            .unwrap_or(S3_CONNECT_TIMEOUT),
        response_timeout: keys
            .duration("storage.s3.responsetimeout")?
            .unwrap_or(S3_RESPONSE_TIMEOUT),
    }))
}

fn read_s3_encryption(keys: &mut KeyReader) -> Result<Option<S3Encryption>, ConfigError> {
    let encrypt = keys.bool("storage.s3.encrypt")?.unwrap_or(false);
    let key_id = keys.string("storage.s3.keyid")?.filter(|id| !id.is_empty());
    match (encrypt, key_id) {
        (true, Some(key_id)) => Ok(Some(S3Encryption::Kms { key_id })),
        (true, None) => Ok(Some(S3Encryption::S3Managed)),
        (false, None) => Ok(None),
        // Distribution would send the key without asking for encryption,
        // which S3 refuses on the first write; better said at startup.
        (false, Some(_)) => Err(invalid(
            "storage.s3.keyid",
            "a KMS key is only used with storage.s3.encrypt: true",
        )),
    }
}

fn read_http(keys: &mut KeyReader) -> Result<HttpConfig, ConfigError> {
    let tls = match (
        keys.string("http.tls.certificate")?,
        keys.string("http.tls.key")?,
    ) {
        (Some(certificate), Some(key)) => Some(TlsConfig {
            certificate: certificate.into(),
            key: key.into(),
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                "http.tls.key",
                "required with http.tls.certificate",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "http.tls.certificate",
                "required with http.tls.key",
            ));
        }
    };
    Ok(HttpConfig {
        tls,
        debug_addr: keys
            .string("http.debug.addr")?
            .map(|addr| normalise_listen(&addr)),
        drain_timeout: keys
            .duration("http.draintimeout")?
            .unwrap_or(Duration::from_secs(30)),
        connections: read_connection_limits(keys)?,
    })
}

fn read_connection_limits(keys: &mut KeyReader) -> Result<ConnectionLimits, ConfigError> {
    let defaults = ConnectionLimits::default();
    let mut timeout = |key: &str, default: Duration| match keys.duration(key)? {
        None => Ok(default),
        Some(value) if value.is_zero() => Err(invalid(key, "must be longer than 0")),
        Some(value) => Ok(value),
    };
    Ok(ConnectionLimits {
        header: timeout("http.timeouts.header", defaults.header)?,
        idle: timeout("http.timeouts.idle", defaults.idle)?,
        max: keys.count("http.maxconnections")?.unwrap_or(defaults.max),
    })
}

fn read_htpasswd(keys: &mut KeyReader) -> Result<Option<HtpasswdConfig>, ConfigError> {
    match (
        keys.string("auth.htpasswd.path")?,
        keys.string("auth.htpasswd.realm")?,
    ) {
        (Some(path), realm) => Ok(Some(HtpasswdConfig {
            realm: realm.unwrap_or_else(|| "kura".to_owned()),
            path: path.into(),
        })),
        (None, Some(_)) => Err(invalid(
            "auth.htpasswd.path",
            "required with auth.htpasswd.realm",
        )),
        (None, None) => Ok(None),
    }
}

/// Distribution's default path for `autoredirect` without `autoredirectpath`.
const DEFAULT_AUTO_REDIRECT_PATH: &str = "/auth/token";

fn read_token(keys: &mut KeyReader) -> Result<Option<TokenConfig>, ConfigError> {
    if !keys.exists("auth.token") {
        return Ok(None);
    }
    if keys.exists("auth.htpasswd") {
        return Err(invalid(
            "auth",
            "configure one of auth.htpasswd and auth.token, as Distribution accepts one",
        ));
    }
    let mut required = |key: &str| {
        keys.string(key)?
            .filter(|value| !value.is_empty())
            .ok_or_else(|| invalid(key, "required with auth.token"))
    };
    let realm = required("auth.token.realm")?;
    let service = required("auth.token.service")?;
    let issuer = required("auth.token.issuer")?;
    let root_cert_bundle = keys.string("auth.token.rootcertbundle")?.map(PathBuf::from);
    let jwks = keys.string("auth.token.jwks")?.map(PathBuf::from);
    if root_cert_bundle.is_none() && jwks.is_none() {
        return Err(invalid(
            "auth.token.rootcertbundle",
            "auth.token needs rootcertbundle or jwks: the keys that sign tokens",
        ));
    }
    let auto_redirect = keys.bool("auth.token.autoredirect")?.unwrap_or(false);
    let redirect_path = keys.string("auth.token.autoredirectpath")?;
    Ok(Some(TokenConfig {
        realm,
        service,
        issuer,
        root_cert_bundle,
        jwks,
        auto_redirect_path: auto_redirect.then(|| {
            redirect_path
                .filter(|path| !path.is_empty())
                .unwrap_or_else(|| DEFAULT_AUTO_REDIRECT_PATH.to_owned())
        }),
        signing_algorithms: keys
            .strings("auth.token.signingalgorithms")?
            .unwrap_or_default(),
        groups_claim: keys.string("auth.token.groupsclaim")?,
    }))
}

fn read_access(keys: &mut KeyReader) -> Result<Option<AccessConfig>, ConfigError> {
    let rules_path = keys.string("auth.rules.path")?;
    let groups_path = keys.string("auth.groups.path")?;
    // Anything else under these keys (rules written inline) would be
    // ignored, leaving everything open: refused instead.
    for (key, path) in [("auth.rules", &rules_path), ("auth.groups", &groups_path)] {
        if keys.exists(key) && path.is_none() {
            return Err(invalid(
                &format!("{key}.path"),
                format!("{key} takes a path to its own file, re-read when it changes"),
            ));
        }
    }
    let Some(rules_path) = rules_path else {
        return match groups_path {
            Some(_) => Err(invalid(
                "auth.groups.path",
                "only used with auth.rules.path",
            )),
            None => Ok(None),
        };
    };
    let rules = read_parsed("auth.rules.path", &rules_path, Rules::parse)?;
    let groups = groups_path
        .as_ref()
        .map(|path| read_parsed("auth.groups.path", path, Groups::parse))
        .transpose()?;
    Ok(Some(AccessConfig {
        rules_path: rules_path.into(),
        rules,
        groups_path: groups_path.map(PathBuf::from),
        groups,
    }))
}

fn read_parsed<T>(
    key: &str,
    path: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {path}: {e}")))?;
    parse(&text).map_err(|reason| invalid(key, format!("{path}: {reason}")))
}

fn read_yaml(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let value: Value = serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Yaml {
        path: path.to_owned(),
        source,
    })?;
    Ok(match value {
        Value::Null => Value::Mapping(Mapping::new()),
        other => other,
    })
}

fn reject_unsupported_drivers(keys: &mut KeyReader) -> Result<(), ConfigError> {
    for driver in UNSUPPORTED_DRIVERS {
        let key = format!("storage.{driver}");
        if keys.exists(&key) {
            return Err(invalid(
                &key,
                "this storage driver is not supported; use storage.filesystem",
            ));
        }
    }
    Ok(())
}

fn normalise_listen(addr: &str) -> String {
    match addr.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => addr.to_owned(),
    }
}

fn parse_log_level(raw: Option<String>) -> Result<String, ConfigError> {
    let level = raw.unwrap_or_else(|| "info".into()).to_lowercase();
    match level.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(level),
        "warning" => Ok("warn".into()),
        "fatal" | "panic" => Ok("error".into()),
        _ => Err(invalid(
            "log.level",
            format!("{level:?} is not one of error, warn, info, debug"),
        )),
    }
}

fn parse_formatter(raw: Option<String>) -> Result<bool, ConfigError> {
    match raw.as_deref() {
        None | Some("text") => Ok(false),
        Some("json") | Some("logstash") => Ok(true),
        Some(other) => Err(invalid(
            "log.formatter",
            format!("{other:?} is not one of text, json, logstash"),
        )),
    }
}

/// Without configuration, a cache directory that needs no root.
fn default_storage_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    match base {
        Some(base) => base.join("kura"),
        None => PathBuf::from("kura-data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_yaml(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yml");
        std::fs::write(&path, yaml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(Some(&path), env, &Overrides::default())
    }

    #[test]
    fn defaults_mirror_docker_hub_on_port_5000() {
        let config = Config::load(None, [], &Overrides::default()).unwrap();
        assert_eq!(config.listen, "0.0.0.0:5000");
        assert_eq!(
            config.default_upstream.as_ref().unwrap().url.as_str(),
            "https://registry-1.docker.io/"
        );
        assert_eq!(config.blob_ttl, Some(Duration::from_secs(168 * 3600)));
        assert_eq!(
            config.default_upstream.as_ref().unwrap().tag_ttl,
            Duration::from_secs(60)
        );
        assert!(config.log.access_log);
    }

    #[test]
    fn reads_distribution_keys() {
        let config = load_yaml(
            "version: 0.1\nlog:\n  level: debug\n  formatter: json\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: /tmp/x\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:5001\nproxy:\n  remoteurl: http://up:5000\n  username: u\n  password: p\n  ttl: 0\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:5001");
        assert_eq!(config.storage_root, PathBuf::from("/tmp/x"));
        assert_eq!(
            config.default_upstream.as_ref().unwrap().url.as_str(),
            "http://up:5000/"
        );
        assert_eq!(
            config
                .default_upstream
                .as_ref()
                .unwrap()
                .username
                .as_deref(),
            Some("u")
        );
        assert_eq!(
            config
                .default_upstream
                .as_ref()
                .unwrap()
                .password
                .as_ref()
                .unwrap()
                .expose(),
            "p"
        );
        assert_eq!(config.blob_ttl, None);
        assert_eq!(
            config.log,
            LogConfig {
                level: "debug".into(),
                json: true,
                access_log: false
            }
        );
        assert_eq!(
            config.ignored_keys,
            vec!["version", "storage.delete.enabled"]
        );
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let yaml = "proxy:\n  remoteurl: http://file:1\nhttp:\n  addr: :6000\n";
        let env = [
            ("REGISTRY_PROXY_REMOTEURL", "http://env:2"),
            ("REGISTRY_PROXY_TAGTTL", "5m"),
            ("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY", "/env/root"),
            ("UNRELATED", "x"),
        ];
        let config = load_yaml(yaml, &env).unwrap();
        assert_eq!(
            config.default_upstream.as_ref().unwrap().url.as_str(),
            "http://env:2/"
        );
        assert_eq!(
            config.default_upstream.as_ref().unwrap().tag_ttl,
            Duration::from_secs(300)
        );
        assert_eq!(config.storage_root, PathBuf::from("/env/root"));
        assert_eq!(config.listen, "0.0.0.0:6000");

        let mut config = config;
        config
            .apply(&Overrides {
                listen: Some("127.0.0.1:7".into()),
                upstream: Some("http://flag:3".into()),
                cache_dir: Some("/flag".into()),
            })
            .unwrap();
        assert_eq!(
            config.default_upstream.as_ref().unwrap().url.as_str(),
            "http://flag:3/"
        );
        assert_eq!(config.listen, "127.0.0.1:7");
        assert_eq!(config.storage_root, PathBuf::from("/flag"));
    }

    #[test]
    fn referrers_ttl_follows_each_upstreams_tagttl_unless_set() {
        let yaml = "proxy:\n  remoteurl: https://up.example\n  tagttl: 5m\nupstreams:\n  - name: ghcr.io\n    remoteurl: https://ghcr.io\n    tagttl: 2m\n  - name: quay.io\n    remoteurl: https://quay.io\n    referrersttl: 1h\n";
        let config = load_yaml(yaml, &[]).unwrap();
        let ttl = |i: usize| config.upstreams[i].referrers_ttl();
        let proxy = config.default_upstream.as_ref().unwrap();
        assert_eq!(proxy.referrers_ttl(), Duration::from_secs(300));
        assert_eq!(ttl(0), Duration::from_secs(120));
        assert_eq!(ttl(1), Duration::from_secs(3600));

        let env = [("REGISTRY_PROXY_REFERRERSTTL", "30s")];
        let config = load_yaml(yaml, &env).unwrap();
        let proxy = config.default_upstream.as_ref().unwrap();
        assert_eq!(proxy.referrers_ttl(), Duration::from_secs(30));
        assert_eq!(
            config.upstreams[0].referrers_ttl(),
            Duration::from_secs(30),
            "an upstream without its own takes proxy.referrersttl"
        );
        assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("proxy:\n  ttl: forever\n", "proxy.ttl"),
            ("proxy:\n  remoteurl: not a url\n", "proxy.remoteurl"),
            ("proxy:\n  remoteurl: ftp://x\n", "proxy.remoteurl"),
            ("log:\n  level: loud\n", "log.level"),
            ("proxy:\n  maxconnections: 0\n", "proxy.maxconnections"),
            ("log:\n  formatter: xml\n", "log.formatter"),
            (
                "log:\n  accesslog:\n    disabled: maybe\n",
                "log.accesslog.disabled",
            ),
            ("storage:\n  s3:\n    region: x\n", "storage.s3.bucket"),
            ("storage:\n  azure:\n    accountname: a\n", "storage.azure"),
            ("auth:\n  token:\n    realm: x\n", "auth.token.service"),
            (
                "auth:\n  token:\n    realm: r\n    service: s\n    issuer: i\n",
                "auth.token.rootcertbundle",
            ),
            (
                "auth:\n  token:\n    realm: r\n    service: s\n    issuer: i\n    jwks: /j\n    \
                 autoredirect: sometimes\n",
                "auth.token.autoredirect",
            ),
            (
                "auth:\n  htpasswd:\n    path: /h\n  token:\n    realm: r\n",
                "auth",
            ),
            ("http:\n  tls:\n    certificate: /c.pem\n", "http.tls.key"),
            ("http:\n  draintimeout: soon\n", "http.draintimeout"),
            (
                "http:\n  timeouts:\n    header: 0\n",
                "http.timeouts.header",
            ),
            (
                "http:\n  timeouts:\n    idle: later\n",
                "http.timeouts.idle",
            ),
            ("http:\n  maxconnections: 0\n", "http.maxconnections"),
            ("cache:\n  maxsize: lots\n", "cache.maxsize"),
            ("cache:\n  maxsize: 5PB\n", "cache.maxsize"),
            (
                "storage:\n  s3:\n    bucket: b\n    keyid: k\n",
                "storage.s3.keyid",
            ),
            (
                "upstreams:\n  - name: ghcr.io\n    remoteurl: https://u:p@ghcr.io\n",
                "remoteurl",
            ),
        ];
        for (yaml, key) in cases {
            let err = load_yaml(yaml, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    /// The `auth:` section of a Distribution that delegates to a token
    /// service (docker_auth, GitLab, Harbor) loads as it is.
    #[test]
    fn distribution_token_auth_config_loads() {
        let config = load_yaml(
            "version: 0.1\nauth:\n  token:\n    realm: https://auth.example.com/token\n    \
             service: registry.example.com\n    issuer: auth.example.com\n    \
             rootcertbundle: /certs/bundle.pem\n    autoredirect: false\n",
            &[],
        )
        .unwrap();
        let token = config.token.unwrap();
        assert_eq!(token.realm, "https://auth.example.com/token");
        assert_eq!(token.service, "registry.example.com");
        assert_eq!(token.issuer, "auth.example.com");
        assert_eq!(
            token.root_cert_bundle,
            Some(PathBuf::from("/certs/bundle.pem"))
        );
        assert_eq!(token.auto_redirect_path, None);
        assert_eq!(config.ignored_keys, vec!["version"]);

        let config = load_yaml(
            "auth:\n  token:\n    realm: r\n    service: s\n    issuer: i\n    jwks: /j.json\n    \
             autoredirect: true\n    signingalgorithms: [RS256, ES256]\n",
            &[],
        )
        .unwrap();
        let token = config.token.unwrap();
        assert_eq!(token.jwks, Some(PathBuf::from("/j.json")));
        assert_eq!(token.auto_redirect_path.as_deref(), Some("/auth/token"));
        assert_eq!(token.signing_algorithms, ["RS256", "ES256"]);
    }

    #[test]
    fn each_upstream_has_its_own_policy() {
        let yaml = "proxy:\n  remoteurl: https://up.example\n  policy:\n    allow: [\"library/*\"]\n    deny: [library/evil]\n    tags: [\"3.*\", latest]\n    immutabletags: [\"3.*\"]\n\
                    upstreams:\n  - name: ghcr.io\n    remoteurl: https://ghcr.io\n    policy:\n      deny: [\"secret/**\"]\n  - name: quay.io\n    remoteurl: https://quay.io\n";
        let config = load_yaml(yaml, &[]).unwrap();
        let proxy = &config.default_upstream.as_ref().unwrap().policy;
        assert!(proxy.allows_tag("3.20") && !proxy.allows_tag("edge"));
        assert!(proxy.is_immutable("3.20") && !proxy.is_immutable("latest"));
        let ghcr = &config.upstreams[0].policy;
        assert!(ghcr.allows_tag("edge"), "not inherited from proxy:");
        assert!(!ghcr.is_immutable("3.20"));
        assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);

        let env = [("REGISTRY_PROXY_POLICY_TAGS", "v*")];
        let config = load_yaml("proxy:\n  remoteurl: https://up.example\n", &env).unwrap();
        let proxy = &config.default_upstream.as_ref().unwrap().policy;
        assert!(proxy.allows_tag("v1") && !proxy.allows_tag("latest"));
    }

    #[test]
    fn bad_policies_name_the_key() {
        let cases = [
            (
                "proxy:\n  policy:\n    allow: [\"lib/[a\"]\n",
                "proxy.policy.allow",
            ),
            ("proxy:\n  policy:\n    alow: [x]\n", "proxy.policy.alow"),
            ("proxy:\n  policy: strict\n", "proxy.policy"),
            ("proxy:\n  policy:\n    tags: [[a]]\n", "proxy.policy.tags"),
            (
                "upstreams:\n  - name: ghcr.io\n    remoteurl: https://ghcr.io\n    policy:\n      immutabletags: [\"{a\"]\n",
                "upstreams[0].policy.immutabletags",
            ),
        ];
        for (yaml, key) in cases {
            let err = load_yaml(yaml, &[]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("invalid value for {key}:")),
                "{yaml}: {err}"
            );
        }
    }

    #[test]
    fn s3_encryption_reads_as_distribution_does() {
        let s3 = |extra: &str| {
            load_yaml(&format!("storage:\n  s3:\n    bucket: b\n{extra}"), &[])
                .unwrap()
                .s3
                .unwrap()
        };
        assert_eq!(s3("").encryption, None);
        assert_eq!(s3("    encrypt: false\n").encryption, None);
        assert_eq!(
            s3("    encrypt: true\n").encryption,
            Some(S3Encryption::S3Managed)
        );
        assert_eq!(
            s3("    encrypt: true\n    keyid: \"\"\n").encryption,
            Some(S3Encryption::S3Managed)
        );
        assert_eq!(
            s3("    encrypt: true\n    keyid: arn:aws:kms:k\n").encryption,
            Some(S3Encryption::Kms {
                key_id: "arn:aws:kms:k".into()
            })
        );
        let config = load_yaml("storage:\n  s3:\n    bucket: b\n    encrypt: true\n", &[]);
        assert!(config.unwrap().ignored_keys.is_empty());
    }

    #[test]
    fn reads_connection_limits() {
        let config = load_yaml(
            "http:\n  maxconnections: 8\n  timeouts:\n    header: 2s\n",
            &[("REGISTRY_HTTP_TIMEOUTS_IDLE", "90s")],
        )
        .unwrap();
        assert_eq!(
            config.http.connections,
            ConnectionLimits {
                header: Duration::from_secs(2),
                idle: Duration::from_secs(90),
                max: 8,
            }
        );
        assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("k", "200GiB").unwrap(), 200 << 30);
        assert_eq!(parse_size("k", "500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("k", "1.5KiB").unwrap(), 1536);
        assert_eq!(parse_size("k", "4096").unwrap(), 4096);
    }

    #[test]
    fn reads_the_cluster_section_and_masks_its_secret() {
        let config = load_yaml("cache:\n  gcinterval: 8s\n", &[]).unwrap();
        assert!(config.cluster.is_none(), "a single node without cluster:");
        assert_eq!(config.access_flush_interval(), Duration::from_secs(2));
        assert_eq!(config.collector_policy().grace, Duration::from_secs(600));
        let config = load_yaml("cache:\n  gcinterval: 8s\n  gcgrace: 0\n", &[]).unwrap();
        assert_eq!(config.gc_policy().grace, Duration::ZERO);
        assert_eq!(config.collector_policy().grace, Duration::from_secs(4));

        let yaml = "cluster:\n  advertise: http://10.0.0.7:5000\n  secret: correct-horse-battery\n  heartbeat: 1s\n  expiry: 3s\n";
        let config = load_yaml(yaml, &[]).unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(cluster.advertise.as_str(), "http://10.0.0.7:5000/");
        assert_eq!(cluster.secret.expose(), "correct-horse-battery");
        assert_eq!(cluster.heartbeat, Duration::from_secs(1));
        assert_eq!(cluster.expiry, Duration::from_secs(3));
        assert_eq!(cluster.peer_timeout, Duration::from_secs(2));
        assert_eq!(cluster.max_peer_requests, 64);
        assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);
        let described = config.describe();
        assert!(described.contains("advertise: http://10.0.0.7:5000/"));
        assert!(!described.contains("correct-horse-battery"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-a-mounted-file\n").unwrap();
        let yaml = format!(
            "cluster:\n  advertise: http://k:5000\n  secretfile: {}\n",
            file.display()
        );
        let secret = load_yaml(&yaml, &[]).unwrap().cluster.unwrap().secret;
        assert_eq!(secret.expose(), "from-a-mounted-file");
    }

    #[test]
    fn a_cluster_needs_an_address_a_long_secret_and_sane_timing() {
        let cases = [
            (
                "cluster:\n  secret: correct-horse-battery\n",
                "cluster.advertise",
            ),
            ("cluster:\n  advertise: http://k:5000\n", "cluster.secret"),
            (
                "cluster:\n  advertise: http://k:5000\n  secret: short\n",
                "cluster.secret",
            ),
            (
                "cluster:\n  advertise: k:5000\n  secret: correct-horse-battery\n",
                "cluster.advertise",
            ),
            (
                "cluster:\n  advertise: http://k:5000\n  secret: correct-horse-battery\n  heartbeat: 5s\n  expiry: 6s\n",
                "cluster.expiry",
            ),
            (
                "cluster:\n  advertise: http://k:5000\n  secretfile: /nonexistent/kura-secret\n",
                "cluster.secretfile",
            ),
        ];
        for (yaml, key) in cases {
            let err = load_yaml(yaml, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
            assert!(!err.contains("correct-horse-battery"), "{err}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret("hunter2".into());
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
