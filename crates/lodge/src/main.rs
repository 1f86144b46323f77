//! `lodge`: the single binary. `lodge serve` runs everything on one machine; the other
//! subcommands are the developer CLI, which talks to any Lodge through the public API.

mod agent;
mod bench;
mod cli;
mod migrate;
mod node;
mod ping;
mod serve;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lodge",
    version,
    about = "Self-hostable game-server hosting that speaks the Hathora Cloud API",
    after_help = "Start here:\n  lodge serve                                   run Lodge on this machine\n  \
lodge deploy examples/echo                    upload a build and deploy it\n  \
lodge rooms create --region London --wait     get a room; prints host:port\n  \
lodge logs PROCESS_ID -f                      follow a game server's log"
)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, control plane, an embedded node agent and proxy on this machine.
    Serve(serve::ServeArgs),
    /// Run a node that joins a control plane (`lodge nodes join-token` gives the token).
    Agent(agent::AgentArgs),
    /// Nodes: list, inspect, drain; join tokens for new ones.
    #[command(subcommand)]
    Nodes(cli::nodes::NodesCmd),
    /// The control-plane replicas sharing this Lodge's store, and which runs the singletons.
    Replicas,
    /// Pack, upload and build a game server, then create a deployment.
    Deploy(cli::DeployArgs),
    /// Applications.
    #[command(subcommand)]
    Apps(cli::AppsCmd),
    /// Builds.
    #[command(subcommand)]
    Builds(cli::BuildsCmd),
    /// Deployments.
    #[command(subcommand)]
    Deployments(cli::DeploymentsCmd),
    /// Rooms: create, inspect, connect, destroy.
    #[command(subcommand)]
    Rooms(cli::RoomsCmd),
    /// Processes: list, inspect, stop, pre-warm.
    #[command(subcommand)]
    Processes(cli::ProcessesCmd),
    /// Print (or follow) a process's log.
    Logs(cli::LogsArgs),
    /// Developer tokens of the organization.
    #[command(subcommand)]
    Tokens(cli::TokensCmd),
    /// Organizations of this Lodge: list them, create one with its first admin token.
    #[command(subcommand)]
    Orgs(cli::OrgsCmd),
    /// End every game server a stopped Lodge left running for a data dir (they outlive Lodge
    /// by design), with their network namespaces, cgroups, bridge and nftables table.
    Cleanup {
        #[arg(long, env = "LODGE_DATA_DIR", default_value = "./lodge-data")]
        data_dir: std::path::PathBuf,
    },
    /// Copy a stopped one-box Lodge's state (orgs, tokens, apps, builds, deployments,
    /// processes, rooms, lobbies, legacy ids) from its embedded store into an empty PostgreSQL
    /// database, then serve it with `lodge serve --store URL` on the same data dir.
    Migrate {
        /// The data dir of the Lodge to move (it must not be running).
        #[arg(long, value_name = "DATA_DIR")]
        from: std::path::PathBuf,
        /// The PostgreSQL database to copy into; it must hold no Lodge data yet.
        #[arg(long, value_name = "URL")]
        to: String,
    },
    /// Measure a Lodge started for the purpose: room allocation, cold starts, the proxy against
    /// a direct socket and nginx, and scale. Prints the tables of BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Internal: the benchmarks' game server (UDP and TCP echo).
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        port: u16,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Internal: supervise one game-server process (started by the agent).
    #[command(hide = true)]
    Shim { dir: std::path::PathBuf },
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Run a CLI command; API errors are printed as the server wrote them.
fn client(
    global: &cli::Global,
    f: impl AsyncFnOnce(&cli::Ctx) -> Result<(), cli::CliError>,
) -> std::process::ExitCode {
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let ctx = cli::Ctx::new(global).map_err(|e| e.0)?;
            f(&ctx).await.map_err(|e| e.0)
        })
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let g = &cli.global;
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::Agent(_) | Command::Shim { .. } | Command::EchoServer { .. }
    ) {
        // A CLI piped into `head` ends quietly, like other Unix tools.
        // SAFETY: setting a signal disposition to its default has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Deploy(a) => client(g, async |c| cli::deploy::run(c, a).await),
        Command::Apps(cmd) => client(g, async |c| cli::apps(c, cmd).await),
        Command::Builds(cmd) => client(g, async |c| cli::builds(c, cmd).await),
        Command::Deployments(cmd) => client(g, async |c| cli::deployments(c, cmd).await),
        Command::Rooms(cmd) => client(g, async |c| cli::rooms(c, cmd).await),
        Command::Processes(cmd) => client(g, async |c| cli::processes(c, cmd).await),
        Command::Logs(a) => client(g, async |c| cli::logs(c, a).await),
        Command::Tokens(cmd) => client(g, async |c| cli::tokens(c, cmd).await),
        Command::Orgs(cmd) => client(g, async |c| cli::orgs(c, cmd).await),
        Command::Nodes(cmd) => client(g, async |c| cli::nodes::nodes(c, cmd).await),
        Command::Replicas => client(g, async |c| cli::replicas::list(c).await),
        Command::Agent(args) => match runtime().and_then(|rt| rt.block_on(agent::run(args))) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lodge agent: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Migrate { from, to } => {
            match runtime().and_then(|rt| rt.block_on(migrate::run(&from, &to))) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup { data_dir } => {
            let done = runtime().and_then(|rt| rt.block_on(serve::cleanup(&data_dir)));
            match done {
                Ok(n) => {
                    println!("ended {n} game server process(es); removed their namespaces, cgroups, the bridge and the node's nftables table");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Bench(a) => match bench::run(a) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::EchoServer { port } => match bench::echo_server(port) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lodge echo-server: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lodge", &mut std::io::stdout());
            std::process::ExitCode::SUCCESS
        }
        Command::Shim { dir } => match lodge_agent::shim::main(&dir) {
            Ok(code) => std::process::ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
            Err(e) => {
                eprintln!("lodge shim: {e}");
                std::process::ExitCode::from(111)
            }
        },
        Command::Serve(args) => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("lodge: {e}");
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
