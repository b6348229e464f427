//! Content policies follow the configuration file without a restart: when
//! the file changes, it is read again (with the `REGISTRY_*` variables and
//! flags applied as at startup) and each upstream's `policy:` replaces the
//! one its cache enforces. Other keys still need a restart. A file that no
//! longer loads keeps the policies in force, with a warning saying why.

use std::sync::Arc;

use crate::auth::watched::{RECHECK_INTERVAL, version_of};
use crate::config::{Config, ConfigSource};
use crate::routing::Registries;

/// Watches `source` for as long as the server runs (one `stat` per
/// second; one load, on the blocking pool, per change).
pub async fn follow(source: ConfigSource, registries: Arc<Registries>) {
    let mut version = version_of(&source.path);
    let mut ticks = tokio::time::interval(RECHECK_INTERVAL);
    loop {
        ticks.tick().await;
        let now = version_of(&source.path);
        if now == version {
            continue;
        }
        // Taken before the read: a write racing it is seen next time.
        version = now;
        let reading = source.clone();
        match tokio::task::spawn_blocking(move || reading.load()).await {
            Ok(Ok(config)) => apply(&config, &registries),
            Ok(Err(e)) => tracing::warn!(
                path = %source.path.display(),
                error = %e,
                "configuration changed but does not load; keeping the content policies in force"
            ),
            Err(e) => tracing::warn!(error = %e, "reading the configuration failed"),
        }
    }
}

fn apply(config: &Config, registries: &Registries) {
    for upstream in config.default_upstream.iter().chain(&config.upstreams) {
        let label = upstream.name.as_deref().unwrap_or("proxy");
        match registries.upstream(label) {
            Some(cache) => cache.set_policy(upstream.policy.clone()),
            None => tracing::warn!(
                registry = label,
                "upstream added to the configuration; it needs a restart"
            ),
        }
    }
    tracing::info!("configuration changed: content policies reloaded");
}
