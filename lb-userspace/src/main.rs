//! `lb`: the agent and the operator commands (see `lb --help`).

use std::process::ExitCode;

use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
use lb::{
    api::{Change, Request, Response},
    api_client,
    cli::{Cli, Command, ConfigCmd},
    config::Config,
};

/// The config format's man page (hand-written: it documents the file, not the command line).
const CONFIG_MAN_PAGE: &str = include_str!("../dist/lb.json.5");

/// `lb reload` applied what it could, but settings that need a restart were left.
const EXIT_RELOAD_IGNORED: u8 = 3;

fn main() -> ExitCode {
    // `COMPLETE=bash lb` prints a completion script that asks `lb` itself, so values
    // such as service names come from the running agent.
    clap_complete::CompleteEnv::with_factory(Cli::command).complete();
    let matches = Cli::command().get_matches();
    // The agent takes `--socket` only when it was given (flag or LB_SOCKET), not its
    // default: the file's `agent.api_socket` holds otherwise.
    let socket_given = matches!(
        matches.value_source("socket"),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    );
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli, socket_given) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, socket_given: bool) -> anyhow::Result<ExitCode> {
    let req = match cli.command {
        Command::Agent(args) => {
            init_logging();
            let rt = tokio::runtime::Runtime::new()?;
            let socket = socket_given.then(|| cli.socket.clone());
            rt.block_on(lb::agent::run(args.config, socket))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Config(ConfigCmd::Check { file }) => {
            let c = Config::load(&file)?;
            for w in c.warnings() {
                eprintln!("lb: warning: {w}");
            }
            println!(
                "{}: valid ({} services, {} backends, interfaces {})",
                file.display(),
                c.services.len(),
                c.services.iter().map(|s| s.backends.len()).sum::<usize>(),
                c.node.interfaces.join(", ")
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Fleet(ref f) => return lb::fleet::command::run(f),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut out);
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &out);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man { dir } => {
            // Each page in its section's directory, where `man 5 lb.json` looks.
            let (man1, man5) = (dir.join("man1"), dir.join("man5"));
            std::fs::create_dir_all(&man1)?;
            std::fs::create_dir_all(&man5)?;
            clap_mangen::generate_to(Cli::command(), &man1)?;
            std::fs::write(man5.join("lb.json.5"), CONFIG_MAN_PAGE)?;
            println!(
                "man pages written: {} (lb.1 and its subcommands), {} (lb.json.5, the config format)",
                man1.display(),
                man5.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::List(ref a) if a.rate => {
            let (before, start) = (status(&cli.socket)?, std::time::Instant::now());
            std::thread::sleep(std::time::Duration::from_secs_f64(a.interval));
            let after = status(&cli.socket)?;
            let rates = api_client::Rates::between(&before, &after, start.elapsed().as_secs_f64());
            return Ok(if a.json {
                print(&serde_json::to_string_pretty(&rates)?)
            } else {
                print(&api_client::render_rates(&after, &rates, a.exact))
            });
        }
        Command::Top { interval } => {
            lb::top::run(&cli.socket, std::time::Duration::from_secs_f64(interval))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::List(ref a) => {
            let resp = api_client::request(&cli.socket, &Request::Status {})?;
            return Ok(match resp {
                Response::Status(s) if a.json => print(&serde_json::to_string_pretty(&s)?),
                Response::Status(s) => print(&api_client::render_status(&s, a.stats, a.exact)),
                other => unexpected(other),
            });
        }
        Command::Table { ref service, json } => {
            let resp = api_client::request(
                &cli.socket,
                &Request::Table {
                    service: service.clone(),
                },
            )?;
            return Ok(match resp {
                Response::Table(t) if json => print(&serde_json::to_string_pretty(&t)?),
                Response::Table(t) => print(&api_client::render_table(&t)),
                other => unexpected(other),
            });
        }
        Command::Service(ref s) => Request::Apply { change: s.change() },
        Command::Backend(ref b) => Request::Apply { change: b.change() },
        Command::Plan(ref p) => p.request(),
        Command::Load(ref l) => Request::LoadFreeze {
            frozen: matches!(l, lb::cli::LoadCmd::Freeze),
        },
        Command::Reload => Request::Reload {},
        Command::Detach => Request::Detach {},
    };
    let resp = api_client::request(&cli.socket, &req)?;
    // Warned only for a change the agent accepts (or would).
    if let (
        Request::Plan { change } | Request::Apply { change },
        Response::Plan(_) | Response::Applied(_),
    ) = (&req, &resp)
    {
        warn_empty_service(change);
    }
    Ok(match resp {
        Response::Plan(p) => print(&api_client::render_plan(&p, false)),
        Response::Applied(p) => print(&api_client::render_plan(&p, true)),
        Response::Done { message } => print(&message),
        Response::LoadPlan(p) => print(&lb::load::render::plan(&p)),
        Response::Reloaded(r) => {
            print(&api_client::render_reload(&r));
            if r.ignored.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_RELOAD_IGNORED)
            }
        }
        other => unexpected(other),
    })
}

/// A service without backends drops what reaches its VIP: say so before it is made.
fn warn_empty_service(change: &Change) {
    if let Change::ServiceAdd { service } = change {
        if service.backends.is_empty() {
            eprintln!(
                "lb: warning: service {} has no backends: packets to {} {}:{} are dropped \
                 (counted as drop_no_backend) until one is added with `lb backend add {} ADDRESS`",
                service.name, service.protocol, service.vip, service.port, service.name
            );
        }
    }
}

/// The agent's status, or what it answered instead as an error.
fn status(socket: &std::path::Path) -> anyhow::Result<lb::api::Status> {
    match api_client::request(socket, &Request::Status {})? {
        Response::Status(s) => Ok(s),
        Response::Error { kind, message } => anyhow::bail!("{}: {message}", kind.name()),
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn print(s: &str) -> ExitCode {
    println!("{}", s.trim_end());
    ExitCode::SUCCESS
}

fn unexpected(r: Response) -> ExitCode {
    match r {
        Response::Error { kind, message } => eprintln!("lb: {}: {message}", kind.name()),
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
