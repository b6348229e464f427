//! Process-wide `tracing` setup from `log.level` / `log.formatter`.
//!
//! Nothing in Kura logs request headers or credentials; `RUST_LOG`, when
//! set, overrides `log.level` for debugging individual modules.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

pub fn init(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // `try_init` because tests may initialise more than once per process.
    let _ = if config.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
