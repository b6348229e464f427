//! A tiny Docker token server (the `realm` of Distribution's `auth.token`), on 127.0.0.1.
//!
//! `GET /token?service=..&scope=..` answers `{"token", "access_token", "expires_in"}` with an ES256
//! JWT whose `x5c` header carries the self-signed certificate that Distribution trusts through its
//! `rootcertbundle`. Every repository scope is granted `pull` and `push`, so tests can seed images
//! with the same credentials a client would pull with.
//!
//! [`TokenIssuer::mint`] makes tokens to order ([`TokenSpec`]: lifetime, issuer, audience, access,
//! signing key), for tests of how a registry judges them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::server::BackgroundServer;

/// The `iss` claim; Distribution's `auth.token.issuer` must match it.
pub const ISSUER: &str = "kura-test-token-issuer";
/// The `service` Distribution announces in its challenge (and the `aud` claim).
pub const SERVICE: &str = "kura-test-registry";
/// Token lifetime used when none is given.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

struct SigningKey {
    encoding: EncodingKey,
    cert_der_base64: String,
    cert_pem: String,
    /// DER SubjectPublicKeyInfo, for the key's libtrust `kid`.
    spki_der: Vec<u8>,
}

fn new_signing_key() -> SigningKey {
    let key = rcgen::KeyPair::generate().expect("generate P-256 key");
    let mut params =
        rcgen::CertificateParams::new(vec![ISSUER.to_owned()]).expect("certificate params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ISSUER);
    let cert = params.self_signed(&key).expect("self-sign certificate");
    SigningKey {
        encoding: EncodingKey::from_ec_der(&key.serialize_der()),
        cert_der_base64: STANDARD.encode(cert.der()),
        cert_pem: cert.pem(),
        spki_der: rcgen::PublicKeyData::subject_public_key_info(&key),
    }
}

struct IssuerState {
    credentials: Option<(String, String)>,
    key: SigningKey,
    lifetime: Duration,
    issued: AtomicUsize,
    denied: AtomicUsize,
}

/// The token server; stops on drop.
pub struct TokenIssuer {
    server: BackgroundServer,
    state: Arc<IssuerState>,
}

impl TokenIssuer {
    /// Starts the issuer. With `credentials`, a token request must carry exactly those HTTP Basic
    /// credentials (401 otherwise); without, anyone gets a token.
    pub fn start(credentials: Option<(&str, &str)>, lifetime: Duration) -> Self {
        let state = Arc::new(IssuerState {
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            key: new_signing_key(),
            lifetime,
            issued: AtomicUsize::new(0),
            denied: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/token", get(issue_token))
            .with_state(Arc::clone(&state));
        let server = BackgroundServer::spawn("token-issuer", move |listener| async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { server, state }
    }

    /// The URL to put in Distribution's `auth.token.realm`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.server.addr())
    }

    /// PEM of the certificate for Distribution's `rootcertbundle`.
    pub fn cert_pem(&self) -> &str {
        &self.state.key.cert_pem
    }

    /// Tokens handed out so far.
    pub fn tokens_issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// Token requests refused (missing or wrong credentials) so far.
    pub fn requests_denied(&self) -> usize {
        self.state.denied.load(Ordering::SeqCst)
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// A token as `spec` describes it, signed as `spec.signing` says.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        let claims = spec.claims();
        match spec.signing {
            Signing::Trusted => sign_with(&self.state.key, x5c_header(&self.state.key), &claims),
            Signing::KeyId => {
                let mut header = Header::new(Algorithm::ES256);
                header.kid = Some(kura::auth::token::libtrust_key_id(&self.state.key.spki_der));
                sign_with(&self.state.key, header, &claims)
            }
            Signing::UntrustedKey => {
                let stranger = new_signing_key();
                sign_with(&stranger, x5c_header(&stranger), &claims)
            }
            Signing::ForgedChain => {
                let stranger = new_signing_key();
                sign_with(&stranger, x5c_header(&self.state.key), &claims)
            }
            Signing::None => {
                let header = serde_json::json!({
                    "alg": "none",
                    "typ": "JWT",
                    "x5c": [self.state.key.cert_der_base64],
                });
                let encode = |value: &serde_json::Value| URL_SAFE_NO_PAD.encode(value.to_string());
                format!(
                    "{}.{}.",
                    encode(&header),
                    encode(&serde_json::to_value(&claims).expect("claims"))
                )
            }
        }
    }
}

/// How [`TokenIssuer::mint`] signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signing {
    /// The issuer's key, its certificate in `x5c` (what the issuer hands out).
    Trusted,
    /// The issuer's key, named only by its libtrust `kid` (no `x5c`).
    KeyId,
    /// A key of nobody's bundle, its own certificate in `x5c`.
    UntrustedKey,
    /// The issuer's certificate in `x5c`, but signed by another key.
    ForgedChain,
    /// `alg: none`, no signature.
    None,
}

/// What a minted token says.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub issuer: String,
    pub audience: String,
    pub subject: String,
    /// `exp` in seconds from now (negative: in the past).
    pub expires_in: i64,
    /// `nbf` in seconds from now.
    pub not_before: i64,
    pub access: Vec<Access>,
    pub signing: Signing,
}

impl TokenSpec {
    /// What the issuer would hand `subject` for `access`: valid for five minutes.
    pub fn granting(subject: &str, access: Vec<Access>) -> Self {
        Self {
            issuer: ISSUER.to_owned(),
            audience: SERVICE.to_owned(),
            subject: subject.to_owned(),
            expires_in: DEFAULT_LIFETIME.as_secs() as i64,
            not_before: -10,
            access,
            signing: Signing::Trusted,
        }
    }

    fn claims(&self) -> Claims {
        let now = unix_now() as i64;
        Claims {
            iss: self.issuer.clone(),
            sub: self.subject.clone(),
            aud: self.audience.clone(),
            exp: now + self.expires_in,
            nbf: now + self.not_before,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            access: self.access.clone(),
        }
    }
}

/// One entry of an `access` claim: `access("repository", "library/alpine", &["pull"])`.
pub fn access(kind: &str, name: &str, actions: &[&str]) -> Access {
    Access {
        kind: kind.to_owned(),
        name: name.to_owned(),
        actions: actions.iter().map(|a| (*a).to_owned()).collect(),
    }
}

async fn issue_token(
    State(state): State<Arc<IssuerState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(subject) = authenticate(&state, &headers) else {
        state.denied.fetch_add(1, Ordering::SeqCst);
        return unauthorized();
    };
    let request = TokenRequest::parse(query.as_deref().unwrap_or(""));
    let token = sign(&state, &subject, &request);
    state.issued.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": state.lifetime.as_secs(),
        "issued_at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"kura-test-token-issuer\""),
        )],
        "credentials required",
    )
        .into_response()
}

/// The subject to put in the token, or `None` when the request is not allowed one.
fn authenticate(state: &IssuerState, headers: &HeaderMap) -> Option<String> {
    let given = basic_credentials(headers);
    match (&state.credentials, given) {
        (None, Some((user, _))) => Some(user),
        (None, None) => Some(String::new()),
        (Some(expected), Some(given)) if *expected == given => Some(given.0),
        (Some(_), _) => None,
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// The parts of a token request that shape the token.
struct TokenRequest {
    service: String,
    scopes: Vec<String>,
}

impl TokenRequest {
    fn parse(query: &str) -> Self {
        let url = reqwest::Url::parse(&format!("http://issuer/token?{query}")).expect("query");
        let mut request = Self {
            service: SERVICE.to_owned(),
            scopes: Vec::new(),
        };
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "service" => request.service = value.into_owned(),
                "scope" => request.scopes.extend(
                    value
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                ),
                _ => {}
            }
        }
        request
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

/// `repository:NAME:pull,push` → access entry granting pull and push (any other type: as asked).
fn access_for_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions = if kind == "repository" {
        vec!["pull".to_owned(), "push".to_owned()]
    } else {
        actions.split(',').map(str::to_owned).collect()
    };
    Some(Access {
        kind: kind.to_owned(),
        name: name.to_owned(),
        actions,
    })
}

#[derive(Serialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: i64,
    nbf: i64,
    iat: i64,
    jti: String,
    access: Vec<Access>,
}

fn sign(state: &IssuerState, subject: &str, request: &TokenRequest) -> String {
    let now = unix_now();
    let claims = Claims {
        iss: ISSUER.to_owned(),
        sub: subject.to_owned(),
        aud: request.service.clone(),
        exp: (now + state.lifetime.as_secs()) as i64,
        nbf: now.saturating_sub(10) as i64,
        iat: now as i64,
        jti: uuid::Uuid::new_v4().to_string(),
        access: request
            .scopes
            .iter()
            .filter_map(|s| access_for_scope(s))
            .collect(),
    };
    sign_with(&state.key, x5c_header(&state.key), &claims)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// ES256 with `key`'s certificate as the whole `x5c` chain.
fn x5c_header(key: &SigningKey) -> Header {
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some("JWT".to_owned());
    header.x5c = Some(vec![key.cert_der_base64.clone()]);
    header
}

fn sign_with(key: &SigningKey, header: Header, claims: &Claims) -> String {
    jsonwebtoken::encode(&header, claims, &key.encoding).expect("sign JWT")
}
