//! The operator API on a Unix socket (mode 0600; peers must be root, checked by their
//! credentials, not only by the file mode) and the metrics endpoint.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::Call;
use crate::api::{Request, Response};

/// Longest request line accepted.
const MAX_REQUEST: usize = 1 << 20;

/// Stops serving when dropped, and removes the socket file.
pub struct Server {
    task: JoinHandle<()>,
    path: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the API at `path` (replacing a stale socket file).
pub fn start(path: &Path, calls: mpsc::Sender<Call>) -> Result<Server> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    // Created with mode 0600 from the start: no window where others could connect.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    info!(socket = %path.display(), "API listening");
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, calls.clone()));
                }
                Err(e) => warn!("API accept failed: {e}"),
            }
        }
    });
    Ok(Server {
        task,
        path: path.to_path_buf(),
    })
}

async fn serve(stream: UnixStream, calls: mpsc::Sender<Call>) {
    let uid = stream.peer_cred().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    if uid.as_ref().ok() != Some(&0) {
        warn!(peer_uid = ?uid.ok(), "API connection refused: not root");
        let _ = reply(
            &mut write,
            &Response::Error {
                message: "permission denied: the lb API is for root only".into(),
            },
        )
        .await;
        return;
    }
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => call(&calls, req).await,
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        if reply(&mut write, &resp).await.is_err() {
            return;
        }
    }
}

/// Hands `req` to the agent and waits for its answer.
pub async fn call(calls: &mpsc::Sender<Call>, req: Request) -> Response {
    let (tx, rx) = oneshot::channel();
    if calls.send((req, tx)).await.is_err() {
        return Response::Error {
            message: "the agent is stopping".into(),
        };
    }
    rx.await.unwrap_or(Response::Error {
        message: "the agent is stopping".into(),
    })
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
                })
        })
        .collect()
}

/// Serves Prometheus metrics at `addr`, each scrape rendered from a fresh status.
pub async fn start_metrics(addr: SocketAddr, calls: mpsc::Sender<Call>) -> Result<()> {
    let source = move |format| {
        let calls = calls.clone();
        let fut: futures::future::BoxFuture<'static, String> = Box::pin(async move {
            match call(&calls, Request::Status {}).await {
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
