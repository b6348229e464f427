//! Kura: a pull-through cache for OCI / Docker registries.
//!
//! Module map (see ARCHITECTURE.md for the request path and invariants):
//! - [`cli`]: the `kura` command line.
//! - [`config`]: Distribution-compatible YAML + `REGISTRY_*` env + flags.
//! - [`api`]: the HTTP surface (OCI Distribution read API).
//! - [`auth`]: who a client is (htpasswd, Distribution-compatible tokens) and what it may pull (the one authorization gate).
//! - [`dashboard`]: the page at `/` and its JSON API under `/kura/api/v1/`.
//! - [`cache`]: pull-through logic: cache lookups, tag freshness, shared downloads.
//! - [`upstream`]: the HTTP client for the upstream registry (auth, redirects, timeouts).
//! - [`storage`]: on-disk layout: content-addressed blobs, staging, tag index.
//! - [`reference`]: validation of names, tags and digests.
//! - [`singleflight`]: one shared fetch (a task with a deadline) per key, for cache and upstream alike.
//! - [`glob`]: repository and tag globs of access rules and content policy.
//! - [`cluster`]: replicas of one storage that know each other: heartbeats, the owner rule.
//! - [`warming`]: push events and scheduled sync that warm the cache (and `kura warm`'s core).
pub mod api;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod dashboard;
pub mod gc;
pub mod glob;
pub mod logging;
pub mod metrics;
pub mod policy_reload;
pub mod reference;
pub mod routing;
pub mod server;
pub mod singleflight;
pub mod storage;
pub mod upstream;
pub mod warming;
