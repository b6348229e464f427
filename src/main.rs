//! Thin entry point: everything lives in the `kura` library so tests and
//! future commands share it.
fn main() -> std::process::ExitCode {
    kura::cli::main()
}
