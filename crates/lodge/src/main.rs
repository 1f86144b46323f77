//! `lodge`: the single binary. `lodge serve` runs everything on one machine.

mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lodge",
    version,
    about = "Self-hostable game-server hosting that speaks the Hathora Cloud API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, control plane, an embedded node agent and proxy on this machine.
    Serve(serve::ServeArgs),
    /// Internal: supervise one game-server process (started by the agent).
    #[command(hide = true)]
    Shim { dir: std::path::PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Shim { dir } => match lodge_agent::shim::main(&dir) {
            Ok(code) => std::process::ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
            Err(e) => {
                eprintln!("lodge shim: {e}");
                std::process::ExitCode::from(111)
            }
        },
        Command::Serve(args) => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("lodge: cannot start the runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve::run(args)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lodge: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
