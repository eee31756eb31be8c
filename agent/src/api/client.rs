//! A small client for the agent's API socket (used by `pagefp status`,
//! `pagefp templates`, `pagefp migrate`, the tests and migration tooling).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the agent at {path}: {source}. Is `pagefp agent` running (systemctl status pagefp)? Give its socket (--socket, or --agent-socket for the migration tools) if it listens elsewhere"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the agent failed: {0}")]
    Http(String),
    #[error("the agent answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

/// How long [`post_json`] waits for the whole exchange: a report must never
/// hold up a migration for long.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`get`] waits for the whole answer (a large VM's hash list is
/// tens of megabytes; an agent that takes longer is hung).
pub const GET_TIMEOUT: Duration = Duration::from_secs(60);

/// One request to the agent listening on `socket`; the body of a 2xx answer.
async fn request(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    body: Option<&[u8]>,
) -> Result<Vec<u8>, ClientError> {
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
    let mut builder = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, "pagefp");
    if body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
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
    // Without a copy when the body arrived in one piece.
    Ok(Vec::from(body))
}

/// GETs `path_and_query` from the agent listening on `socket`; gives up
/// after [`GET_TIMEOUT`].
pub async fn get(socket: &Path, path_and_query: &str) -> Result<Vec<u8>, ClientError> {
    tokio::time::timeout(
        GET_TIMEOUT,
        request(socket, Method::GET, path_and_query, None),
    )
    .await
    .map_err(|_| ClientError::Timeout(GET_TIMEOUT))?
}

/// POSTs the JSON `body` to `path` of the agent listening on `socket`
/// (e.g. a migration report to `/v1/migrations`); gives up after
/// [`POST_TIMEOUT`].
pub async fn post_json(socket: &Path, path: &str, body: &[u8]) -> Result<Vec<u8>, ClientError> {
    tokio::time::timeout(
        POST_TIMEOUT,
        request(socket, Method::POST, path, Some(body)),
    )
    .await
    .map_err(|_| ClientError::Timeout(POST_TIMEOUT))?
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Http(e.to_string()))
}

/// Blocking variant of [`get`] for callers without a runtime.
pub fn get_blocking(socket: &Path, path_and_query: &str) -> Result<Vec<u8>, ClientError> {
    runtime()?.block_on(get(socket, path_and_query))
}

/// Blocking variant of [`post_json`] for callers without a runtime (not
/// from inside one).
pub fn post_json_blocking(socket: &Path, path: &str, body: &[u8]) -> Result<Vec<u8>, ClientError> {
    runtime()?.block_on(post_json(socket, path, body))
}
