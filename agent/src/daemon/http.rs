//! The daemon's one HTTP server: the API on a Unix socket and the metrics
//! on TCP, with the same limits (connections at once, a deadline for the
//! request head, back-off when accept fails) and the same graceful shutdown
//! (stop accepting, let requests in flight finish, up to a deadline).

use std::{
    future::Future,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{Semaphore, watch},
};

use super::{
    metrics,
    routes::{ApiResponse, MAX_BODY, error, handle_with_body},
    state::AppState,
};

/// What one server allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub connections: usize,
    /// A client must send its whole request head within this.
    pub header_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 64,
            header_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Tells the servers to stop: [`Shutdown::signal`] once, every server sees it.
#[derive(Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Default for Shutdown {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Shutdown {
    pub fn signal(&self) {
        self.0.send_replace(true);
    }

    fn watch(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

async fn stopped(mut watch: watch::Receiver<bool>) {
    let _ = watch.wait_for(|stop| *stop).await;
}

/// Serves connections from `accept` with `handle` until `shutdown`, then
/// lets the connections in flight finish their requests (at most
/// `limits.shutdown_grace`).
async fn serve<Io, Accept, AcceptFut, Handle, HandleFut>(
    name: &'static str,
    mut accept: Accept,
    handle: Handle,
    limits: Limits,
    shutdown: Shutdown,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Accept: FnMut() -> AcceptFut,
    AcceptFut: Future<Output = std::io::Result<(Io, Option<u32>)>>,
    Handle: Fn(Request<Incoming>, Option<u32>) -> HandleFut + Clone + Send + Sync + 'static,
    HandleFut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stopped(shutdown.watch()) => break,
        };
        let (stream, peer_pid) = tokio::select! {
            accepted = accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, usually: wait instead of spinning.
                    log::warn!("{name}: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopped(shutdown.watch()) => break,
        };
        let handle = handle.clone();
        let watch = shutdown.watch();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request: Request<Incoming>| {
                let handle = handle.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(request, peer_pid).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopped(watch) => {
                    // Finish the request under way, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                log::debug!("{name} connection ended: {err}");
            }
        });
    }
    // Every permit back: every connection has ended.
    let all = u32::try_from(limits.connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        log::warn!(
            "{name}: requests still running after {} s of shutdown: abandoned",
            limits.shutdown_grace.as_secs()
        );
    }
}

/// Binds the socket (replacing a stale one), mode 0600.
pub fn bind_api(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another agent is already serving {}: stop it first, or pass --socket PATH",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(listener)
}

/// Serves until the task is dropped.
/// Serves the API on `listener` until `shutdown`.
pub async fn serve_api(
    listener: UnixListener,
    state: Arc<AppState>,
    path: PathBuf,
    shutdown: Shutdown,
) {
    log::info!("API listening on {}", path.display());
    let accept = || async {
        let (stream, _) = listener.accept().await?;
        // The peer's pid: a migration whose reporting process is gone
        // without a final report is counted as failed.
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|cred| cred.pid())
            .and_then(|pid| u32::try_from(pid).ok());
        Ok((stream, peer_pid))
    };
    let handle = move |request: Request<Incoming>, peer_pid: Option<u32>| {
        let state = state.clone();
        async move { api_answer(request, state, peer_pid).await }
    };
    serve("API", accept, handle, Limits::default(), shutdown).await;
}

async fn api_answer(
    request: Request<Incoming>,
    state: Arc<AppState>,
    peer_pid: Option<u32>,
) -> ApiResponse {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().map(str::to_string);
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            return error(
                hyper::StatusCode::PAYLOAD_TOO_LARGE,
                &format!("reading the request body failed (at most {MAX_BODY} bytes): {err}"),
            );
        }
    };
    tokio::task::spawn_blocking(move || {
        handle_with_body(&state, &method, &path, query.as_deref(), &body, peer_pid)
    })
    .await
    .unwrap_or_else(|err| {
        error(
            hyper::StatusCode::INTERNAL_SERVER_ERROR,
            &format!("handler failed: {err}"),
        )
    })
}

/// Binds the metrics address (before the agent says it is ready).
pub async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for metrics on {addr}: {e}. Pick another address with --metrics-addr (or metrics_addr in the config file)"
        )
    })
}

/// Serves `/metrics` and `/` on `listener` until `shutdown`.
pub async fn serve_metrics(listener: TcpListener, state: Arc<AppState>, shutdown: Shutdown) {
    if let Ok(addr) = listener.local_addr() {
        log::info!("metrics on http://{addr}/metrics");
    }
    let accept = || async { Ok((listener.accept().await?.0, None)) };
    let handle = move |request: Request<Incoming>, _: Option<u32>| {
        let state = state.clone();
        async move { metrics::answer(request, state).await }
    };
    serve("metrics", accept, handle, Limits::default(), shutdown).await;
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A server on a fresh Unix socket whose one route answers "done" after
    /// `delay`.
    fn start(
        dir: &Path,
        delay: Duration,
        limits: Limits,
    ) -> (PathBuf, Shutdown, tokio::task::JoinHandle<()>) {
        let path = dir.join("http.sock");
        let listener = bind_api(&path).unwrap();
        let shutdown = Shutdown::default();
        let server = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let accept = || async { Ok((listener.accept().await?.0, None)) };
                let handle = move |_: Request<Incoming>, _: Option<u32>| async move {
                    tokio::time::sleep(delay).await;
                    Response::new(Full::new(Bytes::from_static(b"done")))
                };
                serve("test", accept, handle, limits, shutdown).await;
            })
        };
        (path, shutdown, server)
    }

    async fn get(path: &Path) -> std::io::Result<String> {
        let mut stream = tokio::net::UnixStream::connect(path).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        // One response: read until its body arrived (the server keeps the
        // connection open otherwise).
        while !answer.ends_with(b"done") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pagefp-http-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn shutdown_lets_the_request_in_flight_finish_then_stops_accepting() {
        let dir = temp_dir("shutdown");
        let (path, shutdown, server) = start(&dir, Duration::from_millis(300), Limits::default());
        let request = tokio::spawn({
            let path = path.clone();
            async move { get(&path).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.signal();
        let answer = request.await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops once its connections ended")
            .unwrap();
        let after = tokio::net::UnixStream::connect(&path).await;
        assert!(after.is_err(), "nobody accepts after shutdown");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_head_is_cut_off() {
        let dir = temp_dir("slow");
        let limits = Limits {
            header_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (path, shutdown, server) = start(&dir, Duration::ZERO, limits);
        let mut idle = tokio::net::UnixStream::connect(&path).await.unwrap();
        idle.write_all(b"GET / HT").await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match idle.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the idle connection was not closed");
        assert!(started.elapsed() >= Duration::from_millis(150));
        shutdown.signal();
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_for_a_free_slot() {
        let dir = temp_dir("cap");
        let limits = Limits {
            connections: 1,
            ..Limits::default()
        };
        let (path, shutdown, server) = start(&dir, Duration::from_millis(200), limits);
        // The first client holds the only slot until its connection closes.
        let first = tokio::net::UnixStream::connect(&path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = tokio::spawn({
            let path = path.clone();
            async move { get(&path).await }
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!second.is_finished(), "served beyond the connection cap");
        drop(first);
        let answer = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("served once the slot is free")
            .unwrap()
            .unwrap();
        assert!(answer.ends_with("done"), "{answer}");
        shutdown.signal();
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
