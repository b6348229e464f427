//! `kura serve`: wires storage, upstream client and cache into the HTTP
//! API and runs it until SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::config::Config;
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
    let upstream =
        Upstream::new(&config.upstream).context("proxy: cannot build upstream client")?;
    let cache = Arc::new(Cache::new(storage, upstream, config.upstream.tag_ttl));
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("http.addr: cannot listen on {}", config.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        upstream = %config.upstream.url,
        storage = %config.storage_root.display(),
        "kura serving"
    );
    let app = crate::api::router(cache, config.log.access_log);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("http server failed")
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
