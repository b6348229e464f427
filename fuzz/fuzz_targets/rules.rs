//! `kura::auth::rules::Rules::parse` and `kura::auth::groups::Groups::parse`
//! on arbitrary files: must not panic, and whatever parses must answer
//! questions (and describe itself) without panicking either.
#![no_main]

use kura::auth::Identity;
use kura::auth::groups::Groups;
use kura::auth::rules::Rules;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(groups) = Groups::parse(text) {
        let _ = groups.members();
        let _ = groups.of("alice");
    }
    let Ok(rules) = Rules::parse(text) else {
        return;
    };
    let alice = Identity {
        user: Some("alice".into()),
        groups: vec!["ops".into()],
    };
    for identity in [Identity::anonymous(), alice] {
        for repository in ["docker.io/library/alpine", "ghcr.io/org/a/b", ""] {
            let _ = rules.may_pull(&identity, repository);
        }
    }
    let _ = rules.grant_anonymous();
    let _ = rules.describe();
});
