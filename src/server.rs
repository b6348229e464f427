//! `kura serve`: wires storage, upstream clients and caches into the HTTP
//! API and dashboard (plain or TLS), the optional debug listener and housekeeping
//! (usage, collection, the dashboard's history), and
//! runs until SIGINT/SIGTERM, then drains within `http.draintimeout`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::Router;
use axum_server::Handle;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};

use crate::api::peer::peer_routes;
use crate::api::{ApiOptions, ops_router, router};
use crate::auth::Gate;
use crate::cache::{Admission, Cache};
use crate::cluster::{self, Cluster};
use crate::config::{Config, ConfigSource, ConnectionLimits, UpstreamConfig};
use crate::connections::{PeerAddr, idle_guard, limited_server, listen};
use crate::dashboard::{self, Dashboard, history::History};
use crate::gc;
use crate::metrics::metrics;
use crate::policy_reload;
use crate::routing::Registries;
use crate::storage::Storage;
use crate::upstream::Upstream;
use crate::warming::Warming;

/// How often the storage gauges are recomputed.
const USAGE_INTERVAL: Duration = Duration::from_secs(60);

/// Connections the debug listener holds at most: its own pool, so that
/// probes and scrapers there still get in when the main listener is full.
const DEBUG_MAX_CONNECTIONS: usize = 32;

/// Serves `config`; with a `source`, content policies follow its file.
pub async fn run(config: Config, source: Option<ConfigSource>) -> anyhow::Result<()> {
    raise_open_file_limit();
    for key in &config.ignored_keys {
        tracing::info!(
            key,
            "configuration key accepted but not implemented by Kura; ignored"
        );
    }
    let storage = config.storage()?.open().await.with_context(|| {
        format!(
            "storage.filesystem.rootdirectory: cannot use {}",
            config.storage_root.display()
        )
    })?;
    storage.relist_catalog_behind();
    let cluster = config
        .cluster
        .as_ref()
        .map(|cluster| Cluster::start(cluster, &storage))
        .transpose()
        .context("cluster: cannot start")?;
    let (registries, admission) = build_registries(&config, &storage, cluster.as_ref())?;
    let registries = Arc::new(registries);
    let gate = Arc::new(Gate::load(&config).context("auth")?);
    if let Some(source) = source {
        tokio::spawn(policy_reload::follow(source, registries.clone()));
    }
    let warming = Warming::start(&config, &registries);
    let last_collection = gc::LastCollection::default();
    let history = Arc::new(History::default());
    tokio::spawn(dashboard::history::keep(
        history.clone(),
        registries.clone(),
    ));
    let dashboard = Arc::new(Dashboard {
        registries: registries.clone(),
        storage: storage.clone(),
        max_size: config.cache.max_size,
        last_collection: last_collection.clone(),
        history,
        gate: gate.clone(),
    });
    // Beside the registry API, outside its login: push events carry their
    // own secret (events.secret), peers the cluster secret.
    let own_secret = match &cluster {
        Some(cluster) => warming
            .event_routes()
            .merge(peer_routes(registries.clone(), cluster.clone())),
        None => warming.event_routes(),
    };
    let app = router(
        registries.clone(),
        storage.clone(),
        ApiOptions {
            access_log: config.log.access_log,
            pages: dashboard::routes(dashboard).merge(warming.status_routes(gate.clone())),
            own_secret,
            gate,
        },
    );
    let handle = Handle::new();
    if let Some(addr) = &config.http.debug_addr {
        let listener = bind("http.debug.addr", addr)?;
        tracing::info!(addr = %listener.local_addr()?, "debug listener (metrics, health)");
        let debug = ops_router(registries, storage.clone());
        let limits = config.http.connections;
        tokio::spawn(serve_plain(
            listener,
            debug,
            handle.clone(),
            limits,
            DEBUG_MAX_CONNECTIONS,
        ));
    }
    tokio::spawn(track_storage_usage(storage.clone()));
    tokio::spawn(flush_accesses(
        storage.clone(),
        config.access_flush_interval(),
    ));
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(release_free_heap());
    tokio::spawn(collect_garbage(
        storage.clone(),
        config.collector_policy(),
        config.cache.gc_interval,
        last_collection,
        cluster.clone(),
    ));
    tokio::spawn(shutdown_on_signal(
        handle.clone(),
        config.http.drain_timeout,
    ));

    let listener = bind("http.addr", &config.listen)?;
    let limits = config.http.connections;
    tracing::info!(
        addr = %listener.local_addr()?,
        tls = config.http.tls.is_some(),
        storage = %config.storage_root.display(),
        "kura serving"
    );
    let served = match &config.http.tls {
        Some(tls) => {
            let rustls = RustlsConfig::from_pem_file(&tls.certificate, &tls.key)
                .await
                .with_context(|| {
                    format!(
                        "http.tls: cannot load {} / {}",
                        tls.certificate.display(),
                        tls.key.display()
                    )
                })?;
            let tls = RustlsAcceptor::new(rustls)
                .handshake_timeout(limits.header)
                .acceptor(idle_guard(limits));
            limited_server(listener, limits, limits.max)
                .handle(handle)
                .acceptor(tls)
                .serve(app.into_make_service())
                .await
        }
        None => serve_plain(listener, app, handle, limits, limits.max).await,
    };
    if let Some(cluster) = &cluster {
        cluster.leave().await;
    }
    // Clients were released when their bytes were verified; give those
    // downloads the drain time to commit. What is cut short can never be.
    if tokio::time::timeout(config.http.drain_timeout, admission.settled())
        .await
        .is_err()
    {
        tracing::warn!("downloads still running at shutdown; abandoned");
    }
    // Only this process's own staging: another Kura on the same directory
    // (the next one of a rolling restart) may be mid-download.
    if let Err(e) = storage.clear_staging().await {
        tracing::warn!(error = %e, "cannot clear staging on shutdown");
    }
    served.context("http server failed")
}

/// Lifts the soft limit on open files to the hard limit, as Go programs
/// (Distribution among them) do at startup: every client connection,
/// upstream connection and staging file is a descriptor, and the usual
/// soft limit of 1,024 is below what a busy cache holds; its own bounds
/// (connections, downloads) keep it well under the hard limit.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            ..limit
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open file limit");
        }
    }
}

fn bind(key: &str, addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    listen(addr).with_context(|| format!("{key}: cannot listen on {addr}"))
}

async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: Router,
    handle: Handle<PeerAddr>,
    limits: ConnectionLimits,
    max_connections: usize,
) -> std::io::Result<()> {
    limited_server(listener, limits, max_connections)
        .handle(handle)
        .acceptor(idle_guard(limits))
        .serve(app.into_make_service())
        .await
}

/// One cache per upstream, and the download admission they share.
/// With a cluster, cold blobs are asked of their owner replica first.
pub(crate) fn build_registries(
    config: &Config,
    storage: &Storage,
    cluster: Option<&Arc<Cluster>>,
) -> anyhow::Result<(Registries, Admission)> {
    // One admission for every upstream: downloads share the disk, the
    // memory and the blocking pool whichever registry they come from.
    let admission = Admission::new(config.cache.max_downloads, config.cache.download_wait);
    let default = config
        .default_upstream
        .as_ref()
        .map(|upstream| cache_for(upstream, storage.clone(), &admission, cluster))
        .transpose()?;
    let named = config
        .upstreams
        .iter()
        .map(|upstream| {
            let name = upstream.name.as_deref().expect("list entries are named");
            cache_for(upstream, storage.namespaced(name), &admission, cluster)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((Registries::new(default, named), admission))
}

fn cache_for(
    upstream: &UpstreamConfig,
    storage: Storage,
    admission: &Admission,
    cluster: Option<&Arc<Cluster>>,
) -> anyhow::Result<(Arc<Cache>, Vec<String>)> {
    let label = upstream.name.as_deref().unwrap_or("proxy");
    let client = Upstream::new(upstream)
        .with_context(|| format!("{label}: cannot build upstream client"))?;
    tracing::info!(registry = label, url = %upstream.url, tagttl = ?upstream.tag_ttl, "upstream configured");
    let cache = Arc::new(
        Cache::new(storage, client, upstream.tag_ttl, admission.clone())
            .with_referrers_ttl(upstream.referrers_ttl())
            .with_policy(upstream.policy.clone())
            .with_cluster(cluster.cloned()),
    );
    Ok((cache, upstream.aliases()))
}

/// Keeps the storage gauges current without a walk per scrape.
async fn track_storage_usage(storage: Storage) {
    let mut ticks = tokio::time::interval(USAGE_INTERVAL);
    loop {
        ticks.tick().await;
        match storage.usage().await {
            Ok(usage) => {
                metrics()
                    .storage_bytes
                    .set(i64::try_from(usage.bytes).unwrap_or(i64::MAX));
                metrics()
                    .storage_objects
                    .set(i64::try_from(usage.blobs).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::warn!(error = %e, "cannot measure storage usage"),
        }
    }
}

/// Writes access times out every `interval`, so that `kura ls`/`gc` run
/// beside the server, and the collector of another replica, see recent
/// use (see [`Config::access_flush_interval`]).
async fn flush_accesses(storage: Storage, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        storage.flush_accesses().await;
    }
}

/// Hands freed heap back to the OS every few seconds. glibc keeps what a
/// burst freed (a large download's batches, many connections' buffers) in
/// its arenas, where it stays resident long after; `malloc_trim` returns
/// it, in well under a millisecond for a heap this size. Other C libraries
/// (musl) have no such call and give memory back on their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn release_free_heap() {
    let mut ticks = tokio::time::interval(Duration::from_secs(10));
    loop {
        ticks.tick().await;
        // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Flushes access times and evicts what the policy no longer keeps,
/// reporting each collection in `last`; in a cluster only on the replica
/// that owns [`cluster::GC_KEY`], so one collector works at a time
/// (another replica takes over within `cluster.expiry` of its leaving).
async fn collect_garbage(
    storage: Storage,
    policy: gc::Policy,
    interval: Duration,
    last: gc::LastCollection,
    cluster: Option<Arc<Cluster>>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await; // the first tick is immediate; start one interval in
    loop {
        ticks.tick().await;
        if let Some(cluster) = &cluster
            && !cluster.owns(cluster::GC_KEY)
        {
            tracing::debug!("collection skipped: another replica collects");
            continue;
        }
        storage.flush_accesses().await;
        let now = SystemTime::now();
        let plan = match gc::plan(&storage, &policy, now).await {
            Ok(plan) => plan,
            Err(e) => {
                tracing::warn!(error = %e, "eviction: cannot plan");
                report(&last, Err(format!("cannot plan: {e}")));
                continue;
            }
        };
        let applied = gc::apply(&storage, &plan, &policy, now).await;
        report(&last, applied.as_ref().map_err(|e| e.to_string()));
        match applied {
            Ok(applied) if !applied.removed_anything() => {
                tracing::debug!(
                    spared_as_used_since = applied.spared,
                    kept_bytes = plan.kept_bytes,
                    "collection removed nothing"
                );
            }
            Ok(applied) => {
                metrics().evicted_blobs.inc_by(applied.deleted_blobs as u64);
                metrics().evicted_bytes.inc_by(applied.freed_bytes);
                tracing::info!(
                    manifests = applied.dropped_links,
                    referrers_lists = applied.dropped_referrers,
                    blobs = applied.deleted_blobs,
                    freed_bytes = applied.freed_bytes,
                    spared_as_used_since = applied.spared,
                    kept_bytes = plan.kept_bytes,
                    "evicted unused content"
                );
            }
            Err(e) => tracing::warn!(error = %e, "eviction failed part-way; will retry"),
        }
    }
}

fn report(last: &gc::LastCollection, outcome: Result<&gc::Applied, String>) {
    *last.lock().expect("collection report lock") = Some(gc::CollectionReport::new(outcome));
}

/// On SIGINT/SIGTERM: stop accepting, give in-flight responses `drain` to
/// finish, then close what is left.
async fn shutdown_on_signal(handle: Handle<PeerAddr>, drain: Duration) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!(
        drain_seconds = drain.as_secs(),
        "shutting down: draining in-flight requests"
    );
    handle.graceful_shutdown(Some(drain));
}
