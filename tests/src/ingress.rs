//! A client of a database's ingress, as users have one: the database's DNS name resolved through
//! Route53 (the emulator's API: nothing on this machine serves DNS), then TLS to that address
//! with the name as the server name: Traefik routes by it. Clients that speak plain protocols
//! (sqlx's pgwire, reqwest's HTTP here) go through [`TlsRelay`], a local stunnel: it listens on
//! 127.0.0.1 and wraps each connection in TLS to the ingress, after PostgreSQL's SSLRequest for
//! pgwire (Traefik answers it for HostSNI routes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrap {
    /// TLS from the first byte (HTTPS, ILP over TLS).
    Tls,
    /// PostgreSQL: SSLRequest, the server's `S`, then TLS.
    PgStartTls,
}

/// Plain on 127.0.0.1, TLS with `server_name` to `target`. Dropped, it stops accepting.
pub struct TlsRelay {
    pub local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsRelay {
    pub async fn start(target: SocketAddr, server_name: &str, wrap: Wrap) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        let name = ServerName::try_from(server_name.to_string()).context("server name")?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config()));
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (connector, name) = (connector.clone(), name.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    if wrap == Wrap::PgStartTls {
                        let mut answer = [0u8; 1];
                        if outbound.write_all(&SSL_REQUEST).await.is_err()
                            || outbound.read_exact(&mut answer).await.is_err()
                            || answer[0] != b'S'
                        {
                            return;
                        }
                    }
                    let Ok(mut tls) = connector.connect(name, outbound).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut tls).await;
                });
            }
        });
        Ok(Self { local, task })
    }
}

impl Drop for TlsRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Traefik serves its default self-signed certificate for these routes (`tls: {}` with no
/// certificate): the test trusts any, as a client given the cluster's own certificate would.
fn client_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A database as its users reach it: by name, through the node's Traefik.
pub struct Ingress {
    pub dns_name: String,
    /// The address the name resolved to (the node's).
    pub address: String,
    http: TlsRelay,
    pgwire: TlsRelay,
}

impl Ingress {
    /// Resolves `dns_name` through Route53 (`zone` the operator's zone) and opens relays to that
    /// address's HTTPS (443) and pgwire (8812) entry points.
    pub async fn resolve(aws: &qdb_operator::aws::Aws, zone: &str, dns_name: &str) -> Result<Ingress> {
        let zone_id = aws.hosted_zone(zone, false).await?.context("no hosted zone")?;
        let (address, _ttl) = aws.get_a_record(&zone_id, dns_name).await?.context("no A record")?;
        let ip: std::net::IpAddr = address.parse().with_context(|| format!("A record {address}"))?;
        Ok(Ingress {
            dns_name: dns_name.to_string(),
            http: TlsRelay::start(SocketAddr::new(ip, 443), dns_name, Wrap::Tls).await?,
            pgwire: TlsRelay::start(SocketAddr::new(ip, 8812), dns_name, Wrap::PgStartTls).await?,
            address,
        })
    }

    /// Resolves `dns_name` and waits until the ingress there serves the database, resolving again
    /// while it does not: after a move the record and the new node's Traefik take a moment.
    pub async fn resolve_serving(
        aws: &qdb_operator::aws::Aws,
        zone: &str,
        dns_name: &str,
        timeout: Duration,
    ) -> Result<Ingress> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt = match Ingress::resolve(aws, zone, dns_name).await {
                Ok(ingress) => ingress.wait_serving(Duration::from_secs(5)).await.map(|()| ingress),
                Err(e) => Err(e),
            };
            match attempt {
                Ok(ingress) => return Ok(ingress),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// `host:port` a plain pgwire client connects to (the relay).
    pub fn pgwire(&self) -> SocketAddr {
        self.pgwire.local
    }

    /// An HTTP request to the database's console port, by name (Host) through the relay.
    pub fn http(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("http://{}{path}", self.http.local))
            .header(reqwest::header::HOST, &self.dns_name)
            .timeout(Duration::from_secs(10))
    }

    /// Sends ILP lines over TCP (9009, TLS with the name as server name). ILP over TCP has no
    /// acknowledgement: read the rows back to know they arrived.
    pub async fn write_ilp_tcp(&self, lines: &str) -> Result<()> {
        let ip: std::net::IpAddr = self.address.parse()?;
        let relay = TlsRelay::start(SocketAddr::new(ip, 9009), &self.dns_name, Wrap::Tls).await?;
        let mut conn = tokio::net::TcpStream::connect(relay.local).await?;
        conn.write_all(lines.as_bytes()).await?;
        conn.shutdown().await?;
        // The relay forwards what it read before it goes.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.read_to_end(&mut rest)).await;
        Ok(())
    }

    /// Waits until the ingress answers for the database (Traefik has the route and an endpoint).
    pub async fn wait_serving(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ok = self.http(reqwest::Method::GET, "/exec?query=select%201").send().await;
            if ok.as_ref().is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{} ({}) not served through the ingress within {timeout:?}: {:?}",
                self.dns_name,
                self.address,
                ok.map(|r| r.status())
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
