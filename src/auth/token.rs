//! Distribution-compatible token authentication (`auth.token`): clients
//! fetch a JWT from an external token service (docker_auth, GitLab, Harbor,
//! ...) and bring it as `Authorization: Bearer`.
//!
//! A token is accepted as Distribution accepts it: signed (ES256/384, RS*,
//! PS*, EdDSA; never `none` or HMAC) by a key Kura trusts, found the way
//! Distribution finds it: an `x5c` chain in the header that ends in a
//! certificate of `rootcertbundle`; a `jwk` header naming a trusted key; or
//! a `kid` naming one (the libtrust fingerprint Distribution 2 uses or the
//! RFC 7638 thumbprint Distribution 3 uses for bundle keys, the `kid` of a
//! `jwks` key). Its `iss` must be `issuer`, its `aud` name `service`, and
//! `exp`/`nbf` hold with [`LEEWAY`] either way. What it grants is its
//! `access` claim; the caller decides what a request needs ([`Scope`]).
//!
//! Verified tokens are remembered (bounded, least recently used out, never
//! past their expiry) so the signature is checked once per token, not once
//! per blob request. Requests check a token not remembered on the blocking
//! pool, at most [`CONCURRENT_CHECKS`] at once ([`TokenAuth::check`]), with
//! at most [`MAX_SIGNATURE_CHECKS`] signatures checked for its `x5c` chain:
//! anyone can send a token, so what one costs must stay small and apart
//! from the threads serving requests. The key files are re-read when they
//! change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::watched::WatchedFile;
use crate::config::TokenConfig;

/// Clock skew tolerated on `exp` and `nbf`, as Distribution's `Leeway`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// Verified tokens remembered at once; the least recently used goes first.
pub const MAX_CACHED_TOKENS: usize = 1024;
/// Longer bearer values are refused unread: real tokens are a few KiB, and
/// this bounds the work one request can ask for.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Certificates in an `x5c` chain, leaf included.
const MAX_CHAIN_LENGTH: usize = 8;
/// Certificate signatures checked to lead an `x5c` chain to a root: one
/// per certificate for a real chain, however its certificates are
/// ordered; a chain of look-alike names (each a candidate issuer of every
/// other) is refused after this many instead of costing dozens.
const MAX_SIGNATURE_CHECKS: usize = 2 * MAX_CHAIN_LENGTH;
/// Tokens checked (signatures and all) at once by [`TokenAuth::check`].
pub const CONCURRENT_CHECKS: usize = 2;
/// Groups taken from the groups claim; the rest are dropped.
const MAX_GROUPS: usize = 256;

/// The asymmetric JWS algorithms Kura verifies. HMAC is refused: a public
/// certificate must never double as a shared secret.
const SUPPORTED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

/// What a request needs, in Distribution's terms: `repository:<name>:pull`
/// or `registry:catalog:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub kind: &'static str,
    pub name: String,
    pub action: &'static str,
}

impl Scope {
    /// Pulling from `name`, as the client spelt it (upstream prefix included).
    pub fn pull(name: &str) -> Self {
        Self {
            kind: "repository",
            name: name.to_owned(),
            action: "pull",
        }
    }

    /// Listing `/v2/_catalog`.
    pub fn catalog() -> Self {
        Self {
            kind: "registry",
            name: "catalog".to_owned(),
            action: "*",
        }
    }

    /// The challenge's `scope` parameter.
    pub fn param(&self) -> String {
        format!("{}:{}:{}", self.kind, self.name, self.action)
    }

    /// Distribution's `detail` of its 401 body: the access records asked for.
    pub fn detail(&self) -> serde_json::Value {
        serde_json::json!([{
            "Type": self.kind,
            "Class": "",
            "Name": self.name,
            "Action": self.action,
        }])
    }
}

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ResourceActions {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
}

impl ResourceActions {
    /// `*` grants every action, as in Distribution's `actionSet`.
    fn grants(&self, scope: &Scope) -> bool {
        self.kind == scope.kind
            && self.name == scope.name
            && self
                .actions
                .iter()
                .any(|action| action == "*" || action == scope.action)
    }
}

/// Who a verified token speaks for and what it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The `sub` claim (empty for an anonymous token).
    pub subject: String,
    /// From the claim named by `auth.token.groupsclaim`, if any.
    pub groups: Vec<String>,
    /// The `access` claim.
    pub access: Vec<ResourceActions>,
}

impl Grant {
    pub fn allows(&self, scope: &Scope) -> bool {
        self.access.iter().any(|entry| entry.grants(scope))
    }
}

/// Why a request was not let through; each is a 401 with a challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No Bearer token at all.
    TokenRequired,
    /// Malformed, untrusted, expired, or for another issuer or audience.
    InvalidToken,
    /// A valid token that does not grant the scope.
    InsufficientScope,
}

impl Rejection {
    /// The challenge's `error` parameter (RFC 6750).
    fn error_param(self) -> Option<&'static str> {
        match self {
            Rejection::TokenRequired => None,
            Rejection::InvalidToken => Some("invalid_token"),
            Rejection::InsufficientScope => Some("insufficient_scope"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{key}: {path}: {source}")]
    File {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "auth.token.signingalgorithms: {0:?} is not supported (use ES256, ES384, RS*, PS* or EdDSA)"
    )]
    Algorithm(String),
}

/// The token checker of `auth.token`.
pub struct TokenAuth {
    config: TokenConfig,
    algorithms: Vec<Algorithm>,
    /// `rootcertbundle` and `jwks`, each re-read when it changes.
    bundle: Option<WatchedFile<Keys>>,
    jwks: Option<WatchedFile<Keys>>,
    cache: Mutex<TokenCache>,
    /// Held by each check until its blocking task ends, even if the
    /// request that started it is gone.
    checks: Arc<tokio::sync::Semaphore>,
}

impl TokenAuth {
    /// Reads the key files; an unreadable or keyless one is a startup error.
    pub fn load(config: &TokenConfig) -> Result<Self, KeyError> {
        Ok(Self {
            algorithms: accepted_algorithms(&config.signing_algorithms)?,
            bundle: watch(
                "auth.token.rootcertbundle",
                config.root_cert_bundle.as_deref(),
                parse_bundle,
            )?,
            jwks: watch("auth.token.jwks", config.jwks.as_deref(), parse_jwks)?,
            config: config.clone(),
            cache: Mutex::new(TokenCache::default()),
            checks: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CHECKS)),
        })
    }

    /// The grant of the `Authorization` header's token, if it is valid and
    /// grants `needed` (`None`: any valid token will do), checked here and
    /// now, without a runtime (unit tests and the fuzz target; requests use
    /// [`Self::check`]).
    pub fn authorize(
        &self,
        authorization: Option<&[u8]>,
        needed: Option<&Scope>,
    ) -> Result<Arc<Grant>, Rejection> {
        let token = authorization
            .and_then(bearer_token)
            .ok_or(Rejection::TokenRequired)?;
        let grant = self.verify(token).ok_or(Rejection::InvalidToken)?;
        scoped(grant, needed)
    }

    /// [`Self::authorize`] for request handlers: the token is hashed and
    /// looked up once; a token not remembered is checked on the blocking
    /// pool, at most [`CONCURRENT_CHECKS`] at a time. Requests with one
    /// new token (a client pulling layers at once) queue, and the first
    /// check settles the others.
    pub async fn check(
        self: &Arc<Self>,
        authorization: Option<&[u8]>,
        needed: Option<&Scope>,
    ) -> Result<Arc<Grant>, Rejection> {
        let token = authorization
            .and_then(bearer_token)
            .ok_or(Rejection::TokenRequired)?;
        let grant = self
            .verify_off_thread(token)
            .await
            .ok_or(Rejection::InvalidToken)?;
        scoped(grant, needed)
    }

    async fn verify_off_thread(self: &Arc<Self>, token: &str) -> Option<Arc<Grant>> {
        let (fingerprint, keys) = self.lookup_key(token)?;
        if let Some(grant) = self.cached(&fingerprint, &keys) {
            return Some(grant);
        }
        let check = Arc::clone(&self.checks).acquire_owned().await.ok()?;
        let (this, token) = (Arc::clone(self), token.to_owned());
        tokio::task::spawn_blocking(move || {
            let _check = check;
            this.verify_keyed(&token, fingerprint, &keys)
        })
        .await
        .ok()?
    }

    /// `WWW-Authenticate` for a rejection, as Distribution words it. With
    /// `autoredirect`, the realm is on the host the client asked for.
    pub fn challenge(
        &self,
        needed: Option<&Scope>,
        rejection: Rejection,
        host: HostSeen,
    ) -> String {
        let realm = match (&self.config.auto_redirect_path, host.host) {
            (Some(path), Some(name)) => {
                format!("{}://{name}{path}", host_scheme(host.forwarded_proto))
            }
            _ => self.config.realm.clone(),
        };
        let mut challenge = format!(
            "Bearer realm={},service={}",
            quote(&realm),
            quote(&self.config.service)
        );
        if let Some(scope) = needed {
            challenge.push_str(&format!(",scope={}", quote(&scope.param())));
        }
        if let Some(error) = rejection.error_param() {
            challenge.push_str(&format!(",error={}", quote(error)));
        }
        challenge
    }

    /// The grant of a valid token: from the cache, or verified now.
    fn verify(&self, token: &str) -> Option<Arc<Grant>> {
        let (fingerprint, keys) = self.lookup_key(token)?;
        self.verify_keyed(token, fingerprint, &keys)
    }

    /// What a token is remembered by (its sha256, and the keys it would be
    /// checked with); `None` for a token too long to be read at all.
    fn lookup_key(&self, token: &str) -> Option<([u8; 32], KeyRing)> {
        (token.len() <= MAX_TOKEN_BYTES)
            .then(|| (Sha256::digest(token.as_bytes()).into(), self.current_keys()))
    }

    fn cached(&self, fingerprint: &[u8; 32], keys: &KeyRing) -> Option<Arc<Grant>> {
        self.lock_cache().get(fingerprint, keys, SystemTime::now())
    }

    /// The grant of a token from the cache (another request may have just
    /// checked it), or checked now and remembered.
    fn verify_keyed(
        &self,
        token: &str,
        fingerprint: [u8; 32],
        keys: &KeyRing,
    ) -> Option<Arc<Grant>> {
        if let Some(grant) = self.cached(&fingerprint, keys) {
            return Some(grant);
        }
        let now = SystemTime::now();
        let (grant, valid_until) = match self.verify_uncached(token, keys, now) {
            Ok(verified) => verified,
            Err(reason) => {
                tracing::debug!(reason, "bearer token refused");
                return None;
            }
        };
        let grant = Arc::new(grant);
        self.lock_cache()
            .insert(fingerprint, Arc::clone(&grant), keys, valid_until, now);
        Some(grant)
    }

    fn verify_uncached(
        &self,
        token: &str,
        keys: &KeyRing,
        now: SystemTime,
    ) -> Result<(Grant, SystemTime), &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        if !self.algorithms.contains(&header.alg) {
            return Err("signing algorithm not accepted");
        }
        let key = keys.signing_key(&header, now)?;
        let claims = verify_signature(token, header.alg, &key)?;
        let claims = Claims::from_value(claims, self.config.groups_claim.as_deref())?;
        let valid_until = claims.check(&self.config, now)?;
        Ok((claims.grant, valid_until))
    }

    /// The keys of both files, each re-read first if it changed.
    fn current_keys(&self) -> KeyRing {
        KeyRing {
            files: [&self.bundle, &self.jwks]
                .into_iter()
                .flatten()
                .map(WatchedFile::current)
                .collect(),
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, TokenCache> {
        self.cache.lock().expect("token cache lock")
    }
}

/// `grant` if it holds `needed` (`None`: any valid token will do).
fn scoped(grant: Arc<Grant>, needed: Option<&Scope>) -> Result<Arc<Grant>, Rejection> {
    match needed {
        Some(scope) if !grant.allows(scope) => Err(Rejection::InsufficientScope),
        _ => Ok(grant),
    }
}

/// The host a request was addressed to, for `autoredirect` realms.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostSeen<'a> {
    pub host: Option<&'a str>,
    /// `X-Forwarded-Proto`, as Distribution honours it.
    pub forwarded_proto: Option<&'a str>,
}

fn host_scheme(forwarded_proto: Option<&str>) -> &str {
    forwarded_proto.filter(|p| !p.is_empty()).unwrap_or("https")
}

/// Go's `%q` for the ASCII a header can carry: quotes and backslashes escaped.
fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// `Bearer <token>`, scheme case-insensitive, as Distribution splits it.
fn bearer_token(header: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(header).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn accepted_algorithms(names: &[String]) -> Result<Vec<Algorithm>, KeyError> {
    if names.is_empty() {
        return Ok(SUPPORTED_ALGORITHMS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            name.parse::<Algorithm>()
                .ok()
                .filter(|alg| SUPPORTED_ALGORITHMS.contains(alg))
                .ok_or_else(|| KeyError::Algorithm(name.clone()))
        })
        .collect()
}

/// Checks the signature only; the claims are Distribution's to check.
fn verify_signature(
    token: &str,
    alg: Algorithm,
    key: &DecodingKey,
) -> Result<serde_json::Value, &'static str> {
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
        .map(|data| data.claims)
        .map_err(|_| "bad signature")
}

/// The claims Distribution reads; absent numbers are 0 as in Go.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    aud: Audience,
    #[serde(default)]
    exp: i64,
    #[serde(default)]
    nbf: i64,
    #[serde(default)]
    access: Option<Vec<ResourceActions>>,
}

/// `aud` is a string or a list of strings.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn names(&self, service: &str) -> bool {
        match self {
            Audience::None => false,
            Audience::One(aud) => aud == service,
            Audience::Many(auds) => auds.iter().any(|aud| aud == service),
        }
    }
}

struct Claims {
    issuer: String,
    audience: Audience,
    expires: i64,
    not_before: i64,
    grant: Grant,
}

impl Claims {
    fn from_value(
        value: serde_json::Value,
        groups_claim: Option<&str>,
    ) -> Result<Self, &'static str> {
        let groups = groups_claim
            .and_then(|claim| value.get(claim))
            .map(group_names)
            .unwrap_or_default();
        let raw: RawClaims = serde_json::from_value(value).map_err(|_| "malformed claims")?;
        Ok(Self {
            issuer: raw.iss,
            audience: raw.aud,
            expires: raw.exp,
            not_before: raw.nbf,
            grant: Grant {
                subject: raw.sub,
                groups,
                access: raw.access.unwrap_or_default(),
            },
        })
    }

    /// Distribution's checks in its order; the instant the token stops
    /// being valid (expiry plus leeway) when they pass.
    fn check(&self, config: &TokenConfig, now: SystemTime) -> Result<SystemTime, &'static str> {
        if self.issuer != config.issuer {
            return Err("token from untrusted issuer");
        }
        if !self.audience.names(&config.service) {
            return Err("token intended for another audience");
        }
        let valid_until = unix_time(self.expires) + LEEWAY;
        if now > valid_until {
            return Err("token expired");
        }
        if now
            < unix_time(self.not_before)
                .checked_sub(LEEWAY)
                .unwrap_or(UNIX_EPOCH)
        {
            return Err("token not valid yet");
        }
        Ok(valid_until)
    }
}

/// A groups claim: a list of strings, or one string; anything else, none.
fn group_names(claim: &serde_json::Value) -> Vec<String> {
    match claim {
        serde_json::Value::String(group) => vec![group.clone()],
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .take(MAX_GROUPS)
            .collect(),
        _ => Vec::new(),
    }
}

/// Seconds since the epoch as a time; negative ones clamp to the epoch.
fn unix_time(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds.max(0).unsigned_abs())
}

/// The keys of one file.
#[derive(Default)]
struct Keys {
    /// DER of the `rootcertbundle` certificates: trust anchors of `x5c`.
    roots: Vec<Vec<u8>>,
    /// Keys a `kid` may name: bundle keys by libtrust fingerprint and by
    /// RFC 7638 thumbprint, JWKS keys by their `kid`.
    by_kid: HashMap<String, Arc<DecodingKey>>,
}

/// The keys tokens may be signed with: those of every configured file, as
/// they are now.
#[derive(Clone)]
struct KeyRing {
    files: Vec<Arc<Keys>>,
}

impl KeyRing {
    /// The very same file contents (not merely equal ones).
    fn same_as(&self, other: &KeyRing) -> bool {
        self.files.len() == other.files.len()
            && self
                .files
                .iter()
                .zip(&other.files)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// Distribution 2's order of preference: `x5c`, then `jwk`, then `kid`.
    fn signing_key(
        &self,
        header: &Header,
        now: SystemTime,
    ) -> Result<Arc<DecodingKey>, &'static str> {
        if let Some(chain) = header.x5c.as_deref().filter(|c| !c.is_empty()) {
            return self.verify_chain(chain, now);
        }
        if let Some(jwk) = &header.jwk {
            return match jwk.common.x509_chain.as_deref().filter(|c| !c.is_empty()) {
                Some(chain) => self.verify_chain(chain, now),
                None => self.named_key(jwk.common.key_id.as_deref()),
            };
        }
        self.named_key(header.kid.as_deref())
    }

    fn named_key(&self, kid: Option<&str>) -> Result<Arc<DecodingKey>, &'static str> {
        kid.filter(|kid| !kid.is_empty())
            .and_then(|kid| self.files.iter().find_map(|keys| keys.by_kid.get(kid)))
            .cloned()
            .ok_or("token signed by an untrusted key")
    }

    /// The leaf's key when the chain (base64 DER, leaf first) leads to a
    /// bundle certificate: each certificate signed by the next one or by a
    /// root, every one of them within its validity period.
    fn verify_chain(
        &self,
        chain: &[String],
        now: SystemTime,
    ) -> Result<Arc<DecodingKey>, &'static str> {
        if chain.len() > MAX_CHAIN_LENGTH {
            return Err("x5c chain too long");
        }
        let ders = chain
            .iter()
            .map(|cert| STANDARD.decode(cert))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "x5c is not base64")?;
        let certs = ders
            .iter()
            .map(|der| X509Certificate::from_der(der).map(|(_, cert)| cert))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "x5c holds a malformed certificate")?;
        let roots = self
            .files
            .iter()
            .flat_map(|keys| &keys.roots)
            .filter_map(|der| X509Certificate::from_der(der).ok().map(|(_, cert)| cert))
            .collect::<Vec<_>>();
        let (leaf, intermediates) = certs.split_first().ok_or("empty x5c")?;
        let mut current = leaf;
        let checks = SignatureChecks::default();
        let signed_by = |cert: &X509Certificate, issuer: &X509Certificate| {
            cert.issuer() == issuer.subject() && checks.verify(cert, issuer)
        };
        // Each step moves up one certificate, so the chain length bounds it.
        for _ in 0..=MAX_CHAIN_LENGTH {
            if !valid_at(current, now) {
                return Err("x5c certificate outside its validity period");
            }
            if let Some(root) = roots
                .iter()
                .find(|root| root.as_raw() == current.as_raw() || signed_by(current, root))
            {
                if !valid_at(root, now) {
                    return Err("root certificate outside its validity period");
                }
                return decoding_key(leaf.public_key()).map(Arc::new);
            }
            current = intermediates
                .iter()
                .find(|issuer| issuer.is_ca() && signed_by(current, issuer))
                .ok_or(if checks.exhausted() {
                    "x5c chain needs too many signature checks"
                } else {
                    "x5c chain does not lead to a trusted root"
                })?;
        }
        Err("x5c chain does not lead to a trusted root")
    }
}

/// The certificate signatures one chain has had checked, refusing more
/// than [`MAX_SIGNATURE_CHECKS`].
#[derive(Default)]
struct SignatureChecks(std::cell::Cell<usize>);

impl SignatureChecks {
    /// Whether `issuer` signed `cert`; `false` once the budget is spent.
    fn verify(&self, cert: &X509Certificate, issuer: &X509Certificate) -> bool {
        self.0.set(self.0.get() + 1);
        !self.exhausted() && cert.verify_signature(Some(issuer.public_key())).is_ok()
    }

    fn exhausted(&self) -> bool {
        self.0.get() > MAX_SIGNATURE_CHECKS
    }
}

fn valid_at(cert: &X509Certificate, now: SystemTime) -> bool {
    let Ok(since_epoch) = now.duration_since(UNIX_EPOCH) else {
        return false;
    };
    let now = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    let validity = cert.validity();
    validity.not_before.timestamp() <= now && now <= validity.not_after.timestamp()
}

/// A certificate's public key as `jsonwebtoken` takes it.
fn decoding_key(spki: &SubjectPublicKeyInfo) -> Result<DecodingKey, &'static str> {
    let algorithm = &spki.algorithm.algorithm;
    let bits = spki.subject_public_key.data.as_ref();
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        Ok(DecodingKey::from_rsa_der(bits))
    } else if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        Ok(DecodingKey::from_ec_der(bits))
    } else if *algorithm == OID_SIG_ED25519 {
        Ok(DecodingKey::from_ed_der(bits))
    } else {
        Err("certificate key of an unsupported type")
    }
}

/// The names a `kid` may give a bundle key: libtrust's fingerprint
/// (Distribution 2, docker_auth, GitLab, Harbor) and the RFC 7638
/// thumbprint (Distribution 3).
fn key_ids(spki: &SubjectPublicKeyInfo) -> Vec<String> {
    let mut ids = vec![libtrust_key_id(spki.raw)];
    ids.extend(jwk_thumbprint(spki));
    ids
}

/// libtrust's key ID: the SHA-256 of the DER public key, first 240 bits,
/// base32, in twelve groups of four joined by `:`.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let encoded = base32(&digest[..30]);
    encoded
        .as_bytes()
        .chunks(4)
        .map(|group| std::str::from_utf8(group).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(":")
}

/// RFC 4648 base32 without padding (30 bytes encode without any).
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Distribution 3's `GetJWKThumbprint`. Like Go's `big.Int.Bytes()`, the
/// numbers lose leading zero bytes, so the ID matches Distribution's.
fn jwk_thumbprint(spki: &SubjectPublicKeyInfo) -> Option<String> {
    let number = |bytes: &[u8]| {
        let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        URL_SAFE_NO_PAD.encode(&bytes[first..])
    };
    let json = match spki.parsed().ok()? {
        PublicKey::RSA(rsa) => format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            number(rsa.exponent),
            number(rsa.modulus)
        ),
        PublicKey::EC(point) => {
            let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            let crv = if curve == OID_EC_P256 {
                "P-256"
            } else if curve == OID_NIST_EC_P384 {
                "P-384"
            } else {
                return None;
            };
            // Uncompressed SEC1: 0x04, then x and y of equal length.
            let coordinates = point.data().strip_prefix(&[4])?;
            let (x, y) = coordinates.split_at(coordinates.len() / 2);
            format!(
                r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
                number(x),
                number(y)
            )
        }
        _ if spki.algorithm.algorithm == OID_SIG_ED25519 => format!(
            r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(spki.subject_public_key.data.as_ref())
        ),
        _ => return None,
    };
    Some(URL_SAFE_NO_PAD.encode(Sha256::digest(json.as_bytes())))
}

/// A key file, watched, when configured.
fn watch(
    key: &'static str,
    path: Option<&Path>,
    parse: fn(&str) -> Result<Keys, String>,
) -> Result<Option<WatchedFile<Keys>>, KeyError> {
    path.map(|path| {
        WatchedFile::load(path, key, parse).map_err(|source| KeyError::File {
            key,
            path: path.to_owned(),
            source,
        })
    })
    .transpose()
}

/// `rootcertbundle`: the certificates, trust anchors of `x5c` chains, and
/// their keys under the names a `kid` may give them.
fn parse_bundle(text: &str) -> Result<Keys, String> {
    let mut keys = Keys::default();
    for pem in Pem::iter_from_buffer(text.as_bytes()) {
        let pem = pem.map_err(|e| format!("not a PEM bundle: {e}"))?;
        if pem.label != "CERTIFICATE" {
            continue;
        }
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("malformed certificate: {e}"))?;
        if let Ok(key) = decoding_key(cert.public_key()) {
            let key = Arc::new(key);
            for id in key_ids(cert.public_key()) {
                keys.by_kid.insert(id, Arc::clone(&key));
            }
        }
        keys.roots.push(pem.contents.clone());
    }
    // Taken as the operator's mistake (or a file caught mid-write): at
    // startup an error, on reload the last good keys stay.
    match keys.roots.is_empty() {
        true => Err("no certificate in the bundle".into()),
        false => Ok(keys),
    }
}

/// `jwks`: keys by their `kid`; symmetric ones and ones without a `kid`
/// are left out (and said so).
fn parse_jwks(text: &str) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Keys::default();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone().filter(|kid| !kid.is_empty()) else {
            tracing::warn!("JWKS key without kid ignored: tokens cannot name it");
            continue;
        };
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            tracing::warn!(kid, "symmetric JWKS key ignored");
            continue;
        }
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => {
                keys.by_kid.insert(kid, Arc::new(key));
            }
            Err(e) => tracing::warn!(kid, error = %e, "unusable JWKS key ignored"),
        }
    }
    match keys.by_kid.is_empty() {
        true => Err("no usable key (asymmetric, with a kid) in the JWKS".into()),
        false => Ok(keys),
    }
}

/// Verified tokens by SHA-256, at most [`MAX_CACHED_TOKENS`], each until
/// its expiry (plus leeway) and only while the keys that verified it are
/// the current ones.
#[derive(Default)]
struct TokenCache {
    entries: HashMap<[u8; 32], CachedGrant>,
    /// The keys every entry was verified with.
    keys: Option<KeyRing>,
    /// A counter standing in for time: the entry with the smallest
    /// `last_used` is the least recently used.
    clock: u64,
}

struct CachedGrant {
    grant: Arc<Grant>,
    valid_until: SystemTime,
    last_used: u64,
}

impl TokenCache {
    fn get(
        &mut self,
        fingerprint: &[u8; 32],
        keys: &KeyRing,
        now: SystemTime,
    ) -> Option<Arc<Grant>> {
        self.clock += 1;
        if !self.verified_with(keys) {
            // The keys changed: what they verified may no longer hold.
            self.entries.clear();
            self.keys = Some(keys.clone());
            return None;
        }
        let entry = self.entries.get_mut(fingerprint)?;
        if now > entry.valid_until {
            self.entries.remove(fingerprint);
            return None;
        }
        entry.last_used = self.clock;
        Some(Arc::clone(&entry.grant))
    }

    fn insert(
        &mut self,
        fingerprint: [u8; 32],
        grant: Arc<Grant>,
        keys: &KeyRing,
        valid_until: SystemTime,
        now: SystemTime,
    ) {
        // Verified with keys replaced meanwhile: not remembered.
        if !self.verified_with(keys) {
            return;
        }
        if self.entries.len() >= MAX_CACHED_TOKENS && !self.entries.contains_key(&fingerprint) {
            self.make_room(now);
        }
        self.clock += 1;
        self.entries.insert(
            fingerprint,
            CachedGrant {
                grant,
                valid_until,
                last_used: self.clock,
            },
        );
    }

    fn verified_with(&self, keys: &KeyRing) -> bool {
        self.keys
            .as_ref()
            .is_some_and(|cached| cached.same_as(keys))
    }

    /// Drops what has expired; if that frees nothing, the least recently
    /// used entry. A scan of at most [`MAX_CACHED_TOKENS`], paid only by a
    /// request that also paid for a signature check.
    fn make_room(&mut self, now: SystemTime) {
        self.entries.retain(|_, entry| now <= entry.valid_until);
        if self.entries.len() < MAX_CACHED_TOKENS {
            return;
        }
        if let Some(oldest) = self
            .entries
            .iter()
            .min_by_key(|(_, entry)| entry.last_used)
            .map(|(fingerprint, _)| *fingerprint)
        {
            self.entries.remove(&oldest);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::EncodingKey;

    /// A P-256 key and its certificate, CA or not, self-signed or issued.
    struct TestKey {
        key: rcgen::KeyPair,
        cert: rcgen::Certificate,
        params: rcgen::CertificateParams,
    }

    impl TestKey {
        fn new(name: &str, ca: bool, issuer: Option<&TestKey>) -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            if ca {
                params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }
            let cert = match issuer {
                None => params.self_signed(&key).unwrap(),
                Some(issuer) => {
                    let signer = rcgen::Issuer::from_params(&issuer.params, &issuer.key);
                    params.signed_by(&key, &signer).unwrap()
                }
            };
            Self { key, cert, params }
        }

        fn x5c(&self) -> String {
            STANDARD.encode(self.cert.der())
        }

        fn spki(&self) -> Vec<u8> {
            rcgen::PublicKeyData::subject_public_key_info(&self.key)
        }

        fn sign(&self, header: Header, claims: &serde_json::Value) -> String {
            let key = EncodingKey::from_ec_der(&self.key.serialize_der());
            jsonwebtoken::encode(&header, claims, &key).unwrap()
        }

        fn sign_x5c(&self, chain: &[&TestKey], claims: &serde_json::Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.x5c = Some(chain.iter().map(|k| k.x5c()).collect());
            self.sign(header, claims)
        }

        fn sign_kid(&self, kid: &str, claims: &serde_json::Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(kid.to_owned());
            self.sign(header, claims)
        }
    }

    fn claims_with_id(id: u64) -> serde_json::Value {
        let mut claims = claims();
        claims["jti"] = serde_json::json!(id);
        claims
    }

    fn claims() -> serde_json::Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        serde_json::json!({
            "iss": "issuer", "sub": "alice", "aud": ["other", "registry"],
            "exp": now + 300, "nbf": now - 10,
            "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}],
            "groups": ["dev", 7, "ops"],
        })
    }

    fn config(dir: &Path, bundle: &[&TestKey]) -> TokenConfig {
        let path = dir.join("bundle.pem");
        let pem: String = bundle.iter().map(|k| k.cert.pem()).collect();
        std::fs::write(&path, pem).unwrap();
        TokenConfig {
            realm: "https://auth.example/token".into(),
            service: "registry".into(),
            issuer: "issuer".into(),
            root_cert_bundle: Some(path),
            jwks: None,
            auto_redirect_path: None,
            signing_algorithms: Vec::new(),
            groups_claim: None,
        }
    }

    fn accepts(auth: &TokenAuth, token: &str) -> bool {
        let header = format!("Bearer {token}");
        auth.authorize(Some(header.as_bytes()), Some(&Scope::pull("team/app")))
            .is_ok()
    }

    /// Certificates with one name, each a candidate issuer of the others
    /// and of itself, none leading to a root: refused once the signature
    /// budget is spent, not after one check per candidate per step (63).
    #[test]
    fn a_chain_of_look_alike_issuers_costs_at_most_the_signature_budget() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestKey::new("root", true, None);
        let look_alikes: Vec<TestKey> = (1..MAX_CHAIN_LENGTH)
            .map(|_| TestKey::new("mid", true, None))
            .collect();
        let leaf = TestKey::new("leaf", false, look_alikes.last());
        let chain: Vec<String> = std::iter::once(&leaf)
            .chain(&look_alikes)
            .map(TestKey::x5c)
            .collect();
        let auth = TokenAuth::load(&config(dir.path(), &[&root])).unwrap();
        let refused = auth.current_keys().verify_chain(&chain, SystemTime::now());
        assert_eq!(
            refused.err(),
            Some("x5c chain needs too many signature checks")
        );
    }

    /// A remembered token is answered without waiting for a check; a new
    /// one waits while [`CONCURRENT_CHECKS`] checks run.
    #[tokio::test]
    async fn requests_check_new_tokens_a_few_at_a_time() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let key = TestKey::new("key", false, None);
        let auth = Arc::new(TokenAuth::load(&config(dir.path(), &[&key])).unwrap());
        let bearer = |claims| format!("Bearer {}", key.sign_x5c(&[&key], &claims));
        let (known, new) = (bearer(claims()), bearer(claims_with_id(1)));
        let check = |header: &str| {
            let auth = Arc::clone(&auth);
            let header = header.to_owned();
            async move { auth.check(Some(header.as_bytes()), None).await }
        };
        assert!(check(&known).await.is_ok());
        let running = auth
            .checks
            .acquire_many(CONCURRENT_CHECKS as u32)
            .await
            .unwrap();
        assert!(check(&known).now_or_never().expect("no wait").is_ok());
        let waiting = tokio::spawn(check(&new));
        // Unbounded, a P-256 check would have verified (and remembered)
        // the new token long before this.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let new_token = new.strip_prefix("Bearer ").unwrap();
        let (fingerprint, keys) = auth.lookup_key(new_token).unwrap();
        assert!(
            auth.cached(&fingerprint, &keys).is_none(),
            "checked past the bound"
        );
        drop(running);
        assert!(waiting.await.unwrap().is_ok());
    }

    #[test]
    fn an_x5c_chain_through_an_intermediate_to_a_bundle_root_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let root = TestKey::new("root", true, None);
        let intermediate = TestKey::new("intermediate", true, Some(&root));
        let leaf = TestKey::new("leaf", false, Some(&intermediate));
        let auth = TokenAuth::load(&config(dir.path(), &[&root])).unwrap();

        assert!(accepts(
            &auth,
            &leaf.sign_x5c(&[&leaf, &intermediate], &claims())
        ));
        assert!(
            !accepts(&auth, &leaf.sign_x5c(&[&leaf], &claims())),
            "the intermediate is missing"
        );
        let not_ca = TestKey::new("not-ca", false, Some(&root));
        let below_not_ca = TestKey::new("leaf2", false, Some(&not_ca));
        assert!(
            !accepts(
                &auth,
                &below_not_ca.sign_x5c(&[&below_not_ca, &not_ca], &claims())
            ),
            "only a CA may issue"
        );
        let stranger = TestKey::new("stranger", true, None);
        assert!(!accepts(&auth, &stranger.sign_x5c(&[&stranger], &claims())));
    }

    #[test]
    fn a_kid_names_bundle_keys_by_fingerprint_and_jwks_keys_by_their_kid() {
        let dir = tempfile::tempdir().unwrap();
        let bundled = TestKey::new("bundled", false, None);
        let in_jwks = TestKey::new("jwks", false, None);
        let mut config = config(dir.path(), &[&bundled]);
        let point = in_jwks.key.public_key_raw();
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "jwks-key", "use": "sig",
             "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])},
            {"kty": "oct", "kid": "shared-secret", "k": "c2VjcmV0"},
        ]});
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, jwks.to_string()).unwrap();
        config.jwks = Some(jwks_path);
        let auth = TokenAuth::load(&config).unwrap();

        let (_, cert) = X509Certificate::from_der(bundled.cert.der()).unwrap();
        let ids = key_ids(cert.public_key());
        assert_eq!(ids.len(), 2, "libtrust fingerprint and RFC 7638 thumbprint");
        assert_eq!(ids[0], libtrust_key_id(&bundled.spki()));
        assert_eq!(ids[0].len(), 59, "twelve groups of four: {}", ids[0]);
        for id in &ids {
            assert!(accepts(&auth, &bundled.sign_kid(id, &claims())), "{id}");
        }
        assert!(accepts(&auth, &in_jwks.sign_kid("jwks-key", &claims())));
        assert!(!accepts(&auth, &in_jwks.sign_kid(&ids[0], &claims())));
        assert!(!accepts(&auth, &bundled.sign_kid("unknown", &claims())));
        assert!(!accepts(
            &auth,
            &bundled.sign(Header::new(Algorithm::ES256), &claims())
        ));
    }

    #[test]
    fn neither_none_nor_hmac_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let key = TestKey::new("key", false, None);
        let auth = TokenAuth::load(&config(dir.path(), &[&key])).unwrap();
        let claims = claims();
        // The classic confusion: the public certificate used as an HMAC secret.
        let mut header = Header::new(Algorithm::HS256);
        header.x5c = Some(vec![key.x5c()]);
        let hmac = EncodingKey::from_secret(key.cert.der()).unwrap();
        let token = jsonwebtoken::encode(&header, &claims, &hmac).unwrap();
        assert!(!accepts(&auth, &token));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","x5c":["{}"]}}"#, key.x5c())),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        assert!(!accepts(&auth, &none));
        assert!(accepted_algorithms(&["HS256".into()]).is_err());
        assert!(accepted_algorithms(&["none".into()]).is_err());

        let mut only_rsa = config(dir.path(), &[&key]);
        only_rsa.signing_algorithms = vec!["RS256".into()];
        let auth = TokenAuth::load(&only_rsa).unwrap();
        assert!(!accepts(&auth, &key.sign_x5c(&[&key], &claims)));
    }

    #[test]
    fn grants_carry_subject_groups_and_access_and_scopes_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let key = TestKey::new("key", false, None);
        let mut config = config(dir.path(), &[&key]);
        config.groups_claim = Some("groups".into());
        let auth = TokenAuth::load(&config).unwrap();
        let header = format!("Bearer {}", key.sign_x5c(&[&key], &claims()));
        let grant = auth.authorize(Some(header.as_bytes()), None).unwrap();
        assert_eq!(grant.subject, "alice");
        assert_eq!(grant.groups, ["dev", "ops"]);
        assert!(grant.allows(&Scope::pull("team/app")));
        assert!(!grant.allows(&Scope::pull("team/app/sub")));
        assert!(!grant.allows(&Scope::pull("team")));
        assert!(!grant.allows(&Scope::catalog()));
        let refused = |scope: Scope| auth.authorize(Some(header.as_bytes()), Some(&scope));
        assert_eq!(
            refused(Scope::catalog()).unwrap_err(),
            Rejection::InsufficientScope
        );
        assert_eq!(
            auth.authorize(None, None).unwrap_err(),
            Rejection::TokenRequired
        );
        assert_eq!(
            auth.challenge(
                Some(&Scope::pull("team/app")),
                Rejection::InsufficientScope,
                HostSeen::default()
            ),
            r#"Bearer realm="https://auth.example/token",service="registry",scope="repository:team/app:pull",error="insufficient_scope""#
        );
    }

    #[test]
    fn autoredirect_puts_the_realm_on_the_requested_host() {
        let dir = tempfile::tempdir().unwrap();
        let key = TestKey::new("key", false, None);
        let mut config = config(dir.path(), &[&key]);
        config.auto_redirect_path = Some("/auth/token".into());
        let auth = TokenAuth::load(&config).unwrap();
        let host = HostSeen {
            host: Some("kura.example:5000"),
            forwarded_proto: Some("http"),
        };
        assert_eq!(
            auth.challenge(None, Rejection::TokenRequired, host),
            r#"Bearer realm="http://kura.example:5000/auth/token",service="registry""#
        );
    }

    #[test]
    fn keys_reload_when_the_bundle_changes_and_old_grants_go_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let old = TestKey::new("old", false, None);
        let new = TestKey::new("new", false, None);
        let config = config(dir.path(), &[&old]);
        let auth = TokenAuth::load(&config).unwrap();
        let old_token = old.sign_x5c(&[&old], &claims());
        assert!(accepts(&auth, &old_token));

        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(config.root_cert_bundle.as_ref().unwrap(), new.cert.pem()).unwrap();
        auth.bundle.as_ref().unwrap().recheck_now();
        assert!(!accepts(&auth, &old_token), "cached grant of a removed key");
        assert!(accepts(&auth, &new.sign_x5c(&[&new], &claims())));

        std::fs::write(config.root_cert_bundle.as_ref().unwrap(), "not pem").unwrap();
        auth.bundle.as_ref().unwrap().recheck_now();
        assert!(
            accepts(&auth, &new.sign_x5c(&[&new], &claims())),
            "a broken file keeps the last good keys"
        );
    }

    #[test]
    fn the_token_cache_stays_bounded_and_keeps_what_is_in_use() {
        let mut cache = TokenCache::default();
        let keys = KeyRing {
            files: vec![Arc::new(Keys::default())],
        };
        let now = SystemTime::now();
        let later = now + Duration::from_secs(600);
        let grant = Arc::new(Grant {
            subject: String::new(),
            groups: Vec::new(),
            access: Vec::new(),
        });
        let fingerprint = |i: usize| -> [u8; 32] { Sha256::digest(i.to_le_bytes()).into() };
        let kept = fingerprint(usize::MAX);
        assert!(cache.get(&kept, &keys, now).is_none());
        cache.insert(kept, Arc::clone(&grant), &keys, later, now);
        for i in 0..10 * MAX_CACHED_TOKENS {
            cache.insert(fingerprint(i), Arc::clone(&grant), &keys, later, now);
            assert!(
                cache.get(&kept, &keys, now).is_some(),
                "in use, so never evicted"
            );
            assert!(cache.len() <= MAX_CACHED_TOKENS);
        }
        assert_eq!(cache.len(), MAX_CACHED_TOKENS);
        assert!(
            cache
                .get(&kept, &keys, later + Duration::from_secs(1))
                .is_none(),
            "never past its expiry"
        );
        let reloaded = KeyRing {
            files: vec![Arc::new(Keys::default())],
        };
        assert!(
            cache.get(&fingerprint(1), &reloaded, now).is_none(),
            "never under other keys"
        );
        assert_eq!(cache.len(), 0);
        cache.insert(kept, grant, &keys, later, now);
        assert_eq!(
            cache.len(),
            0,
            "verified with replaced keys: not remembered"
        );
    }

    /// Twice as many distinct valid tokens as the cache holds, and as
    /// many refused ones: the cache stays at its bound, refusals leave nothing.
    #[test]
    fn a_storm_of_distinct_tokens_leaves_the_cache_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let key = TestKey::new("key", false, None);
        let auth = TokenAuth::load(&config(dir.path(), &[&key])).unwrap();
        for i in 0..2 * MAX_CACHED_TOKENS {
            let mut claims = claims();
            claims["jti"] = serde_json::json!(i);
            assert!(accepts(&auth, &key.sign_x5c(&[&key], &claims)));
            assert!(!accepts(&auth, &format!("{i}.not.valid")));
        }
        assert_eq!(auth.lock_cache().len(), MAX_CACHED_TOKENS);
    }

    #[test]
    fn oversized_and_odd_authorization_headers_are_refused_without_panic() {
        let dir = tempfile::tempdir().unwrap();
        let key = TestKey::new("key", false, None);
        let auth = TokenAuth::load(&config(dir.path(), &[&key])).unwrap();
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        for header in [
            &long[..],
            "Bearer",
            "Bearer ",
            "bearer a.b.c",
            "Bearer ..",
            "\u{0}",
        ] {
            assert!(
                auth.authorize(Some(header.as_bytes()), None).is_err(),
                "{header:?}"
            );
        }
        assert!(auth.authorize(Some(&[0xff, 0x20, 0x41]), None).is_err());
    }

    #[test]
    fn base32_matches_rfc_4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
    }
}
