use clap::Parser as _;

/// mimalloc: the job path allocates and frees many short-lived buffers across threads, where
/// glibc's allocator spent a quarter of the worker's CPU (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = stella_signer::cli::Cli::parse();
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stella-signer: {err}");
            std::process::ExitCode::from(err.exit_code())
        }
    }
}
