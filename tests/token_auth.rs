//! `auth.token`: Kura in front of clients the way Distribution is behind a token service. Kura
//! and a real Distribution 2.8 trust the same token issuer (same realm, service, issuer and
//! certificate bundle); skopeo pulls through Kura with a token it fetched itself, and each kind of
//! token (valid, expired, wrong issuer, wrong audience, untrusted key, scope for another
//! repository, `alg: none`, ...) gets the same answer from Kura as from Distribution: status,
//! `WWW-Authenticate` challenge and OCI error body.

mod support;

use std::path::Path;

use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use support::images::{Flavor, ImageBuild};
use support::token::{ISSUER, SERVICE, Signing, TokenSpec, access};
use support::{Kura, KuraOptions, Platform, PushedImage, Upstream, skopeo_copy_as};

const USER: &str = "alice";
const PASSWORD: &str = "token-auth-pw";
const REPO: &str = "team/app";
const TAG: &str = "v1";

/// Distribution 2.8 with token auth, holding `team/app:v1`.
async fn token_upstream_with_image() -> (Upstream, PushedImage) {
    let upstream = Upstream::token(USER, PASSWORD).await;
    let image = ImageBuild::synthetic(Flavor::Oci, Platform::linux("amd64", None), "token-auth", 2)
        .push(&upstream.client(), REPO, Some(TAG))
        .await;
    (upstream, image)
}

/// Kura proxying `upstream`, with `auth.token` trusting the upstream's issuer, set through the
/// same `REGISTRY_AUTH_TOKEN_*` variables a Distribution deployment would use.
async fn kura_with_token_auth(upstream: &Upstream, bundle_dir: &Path) -> Kura {
    kura_with_token_auth_and(upstream, bundle_dir, Vec::new()).await
}

async fn kura_with_token_auth_and(
    upstream: &Upstream,
    bundle_dir: &Path,
    more_env: Vec<(String, String)>,
) -> Kura {
    let issuer = upstream.token_issuer().expect("token upstream");
    let bundle = bundle_dir.join("token-ca.pem");
    std::fs::write(&bundle, issuer.cert_pem()).expect("write bundle");
    let mut options = KuraOptions::for_upstream(upstream);
    options.extra_env = vec![
        ("REGISTRY_AUTH_TOKEN_REALM".into(), issuer.realm()),
        ("REGISTRY_AUTH_TOKEN_SERVICE".into(), SERVICE.into()),
        ("REGISTRY_AUTH_TOKEN_ISSUER".into(), ISSUER.into()),
        (
            "REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE".into(),
            bundle.display().to_string(),
        ),
    ];
    options.extra_env.extend(more_env);
    Kura::start(options).await
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_pulls_through_kura_with_a_token_from_the_token_service() {
    let (upstream, image) = token_upstream_with_image().await;
    let dir = tempfile::tempdir().unwrap();
    let kura = kura_with_token_auth(&upstream, dir.path()).await;
    let issued_before = upstream.token_issuer().unwrap().tokens_issued();

    let landed = skopeo_copy_as(
        kura.addr(),
        &format!("{REPO}:{TAG}"),
        &dir.path().join("pulled"),
        false,
        Some((USER, PASSWORD)),
    );

    assert_eq!(landed.top_digest, image.digest);
    assert_eq!(landed.digests, image.all_digests());
    assert!(
        upstream.token_issuer().unwrap().tokens_issued() > issued_before,
        "skopeo fetched its token from the realm Kura named"
    );
}

/// What a registry answered: for a refusal, the challenge and OCI error body too.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    challenge: Option<String>,
    body: Option<serde_json::Value>,
}

impl Answer {
    /// The challenge's `error` parameter.
    fn error(&self) -> Option<&str> {
        let challenge = self.challenge.as_deref()?;
        let (_, rest) = challenge.split_once("error=\"")?;
        rest.split_once('"').map(|(error, _)| error)
    }
}

async fn ask(base: &str, path: &str, authorization: Option<&str>) -> Answer {
    let client = support::net::http_client(std::time::Duration::from_secs(30));
    let mut request = client
        .get(format!("{base}{path}"))
        .header(ACCEPT, Flavor::Oci.manifest_type());
    if let Some(value) = authorization {
        request = request.header(AUTHORIZATION, value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    if response.status().is_success() {
        return Answer {
            status,
            challenge: None,
            body: None,
        };
    }
    let challenge = response
        .headers()
        .get(WWW_AUTHENTICATE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.ok();
    Answer {
        status,
        challenge,
        body,
    }
}

/// One request of the table: what it sends and what both registries must answer.
struct Case {
    name: &'static str,
    path: String,
    authorization: Option<String>,
    status: u16,
    error: Option<&'static str>,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_token_gets_the_answer_distribution_gives() {
    let (upstream, image) = token_upstream_with_image().await;
    let dir = tempfile::tempdir().unwrap();
    let kura = kura_with_token_auth(&upstream, dir.path()).await;
    let issuer = upstream.token_issuer().unwrap();
    let bearer = |spec: TokenSpec| Some(format!("Bearer {}", issuer.mint(&spec)));
    let pulling = |change: fn(&mut TokenSpec)| {
        let mut spec = TokenSpec::granting(USER, vec![access("repository", REPO, &["pull"])]);
        change(&mut spec);
        bearer(spec)
    };
    let manifest = format!("/v2/{REPO}/manifests/{TAG}");
    let blob = format!("/v2/{REPO}/blobs/{}", image.config.digest);
    let tags = format!("/v2/{REPO}/tags/list");
    let case = |name, path: &String, authorization, status, error| Case {
        name,
        path: path.clone(),
        authorization,
        status,
        error,
    };
    let invalid = Some("invalid_token");
    let insufficient = Some("insufficient_scope");
    let cases = [
        case("no token", &manifest, None, 401, None),
        case(
            "basic credentials",
            &manifest,
            Some(format!("Basic {}", base64_pair(USER, PASSWORD))),
            401,
            None,
        ),
        case("valid", &manifest, pulling(|_| {}), 200, None),
        case("valid, blob", &blob, pulling(|_| {}), 200, None),
        case("valid, tag list", &tags, pulling(|_| {}), 200, None),
        case(
            "expired within the leeway",
            &manifest,
            pulling(|s| s.expires_in = -20),
            200,
            None,
        ),
        case(
            "expired beyond the leeway",
            &manifest,
            pulling(|s| s.expires_in = -120),
            401,
            invalid,
        ),
        case(
            "not valid yet",
            &manifest,
            pulling(|s| {
                s.not_before = 600;
                s.expires_in = 900;
            }),
            401,
            invalid,
        ),
        case(
            "wrong issuer",
            &manifest,
            pulling(|s| s.issuer = "someone-else".into()),
            401,
            invalid,
        ),
        case(
            "wrong audience",
            &manifest,
            pulling(|s| s.audience = "another-registry".into()),
            401,
            invalid,
        ),
        case(
            "key not in the bundle",
            &manifest,
            pulling(|s| s.signing = Signing::UntrustedKey),
            401,
            invalid,
        ),
        case(
            "trusted certificate, other key's signature",
            &manifest,
            pulling(|s| s.signing = Signing::ForgedChain),
            401,
            invalid,
        ),
        case(
            "trusted key named by libtrust kid",
            &manifest,
            pulling(|s| s.signing = Signing::KeyId),
            200,
            None,
        ),
        case(
            "alg none",
            &manifest,
            pulling(|s| s.signing = Signing::None),
            401,
            invalid,
        ),
        case(
            "not a JWT",
            &manifest,
            Some("Bearer not.a-jwt".into()),
            401,
            invalid,
        ),
        case(
            "access to another repository",
            &manifest,
            pulling(|s| s.access = vec![access("repository", "team/other", &["pull"])]),
            401,
            insufficient,
        ),
        case(
            "push but not pull",
            &blob,
            pulling(|s| s.access = vec![access("repository", REPO, &["push"])]),
            401,
            insufficient,
        ),
        case(
            "every action",
            &manifest,
            pulling(|s| s.access = vec![access("repository", REPO, &["*"])]),
            200,
            None,
        ),
        case(
            "catalog without the catalog grant",
            &"/v2/_catalog".to_owned(),
            pulling(|_| {}),
            401,
            insufficient,
        ),
        case(
            "catalog with registry:catalog:*",
            &"/v2/_catalog".to_owned(),
            pulling(|s| s.access = vec![access("registry", "catalog", &["*"])]),
            200,
            None,
        ),
        case("base without a token", &"/v2/".to_owned(), None, 401, None),
        case(
            "base with a token granting nothing",
            &"/v2/".to_owned(),
            pulling(|s| s.access = vec![]),
            200,
            None,
        ),
    ];

    // Refusals never reach the upstream: Kura answers them from the token alone.
    let upstream_requests = upstream.requests().len();
    for case in cases.iter().filter(|c| c.status != 200) {
        let kura_answer = ask(&kura.url(), &case.path, case.authorization.as_deref()).await;
        assert_eq!(kura_answer.status, case.status, "{}", case.name);
    }
    assert_eq!(
        upstream.requests().len(),
        upstream_requests,
        "a refused request reached the upstream"
    );

    let distribution = format!("http://{}", upstream.direct_addr());
    for case in &cases {
        let auth = case.authorization.as_deref();
        let from_kura = ask(&kura.url(), &case.path, auth).await;
        let from_distribution = ask(&distribution, &case.path, auth).await;
        assert_eq!(
            from_kura, from_distribution,
            "{}: Kura answered unlike Distribution",
            case.name
        );
        assert_eq!(
            (from_kura.status, from_kura.error()),
            (case.status, case.error),
            "{}",
            case.name
        );
    }
}

fn base64_pair(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// Access rules apply to token users as to any: the token's subject is the user, and a rule can
/// refuse what the token grants (403 `DENIED`, the upstream never asked), never grant more.
#[tokio::test(flavor = "multi_thread")]
async fn access_rules_narrow_what_a_token_grants() {
    let (upstream, _image) = token_upstream_with_image().await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yml");
    let registry = upstream.addr().to_string();
    std::fs::write(
        &rules,
        format!("rules:\n  - users: [{USER}]\n    pull: [\"{registry}/{REPO}\"]\n"),
    )
    .unwrap();
    let rules_env = vec![(
        "REGISTRY_AUTH_RULES_PATH".to_owned(),
        rules.display().to_string(),
    )];
    let kura = kura_with_token_auth_and(&upstream, dir.path(), rules_env).await;
    let issuer = upstream.token_issuer().unwrap();
    let token_for = |subject: &str| {
        let spec = TokenSpec::granting(subject, vec![access("repository", REPO, &["pull"])]);
        format!("Bearer {}", issuer.mint(&spec))
    };
    let manifest = format!("/v2/{REPO}/manifests/{TAG}");

    let before = upstream.requests().len();
    let refused = ask(&kura.url(), &manifest, Some(&token_for("mallory"))).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.body.unwrap()["errors"][0]["code"], "DENIED");
    assert_eq!(
        upstream.requests().len(),
        before,
        "a refusal reached the upstream"
    );

    let allowed = ask(&kura.url(), &manifest, Some(&token_for(USER))).await;
    assert_eq!(allowed.status, 200, "{allowed:?}");

    // The dashboard lists repositories: without a token (a browser has none) it shows nothing.
    let listing = ask(&kura.url(), "/kura/api/v1/repositories", None).await;
    assert_eq!(listing.status, 401, "{listing:?}");
    // A token for one repository does not list them all: the listing needs what
    // /v2/_catalog needs.
    let listing = ask(
        &kura.url(),
        "/kura/api/v1/repositories",
        Some(&token_for(USER)),
    )
    .await;
    assert_eq!(listing.status, 401, "{listing:?}");
    let catalog_token = TokenSpec::granting(USER, vec![access("registry", "catalog", &["*"])]);
    let catalog_token = format!("Bearer {}", issuer.mint(&catalog_token));
    let listing = ask(
        &kura.url(),
        "/kura/api/v1/repositories",
        Some(&catalog_token),
    )
    .await;
    assert_eq!(listing.status, 200, "{listing:?}");
}

/// A Distribution `auth: token:` section passes `kura config check` (which also reads the keys);
/// a bundle with no certificate in it is refused there, as `serve` would refuse it.
#[test]
fn config_check_reads_the_token_section_and_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = support::TokenIssuer::start(None, support::token::DEFAULT_LIFETIME);
    let bundle = dir.path().join("token-ca.pem");
    std::fs::write(&bundle, issuer.cert_pem()).unwrap();
    let config = dir.path().join("config.yml");
    let write_config = |bundle: &Path| {
        let yaml = format!(
            "version: 0.1\nauth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    \
             issuer: {ISSUER}\n    rootcertbundle: {}\n",
            issuer.realm(),
            bundle.display()
        );
        std::fs::write(&config, yaml).unwrap();
    };
    let check = || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kura"));
        command
            .args(["config", "check"])
            .arg(&config)
            .env("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY", dir.path());
        support::process::run_tool(command, std::time::Duration::from_secs(30))
    };

    write_config(&bundle);
    let output = check();
    assert!(output.success(), "{}{}", output.stdout, output.stderr);
    assert!(
        output.stdout.contains(&format!("service: {SERVICE}")),
        "{}",
        output.stdout
    );

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    write_config(&empty);
    let output = check();
    assert!(!output.success(), "{}", output.stdout);
    assert!(output.stderr.contains("auth.token"), "{}", output.stderr);
}
