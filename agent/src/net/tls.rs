//! TLS 1.3 with mutual certificate authentication for the WAN channels, in
//! the file layout QEMU and libvirt use for `virsh migrate --tls`
//! (`/etc/pki/qemu`: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem`, `client-key.pem`), so an operator reuses those
//! certificates. The receiving end is the TLS server and requires a client
//! certificate from the CA; the sending end checks the receiver's name.

use std::{
    io::{self, Read as _},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use nix::poll::PollFlags;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

use super::channel::{Channel, Protection, receive_available, send_queued, wait};

/// The directory QEMU and libvirt read their migration certificates from.
pub const DEFAULT_DIR: &str = "/etc/pki/qemu";
/// Longest time a connecting peer has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time the sending end waits for the receiver's side of the
/// handshake: more than [`HANDSHAKE_TIMEOUT`], since a receiver busy with
/// stray connections reaches a new one only as earlier handshakes end.
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// No certificate or key file is larger (they are a few KiB).
const MAX_PEM_FILE: u64 = 1 << 20;

/// The sending end's options (it connects, and checks the receiver's name).
#[derive(Args, Clone, Debug)]
pub struct ConnectSecurity {
    /// Directory with ca-cert.pem, client-cert.pem and client-key.pem (the
    /// layout QEMU and libvirt use for `virsh migrate --tls`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub tls_dir: PathBuf,
    /// The name the receiver's certificate must carry (a DNS name or IP
    /// address in its subjectAltName); default: the host part of --to.
    #[arg(long, value_name = "NAME")]
    pub tls_hostname: Option<String>,
    /// Plain TCP, no encryption and no authentication: anyone on the path can
    /// read the guest's memory and forge what the peer says. Only on a network
    /// you trust; both ends must say so.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

/// The receiving end's options (it listens, and checks the sender).
#[derive(Args, Clone, Debug)]
pub struct ListenSecurity {
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem (the
    /// layout QEMU and libvirt use for `virsh migrate --tls`).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub tls_dir: PathBuf,
    /// Accept only senders whose client certificate carries this name (its
    /// subject CN or a DNS subjectAltName); repeat for more. Default: any
    /// certificate the CA signed.
    #[arg(long = "tls-allow-client", value_name = "NAME")]
    pub tls_allow_clients: Vec<String>,
    /// Plain TCP, no encryption and no authentication: anyone who reaches
    /// the port can push a forged VM. Only on a network you trust; both ends
    /// must say so.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

impl ConnectSecurity {
    /// TLS with the files in `dir`, checking the receiver's name.
    pub fn tls(dir: impl Into<PathBuf>, hostname: Option<String>) -> Self {
        Self {
            tls_dir: dir.into(),
            tls_hostname: hostname,
            insecure_plaintext: false,
        }
    }
}

impl ListenSecurity {
    /// TLS with the files in `dir`, any client the CA signed.
    pub fn tls(dir: impl Into<PathBuf>) -> Self {
        Self {
            tls_dir: dir.into(),
            tls_allow_clients: Vec::new(),
            insecure_plaintext: false,
        }
    }
}

/// The sending end, ready to connect (files read and checked).
#[derive(Clone, Debug)]
pub enum Client {
    Tls {
        config: Arc<ClientConfig>,
        hostname: Option<String>,
    },
    Plaintext,
}

/// The receiving end, ready to accept (files read and checked).
#[derive(Clone, Debug)]
pub enum Server {
    Tls {
        config: Arc<ServerConfig>,
        allow: Vec<String>,
    },
    Plaintext,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const ADVICE: &str = "make certificates as for `virsh migrate --tls` (or a test set with \
    `pagefp tls make-test-pki --out DIR`), point --tls-dir at them, or pass \
    --insecure-plaintext on both ends on a network you trust";

/// A PEM file's bytes, bounded.
pub fn read_pem(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(name);
    let file = std::fs::File::open(&path)
        .with_context(|| format!("cannot read {}: {ADVICE}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        bail!(
            "{} is larger than {MAX_PEM_FILE} bytes: not a certificate or key file",
            path.display()
        );
    }
    Ok(bytes)
}

fn certificates(dir: &Path, name: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = read_pem(dir, name)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", dir.join(name).display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", dir.join(name).display());
    }
    Ok(certs)
}

fn private_key(dir: &Path, name: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let bytes = read_pem(dir, name)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .with_context(|| format!("{} is not a PEM private key", dir.join(name).display()))
}

fn roots(dir: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(dir, "ca-cert.pem")? {
        roots.add(cert).with_context(|| {
            format!(
                "{}: not a usable CA certificate",
                dir.join("ca-cert.pem").display()
            )
        })?;
    }
    Ok(roots)
}

impl Client {
    pub fn from_options(options: &ConnectSecurity) -> anyhow::Result<Self> {
        if options.insecure_plaintext {
            log::warn!(
                "--insecure-plaintext: guest memory travels unencrypted and unauthenticated"
            );
            return Ok(Client::Plaintext);
        }
        let dir = &options.tls_dir;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 is not available")?
            .with_root_certificates(roots(dir)?)
            .with_client_auth_cert(
                certificates(dir, "client-cert.pem")?,
                private_key(dir, "client-key.pem")?,
            )
            .with_context(|| {
                format!(
                    "{0}/client-key.pem does not match {0}/client-cert.pem",
                    dir.display()
                )
            })?;
        Ok(Client::Tls {
            config: Arc::new(config),
            hostname: options.tls_hostname.clone(),
        })
    }

    /// Secures a fresh connection to `to` (HOST:PORT), within the handshake
    /// timeout.
    pub fn secure(&self, tcp: TcpStream, to: &str) -> anyhow::Result<Channel> {
        let peer = to.to_string();
        match self {
            Client::Plaintext => Ok(Channel::new(
                tcp,
                None,
                peer,
                Protection::InsecurePlaintext,
            )?),
            Client::Tls { config, hostname } => {
                let name = match hostname {
                    Some(name) => name.clone(),
                    None => host_of(to).to_string(),
                };
                let server_name = ServerName::try_from(name.clone()).with_context(|| {
                    format!("{name:?} is not a DNS name or IP address: give --tls-hostname")
                })?;
                let conn = rustls::ClientConnection::new(config.clone(), server_name)
                    .context("starting TLS")?;
                let conn = handshake(&tcp, conn.into(), CLIENT_HANDSHAKE_TIMEOUT).with_context(|| {
                    format!(
                        "TLS handshake with {to} (expecting a certificate for {name:?}) failed; \
                         is the receiver started without --insecure-plaintext, with a certificate \
                         from the same CA?"
                    )
                })?;
                let protection = protection_of(&conn);
                Ok(Channel::new(tcp, Some(conn), peer, protection)?)
            }
        }
    }
}

impl Server {
    pub fn from_options(options: &ListenSecurity) -> anyhow::Result<Self> {
        if options.insecure_plaintext {
            log::warn!(
                "--insecure-plaintext: anyone who reaches this port can read or forge the incoming VM"
            );
            return Ok(Server::Plaintext);
        }
        let dir = &options.tls_dir;
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider.clone())
                .build()
                .context("cannot build the client certificate check")?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 is not available")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certificates(dir, "server-cert.pem")?,
                private_key(dir, "server-key.pem")?,
            )
            .with_context(|| {
                format!(
                    "{0}/server-key.pem does not match {0}/server-cert.pem",
                    dir.display()
                )
            })?;
        // One connection per migration: nothing to resume.
        config.send_tls13_tickets = 0;
        Ok(Server::Tls {
            config: Arc::new(config),
            allow: options.tls_allow_clients.clone(),
        })
    }

    /// Authenticates a fresh connection from `peer`, within the handshake
    /// timeout. A connection that fails is the caller's to drop (and log):
    /// nothing was read from it.
    pub fn secure(&self, tcp: TcpStream, peer: String) -> anyhow::Result<Channel> {
        match self {
            Server::Plaintext => {
                if starts_with_tls(&tcp)? {
                    bail!(
                        "the peer opened a TLS handshake, but this end was started with \
                         --insecure-plaintext: start both ends with TLS (or both plaintext)"
                    );
                }
                Ok(Channel::new(
                    tcp,
                    None,
                    peer,
                    Protection::InsecurePlaintext,
                )?)
            }
            Server::Tls { config, allow } => {
                if !starts_with_tls(&tcp)? {
                    bail!(
                        "the peer speaks plain TCP, but this end requires TLS: start the sender \
                         without --insecure-plaintext, with a client certificate from this CA"
                    );
                }
                let conn = rustls::ServerConnection::new(config.clone()).context("starting TLS")?;
                let conn = handshake(&tcp, conn.into(), HANDSHAKE_TIMEOUT)
                    .context("TLS handshake failed")?;
                let names = peer_names(&conn);
                if !allow.is_empty() && !names.iter().any(|n| allow.contains(n)) {
                    bail!(
                        "the client certificate names {names:?}, none of them in --tls-allow-client {allow:?}"
                    );
                }
                let protection = protection_of(&conn);
                Ok(Channel::new(tcp, Some(conn), peer, protection)?)
            }
        }
    }
}

/// Whether the first byte the peer sent (within the handshake timeout) is a
/// TLS handshake record's.
fn starts_with_tls(tcp: &TcpStream) -> anyhow::Result<bool> {
    tcp.set_nonblocking(true)?;
    let until = Some(Instant::now() + HANDSHAKE_TIMEOUT);
    let mut first = [0u8; 1];
    loop {
        match tcp.peek(&mut first) {
            Ok(0) => bail!("the peer closed the connection without sending anything"),
            Ok(_) => return Ok(first[0] == 0x16),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(tcp, PollFlags::POLLIN, until)
                    .context("the peer sent nothing within the handshake timeout")?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the handshake to its end on non-blocking `tcp`, within `timeout` in
/// all (a peer that drips bytes is cut at the same time as a silent one).
fn handshake(
    tcp: &TcpStream,
    mut conn: rustls::Connection,
    timeout: Duration,
) -> anyhow::Result<rustls::Connection> {
    tcp.set_nonblocking(true)?;
    let until = Some(Instant::now() + timeout);
    while conn.is_handshaking() {
        if send_queued(&mut conn, tcp)?.left {
            wait(tcp, PollFlags::POLLOUT, until)?;
            continue;
        }
        if conn.wants_read() && !receive_available(&mut conn, tcp)? {
            wait(tcp, PollFlags::POLLIN, until)?;
        }
    }
    while send_queued(&mut conn, tcp)?.left {
        wait(tcp, PollFlags::POLLOUT, until)?;
    }
    Ok(conn)
}

fn protection_of(conn: &rustls::Connection) -> Protection {
    let cipher = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "?".into(), |s| format!("{:?}", s.suite()));
    Protection::Tls {
        cipher,
        peer_names: peer_names(conn),
    }
}

/// The names in the peer's certificate (none if it sent none).
fn peer_names(conn: &rustls::Connection) -> Vec<String> {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| certificate_names(cert))
        .unwrap_or_default()
}

/// The subject CN and the DNS subjectAltNames of a certificate.
fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    names
}

/// HOST of HOST:PORT or [V6]:PORT.
fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What a TLS failure means, for the operator.
pub fn explain(error: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    let what = match error {
        Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the peer's certificate has expired: renew it".into()
        }
        Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "the peer's certificate is not valid yet: check both hosts' clocks".into()
        }
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
            "the peer's certificate is not signed by the CA in ca-cert.pem: give both ends certificates from one CA".into()
        }
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            "the receiver's certificate is not for the name this end expects: give --tls-hostname, or a certificate with that name in its subjectAltName".into()
        }
        Error::NoCertificatesPresented => {
            "the sender presented no client certificate: give it client-cert.pem and client-key.pem".into()
        }
        Error::AlertReceived(Alert::CertificateRequired) => {
            "the receiver requires a client certificate".into()
        }
        Error::AlertReceived(
            Alert::BadCertificate | Alert::UnknownCA | Alert::CertificateExpired | Alert::DecryptError,
        ) => format!(
            "the peer refused this end's certificate ({error}): its log says why; check that both ends use certificates from one CA"
        ),
        Error::DecryptError | Error::InvalidMessage(_) => format!(
            "{error}: the data was altered on the way (or the peer is not pagefp with TLS); the connection cannot be trusted"
        ),
        other => other.to_string(),
    };
    format!("TLS: {what}")
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_strips_the_port_and_brackets() {
        assert_eq!(host_of("dest.example:7000"), "dest.example");
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("dest"), "dest");
    }
}
