//! A minimal Docker Registry HTTP API v2 client for seeding and checking registries: follows the
//! 401 challenge (Basic, or Bearer via the token realm with scope `repository:NAME:pull,push`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode, Url};

use super::images::{ALL_MANIFEST_TYPES, sha256_digest};
use super::net::http_client;

/// Generous enough for a 256 MiB blob over loopback in a debug build.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Credentials for a registry: used as HTTP Basic, or to obtain Bearer tokens from the realm,
/// depending on the challenge the registry answers with.
#[derive(Clone, Debug)]
pub enum Auth {
    Anonymous,
    Basic { user: String, pass: String },
}

impl Auth {
    pub fn basic(user: &str, pass: &str) -> Self {
        Self::Basic {
            user: user.to_owned(),
            pass: pass.to_owned(),
        }
    }

    fn basic_header(&self) -> Option<String> {
        match self {
            Self::Anonymous => None,
            Self::Basic { user, pass } => Some(format!(
                "Basic {}",
                STANDARD.encode(format!("{user}:{pass}"))
            )),
        }
    }
}

/// A manifest as a registry served it.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// `Docker-Content-Digest` header (checked against the body).
    pub digest: String,
    pub media_type: String,
    pub body: Bytes,
}

pub struct RegistryClient {
    base: Url,
    auth: Auth,
    http: reqwest::Client,
    /// `Authorization` header value per repository (`None`: registry needs none).
    authorizations: Mutex<HashMap<String, Option<String>>>,
}

impl RegistryClient {
    /// `base_url` like `http://127.0.0.1:5000`.
    pub fn new(base_url: &str, auth: Auth) -> Self {
        Self {
            base: Url::parse(base_url).unwrap_or_else(|e| panic!("registry URL {base_url}: {e}")),
            auth,
            http: http_client(REQUEST_TIMEOUT),
            authorizations: Mutex::new(HashMap::new()),
        }
    }

    /// Sends an authenticated request for `/v2/{repo}/{path}` (path like `manifests/latest`).
    pub async fn send(
        &self,
        method: Method,
        repo: &str,
        path: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Response {
        let url = self.url(&format!("/v2/{repo}/{path}"));
        self.send_url(method, repo, url, headers, body).await
    }

    /// Uploads a blob (skipped if it already exists); returns its digest.
    pub async fn push_blob(&self, repo: &str, data: Bytes) -> String {
        let digest = sha256_digest(&data);
        self.push_blob_as(repo, &digest, data).await;
        digest
    }

    /// Uploads a blob whose digest the caller already knows (monolithic POST + PUT `?digest=`);
    /// skipped if the registry has it. The registry verifies the digest.
    pub async fn push_blob_as(&self, repo: &str, digest: &str, data: Bytes) {
        if self.blob_exists(repo, digest).await {
            return;
        }
        let mut upload = self.start_upload(repo).await;
        upload.query_pairs_mut().append_pair("digest", digest);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, "application/octet-stream".parse().unwrap());
        let resp = self
            .send_url(Method::PUT, repo, upload, headers, Some(data))
            .await;
        expect_status(resp, StatusCode::CREATED, "blob upload PUT").await;
    }

    pub async fn blob_exists(&self, repo: &str, digest: &str) -> bool {
        let path = format!("blobs/{digest}");
        let resp = self
            .send(Method::HEAD, repo, &path, HeaderMap::new(), None)
            .await;
        resp.status() == StatusCode::OK
    }

    /// Pushes a manifest under `reference` (a tag or its digest); returns the registry's digest,
    /// asserting it is the sha256 of `body`.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> String {
        let expected = sha256_digest(&body);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, media_type.parse().expect("media type"));
        let path = format!("manifests/{reference}");
        let resp = self
            .send(Method::PUT, repo, &path, headers, Some(body))
            .await;
        let resp = expect_status(resp, StatusCode::CREATED, "manifest PUT").await;
        let digest = header_string(&resp, "docker-content-digest");
        assert_eq!(digest, expected, "registry digest of {repo}:{reference}");
        digest
    }

    /// GETs a manifest accepting every known manifest type; panics unless 200.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> FetchedManifest {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, ALL_MANIFEST_TYPES.join(", ").parse().unwrap());
        let path = format!("manifests/{reference}");
        let resp = self.send(Method::GET, repo, &path, headers, None).await;
        let resp = expect_status(resp, StatusCode::OK, "manifest GET").await;
        let digest = header_string(&resp, "docker-content-digest");
        let media_type = header_string(&resp, "content-type");
        let body = resp.bytes().await.expect("manifest body");
        assert_eq!(
            sha256_digest(&body),
            digest,
            "manifest body vs digest header"
        );
        FetchedManifest {
            digest,
            media_type,
            body,
        }
    }

    /// GETs a blob; panics unless 200 and the content matches `digest`.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Bytes {
        let path = format!("blobs/{digest}");
        let resp = self
            .send(Method::GET, repo, &path, HeaderMap::new(), None)
            .await;
        let resp = expect_status(resp, StatusCode::OK, "blob GET").await;
        let body = resp.bytes().await.expect("blob body");
        assert_eq!(sha256_digest(&body), digest, "blob content vs digest");
        body
    }

    async fn start_upload(&self, repo: &str) -> Url {
        let resp = self
            .send(Method::POST, repo, "blobs/uploads/", HeaderMap::new(), None)
            .await;
        let resp = expect_status(resp, StatusCode::ACCEPTED, "blob upload POST").await;
        let location = header_string(&resp, LOCATION.as_str());
        self.base
            .join(&location)
            .unwrap_or_else(|e| panic!("upload location {location}: {e}"))
    }

    async fn send_url(
        &self,
        method: Method,
        repo: &str,
        url: Url,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Response {
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .headers(headers);
        if let Some(authorization) = self.authorization(repo).await {
            request = request.header(AUTHORIZATION, authorization);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("registry URL path")
    }

    /// The `Authorization` value for `repo`, worked out once from the `/v2/` challenge.
    async fn authorization(&self, repo: &str) -> Option<String> {
        if let Some(cached) = self.authorizations.lock().unwrap().get(repo) {
            return cached.clone();
        }
        let value = self.answer_challenge(repo).await;
        self.authorizations
            .lock()
            .unwrap()
            .insert(repo.to_owned(), value.clone());
        value
    }

    /// Answers the `/v2/` challenge. Without usable credentials (none given, or the token realm
    /// refuses them) requests go out unauthenticated, so callers see the registry's 401.
    async fn answer_challenge(&self, repo: &str) -> Option<String> {
        let url = self.url("/v2/");
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        if resp.status() != StatusCode::UNAUTHORIZED {
            return None;
        }
        let challenge = Challenge::parse(&header_string(&resp, WWW_AUTHENTICATE.as_str()));
        match challenge.scheme.as_str() {
            "basic" => self.auth.basic_header(),
            "bearer" => self
                .fetch_token(&challenge, repo)
                .await
                .map(|token| format!("Bearer {token}")),
            other => panic!("{url}: unsupported auth scheme {other}"),
        }
    }

    /// Asks the challenge's realm for a `repository:{repo}:pull,push` token (`None` if refused).
    async fn fetch_token(&self, challenge: &Challenge, repo: &str) -> Option<String> {
        let realm = challenge
            .param("realm")
            .expect("Bearer challenge without realm");
        let mut url = Url::parse(&realm).unwrap_or_else(|e| panic!("realm {realm}: {e}"));
        if let Some(service) = challenge.param("service") {
            url.query_pairs_mut().append_pair("service", &service);
        }
        url.query_pairs_mut()
            .append_pair("scope", &format!("repository:{repo}:pull,push"));
        let mut request = self.http.get(url.clone());
        if let Some(basic) = self.auth.basic_header() {
            request = request.header(AUTHORIZATION, basic);
        }
        let resp = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        if resp.status() != StatusCode::OK {
            return None;
        }
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("token body")).expect("token JSON");
        let token = ["token", "access_token"]
            .iter()
            .find_map(|key| body[key].as_str())
            .unwrap_or_else(|| panic!("token response without token: {body}"));
        Some(token.to_owned())
    }
}

/// A parsed `WWW-Authenticate` challenge (the first one).
struct Challenge {
    /// Lower-case scheme.
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn parse(header: &str) -> Self {
        let challenges = http_auth::parse_challenges(header)
            .unwrap_or_else(|e| panic!("WWW-Authenticate {header:?}: {e:?}"));
        let first = challenges
            .first()
            .unwrap_or_else(|| panic!("empty WWW-Authenticate {header:?}"));
        Self {
            scheme: first.scheme.to_ascii_lowercase(),
            params: first
                .params
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_unescaped()))
                .collect(),
        }
    }

    fn param(&self, key: &str) -> Option<String> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

fn header_string(resp: &Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{} response without {name}", resp.url()))
        .to_owned()
}

/// Returns `resp` if it has `status`; otherwise panics with the body.
async fn expect_status(resp: Response, status: StatusCode, what: &str) -> Response {
    if resp.status() == status {
        return resp;
    }
    let (url, got) = (resp.url().clone(), resp.status());
    let body = resp.text().await.unwrap_or_default();
    panic!("{what} {url}: expected {status}, got {got}: {body}");
}
