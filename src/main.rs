use clap::Parser as _;

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
