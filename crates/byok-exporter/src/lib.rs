//! byok_pg's Prometheus endpoint: `GET /metrics` over HTTP, or HTTPS, with
//! optional basic authentication. The key broker runs it on its tokio
//! runtime; the page comes from a render function the broker supplies (built
//! from shared-memory counters only, never a PostgreSQL call).
//!
//! Policy: unauthenticated HTTP is served on loopback addresses only (where
//! it is open to the machine's local users). Bound anywhere else, the
//! endpoint needs basic authentication (TLS only encrypts: it does not say who
//! may scrape), and TLS with it, or the password crosses the network in the
//! clear (allowed, with a warning), or it refuses to start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections served at once; more are closed at once (a scraper needs one,
/// and a client holding many cannot make the others wait behind it).
const MAX_CONNECTIONS: usize = 16;
/// A client has this long to finish its TLS handshake and request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// And this long for the whole exchange: one request per connection, so a
/// local user holding connections open cannot starve the scraper for long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExporterConfig {
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub basic_auth: Option<BasicAuth>,
}

/// A PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The one user and password a scraper must present.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BasicAuth {{ user: {:?}, password: <hidden> }}",
            self.user
        )
    }
}

impl BasicAuth {
    /// Reads `user:password` from the first line of a file.
    pub fn from_file_contents(contents: &str) -> Result<BasicAuth, ExporterError> {
        let line = contents.lines().next().unwrap_or("").trim_end_matches('\r');
        match line.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => Ok(BasicAuth {
                user: user.to_string(),
                password: password.to_string(),
            }),
            _ => Err(ExporterError::Config(
                "the basic authentication file must hold one line \"user:password\"".into(),
            )),
        }
    }

    fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        use base64::Engine;
        let Some(encoded) = header
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Basic "))
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let expected = format!("{}:{}", self.user, self.password);
        // Constant time, so the comparison does not reveal how much matched.
        decoded.len() == expected.len() && bool::from(decoded.ct_eq(expected.as_bytes()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("{0}")]
    Config(String),
    #[error(
        "{0} is not a loopback address: serving metrics there needs basic authentication (byok.metrics_basic_auth_file), with TLS (byok.metrics_tls_cert_file and byok.metrics_tls_key_file)"
    )]
    Insecure(SocketAddr),
    #[error("could not listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

impl ExporterConfig {
    /// Refuses a configuration that would expose the metrics unprotected.
    pub fn check(&self) -> Result<(), ExporterError> {
        if !self.address.ip().is_loopback() && self.basic_auth.is_none() {
            return Err(ExporterError::Insecure(self.address));
        }
        Ok(())
    }

    /// Whether a password would travel in the clear (worth a warning).
    pub fn password_in_clear(&self) -> bool {
        self.basic_auth.is_some() && self.tls.is_none() && !self.address.ip().is_loopback()
    }
}

/// A bound endpoint, ready to serve.
pub struct Exporter {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    basic_auth: Option<Arc<BasicAuth>>,
}

/// Makes the page; called once per scrape, on a runtime thread.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

impl Exporter {
    /// Checks the configuration, loads the TLS files and binds the address.
    pub async fn bind(config: &ExporterConfig) -> Result<Exporter, ExporterError> {
        config.check()?;
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = TcpListener::bind(config.address)
            .await
            .map_err(|e| ExporterError::Bind(config.address, e))?;
        Ok(Exporter {
            listener,
            tls,
            basic_auth: config.basic_auth.clone().map(Arc::new),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the task is dropped or aborted.
    pub async fn serve(self, render: Render) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                // (out of descriptors, say: try again shortly)
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let (tls, auth, render) = (self.tls.clone(), self.basic_auth.clone(), render.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |request| {
                    let (auth, render) = (auth.clone(), render.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            answer(&request, auth.as_deref(), render).await,
                        )
                    }
                });
                let mut http = http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .keep_alive(false);
                let exchange = async {
                    match tls {
                        Some(acceptor) => {
                            let Ok(Ok(stream)) =
                                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                    .await
                            else {
                                return;
                            };
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                };
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, exchange).await;
            });
        }
    }
}

async fn answer(
    request: &Request<Incoming>,
    auth: Option<&BasicAuth>,
    render: Render,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if let Some(auth) = auth
        && !auth.accepts(request.headers().get(AUTHORIZATION))
    {
        let mut response = reply(StatusCode::UNAUTHORIZED, "authentication required\n".into());
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"byok_pg metrics\""),
        );
        return response;
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            // Off the runtime's worker threads, which also serve key requests.
            let Ok(page) = tokio::task::spawn_blocking(move || render()).await else {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "could not render\n".into(),
                );
            };
            let mut response = reply(StatusCode::OK, page);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
            response
        }
        (&Method::GET | &Method::HEAD, _) => reply(
            StatusCode::NOT_FOUND,
            "byok_pg serves its metrics at /metrics\n".into(),
        ),
        _ => reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into()),
    }
}

fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, ExporterError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| {
            ExporterError::Tls(format!(
                "could not read certificates from {}: {e}",
                files.cert_file.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(ExporterError::Tls(format!(
            "no certificate in {}",
            files.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| {
        ExporterError::Tls(format!(
            "could not read a private key from {}: {e}",
            files.key_file.display()
        ))
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| ExporterError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config(address: &str) -> ExporterConfig {
        ExporterConfig {
            address: address.parse().unwrap(),
            tls: None,
            basic_auth: None,
        }
    }

    async fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> String {
        use base64::Engine;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(auth) = auth {
            let encoded = base64::engine::general_purpose::STANDARD.encode(auth);
            request.push_str(&format!("Authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        // (a refused connection is an empty answer)
        if stream.write_all(request.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        response
    }

    #[test]
    fn only_loopback_may_be_unprotected() {
        assert!(config("127.0.0.1:9187").check().is_ok());
        assert!(config("[::1]:9187").check().is_ok());
        let open = config("0.0.0.0:9187");
        assert!(matches!(open.check(), Err(ExporterError::Insecure(_))));
        // TLS alone encrypts but lets anyone scrape.
        let mut tls_only = open.clone();
        tls_only.tls = Some(TlsFiles {
            cert_file: "c".into(),
            key_file: "k".into(),
        });
        assert!(matches!(tls_only.check(), Err(ExporterError::Insecure(_))));
        let mut with_auth = open.clone();
        with_auth.basic_auth = Some(BasicAuth::from_file_contents("prom:s3cret\n").unwrap());
        assert!(with_auth.check().is_ok());
        assert!(with_auth.password_in_clear());
        assert!(!format!("{with_auth:?}").contains("s3cret"));
        assert!(BasicAuth::from_file_contents("no colon").is_err());
        assert!(BasicAuth::from_file_contents(":pw").is_err());
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_wrong_credentials() {
        let mut cfg = config("127.0.0.1:0");
        cfg.basic_auth = Some(BasicAuth::from_file_contents("prom:s3cret").unwrap());
        let exporter = Exporter::bind(&cfg).await.unwrap();
        let addr = exporter.local_addr().unwrap();
        let server = tokio::spawn(exporter.serve(Arc::new(|| "byok_broker_up 1\n".to_string())));
        let ok = get(addr, "/metrics", Some("prom:s3cret")).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"));
        assert!(ok.ends_with("byok_broker_up 1\n"));
        let wrong = get(addr, "/metrics", Some("prom:s3cres")).await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        assert!(
            wrong.contains("WWW-Authenticate: Basic") || wrong.contains("www-authenticate: Basic")
        );
        assert!(!wrong.contains("byok_broker_up"));
        assert!(
            get(addr, "/metrics", None)
                .await
                .starts_with("HTTP/1.1 401")
        );
        assert!(
            get(addr, "/other", Some("prom:s3cret"))
                .await
                .starts_with("HTTP/1.1 404")
        );
        server.abort();
    }

    #[tokio::test]
    async fn idle_connections_do_not_starve_the_scraper_for_long() {
        let exporter = Exporter::bind(&config("127.0.0.1:0")).await.unwrap();
        let addr = exporter.local_addr().unwrap();
        let server = tokio::spawn(exporter.serve(Arc::new(|| "byok_broker_up 1\n".to_string())));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Over the limit: closed at once, not queued behind the idle ones.
        let refused = tokio::time::timeout(Duration::from_secs(2), get(addr, "/metrics", None))
            .await
            .expect("an over-limit connection is closed at once");
        assert!(!refused.contains("byok_broker_up"));
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            get(addr, "/metrics", None)
                .await
                .ends_with("byok_broker_up 1\n")
        );
        server.abort();
    }

    #[tokio::test]
    async fn serves_over_tls() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl makes the test certificate");
        assert!(made.status.success());
        let mut cfg = config("127.0.0.1:0");
        cfg.tls = Some(TlsFiles {
            cert_file: cert.clone(),
            key_file: key,
        });
        let exporter = Exporter::bind(&cfg).await.unwrap();
        let addr = exporter.local_addr().unwrap();
        let server = tokio::spawn(exporter.serve(Arc::new(|| "byok_broker_up 1\n".to_string())));
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&cert).unwrap())
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let client = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("byok_broker_up 1"));
        // Plain HTTP to the TLS port gets no metrics.
        let plain = tokio::time::timeout(Duration::from_secs(5), get(addr, "/metrics", None))
            .await
            .unwrap_or_default();
        assert!(!plain.contains("byok_broker_up"));
        server.abort();
    }
}
