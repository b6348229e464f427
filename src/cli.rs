//! The `kura` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};

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
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate CONFIG (plus REGISTRY_* variables) and print the effective
    /// settings with secrets masked. Exits 2 when invalid.
    Check { config: Option<PathBuf> },
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
            serve(config, &overrides)
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => check_config(config),
    }
}

fn check_config(config_path: Option<PathBuf>) -> ExitCode {
    match Config::load(
        config_path.as_deref(),
        std::env::vars(),
        &Overrides::default(),
    ) {
        Ok(config) => {
            print!("{}", config.describe());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("kura: {err}");
            ExitCode::from(2)
        }
    }
}

fn serve(config_path: Option<PathBuf>, overrides: &Overrides) -> ExitCode {
    let config = match Config::load(config_path.as_deref(), std::env::vars(), overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("kura: {err}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init(&config.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kura: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("kura: {err:#}");
            ExitCode::FAILURE
        }
    }
}
