//! `kura serve`: wires storage, upstream clients and caches into the HTTP
//! API and runs it until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::config::{Config, UpstreamConfig};
use crate::routing::Registries;
use crate::storage::Storage;
use crate::upstream::Upstream;

pub async fn run(config: Config) -> anyhow::Result<()> {
    for key in &config.ignored_keys {
        tracing::info!(
            key,
            "configuration key accepted but not implemented by Kura; ignored"
        );
    }
    let storage = Storage::open(&config.storage_root).await.with_context(|| {
        format!(
            "storage.filesystem.rootdirectory: cannot use {}",
            config.storage_root.display()
        )
    })?;
    let registries = build_registries(&config, &storage)?;
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("http.addr: cannot listen on {}", config.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        storage = %config.storage_root.display(),
        "kura serving"
    );
    let app = crate::api::router(Arc::new(registries), storage, config.log.access_log);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("http server failed")
}

fn build_registries(config: &Config, storage: &Storage) -> anyhow::Result<Registries> {
    let default = config
        .default_upstream
        .as_ref()
        .map(|upstream| cache_for(upstream, storage.clone()))
        .transpose()?;
    let named = config
        .upstreams
        .iter()
        .map(|upstream| {
            let name = upstream.name.as_deref().expect("list entries are named");
            cache_for(upstream, storage.namespaced(name))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Registries::new(default, named))
}

fn cache_for(
    upstream: &UpstreamConfig,
    storage: Storage,
) -> anyhow::Result<(Arc<Cache>, Vec<String>)> {
    let label = upstream.name.as_deref().unwrap_or("proxy");
    let client = Upstream::new(upstream)
        .with_context(|| format!("{label}: cannot build upstream client"))?;
    tracing::info!(registry = label, url = %upstream.url, tagttl = ?upstream.tag_ttl, "upstream configured");
    let cache = Arc::new(Cache::new(storage, client, upstream.tag_ttl));
    Ok((cache, upstream.aliases()))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
