//! `pagefp tls make-test-pki`: a CA and the five files QEMU, libvirt and
//! pagefp read from a TLS directory, for tests and first trials. A real site
//! uses its own CA (the same certificates as `virsh migrate --tls`).

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::Args;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

#[derive(Args, Clone, Debug)]
pub struct TestPki {
    /// Directory to write ca-cert.pem, ca-key.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem and client-key.pem into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The receiving host's name (DNS name or IP address), put in the server
    /// certificate's CN and subjectAltName; repeat for more.
    #[arg(long = "server-name", value_name = "NAME", default_value = "localhost")]
    pub server_names: Vec<String>,
    /// The sending host's name, put in the client certificate's CN and
    /// subjectAltName.
    #[arg(long, value_name = "NAME", default_value = "pagefp-client")]
    pub client_name: String,
    /// Days the certificates are valid from now (negative: already expired,
    /// for tests).
    #[arg(long, default_value_t = 365, allow_negative_numbers = true)]
    pub days: i64,
    /// Sign with the CA in this directory (its ca-cert.pem and ca-key.pem)
    /// instead of making a new one: certificates for a second host.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
}

/// A CA that can sign more certificates.
pub struct Authority {
    cert: Certificate,
    key: KeyPair,
}

impl Authority {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA whose certificate and key are in `dir` (ca-cert.pem,
    /// ca-key.pem).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .with_context(|| format!("cannot read {}", dir.join(name).display()))
        };
        let key = KeyPair::from_pem(&read("ca-key.pem")?)
            .with_context(|| format!("{}/ca-key.pem is not a private key", dir.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&read("ca-cert.pem")?)
            .with_context(|| format!("{}/ca-cert.pem is not a CA certificate", dir.display()))?;
        // The same subject and key: what it signs chains to the original.
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate and its key (PEM) for `names`, valid for `days` from
    /// now (or, if negative, expired that many days ago).
    pub fn issue(
        &self,
        names: &[String],
        usage: ExtendedKeyUsagePurpose,
        days: i64,
    ) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let now = time::OffsetDateTime::now_utc();
        if days >= 0 {
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(days);
        } else {
            params.not_before = now + time::Duration::days(days - 1);
            params.not_after = now + time::Duration::days(days);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a complete test TLS directory; what it wrote.
pub fn make(options: &TestPki) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("cannot create {}", options.out.display()))?;
    let (ca, ca_pem) = match &options.ca_dir {
        Some(dir) => (
            Authority::load(dir)?,
            std::fs::read_to_string(dir.join("ca-cert.pem"))?,
        ),
        None => {
            let ca = Authority::new("pagefp test CA")?;
            let pem = ca.cert_pem();
            (ca, pem)
        }
    };
    let (server_cert, server_key) = ca.issue(
        &options.server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        options.days,
    )?;
    let (client_cert, client_key) = ca.issue(
        std::slice::from_ref(&options.client_name),
        ExtendedKeyUsagePurpose::ClientAuth,
        options.days,
    )?;
    let files = [
        ("ca-cert.pem", ca_pem, 0o644),
        ("ca-key.pem", ca.key_pem(), 0o600),
        ("server-cert.pem", server_cert, 0o644),
        ("server-key.pem", server_key, 0o600),
        ("client-cert.pem", client_cert, 0o644),
        ("client-key.pem", client_key, 0o600),
    ];
    let mut written = Vec::new();
    for (name, pem, mode) in files {
        let path = options.out.join(name);
        write_file(&path, &pem, mode)?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A test TLS directory made once per test process: both ends' settings.
#[cfg(test)]
pub fn test_security() -> (super::tls::Client, super::tls::Server) {
    use std::sync::OnceLock;
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pagefp-test-pki-{}", std::process::id()));
        make(&TestPki {
            out: dir.clone(),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            client_name: "pagefp-client".into(),
            days: 1,
            ca_dir: None,
        })
        .unwrap();
        dir
    });
    (
        super::tls::Client::from_options(&super::tls::ConnectSecurity::tls(dir, None)).unwrap(),
        super::tls::Server::from_options(&super::tls::ListenSecurity::tls(dir)).unwrap(),
    )
}
