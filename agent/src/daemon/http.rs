//! Serving the API with hyper on a Unix socket.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use http_body_util::{BodyExt, Limited};
use hyper::{Request, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use super::{
    routes::{ApiResponse, MAX_BODY, error, handle_with_body},
    state::AppState,
};

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
pub async fn serve_api(listener: UnixListener, state: Arc<AppState>, path: PathBuf) {
    log::info!("API listening on {}", path.display());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                log::warn!("API accept failed: {err}");
                continue;
            }
        };
        // The peer's pid: a migration whose reporting process is gone
        // without a final report is counted as failed.
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|cred| cred.pid())
            .and_then(|pid| u32::try_from(pid).ok());
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let method = request.method().clone();
                    let path = request.uri().path().to_string();
                    let query = request.uri().query().map(str::to_string);
                    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                        Ok(body) => body.to_bytes(),
                        Err(err) => {
                            return Ok(error(
                                hyper::StatusCode::PAYLOAD_TOO_LARGE,
                                &format!(
                                    "reading the request body failed (at most {MAX_BODY} bytes): {err}"
                                ),
                            ));
                        }
                    };
                    let response: ApiResponse = tokio::task::spawn_blocking(move || {
                        handle_with_body(&state, &method, &path, query.as_deref(), &body, peer_pid)
                    })
                    .await
                    .unwrap_or_else(|err| {
                        error(
                            hyper::StatusCode::INTERNAL_SERVER_ERROR,
                            &format!("handler failed: {err}"),
                        )
                    });
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("API connection ended: {err}");
            }
        });
    }
}
