//! Warming before anyone asks: push events from the upstream
//! ([`events`]) and a per-upstream schedule ([`schedule`]) submit images
//! to one bounded, deduplicating queue ([`queue`]) whose workers warm each
//! through the upstream's cache ([`image`], what `kura warm` runs), so
//! downloads coalesce with client pulls and take `cache.maxdownloads`
//! turns like them. The schedule's manifest GETs are paid from an hourly
//! budget per upstream ([`budget`]). `GET /kura/api/v1/warming` shows the
//! queue and the last outcomes.

pub mod budget;
pub mod events;
pub mod image;
pub mod queue;
pub mod schedule;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::auth::{Gate, Identity};
use crate::cache::Cache;
use crate::config::{Config, UpstreamWarming};
use crate::reference::{Reference, RepoName, Tag};
use crate::routing::Registries;
use budget::Budget;
use events::Pushed;
use image::{Plan, Step, warm_image, warm_referrers};
use queue::{Job, Origin, Queue, Runner};

/// The label of the `proxy:` upstream, in event URLs as in metrics.
pub const DEFAULT_UPSTREAM_LABEL: &str = "proxy";

/// The warming service: the queue and every upstream's warmer.
pub struct Warming {
    queue: Arc<Queue>,
    upstreams: HashMap<String, Arc<UpstreamWarmer>>,
}

/// One upstream's cache, warming settings and schedule budget.
pub struct UpstreamWarmer {
    label: String,
    cache: Arc<Cache>,
    config: UpstreamWarming,
    event_platforms: Arc<[String]>,
    budget: Budget,
}

impl Warming {
    /// Starts the queue's workers and every upstream's schedule.
    pub fn start(config: &Config, registries: &Registries) -> Arc<Self> {
        let upstreams: HashMap<String, Arc<UpstreamWarmer>> = (config.default_upstream.iter())
            .chain(&config.upstreams)
            .filter_map(|upstream| {
                let label = upstream
                    .name
                    .clone()
                    .unwrap_or_else(|| DEFAULT_UPSTREAM_LABEL.to_owned());
                let warmer = UpstreamWarmer {
                    cache: registries.upstream(&label)?,
                    event_platforms: Arc::from(upstream.warming.events.platforms.clone()),
                    budget: Budget::per_hour(upstream.warming.budget_per_hour),
                    config: upstream.warming.clone(),
                    label: label.clone(),
                };
                Some((label, Arc::new(warmer)))
            })
            .collect();
        let queue = Queue::start(config.warming, runner(upstreams.clone()));
        for warmer in upstreams.values() {
            schedule::spawn(warmer, &queue);
        }
        Arc::new(Self { queue, upstreams })
    }

    /// `POST /kura/events/{upstream}` and `GET /kura/api/v1/warming`.
    /// The push-event endpoint, authenticated by each upstream's
    /// `events.secret`, not by client logins.
    pub fn event_routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/kura/events/{upstream}", post(events::receive))
            .with_state(self.clone())
    }

    /// The status view, which names repositories: for logged-in clients,
    /// each shown only the jobs of repositories it may pull.
    pub fn status_routes(self: &Arc<Self>, gate: Arc<Gate>) -> Router {
        Router::new()
            .route("/kura/api/v1/warming", get(status))
            .with_state((self.clone(), gate))
    }

    /// Whether `identity` may pull the repository a job or record names,
    /// as the registry API would decide it.
    fn may_pull(&self, gate: &Gate, identity: &Identity, upstream: &str, repository: &str) -> bool {
        self.upstreams
            .get(upstream)
            .is_some_and(|warmer| gate.may_pull_in(identity, &warmer.cache, repository))
    }
}

fn runner(upstreams: HashMap<String, Arc<UpstreamWarmer>>) -> Runner {
    Arc::new(move |job: Job| {
        let warmer = upstreams.get(&job.upstream).cloned();
        Box::pin(async move {
            match warmer {
                Some(warmer) => warmer.warm(&job).await,
                None => Err(anyhow::anyhow!("no upstream {}", job.upstream)),
            }
        })
    })
}

async fn status(
    State((warming, gate)): State<(Arc<Warming>, Arc<Gate>)>,
    Extension(identity): Extension<Identity>,
) -> Response {
    let visible =
        |upstream: &str, repository: &str| warming.may_pull(&gate, &identity, upstream, repository);
    axum::Json(warming.queue.status(visible)).into_response()
}

impl UpstreamWarmer {
    /// The job a push asks for, if its tag passes `events.repositories`
    /// and `events.tags`.
    fn job_for(&self, pushed: &Pushed) -> Option<Job> {
        let tag = pushed.tag.as_deref()?;
        let filter = &self.config.events;
        if !filter.repositories.is_match(&pushed.repository) || !filter.tags.is_match(tag) {
            return None;
        }
        Some(Job {
            upstream: self.label.clone(),
            repository: RepoName::parse(&pushed.repository)?,
            reference: Reference::Tag(Tag::parse(tag)?),
            origin: Origin::Event,
            platforms: self.event_platforms.clone(),
        })
    }

    /// Warms a job's image and its referrers; the schedule's pay their
    /// manifest GETs from the budget.
    async fn warm(&self, job: &Job) -> anyhow::Result<()> {
        let plan = Plan {
            platforms: &job.platforms,
            revalidate: true,
            budget: (job.origin == Origin::Schedule).then_some(&self.budget),
        };
        let (mut blobs, mut bytes) = (0usize, 0u64);
        let mut count = |step: Step<'_>| {
            if let Step::BlobFetched { bytes: fetched, .. } = step {
                blobs += 1;
                bytes += fetched;
            }
        };
        let (repo, reference) = (&job.repository, &job.reference);
        let warmed = warm_image(&self.cache, repo, reference, plan, &mut count).await?;
        let manifests = warmed.len();
        warm_referrers(&self.cache, repo, warmed, plan, &mut count).await?;
        tracing::debug!(upstream = self.label, repository = %repo, %reference, manifests, blobs_fetched = blobs, bytes_fetched = bytes, "warm finished");
        Ok(())
    }
}
