use clap::Parser as _;

/// The service's allocator (mimalloc, see src/main.rs), so that what the benchmarks measure
/// in this process (sign-local, the key backends) allocates as the worker does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = stella_signer_tools::cli::Cli::parse();
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stella-signer-tools: {err}");
            std::process::ExitCode::from(err.exit_code())
        }
    }
}
