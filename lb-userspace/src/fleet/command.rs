//! `lb fleet import|export|status`: the fleet's store read and written directly, with
//! the etcd endpoints and prefix of an agent's configuration file.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::{
    doc::{self, FleetState, ServicesDoc, SERVICES},
    status::{self, FleetStatus},
    store::{FleetConfig, Store},
};
use crate::config::Config;

/// Where the packaged service keeps the agent's file (`dist/lb-agent.service`).
const DEFAULT_CONFIG: &str = "/etc/lb/lb.json";

#[derive(Debug, Subcommand)]
pub enum FleetCmd {
    /// Write FILE's services to the fleet store, where every agent of the fleet takes
    /// them from. FILE is what `lb fleet export` prints, or an agent's configuration file
    /// (its services are taken). Validated as a file first; refused if the services
    /// changed in the store while this ran.
    Import {
        #[command(flatten)]
        at: Where,
        file: PathBuf,
    },
    /// Print the fleet's services document.
    Export {
        #[command(flatten)]
        at: Where,
    },
    /// The live nodes, the revision each applied, its tables' digests, its flow hash and
    /// its lag; flags services whose tables differ between nodes, and nodes that hash
    /// flows differently (exit status 3).
    Status {
        #[command(flatten)]
        at: Where,
        #[arg(long)]
        json: bool,
    },
}

/// Which fleet: the `fleet` section of an agent's configuration file.
#[derive(Debug, clap::Args)]
pub struct Where {
    /// An agent configuration file with a `fleet` section (etcd endpoints, prefix, TLS).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// Tables differ between nodes, or a node lags.
const EXIT_DISAGREE: u8 = 3;

impl Where {
    fn load(&self) -> Result<(Config, FleetConfig)> {
        let c = Config::load(&self.config)?;
        let Some(f) = c.fleet.clone() else {
            bail!(
                "{}: no `fleet` section: this node is not part of a fleet",
                self.config.display()
            );
        };
        Ok((c, f))
    }
}

pub fn run(cmd: &FleetCmd) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            FleetCmd::Import { at, file } => import(at, file).await,
            FleetCmd::Export { at } => {
                let (_, f) = at.load()?;
                let mut store = Store::connect(&f).await?;
                let doc = store.get::<ServicesDoc>(SERVICES).await?;
                let Some(doc) = doc.value else {
                    bail!("the fleet store has no services under {}", f.prefix);
                };
                println!("{}", serde_json::to_string_pretty(&doc)?);
                Ok(ExitCode::SUCCESS)
            }
            FleetCmd::Status { at, json } => {
                let (_, f) = at.load()?;
                let s = read_status(&f).await?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print!("{}", status::render(&s));
                }
                Ok(if s.agrees() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_DISAGREE)
                })
            }
        }
    })
}

/// The fleet's status as the store holds it now.
pub async fn read_status(f: &FleetConfig) -> Result<FleetStatus> {
    let mut store = Store::connect(f).await?;
    let (_, docs) = store.read_all().await?;
    let mut state = FleetState::default();
    for d in &docs {
        state.take(d);
    }
    Ok(FleetStatus::of(&f.prefix, &state))
}

async fn import(at: &Where, file: &Path) -> Result<ExitCode> {
    let (local, f) = at.load()?;
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    // An agent's file is validated whole; a services document with this node's settings.
    let services = if value.get("node").is_some() {
        Config::parse(file, &text)?.services
    } else {
        doc::parse_services(&text, &local)
            .map_err(|e| anyhow::anyhow!("{}: invalid, nothing written: {e}", file.display()))?
    };
    let mut store = Store::connect(&f).await?;
    let now = store.get::<serde_json::Value>(SERVICES).await?;
    let n = services.len();
    let revision = store
        .put_if(SERVICES, &ServicesDoc { services }, now.revision)
        .await?;
    println!(
        "{n} services written to {}/{SERVICES} at revision {revision} (was {}); every agent \
         of the fleet applies them",
        f.prefix.trim_end_matches('/'),
        now.revision
    );
    Ok(ExitCode::SUCCESS)
}
