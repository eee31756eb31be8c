//! TLS between the two ends over loopback, with real certificates: what
//! passes, what is refused, and what the refusal says.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use rcgen::ExtendedKeyUsagePurpose;

use super::{
    SecureListener, connect,
    pki::{Authority, TestPki, make},
    tls::{Client, ConnectSecurity, ListenSecurity, Server},
};

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagefp-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn pki(name: &str, days: i64) -> PathBuf {
    let out = dir(name);
    make(&TestPki {
        out: out.clone(),
        server_names: vec!["localhost".into()],
        client_name: "source-host".into(),
        days,
        ca_dir: None,
    })
    .unwrap();
    out
}

fn server(dir: &Path, allow: &[&str]) -> Server {
    Server::from_options(&ListenSecurity {
        tls_allow_clients: allow.iter().map(|s| s.to_string()).collect(),
        ..ListenSecurity::tls(dir)
    })
    .unwrap()
}

fn client(dir: &Path, hostname: &str) -> Client {
    Client::from_options(&ConnectSecurity::tls(dir, Some(hostname.into()))).unwrap()
}

/// One connection attempt: the client writes "ping", the server answers
/// "pong". The server's and the client's outcome.
fn attempt(server: Server, client: Client) -> (Result<(), String>, Result<(), String>) {
    let listener = SecureListener::bind("127.0.0.1:0", server).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let served = thread::spawn(move || {
        let channel = listener
            .accept(
                Some(Instant::now() + Duration::from_secs(3)),
                "the test client",
            )
            .map_err(|e| format!("{e:#}"))?;
        assert!(channel.protection.is_tls());
        let (mut reader, mut writer) = channel.split(Some(Duration::from_secs(5)));
        let mut ping = [0u8; 4];
        reader.read_exact(&mut ping).map_err(|e| e.to_string())?;
        assert_eq!(&ping, b"ping");
        writer.write_all(b"pong").unwrap();
        writer.flush().unwrap();
        Ok(())
    });
    let connected = (|| {
        let channel = connect(&addr, &client, Duration::ZERO).map_err(|e| format!("{e:#}"))?;
        let (mut reader, mut writer) = channel.split(Some(Duration::from_secs(5)));
        writer.write_all(b"ping").map_err(|e| e.to_string())?;
        writer.flush().map_err(|e| e.to_string())?;
        let mut pong = [0u8; 4];
        reader.read_exact(&mut pong).map_err(|e| e.to_string())?;
        assert_eq!(&pong, b"pong");
        Ok(())
    })();
    (served.join().unwrap(), connected)
}

#[test]
fn mutual_tls_with_one_ca_passes_and_names_the_peer() {
    let dir = pki("good", 30);
    let (served, connected) = attempt(server(&dir, &["source-host"]), client(&dir, "localhost"));
    assert_eq!(served, Ok(()));
    assert_eq!(connected, Ok(()));
}

#[test]
fn a_receiver_with_another_ca_is_refused_by_the_sender() {
    let (ours, theirs) = (pki("ca-a", 30), pki("ca-b", 30));
    let (served, connected) = attempt(server(&theirs, &[]), client(&ours, "localhost"));
    let err = connected.unwrap_err();
    assert!(err.contains("not signed by the CA"), "{err}");
    assert!(served.is_err());
}

#[test]
fn a_sender_with_another_ca_is_refused_by_the_receiver() {
    let (ours, theirs) = (pki("ca-c", 30), pki("ca-d", 30));
    // The receiver trusts `ours` only; the sender's certificate is from
    // `theirs` but it trusts the receiver's CA.
    let mixed = dir("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(ours.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(theirs.join(f), mixed.join(f)).unwrap();
    }
    let (served, connected) = attempt(server(&ours, &[]), client(&mixed, "localhost"));
    let err = served.unwrap_err();
    assert!(err.contains("did not connect and authenticate"), "{err}");
    let err = connected.unwrap_err();
    assert!(err.contains("refused this end's certificate"), "{err}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let dir = pki("expired", -2);
    let (_, connected) = attempt(server(&dir, &[]), client(&dir, "localhost"));
    let err = connected.unwrap_err();
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn a_receiver_certificate_for_another_name_is_refused() {
    let dir = pki("name", 30);
    let (_, connected) = attempt(server(&dir, &[]), client(&dir, "dest.example"));
    let err = connected.unwrap_err();
    assert!(err.contains("not for the name"), "{err}");
}

#[test]
fn a_sender_without_a_client_certificate_is_refused() {
    let dir = pki("nocert", 30);
    // A client config with the right CA but no certificate of its own.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(dir.join("ca-cert.pem")).unwrap();
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    };
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let anonymous = Client::Tls {
        config: std::sync::Arc::new(config),
        hostname: Some("localhost".into()),
    };
    let (served, connected) = attempt(server(&dir, &[]), anonymous);
    assert!(served.is_err());
    let err = connected.unwrap_err();
    assert!(err.contains("requires a client certificate"), "{err}");
}

#[test]
fn a_client_name_outside_the_allow_list_is_refused() {
    let dir = pki("allow", 30);
    let (served, connected) = attempt(server(&dir, &["other-host"]), client(&dir, "localhost"));
    assert!(served.is_err());
    assert!(connected.is_err());
}

#[test]
fn plaintext_and_tls_ends_refuse_each_other_with_a_clear_message() {
    let dir = pki("mixedmode", 30);
    let (served, connected) = attempt(server(&dir, &[]), Client::Plaintext);
    assert!(served.is_err());
    assert!(connected.is_err());
    let (_, connected) = attempt(Server::Plaintext, client(&dir, "localhost"));
    let err = connected.unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");
}

#[test]
fn a_silent_peer_is_dropped_and_the_genuine_one_still_gets_in() {
    let dir = pki("silent", 30);
    let listener = SecureListener::bind("127.0.0.1:0", server(&dir, &[])).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Silent connections that never start a handshake.
    let silent: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let genuine = {
        let (addr, client) = (addr.clone(), client(&dir, "localhost"));
        thread::spawn(move || connect(&addr, &client, Duration::ZERO).map(|_| ()))
    };
    let started = Instant::now();
    let channel = listener
        .accept(
            Some(Instant::now() + Duration::from_secs(5)),
            "the test client",
        )
        .unwrap();
    // The silent ones were not waited for in turn.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(channel.protection.is_tls());
    genuine.join().unwrap().unwrap();
    drop(silent);
}

#[test]
fn a_second_host_signed_by_the_same_ca_is_accepted() {
    let first = pki("first-host", 30);
    let second = dir("second-host");
    make(&TestPki {
        out: second.clone(),
        server_names: vec!["localhost".into()],
        client_name: "second-host".into(),
        days: 30,
        ca_dir: Some(first.clone()),
    })
    .unwrap();
    // The first host receives from the second, and the other way round.
    let (served, connected) = attempt(
        server(&first, &["second-host"]),
        client(&second, "localhost"),
    );
    assert_eq!((served, connected), (Ok(()), Ok(())));
    let (served, connected) = attempt(
        server(&second, &["source-host"]),
        client(&first, "localhost"),
    );
    assert_eq!((served, connected), (Ok(()), Ok(())));
}

#[test]
fn more_silent_connections_than_handshake_slots_only_delay_the_genuine_peer() {
    let dir = pki("flood", 30);
    let listener = SecureListener::bind("127.0.0.1:0", server(&dir, &[])).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // More than MAX_HANDSHAKES: the rest wait in the backlog, in order.
    let silent: Vec<_> = (0..super::MAX_HANDSHAKES + 4)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let genuine = {
        let (addr, client) = (addr.clone(), client(&dir, "localhost"));
        thread::spawn(move || {
            // The receiver reaches this connection once the first wave of
            // silent ones timed out: give the handshake room for that.
            let channel = connect(&addr, &client, Duration::ZERO)?;
            let (mut reader, _writer) = channel.split(Some(Duration::from_secs(30)));
            let mut byte = [0u8; 1];
            reader.read_exact(&mut byte)?;
            anyhow::Ok(byte[0])
        })
    };
    let channel = listener
        .accept(
            Some(Instant::now() + Duration::from_secs(40)),
            "the test client",
        )
        .unwrap();
    let (_reader, mut writer) = channel.split(Some(Duration::from_secs(5)));
    writer.write_all(&[42]).unwrap();
    writer.flush().unwrap();
    drop(silent);
    assert_eq!(genuine.join().unwrap().unwrap(), 42);
}

#[test]
fn the_issuing_helper_makes_certificates_rustls_accepts() {
    let ca = Authority::new("another CA").unwrap();
    let (cert, key) = ca
        .issue(&["h".into()], ExtendedKeyUsagePurpose::ClientAuth, 1)
        .unwrap();
    assert!(cert.contains("BEGIN CERTIFICATE"));
    assert!(key.contains("PRIVATE KEY"));
}

#[test]
fn missing_files_say_what_to_do() {
    let err = Client::from_options(&ConnectSecurity::tls(dir("missing"), None)).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("ca-cert.pem") && text.contains("make-test-pki"),
        "{text}"
    );
}
