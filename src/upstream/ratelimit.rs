//! Docker Hub's pull allowance, as it reports it: `ratelimit-limit` and
//! `ratelimit-remaining` on manifest responses, each `N;w=SECONDS`
//! (`100;w=21600`). Every upstream response that carries them sets the
//! upstream's gauges; a response without them changes nothing, because
//! no headers means no limit (a paid plan, an exempt image), not zero.

use reqwest::header::HeaderMap;

use crate::metrics::{UpstreamLabels, metrics};

const LIMIT: &str = "ratelimit-limit";
const REMAINING: &str = "ratelimit-remaining";

/// One header's value: the count, and the window in seconds if given.
#[derive(Debug, PartialEq, Eq)]
struct Allowance {
    count: i64,
    window_seconds: Option<i64>,
}

/// Parses `N` or `N;w=SECONDS` (other `;` parameters are ignored).
/// `None` for anything else: an upstream's garbage never becomes a gauge.
fn parse(value: &str) -> Option<Allowance> {
    let mut parts = value.split(';').map(str::trim);
    let count = parts.next()?.parse::<u32>().ok()?;
    let window_seconds = parts
        .filter_map(|part| part.strip_prefix("w="))
        .find_map(|w| w.parse::<u32>().ok());
    Some(Allowance {
        count: i64::from(count),
        window_seconds: window_seconds.map(i64::from),
    })
}

fn header(headers: &HeaderMap, name: &str) -> Option<Allowance> {
    parse(headers.get(name)?.to_str().ok()?)
}

/// Sets `upstream`'s rate-limit gauges from a response's headers, if it
/// carries them. `upstream` is the configured label, never client input.
pub fn observe(upstream: &str, headers: &HeaderMap) {
    let (limit, remaining) = (header(headers, LIMIT), header(headers, REMAINING));
    if limit.is_none() && remaining.is_none() {
        return;
    }
    let m = metrics();
    let labels = UpstreamLabels {
        upstream: upstream.to_owned(),
    };
    let window = limit
        .as_ref()
        .and_then(|l| l.window_seconds)
        .or(remaining.as_ref().and_then(|r| r.window_seconds));
    if let Some(limit) = limit {
        m.ratelimit_limit.get_or_create(&labels).set(limit.count);
    }
    if let Some(remaining) = remaining {
        m.ratelimit_remaining
            .get_or_create(&labels)
            .set(remaining.count);
    }
    if let Some(window) = window {
        m.ratelimit_window_seconds
            .get_or_create(&labels)
            .set(window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_values_parse_with_and_without_a_window() {
        assert_eq!(
            parse("100;w=21600"),
            Some(Allowance {
                count: 100,
                window_seconds: Some(21600)
            })
        );
        assert_eq!(
            parse(" 76 "),
            Some(Allowance {
                count: 76,
                window_seconds: None
            })
        );
    }

    #[test]
    fn garbage_is_not_a_value() {
        for value in ["", "-1;w=60", "many", "1e3;w=60", "99999999999"] {
            assert_eq!(parse(value), None, "{value:?}");
        }
    }
}
