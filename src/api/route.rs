//! Maps a request path onto the registry API. Repository names contain
//! slashes, so routes are recognised from the right: the last
//! `/manifests/`, `/blobs/`, `/referrers/` or `/tags/list` decides.

/// A recognised `/v2/...` path, with its parts still unvalidated.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags { name: &'a str },
    /// `/v2/<name>/manifests/<reference>`.
    Manifest { name: &'a str, reference: &'a str },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { name: &'a str, digest: &'a str },
    /// `/v2/<name>/referrers/<digest>`: what refers to a subject manifest.
    Referrers { name: &'a str, digest: &'a str },
    /// `/v2/<name>/blobs/uploads/...`: the push side, which a cache refuses.
    Upload,
}

pub fn parse(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags { name });
    }
    if rest.contains("/blobs/uploads") {
        return Some(Route::Upload);
    }
    // A digest has no `/`: one after `/referrers/` means the last segment
    // is something else, in a repository with `referrers` in its name.
    if let Some((name, digest)) = rest.rsplit_once("/referrers/")
        && !digest.contains('/')
    {
        return Some(Route::Referrers { name, digest });
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Some(Route::Manifest { name, reference });
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Some(Route::Blob { name, digest });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_every_route() {
        assert_eq!(parse("/v2/"), Some(Route::Base));
        assert_eq!(parse("/v2"), Some(Route::Base));
        assert_eq!(parse("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(
            parse("/v2/a/b/tags/list"),
            Some(Route::Tags { name: "a/b" })
        );
        assert_eq!(
            parse("/v2/library/alpine/manifests/3.20"),
            Some(Route::Manifest {
                name: "library/alpine",
                reference: "3.20"
            })
        );
        assert_eq!(
            parse("/v2/x/manifests/y/manifests/latest"),
            Some(Route::Manifest {
                name: "x/manifests/y",
                reference: "latest"
            })
        );
        assert_eq!(
            parse("/v2/a/blobs/sha256:00"),
            Some(Route::Blob {
                name: "a",
                digest: "sha256:00"
            })
        );
        assert_eq!(parse("/v2/a/blobs/uploads/"), Some(Route::Upload));
        assert_eq!(
            parse("/v2/a/b/referrers/sha256:00"),
            Some(Route::Referrers {
                name: "a/b",
                digest: "sha256:00"
            })
        );
        assert_eq!(
            parse("/v2/x/referrers/y/manifests/latest"),
            Some(Route::Manifest {
                name: "x/referrers/y",
                reference: "latest"
            })
        );
        assert_eq!(
            parse("/v2/x/manifests/y/referrers/sha256:00"),
            Some(Route::Referrers {
                name: "x/manifests/y",
                digest: "sha256:00"
            })
        );
        assert_eq!(parse("/v2/a/other"), None);
        assert_eq!(parse("/v1/_ping"), None);
        assert_eq!(parse("/v2x"), None);
    }
}
