//! A small client for the agent's API socket (used by `pagefp status`,
//! `pagefp templates`, the tests and migration tooling).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the agent at {path}: {source}. Is `pagefp agent` running (systemctl status pagefp)? Use --socket PATH if it listens elsewhere"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the agent failed: {0}")]
    Http(String),
    #[error("the agent answered {status}: {message}")]
    Status { status: StatusCode, message: String },
}

/// GETs `path_and_query` from the agent listening on `socket`.
pub async fn get(socket: &Path, path_and_query: &str) -> Result<Vec<u8>, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.into(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get(path_and_query)
        .header(hyper::header::HOST, "pagefp")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(ClientError::Status { status, message });
    }
    Ok(body.to_vec())
}

/// Blocking variant for callers without a runtime.
pub fn get_blocking(socket: &Path, path_and_query: &str) -> Result<Vec<u8>, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Http(e.to_string()))?;
    runtime.block_on(get(socket, path_and_query))
}
