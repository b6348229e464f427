//! Upstream authentication: anonymous, HTTP Basic, and the registry Bearer
//! token flow driven by `WWW-Authenticate` (realm/service/scope).
//!
//! Tokens are cached per scope until shortly before they expire, and once
//! the upstream's scheme is known, requests carry credentials up front
//! instead of paying a 401 round trip each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Url;
use reqwest::header::HeaderValue;
use serde::Deserialize;

use super::UpstreamError;
use crate::config::Secret;
use crate::metrics::{UpstreamLabels, metrics};
use crate::singleflight::Flights;

/// Distribution's documented default when a token response has no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest a token is kept, whatever the service says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Renew this long before expiry so a token never dies in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Tokens kept at most (one per repository scope): a client naming
/// endless repositories must not grow the cache without bound.
const MAX_CACHED_TOKENS: usize = 1024;

#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    fn basic_header(&self) -> HeaderValue {
        let raw = format!("{}:{}", self.username, self.password.expose());
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        sensitive(format!("Basic {encoded}"))
    }
}

/// What the upstream asked for in its last challenge.
#[derive(Debug, Clone)]
pub enum Scheme {
    Basic,
    Bearer { realm: Url, service: Option<String> },
}

struct CachedToken {
    header: HeaderValue,
    renew_at: Instant,
    last_used: Instant,
}

/// Tokens by scope: at most [`MAX_CACHED_TOKENS`], expired ones dropped
/// first, then the least recently used.
#[derive(Default)]
struct TokenCache(HashMap<String, CachedToken>);

impl TokenCache {
    fn get(&mut self, scope: &str) -> Option<HeaderValue> {
        let now = Instant::now();
        let token = self.0.get_mut(scope).filter(|t| now < t.renew_at)?;
        token.last_used = now;
        Some(token.header.clone())
    }

    fn insert(&mut self, scope: &str, header: HeaderValue, renew_at: Instant) {
        if self.0.len() >= MAX_CACHED_TOKENS && !self.0.contains_key(scope) {
            self.make_room();
        }
        let last_used = Instant::now();
        self.0.insert(
            scope.to_owned(),
            CachedToken {
                header,
                renew_at,
                last_used,
            },
        );
    }

    /// Drops every expired token, or if none is, the least recently used.
    fn make_room(&mut self) {
        let now = Instant::now();
        self.0.retain(|_, token| now < token.renew_at);
        if self.0.len() < MAX_CACHED_TOKENS {
            return;
        }
        let oldest = self
            .0
            .iter()
            .min_by_key(|(_, token)| token.last_used)
            .map(|(scope, _)| scope.clone());
        if let Some(scope) = oldest {
            self.0.remove(&scope);
        }
    }

    fn remove(&mut self, scope: &str) {
        self.0.remove(scope);
    }
}

pub struct Authenticator {
    tokens: Arc<TokenService>,
    scheme: Mutex<Option<Scheme>>,
    /// One token fetch per scope at a time: a rollout's first requests for
    /// one repository all need the same token, and a token service (Docker
    /// Hub's among them) rate-limits.
    fetches: Flights<String, Result<HeaderValue, UpstreamError>>,
}

/// Where tokens come from and are kept.
struct TokenService {
    http: reqwest::Client,
    /// The upstream's label, for metrics.
    label: String,
    credentials: Option<Credentials>,
    timeout: Duration,
    cache: Mutex<TokenCache>,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl Authenticator {
    pub fn new(
        http: reqwest::Client,
        credentials: Option<Credentials>,
        token_timeout: Duration,
        label: String,
    ) -> Self {
        Self {
            tokens: Arc::new(TokenService {
                http,
                label,
                credentials,
                timeout: token_timeout,
                cache: Mutex::default(),
            }),
            scheme: Mutex::new(None),
            // The request's own timeout, plus reading its (small) body.
            fetches: Flights::new(2 * token_timeout),
        }
    }

    /// The `Authorization` header for a request in `scope`, if the upstream
    /// is known to want one. May fetch a token.
    pub async fn header_for(&self, scope: &str) -> Result<Option<HeaderValue>, UpstreamError> {
        let scheme = self.scheme.lock().expect("auth lock").clone();
        match scheme {
            None => Ok(None),
            Some(Scheme::Basic) => Ok(self
                .tokens
                .credentials
                .as_ref()
                .map(Credentials::basic_header)),
            Some(Scheme::Bearer { realm, service }) => {
                if let Some(header) = self.tokens.cached(scope) {
                    return Ok(Some(header));
                }
                let tokens = Arc::clone(&self.tokens);
                let owned_scope = scope.to_owned();
                self.fetches
                    .run(scope.to_owned(), move || async move {
                        tokens.fetch(&realm, service.as_deref(), &owned_scope).await
                    })
                    .await
                    .unwrap_or_else(|| {
                        Err(UpstreamError::Unreachable("token service too slow".into()))
                    })
                    .map(Some)
            }
        }
    }

    /// Learns the scheme from a 401's `WWW-Authenticate` and drops the
    /// token that was refused. Returns whether retrying can help.
    pub fn on_challenge(&self, challenge: Option<&str>, scope: &str) -> bool {
        self.tokens.cache.lock().expect("auth lock").remove(scope);
        let Some(scheme) = challenge.and_then(parse_scheme) else {
            return false;
        };
        let retry_helps = match &scheme {
            Scheme::Basic => self.tokens.credentials.is_some(),
            Scheme::Bearer { .. } => true,
        };
        *self.scheme.lock().expect("auth lock") = Some(scheme);
        retry_helps
    }
}

impl TokenService {
    fn cached(&self, scope: &str) -> Option<HeaderValue> {
        self.cache.lock().expect("auth lock").get(scope)
    }

    async fn fetch(
        &self,
        realm: &Url,
        service: Option<&str>,
        scope: &str,
    ) -> Result<HeaderValue, UpstreamError> {
        let mut url = realm.clone();
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
        }
        metrics()
            .token_fetches
            .get_or_create(&UpstreamLabels {
                upstream: self.label.clone(),
            })
            .inc();
        let mut request = self.http.get(url).timeout(self.timeout);
        if let Some(credentials) = &self.credentials {
            request = request.header(reqwest::header::AUTHORIZATION, credentials.basic_header());
        }
        let response = request
            .send()
            .await
            .map_err(UpstreamError::from_transport)?;
        if !response.status().is_success() {
            tracing::warn!(status = response.status().as_u16(), realm = %realm, "token request refused");
            return Err(UpstreamError::from_response(response).await);
        }
        let body =
            super::read_capped(response, super::MAX_TOKEN_RESPONSE_BYTES, "token response").await?;
        let body: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Unusable(format!("unreadable token response: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| UpstreamError::Unusable("token response has no token".into()))?;
        // The service chooses `expires_in`; a day bounds it (and keeps
        // the expiry time representable).
        let lifetime = body
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .min(MAX_TOKEN_LIFETIME);
        let header = sensitive(format!("Bearer {token}"));
        self.cache.lock().expect("auth lock").insert(
            scope,
            header.clone(),
            Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN),
        );
        tracing::debug!(scope, "fetched upstream token");
        Ok(header)
    }
}

/// Parses a `WWW-Authenticate` value, picking Bearer over Basic when an
/// upstream offers both. `None` for anything unusable.
pub fn parse_scheme(header: &str) -> Option<Scheme> {
    let challenges = http_auth::parse_challenges(header).ok()?;
    let bearer = challenges
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"));
    if let Some(challenge) = bearer {
        let param = |name: &str| {
            challenge
                .params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_unescaped())
        };
        let realm = Url::parse(&param("realm")?).ok()?;
        if !matches!(realm.scheme(), "http" | "https") {
            return None;
        }
        return Some(Scheme::Bearer {
            realm,
            service: param("service"),
        });
    }
    challenges
        .iter()
        .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
        .then_some(Scheme::Basic)
}

fn sensitive(value: String) -> HeaderValue {
    let mut header = HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""));
    header.set_sensitive(true);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_bearer_challenge() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        let Some(Scheme::Bearer { realm, service }) = parse_scheme(header) else {
            panic!("expected bearer");
        };
        assert_eq!(realm.as_str(), "https://auth.docker.io/token");
        assert_eq!(service.as_deref(), Some("registry.docker.io"));
    }

    #[test]
    fn parses_basic_and_rejects_garbage() {
        assert!(matches!(
            parse_scheme(r#"Basic realm="Registry Realm""#),
            Some(Scheme::Basic)
        ));
        assert!(parse_scheme("").is_none());
        assert!(parse_scheme("Bearer").is_none());
        assert!(parse_scheme(r#"Bearer realm="file:///etc/passwd""#).is_none());
        assert!(parse_scheme("\u{0}\u{1}==,,").is_none());
    }

    #[test]
    fn the_token_cache_stays_bounded_dropping_expired_then_least_recently_used() {
        let mut cache = TokenCache::default();
        let later = Instant::now() + Duration::from_secs(3600);
        let header = || HeaderValue::from_static("Bearer t");
        cache.insert("expired", header(), Instant::now());
        cache.insert("first", header(), later);
        for i in 0..MAX_CACHED_TOKENS * 3 {
            cache.insert(&format!("repository:r{i}:pull"), header(), later);
            if i == 10 {
                assert!(cache.get("first").is_some());
            }
            assert!(cache.0.len() <= MAX_CACHED_TOKENS);
        }
        assert!(cache.get("expired").is_none());
        assert!(cache.get("first").is_none(), "least recently used went");
        let newest = format!("repository:r{}:pull", MAX_CACHED_TOKENS * 3 - 1);
        assert!(cache.get(&newest).is_some());
    }

    #[test]
    fn basic_header_is_sensitive() {
        let credentials = Credentials {
            username: "u".into(),
            password: Secret::from("p".to_owned()),
        };
        let header = credentials.basic_header();
        assert!(header.is_sensitive());
        assert_eq!(header.to_str().unwrap(), "Basic dTpw");
    }
}
