//! `kura::auth::token::TokenAuth::authorize` on arbitrary `Authorization`
//! values (JWT header, `x5c` certificates, claims), against a fixed trusted
//! certificate whose private key is nowhere here. Must not panic, and must
//! never grant: a grant would mean a forged signature, `alg: none` or an
//! HMAC key confusion got through. The seeds are real tokens of that key
//! (expired, so still refused) and the usual attacks on it.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use kura::auth::token::{Scope, TokenAuth};
use kura::config::TokenConfig;
use libfuzzer_sys::fuzz_target;

/// The certificate the seeds were signed with (P-256, self-signed).
const TRUSTED_CERT: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBmDCCAT+gAwIBAgIUB28JWLstORsL3Wfkvt61Mjlr0dMwCgYIKoZIzj0EAwIw\n\
ITEfMB0GA1UEAwwWa3VyYS1mdXp6LXRva2VuLWlzc3VlcjAgFw0yNjEyMDIwMDQx\n\
MDhaGA8yMTI2MTEwODAwNDEwOFowITEfMB0GA1UEAwwWa3VyYS1mdXp6LXRva2Vu\n\
LWlzc3VlcjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABK2O+tpQCcqkQhXFGWRG\n\
vwXi7QNyf9eorOnAr0WBUKP75woyMVY/7/JM77RlJmLs1UNUeslg2fBeOHP5Osep\n\
1majUzBRMB0GA1UdDgQWBBSMIaiz/O4XzRSTezWt9fxFAglYdzAfBgNVHSMEGDAW\n\
gBSMIaiz/O4XzRSTezWt9fxFAglYdzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49\n\
BAMCA0cAMEQCICsCoak0uF5prFxA/PHFZbKNkRk/djvs8vbM6neTtCGsAiBUNniW\n\
9bBGGsiWq1pfPF/+5YDpM5NFBquzwlbdSJmf3A==\n\
-----END CERTIFICATE-----\n\
";

fn auth() -> &'static TokenAuth {
    static AUTH: OnceLock<TokenAuth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let bundle: PathBuf =
            std::env::temp_dir().join(format!("kura-fuzz-token-{}.pem", std::process::id()));
        std::fs::write(&bundle, TRUSTED_CERT).expect("write bundle");
        TokenAuth::load(&TokenConfig {
            realm: "https://auth.example/token".into(),
            service: "kura-fuzz".into(),
            issuer: "kura-fuzz-issuer".into(),
            root_cert_bundle: Some(bundle),
            jwks: None,
            auto_redirect_path: None,
            signing_algorithms: Vec::new(),
            groups_claim: Some("groups".into()),
        })
        .expect("load the fuzz bundle")
    })
}

fuzz_target!(|data: &[u8]| {
    let granted = auth().authorize(Some(data), Some(&Scope::pull("library/alpine")));
    assert!(granted.is_err(), "granted {granted:?} for {data:?}");
});
