//! How the tests, the demo and the benchmark secure the WAN channels: TLS
//! with a test PKI made once per process by `pagefp tls make-test-pki` (the
//! product's default), or plaintext where a run asks for it by name.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::agent_process::agent_binary;

/// The name in the test server certificate that senders check.
pub const SERVER_NAME: &str = "localhost";
/// The name in the test client certificate.
pub const CLIENT_NAME: &str = "pagefp-test-source";

#[derive(Clone, Debug)]
pub enum LinkSecurity {
    /// TLS 1.3 with the certificates in this directory.
    Tls(PathBuf),
    /// `--insecure-plaintext` on both ends.
    Plaintext,
}

impl Default for LinkSecurity {
    fn default() -> Self {
        LinkSecurity::Tls(test_pki().to_path_buf())
    }
}

impl LinkSecurity {
    pub fn is_tls(&self) -> bool {
        matches!(self, LinkSecurity::Tls(_))
    }

    /// Flags of a sending end (`migrate send`, `qemu-proxy send`).
    pub fn send_args(&self) -> Vec<OsString> {
        match self {
            LinkSecurity::Tls(dir) => vec![
                "--tls-dir".into(),
                dir.into(),
                "--tls-hostname".into(),
                SERVER_NAME.into(),
            ],
            LinkSecurity::Plaintext => vec!["--insecure-plaintext".into()],
        }
    }

    /// Flags of a receiving end (`migrate receive`, `qemu-proxy receive`).
    pub fn receive_args(&self) -> Vec<OsString> {
        match self {
            LinkSecurity::Tls(dir) => vec!["--tls-dir".into(), dir.into()],
            LinkSecurity::Plaintext => vec!["--insecure-plaintext".into()],
        }
    }
}

/// A test CA with server and client certificates, made once per process.
pub fn test_pki() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pagefp-tests-pki-{}", std::process::id()));
        make_pki(&dir, 30, None);
        dir
    })
}

/// `pagefp tls make-test-pki` into `dir`, certificates valid for `days`
/// (negative: expired), signed by a new CA or by the one in `ca_dir`.
pub fn make_pki(dir: &Path, days: i64, ca_dir: Option<&Path>) {
    let mut command = Command::new(agent_binary());
    command
        .args(["tls", "make-test-pki", "--out"])
        .arg(dir)
        .args(["--server-name", SERVER_NAME, "--client-name", CLIENT_NAME])
        // The test Redis nodes announce themselves by address.
        .args(["--server-name", "127.0.0.1"])
        .arg(format!("--days={days}"));
    if let Some(ca) = ca_dir {
        command.arg("--ca-dir").arg(ca);
    }
    let output = command.output().expect("running pagefp tls make-test-pki");
    assert!(
        output.status.success(),
        "pagefp tls make-test-pki failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
