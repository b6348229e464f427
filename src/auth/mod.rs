//! Who a client is and what it may pull: the one gate in front of content.
//!
//! - Identity is established in [`Gate::identify`], once per request,
//!   before the route is looked at: anonymous (no `Authorization`, or the
//!   empty Basic credentials clients without any send after a challenge),
//!   or a user whose Basic credentials the htpasswd file ([`htpasswd`])
//!   accepts, with the groups of the groups file ([`groups`]). Wrong
//!   credentials are a 401, never a fallback to anonymous. With
//!   `auth.token` ([`token`]) instead, a valid Bearer token is required and
//!   its subject is the user, with the groups of its groups claim and of
//!   the groups file; the token's own `access` claim is enforced before
//!   the gate, as Distribution enforces it (`api::token_gate`), so
//!   access rules can only narrow what a token grants.
//! - Authorization is decided in [`Gate::may_pull`], for a repository
//!   named `<registry>/<repository>` as the access rules name it
//!   ([`rules`]); [`Gate::authorize`] turns a refusal into the answer (401
//!   with the challenge for an anonymous client, so it logs in; 403
//!   `DENIED` for a user). Every content route asks it; `_catalog` filters
//!   by it; blobs are further scoped to repositories that hold them
//!   ([`blob_scope`]).
//!
//! Without access rules, behaviour is Distribution's: with `auth.htpasswd`
//! any logged-in user pulls everything, without it everyone does.
//! The htpasswd, rules and groups files are re-read when they change
//! ([`watched`]).

pub mod blob_scope;
pub mod groups;
pub mod htpasswd;
pub mod rules;
pub mod token;
pub mod watched;

use std::io;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;

use crate::api::error::{ApiError, ErrorCode};
use crate::cache::Cache;
use crate::config::{AccessConfig, Config};
use crate::reference::{Digest, RepoName};
use crate::routing::Registries;
use blob_scope::BlobScope;
use groups::Groups;
use htpasswd::Htpasswd;
use rules::Rules;
use token::{Grant, Scope, TokenAuth};
use watched::WatchedFile;

/// Who sent a request: plain data, whoever established it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// `None`: anonymous.
    pub user: Option<String>,
    pub groups: Vec<String>,
}

impl Identity {
    pub fn anonymous() -> Self {
        Self::default()
    }
}

/// The access rules and the groups they may name, each file reloaded on
/// change.
struct Access {
    rules: WatchedFile<Rules>,
    groups: Option<WatchedFile<Groups>>,
}

pub struct Gate {
    htpasswd: Option<Htpasswd>,
    token: Option<Arc<TokenAuth>>,
    access: Option<Access>,
    blob_scope: BlobScope,
}

impl Gate {
    /// Reads the configured files; an unreadable or invalid one is a
    /// startup error naming its key.
    pub fn load(config: &Config) -> io::Result<Self> {
        let htpasswd = config
            .htpasswd
            .as_ref()
            .map(|auth| {
                Htpasswd::load(auth).map_err(|e| keyed("auth.htpasswd.path", &auth.path, e))
            })
            .transpose()?;
        let token = config
            .token
            .as_ref()
            .map(|token| {
                TokenAuth::load(token)
                    .map(Arc::new)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
            })
            .transpose()?;
        let access = config.access.as_ref().map(Access::load).transpose()?;
        Ok(Self {
            htpasswd,
            token,
            access,
            blob_scope: BlobScope::default(),
        })
    }

    /// No authentication and no rules: every request is let through.
    pub fn open() -> Self {
        Self {
            htpasswd: None,
            token: None,
            access: None,
            blob_scope: BlobScope::default(),
        }
    }

    /// Whether clients can log in at all (and so are asked to).
    fn logins(&self) -> bool {
        self.htpasswd.is_some()
    }

    /// The client's identity from its `Authorization` header; 401 for
    /// credentials that are wrong (or that Kura cannot check).
    pub async fn identify(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        if let Some(token) = &self.token {
            return self.token_identity(token, headers, None).await;
        }
        let Some(htpasswd) = &self.htpasswd else {
            // Nothing to log in to: whatever a client sends (Docker sends
            // its Hub credentials to mirrors) is ignored.
            return Ok(Identity::anonymous());
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Identity::anonymous());
        };
        match basic_credentials(value) {
            Some((user, password)) if user.is_empty() && password.is_empty() => {
                Ok(Identity::anonymous())
            }
            Some((user, password)) if htpasswd.verify(&user, &password).await => {
                let groups = self.groups_of(&user);
                Ok(Identity {
                    user: Some(user),
                    groups,
                })
            }
            _ => Err(unauthenticated()),
        }
    }

    /// The identity a valid Bearer token speaks for; without one, 401 (the
    /// registry API has answered with the challenge already; this is for
    /// pages beside it, which a browser cannot reach with a token).
    async fn token_identity(
        &self,
        token: &Arc<TokenAuth>,
        headers: &HeaderMap,
        needed: Option<&Scope>,
    ) -> Result<Identity, ApiError> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let grant = token
            .check(authorization, needed)
            .await
            .map_err(|_| unauthenticated())?;
        Ok(self.token_holder(&grant))
    }

    /// Who a token checked already speaks for: its subject (an empty one:
    /// anonymous), with the groups of its groups claim and of the groups
    /// file.
    pub fn token_holder(&self, grant: &Grant) -> Identity {
        let user = (!grant.subject.is_empty()).then(|| grant.subject.clone());
        let mut groups = grant.groups.clone();
        if let Some(user) = &user {
            groups.extend(self.groups_of(user));
        }
        groups.sort();
        groups.dedup();
        Identity { user, groups }
    }

    /// [`Self::identify`] for pages that list repositories (the dashboard,
    /// the warming status): with `auth.token`, the token must grant what
    /// `/v2/_catalog` needs, `registry:catalog:*` (any valid token lets a
    /// client in, but one that grants a single repository must not list
    /// them all). Rules then narrow the listing as for anyone.
    pub async fn identify_for_listing(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        match &self.token {
            Some(token) => {
                self.token_identity(token, headers, Some(&Scope::catalog()))
                    .await
            }
            None => self.identify(headers).await,
        }
    }

    /// `auth.token`'s checker, for the registry API's token gate.
    pub fn token(&self) -> Option<&Arc<TokenAuth>> {
        self.token.as_ref()
    }

    fn groups_of(&self, user: &str) -> Vec<String> {
        let groups = self.access.as_ref().and_then(|a| a.groups.as_ref());
        groups.map_or_else(Vec::new, |groups| groups.current().of(user))
    }

    /// THE authorization decision: whether `identity` may pull
    /// `repository`, named `<registry>/<repository>` as access rules name
    /// it ([`Cache::rule_name`]).
    pub fn may_pull(&self, identity: &Identity, repository: &str) -> bool {
        match &self.access {
            Some(access) => access.rules.current().may_pull(identity, repository),
            None => identity.user.is_some() || !self.logins(),
        }
    }

    /// Whether a listing (`_catalog`, the dashboard) shows a stored
    /// repository (`ghcr.io/org/app`) to this client: routed as a request
    /// for it would be, then [`Self::may_pull`] and the upstream's content
    /// policy (which refuses its content to everyone).
    pub fn may_see(&self, registries: &Registries, identity: &Identity, name: &str) -> bool {
        let Ok(routed) = registries.route(name, None) else {
            return false;
        };
        RepoName::parse(routed.name).is_some_and(|repo| {
            routed.cache.admits(&repo, None)
                && self.may_pull(identity, &routed.cache.rule_name(&repo))
        })
    }

    /// [`Self::may_pull`] for a routed repository, as the client's answer:
    /// 401 (log in) for an anonymous client, 403 `DENIED` for a user. The
    /// message names neither the rule nor any repository.
    pub fn authorize(
        &self,
        identity: &Identity,
        cache: &Cache,
        name: &RepoName,
    ) -> Result<(), ApiError> {
        match self.may_pull(identity, &cache.rule_name(name)) {
            true => Ok(()),
            false if identity.user.is_none() && self.logins() => Err(unauthenticated()),
            false => Err(ApiError::new(
                ErrorCode::Denied,
                "requested access to the resource is denied",
            )),
        }
    }

    /// [`Self::may_pull`] for a repository of `cache` named as the
    /// upstream's own (`team/app`), as views beside the API (downloads in
    /// flight, warming jobs) hold it; an invalid name is nobody's.
    pub fn may_pull_in(&self, identity: &Identity, cache: &Cache, repository: &str) -> bool {
        RepoName::parse(repository)
            .is_some_and(|repo| self.may_pull(identity, &cache.rule_name(&repo)))
    }

    /// For `/v2/` itself: a client that can log in is asked to, so that
    /// clients which only send credentials when challenged (podman,
    /// skopeo) send them.
    pub fn check_base(&self, identity: &Identity) -> Result<(), ApiError> {
        match identity.user.is_none() && self.logins() {
            true => Err(unauthenticated()),
            false => Ok(()),
        }
    }

    /// For routes that name no repository (`_catalog`, refused pushes): a
    /// client anonymous users could not pull anything through is asked to
    /// log in.
    pub fn admit(&self, identity: &Identity) -> Result<(), ApiError> {
        let anonymous_pulls = self
            .access
            .as_ref()
            .is_some_and(|a| a.rules.current().grant_anonymous());
        match identity.user.is_none() && self.logins() && !anonymous_pulls {
            true => Err(unauthenticated()),
            false => Ok(()),
        }
    }

    /// With access rules, a blob is served only in a repository that holds
    /// it ([`blob_scope`]); without them every blob is everyone's.
    pub async fn scope_blob(
        &self,
        cache: &Arc<Cache>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<(), ApiError> {
        if self.access.is_none() {
            return Ok(());
        }
        let rule_name = cache.rule_name(name);
        self.blob_scope.check(cache, &rule_name, name, digest).await
    }

    /// The `WWW-Authenticate` header every 401 of Kura carries.
    pub fn challenge(&self) -> Option<HeaderValue> {
        let realm = &self.htpasswd.as_ref()?.realm;
        HeaderValue::from_str(&format!("Basic realm=\"{}\"", realm.replace('"', ""))).ok()
    }
}

impl Access {
    fn load(config: &AccessConfig) -> io::Result<Self> {
        let rules = WatchedFile::load(&config.rules_path, "access rules", Rules::parse)
            .map_err(|e| keyed("auth.rules.path", &config.rules_path, e))?;
        let groups = config
            .groups_path
            .as_ref()
            .map(|path| {
                WatchedFile::load(path, "groups", Groups::parse)
                    .map_err(|e| keyed("auth.groups.path", path, e))
            })
            .transpose()?;
        Ok(Self { rules, groups })
    }
}

fn keyed(key: &str, path: &std::path::Path, error: io::Error) -> io::Error {
    let message = format!("{key}: cannot read {}: {error}", path.display());
    io::Error::new(error.kind(), message)
}

fn unauthenticated() -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, "authentication required")
}

fn basic_credentials(header: &HeaderValue) -> Option<(String, String)> {
    let value = header.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let pair = String::from_utf8(decoded).ok()?;
    let (user, password) = pair.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}
