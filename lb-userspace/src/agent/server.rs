//! The operator API on a Unix socket (mode 0600; peers must be root, checked by their
//! credentials, not only by the file mode; with `agent.api_read_only_group`, mode 0660
//! and that group may list, show tables and plan) and the metrics endpoint.

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::Call;
use crate::api::{ErrorKind, Request, Response};

/// Longest request line accepted.
const MAX_REQUEST: usize = 1 << 20;

/// Stops serving when dropped, and removes the socket file if it is still this server's.
pub struct Server {
    task: JoinHandle<()>,
    path: std::path::PathBuf,
    /// (device, inode) of the socket this server bound: another agent's socket at the
    /// same path is never removed.
    id: (u64, u64),
    /// Connections with a request in flight: their answers are written before the
    /// agent ends.
    busy: Arc<AtomicUsize>,
    /// Set once the agent serves: until then requests are answered "still starting"
    /// at once rather than left waiting while the program loads.
    ready: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        if file_id(&self.path).is_some_and(|id| id == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Server {
    /// The agent has started: requests go to it from now on.
    pub fn ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Stops accepting and waits (a bounded time) until every request taken has been
    /// answered, so a client is never left without its answer (`lb detach`).
    pub async fn finish(self) {
        self.task.abort();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.busy.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Who sent a request: the peer credentials of the API connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.pid) {
            (None, None) => f.write_str("agent"),
            (uid, pid) => write!(
                f,
                "uid={} pid={}",
                uid.map_or("?".into(), |u| u.to_string()),
                pid.map_or("?".into(), |p| p.to_string())
            ),
        }
    }
}

/// What an API peer may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Every request.
    Admin,
    /// Requests that change nothing: list, table, plan.
    ReadOnly,
}

/// Who may use the API: root and the agent's own user, and members (by primary group)
/// of `read_only_gid` for requests that change nothing.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    pub read_only_gid: Option<u32>,
}

impl Access {
    fn role(&self, uid: u32, gid: u32) -> Option<Role> {
        // SAFETY: geteuid cannot fail.
        let own = unsafe { libc::geteuid() };
        if uid == 0 || uid == own {
            Some(Role::Admin)
        } else if self.read_only_gid == Some(gid) {
            Some(Role::ReadOnly)
        } else {
            None
        }
    }
}

/// Serves the API at `path`. A stale socket file is replaced; a socket some process
/// still answers on is left alone and the start fails.
pub fn start(path: &Path, access: Access, calls: mpsc::Sender<Call>) -> Result<Server> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another agent answers on {}; stop it first, or give this one another \
             agent.api_socket (or --socket)",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    // Created with mode 0600 (0660 with a read-only group) from the start: no window
    // where others could connect.
    let mask = if access.read_only_gid.is_some() {
        0o117
    } else {
        0o177
    };
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(mask) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    if let Some(gid) = access.read_only_gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    let id = file_id(path).with_context(|| format!("{} vanished", path.display()))?;
    info!(socket = %path.display(), "API listening");
    let busy = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicBool::new(false));
    let (b, r) = (busy.clone(), ready.clone());
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, access, calls.clone(), b.clone(), r.clone()));
                }
                Err(e) => warn!("API accept failed: {e}"),
            }
        }
    });
    Ok(Server {
        task,
        path: path.to_path_buf(),
        id,
        busy,
        ready,
    })
}

async fn serve(
    stream: UnixStream,
    access: Access,
    calls: mpsc::Sender<Call>,
    busy: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
) {
    let cred = stream.peer_cred().ok();
    let caller = Caller {
        uid: cred.map(|c| c.uid()),
        pid: cred.and_then(|c| c.pid()),
    };
    let role = cred.and_then(|c| access.role(c.uid(), c.gid()));
    let (read, mut write) = stream.into_split();
    let Some(role) = role else {
        warn!(%caller, "API connection refused: not root, not the agent's user, not in the read-only group");
        let _ = reply(
            &mut write,
            &Response::error(
                ErrorKind::Forbidden,
                "permission denied: the lb API is for root only (and the agent's own user; \
                 members of agent.api_read_only_group may list, show tables and plan)",
            ),
        )
        .await;
        return;
    };
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        busy.fetch_add(1, Ordering::AcqRel);
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) if role == Role::ReadOnly && !req.changes_nothing() => {
                warn!(%caller, ?req, "API request refused: read-only caller");
                Response::error(
                    ErrorKind::Forbidden,
                    "permission denied: this user may only list, show tables and plan",
                )
            }
            Ok(_) if !ready.load(Ordering::Acquire) => Response::error(
                ErrorKind::Unavailable,
                "the agent is still starting (loading the program, writing the tables); try \
                 again in a moment",
            ),
            Ok(req) => call(&calls, req, caller).await,
            Err(e) => Response::error(ErrorKind::Invalid, format!("bad request: {e}")),
        };
        let written = reply(&mut write, &resp).await;
        busy.fetch_sub(1, Ordering::AcqRel);
        if written.is_err() {
            return;
        }
    }
}

/// Hands `req` to the agent and waits for its answer.
pub async fn call(calls: &mpsc::Sender<Call>, req: Request, caller: Caller) -> Response {
    let (tx, rx) = oneshot::channel();
    if calls.send((req, caller, tx)).await.is_err() {
        return Response::error(ErrorKind::Unavailable, "the agent is stopping");
    }
    rx.await
        .unwrap_or_else(|_| Response::error(ErrorKind::Unavailable, "the agent is stopping"))
}

async fn reply(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(resp).map_err(std::io::Error::other)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

/// The health-check counters as the metrics want them, from a status.
fn health_of(s: &crate::api::Status) -> Vec<crate::health::TargetState> {
    s.services
        .iter()
        .flat_map(|svc| {
            svc.backends
                .iter()
                .filter(|b| b.health != crate::api::Health::Unchecked)
                .map(|b| crate::health::TargetState {
                    service: svc.name.clone(),
                    backend: b.address,
                    up: b.health == crate::api::Health::Up,
                    checks: b.checks,
                    failures: b.check_failures,
                    transitions: b.health_transitions,
                    last_reason: String::new(),
                    last_failure: b.last_failure.clone().unwrap_or_default(),
                })
        })
        .collect()
}

/// Serves Prometheus metrics at `addr`, each scrape rendered from a fresh status.
pub async fn start_metrics(addr: SocketAddr, calls: mpsc::Sender<Call>) -> Result<()> {
    let source = move |format| {
        let calls = calls.clone();
        let fut: futures::future::BoxFuture<'static, String> = Box::pin(async move {
            match call(&calls, Request::Status {}, Caller::default()).await {
                Response::Status(s) => crate::metrics::render(&s, &health_of(&s), format),
                _ => String::new(),
            }
        });
        fut
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics address {addr}"))?;
    info!(%addr, "metrics listening");
    tokio::spawn(crate::metrics::serve(listener, source));
    Ok(())
}
