//! `Link` headers (RFC 8288) as registries page with them: the target of
//! the `rel="next"` link. Tag lists and referrers lists both page this way.

use reqwest::header::{HeaderMap, LINK};

/// The target of the first `rel="next"` link among the `Link` headers.
pub(super) fn next_target(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(LINK)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(next_link_target)
        .map(str::to_owned)
}

/// The target of the `rel="next"` link in one `Link` header value
/// (RFC 8288: `<target>; param; param, <target>; ...`).
fn next_link_target(header: &str) -> Option<&str> {
    let mut rest = header;
    loop {
        let open = rest.find('<')?;
        let close = open + rest[open..].find('>')?;
        let target = &rest[open + 1..close];
        rest = &rest[close + 1..];
        let params_end = rest.find('<').unwrap_or(rest.len());
        if rest[..params_end].split(';').any(is_rel_next) {
            return Some(target);
        }
        rest = &rest[params_end..];
    }
}

/// `rel=next`, `rel="next"`, or `next` among several relation types.
fn is_rel_next(param: &str) -> bool {
    let Some((key, value)) = param.split_once('=') else {
        return false;
    };
    key.trim().eq_ignore_ascii_case("rel")
        && value
            .trim()
            .trim_end_matches(',')
            .trim_matches('"')
            .split_ascii_whitespace()
            .any(|relation| relation.eq_ignore_ascii_case("next"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_next_link_among_others() {
        let subject = "/v2/a/referrers/sha256:00?last=b&n=2";
        assert_eq!(
            next_link_target(&format!("<{subject}>; rel=\"next\"")),
            Some(subject)
        );
        assert_eq!(
            next_link_target("<http://x/y>; rel=next"),
            Some("http://x/y")
        );
        assert_eq!(
            next_link_target(
                "</first>; rel=\"prev\", </second,odd>; type=\"x\"; rel=\"last next\""
            ),
            Some("/second,odd")
        );
        assert_eq!(next_link_target("</only>; rel=\"prev\""), None);
        assert_eq!(next_link_target("garbage"), None);
        assert_eq!(next_link_target(""), None);
    }
}
