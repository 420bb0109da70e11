//! The operator API between `lb` commands and the agent: one JSON request per line on a
//! Unix socket, one JSON response per line back.

use std::net::IpAddr;

use lb_common::hash::FlowHash;
use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, Protocol, ServiceConfig};

/// What an operator asks of the agent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Services, backends, health, counters.
    // The requests without arguments are empty struct variants, not unit variants:
    // serde ignores unknown fields next to the tag of a unit variant, so
    // `{"op":"detach","dry_run":true}` would detach.
    Status {},
    /// The bucket shares of one service's table.
    Table { service: String },
    /// Dry run: what `change` would move. Changes nothing.
    Plan { change: Change },
    /// Apply `change`.
    Apply { change: Change },
    /// Reread the config file (like SIGHUP).
    Reload {},
    /// Remove the program from the interfaces and the pins, then stop the agent.
    Detach {},
    /// Freeze (`true`) or resume the load controller; kept in the config file.
    LoadFreeze { frozen: bool },
    /// Dry run: the load controller's next step. Changes nothing.
    LoadPlan {},
}

impl Request {
    /// Whether the request only reads (allowed to the read-only API group).
    pub fn changes_nothing(&self) -> bool {
        matches!(
            self,
            Request::Status {}
                | Request::Table { .. }
                | Request::Plan { .. }
                | Request::LoadPlan {}
        )
    }
}

/// A change to the service set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    ServiceAdd {
        service: ServiceConfig,
    },
    ServiceRemove {
        service: String,
    },
    BackendAdd {
        service: String,
        backend: BackendConfig,
    },
    BackendRemove {
        service: String,
        address: IpAddr,
    },
    SetWeight {
        service: String,
        address: IpAddr,
        weight: u32,
    },
    /// `drain: true` drains, `false` undrains.
    Drain {
        service: String,
        address: IpAddr,
        drain: bool,
    },
}

/// The agent's answer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Status),
    Table(TableSummary),
    Plan(PlanSummary),
    /// A change was applied: what it moved.
    Applied(PlanSummary),
    Done {
        message: String,
    },
    /// A reload was applied: what changed, and what waits for a restart.
    Reloaded(ReloadReport),
    /// The load controller's next step (`lb plan load`).
    LoadPlan(crate::load::control::LoadPlan),
    /// The request was refused or failed: nothing changed unless `kind` is `internal`.
    Error {
        /// What sort of failure, for programs (an older agent sends none: `internal`).
        #[serde(default)]
        kind: ErrorKind,
        message: String,
    },
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request or the configuration it would give is invalid (the rules of a file).
    Invalid,
    /// It names a service or backend that does not exist.
    NotFound,
    /// It clashes with what exists (a name, an address, a file edited meanwhile).
    Conflict,
    /// It needs more than the data plane holds (services, backends, buckets).
    Capacity,
    /// The caller may not make this request.
    Forbidden,
    /// The agent cannot answer now (starting, stopping); try again.
    Unavailable,
    /// The agent failed applying it (a map or file write).
    #[default]
    Internal,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Capacity => "capacity",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

/// A refused or failed request: what `Response::Error` carries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Self {
        Response::Error {
            kind: e.kind,
            message: e.message,
        }
    }
}

impl Response {
    /// A response of error `kind`.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError::new(kind, message).into()
    }
}

/// What a reload did.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ReloadReport {
    pub file: String,
    /// One line per change applied (services, backends, their tables, `backend_vips`).
    pub changed: Vec<String>,
    /// One line per setting that differs from the running one but takes effect only
    /// with a restart (`node`, `agent`).
    pub ignored: Vec<String>,
}

/// Everything `lb list` shows.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    /// Per-reason packet counts of the data plane (see docs/counters.md).
    pub reasons: Vec<ReasonCount>,
    pub table_rebuilds: u64,
    /// The flow hash the data plane runs with (`node.flow_hash` as of the last start).
    #[serde(default)]
    pub flow_hash: FlowHash,
    /// The load controller, when a service follows load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<crate::load::control::LoadStatus>,
    /// The fleet as this node sees it (a node with a `fleet` section only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::status::FleetStatus>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ReasonCount {
    pub reason: String,
    pub packets: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub table_bits: u32,
    pub packets: u64,
    pub bytes: u64,
    /// Buckets whose first hop changed in table rebuilds since the agent started.
    #[serde(default)]
    pub moved_buckets: u64,
    /// A fingerprint of the live table (first and second hops by address): nodes that
    /// forward alike have equal digests. 0 when the service has no table.
    #[serde(default)]
    pub table_digest: u64,
    pub backends: Vec<BackendStatus>,
}

/// A backend's health as the agent's checks see it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
    /// No health check configured: taken as up.
    Unchecked,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct BackendStatus {
    pub address: IpAddr,
    /// The backend is this node itself: its packets go to the local stack.
    #[serde(default)]
    pub local: bool,
    pub weight: u32,
    pub drain: bool,
    pub health: Health,
    /// Buckets the backend owns (first hop) in the live table.
    pub buckets: u32,
    /// Packets and bytes forwarded to it (all services it serves on this node).
    pub packets: u64,
    pub bytes: u64,
    /// Health checks done / failed since the agent started.
    pub checks: u64,
    pub check_failures: u64,
    /// Up/down transitions since the agent started.
    pub health_transitions: u64,
    /// Why the most recent failed check failed ("connect refused", "timeout after
    /// 500ms"); absent when no check has failed since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Effective weight and utilisation, when the service follows load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<crate::load::control::BackendLoad>,
}

/// `lb table SERVICE`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct TableSummary {
    pub service: String,
    pub buckets: u32,
    /// Buckets with no backend (no backend active).
    pub empty: u32,
    pub backends: Vec<TableShare>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct TableShare {
    pub address: IpAddr,
    pub weight: u32,
    /// Buckets it owns (first hop).
    pub first: u32,
    /// Buckets where it is the second hop (it owned them before).
    pub second: u32,
}

/// How many buckets a change moves, and between whom.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct PlanSummary {
    pub service: String,
    pub buckets: u32,
    pub moved: u32,
    pub moves: Vec<Move>,
    /// What is allowed but likely wrong in the service after the change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Move {
    /// `None`: an empty bucket.
    pub from: Option<IpAddr>,
    pub to: Option<IpAddr>,
    pub buckets: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        let r = Request::Apply {
            change: Change::SetWeight {
                service: "web".into(),
                address: "10.0.0.1".parse().unwrap(),
                weight: 5,
            },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"op":"apply","change":{"kind":"set_weight","service":"web","address":"10.0.0.1","weight":5}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"table","service":"w","x":1}"#).is_err());
        for op in ["status", "reload", "detach"] {
            let plain = format!(r#"{{"op":"{op}"}}"#);
            let r: Request = serde_json::from_str(&plain).unwrap();
            assert_eq!(serde_json::to_string(&r).unwrap(), plain);
            let extra = format!(r#"{{"op":"{op}","dry_run":true}}"#);
            assert!(serde_json::from_str::<Request>(&extra).is_err(), "{extra}");
        }
        let e = Response::error(ErrorKind::NotFound, "no service named \"x\"");
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"result":"error","kind":"not_found","message":"no service named \"x\""}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), e);
        let old = r#"{"result":"error","message":"m"}"#;
        assert_eq!(
            serde_json::from_str::<Response>(old).unwrap(),
            Response::error(ErrorKind::Internal, "m")
        );
    }
}
