//! The `lb` command line: the agent, and operator commands that talk to it.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};

use crate::{
    api::Change,
    config::{BackendConfig, CheckKind, HealthConfig, Protocol, ServiceConfig},
};

/// lb: an XDP layer-4 load balancer.
///
/// `lb agent` runs on every node: it attaches the XDP program, keeps its maps true to the
/// configured services, backend health and weights, and serves the operator API. The
/// other commands talk to a running agent over its Unix socket (root only).
#[derive(Debug, Parser)]
#[command(name = "lb", version, propagate_version = true)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        global = true,
        default_value = "/run/lb/lb.sock",
        env = "LB_SOCKET"
    )]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

/// The end of `lb agent --help` and of lb-agent(1).
const AGENT_SIGNALS_AND_ENVIRONMENT: &str = "\
Signals:
  SIGTERM, SIGINT  stop the agent; the XDP program stays attached and keeps forwarding
                   with the last tables (`lb detach` removes it)
  SIGHUP           reload the configuration file, as `lb reload`

Environment:
  LB_LOG         what is logged (an EnvFilter): info (default), debug, lb=debug,warn
  LB_SOCKET      the API socket, as --socket
  NOTIFY_SOCKET  set by systemd (Type=notify): READY=1, RELOADING=1, STOPPING=1";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (root, or the capabilities of docs/agent.md): attach, pin,
    /// health-check, serve the API and metrics.
    #[command(after_long_help = AGENT_SIGNALS_AND_ENVIRONMENT)]
    Agent(AgentArgs),
    /// List services and backends, ipvsadm-style.
    List(ListArgs),
    /// A live view of services, backends, shares, rates, health and drops; q quits.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_parser = interval)]
        interval: f64,
    },
    /// Add or remove services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add, remove, reweight, drain or undrain backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Show how a service's buckets are shared among its backends.
    Table {
        /// The service's name.
        #[arg(add = ArgValueCandidates::new(service_names))]
        service: String,
        #[arg(long)]
        json: bool,
    },
    /// Dry run: how many buckets a change would move, and between whom. Changes nothing.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Load-driven weights: freeze or resume the loop (docs/load.md).
    #[command(subcommand)]
    Load(LoadCmd),
    /// A fleet's store in etcd: import, export, status (docs/fleet.md).
    #[command(subcommand)]
    Fleet(crate::fleet::command::FleetCmd),
    /// Make the agent reread its configuration file (like SIGHUP).
    Reload,
    /// Remove the XDP program from the interfaces and delete the pins, then stop the
    /// agent. Forwarding stops.
    Detach,
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages into a man directory (DIR/man1, DIR/man5).
    Man {
        /// A man directory such as /usr/local/share/man: lb.1 and a page per subcommand
        /// go to DIR/man1, lb.json.5 (the config format) to DIR/man5.
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The JSON configuration file (see `lb config check`).
    #[arg(long, short)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Show packet and byte counters.
    #[arg(long)]
    pub stats: bool,
    /// Exact numbers instead of K/M/G.
    #[arg(long)]
    pub exact: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Packets/s and bytes/s per service and backend, measured over `--interval`.
    #[arg(long, conflicts_with = "stats")]
    pub rate: bool,
    /// Seconds to measure `--rate` over.
    #[arg(long, default_value_t = 1.0, value_parser = interval, requires = "rate")]
    pub interval: f64,
}

/// A positive number of seconds, at most an hour.
fn interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

#[derive(Debug, Subcommand)]
pub enum LoadCmd {
    /// Stop changing effective weights; they stay as they are (kept in the config file,
    /// so a restarted agent stays frozen; in a fleet, in the store, for every node).
    Freeze,
    /// Let the loop change effective weights again.
    Resume,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate a configuration file and print what is wrong. Touches nothing.
    Check { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Add a service (backends are added with `lb backend add`).
    Add(ServiceAddArgs),
    /// Remove a service: its VIP:port is passed to the stack again.
    Remove {
        #[arg(add = ArgValueCandidates::new(service_names))]
        service: String,
    },
}

#[derive(Debug, Args)]
pub struct ServiceAddArgs {
    /// A unique name for commands.
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub vip: IpAddr,
    #[arg(long)]
    pub port: u16,
    /// tcp or udp.
    #[arg(long, default_value = "tcp")]
    pub protocol: Protocol,
    /// log2 of the table size (default: 16, more for over 1,024 backends).
    #[arg(long)]
    pub table_bits: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// Add a backend to a service.
    Add(BackendAddArgs),
    /// Remove a backend from a service (drain it first to keep its connections).
    Remove(BackendRef),
    /// Set a backend's weight (0 drains it).
    SetWeight {
        #[command(flatten)]
        at: BackendRef,
        weight: u32,
    },
    /// Stop sending new connections to a backend; its connections continue.
    Drain(BackendRef),
    /// Undo `drain`.
    Undrain(BackendRef),
}

#[derive(Debug, Args)]
pub struct BackendRef {
    /// The service's name.
    #[arg(add = ArgValueCandidates::new(service_names))]
    pub service: String,
    /// The backend's address.
    pub address: IpAddr,
}

#[derive(Debug, Args)]
pub struct BackendAddArgs {
    #[command(flatten)]
    pub at: BackendRef,
    #[arg(long, default_value_t = 100)]
    pub weight: u32,
    /// Health check: tcp, http or udp (none when absent).
    #[arg(long)]
    pub health: Option<CheckKind>,
    /// Port to check (the service port when absent).
    #[arg(long)]
    pub health_port: Option<u16>,
    /// HTTP path to check.
    #[arg(long)]
    pub health_path: Option<String>,
    /// The datagram a udp check sends (any answer is healthy).
    #[arg(long)]
    pub health_send: Option<String>,
    /// Check through the tunnel, GUE-encapsulated to the VIP as client packets travel
    /// (tcp or udp).
    #[arg(long)]
    pub health_tunnel: bool,
    #[arg(long, default_value_t = 1000)]
    pub health_interval_ms: u64,
    #[arg(long, default_value_t = 500)]
    pub health_timeout_ms: u64,
    #[arg(long, default_value_t = 2)]
    pub health_rise: u32,
    #[arg(long, default_value_t = 3)]
    pub health_fall: u32,
}

/// The changes `lb plan` can try.
#[derive(Debug, Subcommand)]
pub enum PlanCmd {
    /// What adding a service would do.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// What a backend change would move.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// The load controller's next step: effective weights and buckets it would move.
    Load,
}

/// Service names for shell completion, asked of the running agent (`LB_SOCKET` or the
/// default socket); none when it cannot be reached.
fn service_names() -> Vec<CompletionCandidate> {
    let socket = std::env::var_os("LB_SOCKET").map_or_else(
        || PathBuf::from(crate::config::DEFAULT_API_SOCKET),
        PathBuf::from,
    );
    match crate::api_client::request(&socket, &crate::api::Request::Status {}) {
        Ok(crate::api::Response::Status(s)) => s
            .services
            .into_iter()
            .map(|s| CompletionCandidate::new(s.name))
            .collect(),
        _ => Vec::new(),
    }
}

impl ServiceCmd {
    pub fn change(&self) -> Change {
        match self {
            ServiceCmd::Add(a) => Change::ServiceAdd {
                service: ServiceConfig {
                    name: a.name.clone(),
                    vip: a.vip,
                    port: a.port,
                    protocol: a.protocol,
                    table_bits: a.table_bits,
                    backends: Vec::new(),
                },
            },
            ServiceCmd::Remove { service } => Change::ServiceRemove {
                service: service.clone(),
            },
        }
    }
}

impl BackendCmd {
    pub fn change(&self) -> Change {
        match self {
            BackendCmd::Add(a) => Change::BackendAdd {
                service: a.at.service.clone(),
                backend: BackendConfig {
                    address: a.at.address,
                    weight: a.weight,
                    drain: false,
                    health: a.health.map(|kind| HealthConfig {
                        kind,
                        path: a.health_path.clone(),
                        port: a.health_port,
                        send: a.health_send.clone(),
                        tunnel: a.health_tunnel,
                        interval_ms: a.health_interval_ms,
                        timeout_ms: a.health_timeout_ms,
                        rise: a.health_rise,
                        fall: a.health_fall,
                    }),
                },
            },
            BackendCmd::Remove(r) => Change::BackendRemove {
                service: r.service.clone(),
                address: r.address,
            },
            BackendCmd::SetWeight { at, weight } => Change::SetWeight {
                service: at.service.clone(),
                address: at.address,
                weight: *weight,
            },
            BackendCmd::Drain(r) => Change::Drain {
                service: r.service.clone(),
                address: r.address,
                drain: true,
            },
            BackendCmd::Undrain(r) => Change::Drain {
                service: r.service.clone(),
                address: r.address,
                drain: false,
            },
        }
    }
}

impl PlanCmd {
    /// The request this dry run makes.
    pub fn request(&self) -> crate::api::Request {
        use crate::api::Request;
        match self {
            PlanCmd::Service(s) => Request::Plan { change: s.change() },
            PlanCmd::Backend(b) => Request::Plan { change: b.change() },
            PlanCmd::Load => Request::LoadPlan {},
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn backend_commands_parse_into_changes() {
        let cli =
            Cli::try_parse_from(["lb", "backend", "set-weight", "web", "10.0.0.3", "50"]).unwrap();
        let Command::Backend(b) = cli.command else {
            panic!()
        };
        assert_eq!(
            b.change(),
            Change::SetWeight {
                service: "web".into(),
                address: "10.0.0.3".parse().unwrap(),
                weight: 50
            }
        );
        let e = Cli::try_parse_from(["lb", "backend", "drain", "web", "10.0.0.300"]).unwrap_err();
        assert!(e.to_string().contains("invalid value '10.0.0.300'"), "{e}");
        let e = Cli::try_parse_from([
            "lb",
            "service",
            "add",
            "--name",
            "x",
            "--vip",
            "10.0.0.1",
            "--port",
            "80",
            "--protocol",
            "sctp",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("[possible values: tcp, udp]"), "{e}");
    }
}
