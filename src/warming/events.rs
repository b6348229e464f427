//! `POST /kura/events/<upstream>`: push events from the upstream registry,
//! `<upstream>` being the configured name of an `upstreams:` entry, or
//! `proxy` for the `proxy:` upstream. Two payloads are understood:
//!
//! - Distribution's notification envelope
//!   (`application/vnd.docker.distribution.events.v1+json`): every
//!   `events[]` entry with `action: push` and a `target.tag`;
//! - Harbor's webhook, `type: PUSH_ARTIFACT` (Default format) or
//!   `harbor.artifact.pushed` (CloudEvents): `event_data.repository.repo_full_name`
//!   and each `resources[].tag`.
//!
//! Only tag pushes are warmed: a push by digest alone is an index's child
//! or an artifact, which the tag's warm brings (Harbor then puts the
//! digest in `tag`, which is no tag). The request carries the upstream's
//! `events.secret` as its whole `Authorization` value (compared in
//! constant time); anything else is 401 and nothing is read or queued.
//! The answer (202) comes as soon as the images are queued.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Warming;
use super::queue::Submitted;
use crate::config::Secret;
use crate::metrics::{WarmLabels, metrics};

/// The largest event body read: a notification is a few KiB; Distribution
/// sends one event per request and Harbor one resource.
pub const MAX_EVENT_BODY: usize = 1 << 20;

/// A tag (or digest) pushed to a repository, as an event names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub repository: String,
    /// `None` for a push by digest alone.
    pub tag: Option<String>,
}

/// What became of an event request's pushes.
#[derive(Debug, Default, Serialize)]
struct Tally {
    queued: usize,
    coalesced: usize,
    dropped: usize,
    /// Pushed by digest alone, or outside `events.repositories`/`tags`.
    ignored: usize,
}

pub(super) async fn receive(
    State(warming): State<Arc<Warming>>,
    Path(upstream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some((warmer, secret)) = warming.upstreams.get(&upstream).and_then(|warmer| {
        let secret = warmer.config.events_secret.as_ref()?;
        Some((warmer, secret))
    }) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "no configured upstream of this name takes push events (events.secret)",
        );
    };
    if !authorized(headers.get(header::AUTHORIZATION), secret) {
        count_event("unauthorized");
        tracing::warn!(
            upstream,
            "push event without the upstream's events.secret; refused"
        );
        return refuse(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "wrong or missing Authorization for push events",
        );
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_EVENT_BODY).await else {
        count_event("invalid");
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "SIZE_INVALID",
            "event body unreadable or larger than 1 MiB",
        );
    };
    let pushes = match parse(&body) {
        Ok(pushes) => pushes,
        Err(reason) => {
            count_event("invalid");
            tracing::warn!(upstream, reason, "unreadable push event");
            return refuse(StatusCode::BAD_REQUEST, "PAYLOAD_INVALID", &reason);
        }
    };
    let mut tally = Tally::default();
    for pushed in &pushes {
        let Some(job) = warmer.job_for(pushed) else {
            count_event("ignored");
            tally.ignored += 1;
            continue;
        };
        count_event("accepted");
        match warming.queue.submit(job) {
            Submitted::Queued => tally.queued += 1,
            Submitted::Coalesced => tally.coalesced += 1,
            Submitted::Dropped => tally.dropped += 1,
        }
    }
    tracing::info!(
        upstream,
        queued = tally.queued,
        coalesced = tally.coalesced,
        dropped = tally.dropped,
        ignored = tally.ignored,
        "push events received"
    );
    (StatusCode::ACCEPTED, Json(tally)).into_response()
}

/// The whole header value against the secret ([`Secret::matches`]).
fn authorized(given: Option<&HeaderValue>, secret: &Secret) -> bool {
    given.is_some_and(|given| secret.matches(given.as_bytes()))
}

fn count_event(state: &'static str) {
    metrics()
        .warm_events
        .get_or_create(&WarmLabels { state })
        .inc();
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
    (status, Json(body)).into_response()
}

/// The pushes an event body announces (other actions and event types
/// announce none).
pub fn parse(body: &[u8]) -> Result<Vec<Pushed>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if value.get("events").is_some() {
        return distribution_pushes(value);
    }
    if let Some(kind) = value.get("type").and_then(Value::as_str) {
        return match (kind, value.get("event_data"), value.get("data")) {
            ("PUSH_ARTIFACT", Some(data), _) | ("harbor.artifact.pushed", _, Some(data)) => {
                harbor_pushes(data)
            }
            _ => Ok(Vec::new()),
        };
    }
    Err(
        "neither a Distribution notification ({\"events\":[...]}) nor a Harbor webhook ({\"type\":...})"
            .into(),
    )
}

fn distribution_pushes(value: Value) -> Result<Vec<Pushed>, String> {
    #[derive(Deserialize)]
    struct Envelope {
        events: Vec<Event>,
    }
    #[derive(Deserialize)]
    struct Event {
        #[serde(default)]
        action: String,
        #[serde(default)]
        target: Option<Target>,
    }
    #[derive(Deserialize)]
    struct Target {
        repository: String,
        tag: Option<String>,
    }
    let envelope: Envelope = serde_json::from_value(value)
        .map_err(|e| format!("not a Distribution notification envelope: {e}"))?;
    Ok(envelope
        .events
        .into_iter()
        .filter(|event| event.action == "push")
        .filter_map(|event| event.target)
        .map(|target| Pushed {
            repository: target.repository,
            tag: target.tag.filter(|tag| !tag.is_empty()),
        })
        .collect())
}

fn harbor_pushes(data: &Value) -> Result<Vec<Pushed>, String> {
    #[derive(Deserialize)]
    struct EventData {
        #[serde(default)]
        resources: Vec<Resource>,
        repository: Repository,
    }
    #[derive(Deserialize)]
    struct Resource {
        tag: Option<String>,
    }
    #[derive(Deserialize)]
    struct Repository {
        repo_full_name: String,
    }
    let data = EventData::deserialize(data)
        .map_err(|e| format!("not a Harbor PUSH_ARTIFACT event_data: {e}"))?;
    Ok(data
        .resources
        .into_iter()
        .map(|resource| Pushed {
            repository: data.repository.repo_full_name.clone(),
            // A push by digest puts the digest in `tag`; no tag has a `:`.
            tag: resource
                .tag
                .filter(|tag| !tag.is_empty() && !tag.contains(':')),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushed(repository: &str, tag: Option<&str>) -> Pushed {
        Pushed {
            repository: repository.into(),
            tag: tag.map(str::to_owned),
        }
    }

    #[test]
    fn distribution_envelopes_give_their_tag_pushes() {
        let body = br#"{"events":[
          {"id":"1","action":"push","target":{"mediaType":"application/octet-stream","digest":"sha256:aa","repository":"team/api","url":"http://r/v2/team/api/blobs/sha256:aa"}},
          {"id":"2","action":"push","target":{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:9a","size":1609,"repository":"team/api","url":"http://r/v2/team/api/manifests/sha256:9a","tag":"v1.4"},
           "request":{"id":"c2","addr":"10.0.0.7:51234","host":"reg.example.net","method":"PUT","useragent":"containerd/2.0"},"actor":{"name":"ci-bot"},"source":{"addr":"reg-0:5000","instanceID":"41e8"}},
          {"id":"3","action":"pull","target":{"repository":"team/api","tag":"v1.4"}}]}"#;
        assert_eq!(
            parse(body).unwrap(),
            [pushed("team/api", None), pushed("team/api", Some("v1.4"))]
        );
    }

    #[test]
    fn harbor_webhooks_give_their_tags_and_digest_pushes_none() {
        let default = br#"{"type":"PUSH_ARTIFACT","occur_at":1748858645,"operator":"ci-bot","event_data":{
          "resources":[{"digest":"sha256:9a1b","tag":"v1.4","resource_url":"harbor.example.net/team/api:v1.4"}],
          "repository":{"date_created":1748000000,"name":"api","namespace":"team","repo_full_name":"team/api","repo_type":"private"}}}"#;
        assert_eq!(parse(default).unwrap(), [pushed("team/api", Some("v1.4"))]);
        let by_digest = br#"{"type":"PUSH_ARTIFACT","event_data":{
          "resources":[{"digest":"sha256:9a1b","tag":"sha256:9a1b","resource_url":"harbor.example.net/team/api@sha256:9a1b"}],
          "repository":{"name":"api","namespace":"team","repo_full_name":"team/api"}}}"#;
        assert_eq!(parse(by_digest).unwrap(), [pushed("team/api", None)]);
        let cloud = br#"{"specversion":"1.0","id":"u","source":"/projects/1/webhook/policies/2","type":"harbor.artifact.pushed",
          "datacontenttype":"application/json","data":{"resources":[{"digest":"sha256:9a1b","tag":"latest"}],
          "repository":{"repo_full_name":"team/web"}}}"#;
        assert_eq!(parse(cloud).unwrap(), [pushed("team/web", Some("latest"))]);
        let scan = br#"{"type":"SCANNING_COMPLETED","event_data":{}}"#;
        assert!(parse(scan).unwrap().is_empty());
    }

    #[test]
    fn other_bodies_are_refused_with_a_reason() {
        assert!(parse(b"not json").unwrap_err().contains("not JSON"));
        assert!(parse(b"{}").unwrap_err().contains("neither"));
        assert!(parse(br#"{"events":[{"action":"push","target":{"tag":"x"}}]}"#).is_err());
        assert!(parse(br#"{"type":"PUSH_ARTIFACT","event_data":{"resources":[]}}"#).is_err());
    }

    #[test]
    fn only_the_exact_secret_authorizes() {
        let secret = Secret::from("Bearer s3cret".to_owned());
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(authorized(Some(&header("Bearer s3cret")), &secret));
        assert!(!authorized(Some(&header("Bearer s3cre")), &secret));
        assert!(!authorized(Some(&header("Bearer s3cret ")), &secret));
        assert!(!authorized(Some(&header("bearer s3cret")), &secret));
        assert!(!authorized(None, &secret));
    }
}
