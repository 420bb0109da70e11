//! `lb`: the agent and the operator commands (see `lb --help`).

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use lb::{
    api::{Request, Response},
    cli::{Cli, Command, ConfigCmd},
    client,
    config::Config,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let req = match cli.command {
        Command::Agent(args) => {
            init_logging();
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(lb::agent::run(args.config))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Config(ConfigCmd::Check { file }) => {
            let c = Config::load(&file)?;
            println!(
                "{}: valid ({} services, {} backends, interfaces {})",
                file.display(),
                c.services.len(),
                c.services.iter().map(|s| s.backends.len()).sum::<usize>(),
                c.node.interfaces.join(", ")
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut out);
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &out);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(Cli::command(), &dir)?;
            println!("man pages written to {}", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        Command::List(ref a) if a.rate => {
            let (before, start) = (status(&cli.socket)?, std::time::Instant::now());
            std::thread::sleep(std::time::Duration::from_secs_f64(a.interval));
            let after = status(&cli.socket)?;
            let rates = client::Rates::between(&before, &after, start.elapsed().as_secs_f64());
            return Ok(if a.json {
                print(&serde_json::to_string_pretty(&rates)?)
            } else {
                print(&client::render_rates(&after, &rates, a.exact))
            });
        }
        Command::Top { interval } => {
            lb::top::run(&cli.socket, std::time::Duration::from_secs_f64(interval))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::List(ref a) => {
            let resp = client::request(&cli.socket, &Request::Status {})?;
            return Ok(match resp {
                Response::Status(s) if a.json => print(&serde_json::to_string_pretty(&s)?),
                Response::Status(s) => print(&client::render_status(&s, a.stats, a.exact)),
                other => unexpected(other),
            });
        }
        Command::Table { ref service, json } => {
            let resp = client::request(
                &cli.socket,
                &Request::Table {
                    service: service.clone(),
                },
            )?;
            return Ok(match resp {
                Response::Table(t) if json => print(&serde_json::to_string_pretty(&t)?),
                Response::Table(t) => print(&client::render_table(&t)),
                other => unexpected(other),
            });
        }
        Command::Service(ref s) => Request::Apply { change: s.change() },
        Command::Backend(ref b) => Request::Apply { change: b.change() },
        Command::Plan(ref p) => Request::Plan { change: p.change() },
        Command::Reload => Request::Reload {},
        Command::Detach => Request::Detach {},
    };
    Ok(match client::request(&cli.socket, &req)? {
        Response::Plan(p) => print(&client::render_plan(&p, false)),
        Response::Applied(p) => print(&client::render_plan(&p, true)),
        Response::Done { message } => print(&message),
        other => unexpected(other),
    })
}

/// The agent's status, or what it answered instead as an error.
fn status(socket: &std::path::Path) -> anyhow::Result<lb::api::Status> {
    match client::request(socket, &Request::Status {})? {
        Response::Status(s) => Ok(s),
        Response::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn print(s: &str) -> ExitCode {
    println!("{}", s.trim_end());
    ExitCode::SUCCESS
}

fn unexpected(r: Response) -> ExitCode {
    match r {
        Response::Error { message } => eprintln!("lb: {message}"),
        other => eprintln!("lb: unexpected answer from the agent: {other:?}"),
    }
    ExitCode::FAILURE
}

fn init_logging() {
    use std::io::IsTerminal;

    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
}
