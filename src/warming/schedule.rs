//! Scheduled sync: every `warm:` entry of an upstream is a task that, each
//! `interval` (the first at startup, so a restart re-derives the queue),
//! queues its references and the upstream's tags matching its globs. Each
//! job then re-resolves its tag with a HEAD and fetches only a digest the
//! cache does not hold; GETs, the tag list's included, are paid from the
//! upstream's `warmbudget`.

use std::sync::Arc;

use tokio::time::MissedTickBehavior;

use super::UpstreamWarmer;
use super::queue::{Job, Origin, Queue};
use crate::config::WarmRule;
use crate::reference::{Reference, Tag};

/// The most tags of one entry queued per interval: a glob matching a
/// repository of thousands of tags would otherwise fill the queue alone.
pub const MAX_TAGS_PER_RULE: usize = 100;

/// Starts one task per `warm:` entry of `warmer`'s upstream.
pub fn spawn(warmer: &Arc<UpstreamWarmer>, queue: &Arc<Queue>) {
    for (index, rule) in warmer.config.schedule.iter().enumerate() {
        tracing::info!(
            upstream = warmer.label,
            repository = %rule.repository,
            interval = ?rule.interval,
            "scheduled warming"
        );
        tokio::spawn(run(warmer.clone(), queue.clone(), index));
    }
}

async fn run(warmer: Arc<UpstreamWarmer>, queue: Arc<Queue>, index: usize) {
    let rule = &warmer.config.schedule[index];
    let platforms: Arc<[String]> = Arc::from(rule.platforms.clone());
    let mut ticks = tokio::time::interval(rule.interval);
    // A tick missed (a slow tag list) is not made up for in a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for reference in references(&warmer, rule).await {
            queue.submit(Job {
                upstream: warmer.label.clone(),
                repository: rule.repository.clone(),
                reference,
                origin: Origin::Schedule,
                platforms: platforms.clone(),
            });
        }
    }
}

/// The entry's fixed references, then the upstream's tags its globs match
/// (at most [`MAX_TAGS_PER_RULE`], in the upstream's sorted order).
async fn references(warmer: &UpstreamWarmer, rule: &WarmRule) -> Vec<Reference> {
    let mut references = rule.references.clone();
    let Some(globs) = &rule.tags else {
        return references;
    };
    // The tag list is a GET: paid, whatever it brings.
    if let Err(spent) = warmer.budget.take() {
        tracing::warn!(upstream = warmer.label, repository = %rule.repository, "scheduled warming skipped: {spent}");
        return references;
    }
    let listed = match warmer.cache.tags(&rule.repository, None, None).await {
        Ok(page) => page.items,
        Err(error) => {
            tracing::warn!(upstream = warmer.label, repository = %rule.repository, %error, "scheduled warming: cannot list tags");
            return references;
        }
    };
    let mut matching = listed.iter().filter(|tag| globs.is_match(tag));
    references.extend(
        matching
            .by_ref()
            .take(MAX_TAGS_PER_RULE)
            .filter_map(|tag| Tag::parse(tag).map(Reference::Tag)),
    );
    let left_out = matching.count();
    if left_out > 0 {
        tracing::warn!(
            upstream = warmer.label,
            repository = %rule.repository,
            left_out,
            "scheduled warming: more than {MAX_TAGS_PER_RULE} tags match; the rest waits (narrow the tags globs)"
        );
    }
    references
}
