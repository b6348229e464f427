//! Integration-test support for Kura.
//!
//! Everything here talks to 127.0.0.1 only. Every child process and background server is owned by a
//! guard whose `Drop` stops it (kill + wait, or shutdown + join), and every wait is bounded in time.
//!
//! Servers written in Rust (token issuer, counting forwarder) run on their own threads with their own
//! tokio runtimes, so a test may block its own runtime (e.g. while running skopeo) without stalling
//! them.
#![allow(dead_code, unused_imports)]

pub mod artifacts;
pub mod clients;
pub mod forwarder;
pub mod hits;
pub mod images;
pub mod kura;
pub mod net;
pub mod process;
pub mod referrers_api;
pub mod registry_client;
pub mod s3;
pub mod server;
pub mod stalling;
pub mod token;
pub mod upstream;

pub use clients::{
    Containerd, CtrImage, LandedContent, PodmanImage, ctr_pull, landed_content, podman_pull,
    skopeo_copy, skopeo_copy_as,
};
pub use images::{Blob, Platform, PushedImage, PushedIndex, SeededImages, seed_all, seed_large};
pub use kura::{Kura, KuraOptions};
pub use net::{free_port, wait_http, wait_http_ok};
pub use process::require_tool;
pub use referrers_api::ReferrersApi;
pub use registry_client::{Auth, RegistryClient};
pub use stalling::StallingUpstream;
pub use token::TokenIssuer;
pub use upstream::Upstream;
