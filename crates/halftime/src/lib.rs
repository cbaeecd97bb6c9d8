//! The `halftime` binary's library: configuration, starting an engine with its gRPC server, bulk import, the
//! scenario runner and the load generator. `main.rs` is a thin command line over these.

pub mod bench;
pub mod config;
pub mod import;
pub mod scenario;

use anyhow::Context;
use halftime_core::time::Clock;
use halftime_engine::Engine;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::oneshot;

/// How long `stop` waits for open calls.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// An engine serving gRPC on a port.
pub struct Running {
    pub engine: Engine,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving: lets open calls finish for a few seconds, then drops what remains (long-lived device
    /// streams and watchers).
    pub async fn stop(mut self) {
        // Device links and watchers end when the engine says it is stopping; then the server drains.
        self.engine.shutdown().await;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(STOP_GRACE, &mut self.server).await.is_err() {
            self.server.abort();
            let _ = (&mut self.server).await;
        }
        let engine = self.engine.clone();
        drop(self);
        engine.close(STOP_GRACE).await;
    }
}

/// Opens the engine on `data_dir` and serves it on `addr` (port 0 picks a free port).
pub async fn start(
    config: &config::Config,
    data_dir: &Path,
    addr: SocketAddr,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Running> {
    let engine = Engine::open(config.engine_config()?, data_dir, clock).await.context("opening the engine")?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let operators = config.operators()?;
    let e = engine.clone();
    let server = tokio::spawn(async move {
        if let Err(err) = halftime_server::serve(e, operators, listener, async {
            let _ = rx.await;
        })
        .await
        {
            tracing::error!(error = %err, "gRPC server stopped");
        }
    });
    Ok(Running { engine, addr, shutdown: Some(tx), server })
}
