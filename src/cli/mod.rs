//! The `kura` command line: `serve`, `config check`, and the toolbox that
//! works on a cache directory (`ls`, `du`, `gc`, `verify`, `warm`).

mod toolbox;
mod warm;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigSource, Overrides};

#[derive(Parser)]
#[command(
    name = "kura",
    version,
    about = "A pull-through cache for container registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the cache. CONFIG is a Distribution-format YAML file (optional);
    /// REGISTRY_* environment variables and the flags below override it.
    Serve {
        config: Option<PathBuf>,
        /// Listen address (overrides http.addr), e.g. 127.0.0.1:5000.
        #[arg(long)]
        listen: Option<String>,
        /// Upstream registry URL (overrides proxy.remoteurl).
        #[arg(long)]
        upstream: Option<String>,
        /// Storage directory (overrides storage.filesystem.rootdirectory).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// List cached repositories and tags with sizes and last use.
    Ls(Settings),
    /// Show how much the cache holds.
    Du(Settings),
    /// Remove expired and unreferenced content (proxy.ttl, cache.maxsize).
    Gc {
        #[command(flatten)]
        settings: Settings,
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash every stored blob; report and remove corrupt ones.
    Verify {
        #[command(flatten)]
        settings: Settings,
        /// Only report.
        #[arg(long)]
        dry_run: bool,
    },
    /// Pre-fetch images into the cache from their upstream.
    Warm {
        #[command(flatten)]
        settings: Settings,
        /// Images: `[registry/]name[:tag|@digest]`.
        #[arg(required = true)]
        images: Vec<String>,
        /// Only this platform of a multi-platform image, e.g. linux/amd64
        /// (default: all platforms).
        #[arg(long)]
        platform: Option<String>,
        /// Skip the referrers (signatures, SBOMs, attestations) of each
        /// warmed manifest, which are fetched too by default.
        #[arg(long)]
        no_referrers: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate CONFIG (plus REGISTRY_* variables) and print the effective
    /// settings with secrets masked. Exits 2 when invalid.
    Check { config: Option<PathBuf> },
}

/// Where the toolbox finds the cache and its upstreams.
#[derive(Args)]
struct Settings {
    /// Distribution-format YAML file, as given to `kura serve`.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Storage directory (overrides storage.filesystem.rootdirectory).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Upstream registry URL (overrides proxy.remoteurl).
    #[arg(long)]
    upstream: Option<String>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            upstream,
            cache_dir,
        } => {
            let overrides = Overrides {
                listen,
                upstream,
                cache_dir,
            };
            let source = config.clone().map(|path| ConfigSource {
                path,
                overrides: overrides.clone(),
            });
            let Some(config) = load(config, &overrides) else {
                return ExitCode::from(2);
            };
            crate::logging::init(&config.log);
            run(crate::server::run(config, source))
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => match load(config, &Overrides::default()) {
            Some(config) => match check_token_keys(&config) {
                Ok(()) => {
                    print!("{}", config.describe());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kura: {e}");
                    ExitCode::from(2)
                }
            },
            None => ExitCode::from(2),
        },
        Command::Ls(settings) => tool(settings, toolbox::ls),
        Command::Du(settings) => tool(settings, toolbox::du),
        Command::Gc { settings, dry_run } => tool(settings, move |c| toolbox::gc(c, dry_run)),
        Command::Verify { settings, dry_run } => {
            tool(settings, move |c| toolbox::verify(c, dry_run))
        }
        Command::Warm {
            settings,
            images,
            platform,
            no_referrers,
        } => tool(settings, move |c| {
            warm::warm(c, images, platform, !no_referrers)
        }),
    }
}

/// Loads configuration, printing the error (which names the key) if invalid.
fn load(path: Option<PathBuf>, overrides: &Overrides) -> Option<Config> {
    match Config::load(path.as_deref(), std::env::vars(), overrides) {
        Ok(config) => Some(config),
        Err(err) => {
            eprintln!("kura: {err}");
            None
        }
    }
}

fn tool<F, Fut>(settings: Settings, command: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let overrides = Overrides {
        listen: None,
        upstream: settings.upstream,
        cache_dir: settings.cache_dir,
    };
    let Some(config) = load(settings.config, &overrides) else {
        return ExitCode::from(2);
    };
    // Tools print their results; only warnings go to the log.
    crate::logging::init(&crate::config::LogConfig {
        level: "warn".into(),
        ..config.log.clone()
    });
    run(command(config))
}

/// Keeps memory freed by a download in glibc's heap for the next chunks
/// instead of handing it back at once. A cold download holds the
/// upstream's chunks (a few hundred KiB each, several MiB in flight) until
/// they are written, hashed and followed, then frees them: with glibc's
/// defaults each free above 128 KiB trimmed the heap and the next chunk
/// faulted in fresh zeroed pages, a page fault per 4 KiB received. The
/// server still returns free heap every few seconds (`malloc_trim`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn reuse_freed_heap() {
    // SAFETY: mallopt sets glibc's allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Threads for blocking calls (file opens, reads the page cache cannot
/// answer, staging writes and hashes, fsyncs). tokio's default is 512;
/// every blocking task Kura runs is one short call that never waits for
/// another, so a burst only queues here, and 64 threads keep a storm of
/// requests from becoming hundreds of threads.
const MAX_BLOCKING_THREADS: usize = 64;

fn run(future: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    reuse_freed_heap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kura: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kura: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `auth.token`'s key files must hold usable keys, as `serve` will insist.
fn check_token_keys(config: &Config) -> Result<(), crate::auth::token::KeyError> {
    match &config.token {
        Some(token) => crate::auth::token::TokenAuth::load(token).map(drop),
        None => Ok(()),
    }
}
