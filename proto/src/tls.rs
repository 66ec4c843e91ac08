//! TLS for every gRPC service and client (rustls through tonic). A process has at most one
//! identity (`--tls-cert`, `--tls-key`: PEM, used as server certificate and as client
//! certificate) and one cluster CA (`--tls-ca`): servers given a CA require client
//! certificates it signed (mutual TLS), clients verify servers against it. Plaintext is
//! allowed on loopback, and elsewhere only with `--insecure`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Environment variable naming this process's PEM certificate.
pub const TLS_CERT_ENV: &str = "TAMING_TLS_CERT";
/// Environment variable naming this process's PEM private key.
pub const TLS_KEY_ENV: &str = "TAMING_TLS_KEY";
/// Environment variable naming the cluster CA's PEM certificate.
pub const TLS_CA_ENV: &str = "TAMING_TLS_CA";

/// What is wrong with the TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named by a flag could not be read.
    #[error("{flag} {}: {source}", path.display())]
    Read {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Flags that only work together, or plaintext where it is refused.
    #[error("{0}")]
    Settings(String),
}

/// The TLS flags every binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This process's certificate (PEM), its server and client identity.
    #[arg(long, global = true, env = TLS_CERT_ENV, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, env = TLS_KEY_ENV, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): servers require client certificates it signed; clients verify
    /// servers with it.
    #[arg(long, global = true, env = TLS_CA_ENV, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Allow plaintext gRPC (and the cluster token in it) off loopback.
    #[arg(
        long,
        global = true,
        env = INSECURE_ENV,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure: bool,
}

/// Environment variable that allows plaintext off loopback (`1` or `true`).
pub const INSECURE_ENV: &str = "TAMING_INSECURE";

/// Loaded TLS material.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    identity: Option<Identity>,
    ca: Option<Certificate>,
}

/// How a process talks to the cluster: TLS (or none) and whether plaintext off loopback was
/// asked for.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// TLS material; `None`: plaintext.
    pub tls: Option<Tls>,
    /// Plaintext off loopback allowed.
    pub insecure: bool,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

impl TlsArgs {
    /// The settings of the environment variables alone (what a library client that is
    /// given no flags uses, like the dataloader client inside a worker).
    pub fn from_env() -> Self {
        let path = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self {
            tls_cert: path(TLS_CERT_ENV),
            tls_key: path(TLS_KEY_ENV),
            tls_ca: path(TLS_CA_ENV),
            insecure: std::env::var(INSECURE_ENV).is_ok_and(|v| v == "1" || v == "true"),
        }
    }

    /// The environment variables that carry these settings to [`Self::from_env`] (and to
    /// child processes).
    pub fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut out = Vec::new();
        for (k, v) in [
            (TLS_CERT_ENV, &self.tls_cert),
            (TLS_KEY_ENV, &self.tls_key),
            (TLS_CA_ENV, &self.tls_ca),
        ] {
            if let Some(v) = v {
                out.push((k, v.clone().into_os_string()));
            }
        }
        if self.insecure {
            out.push((INSECURE_ENV, "1".into()));
        }
        out
    }

    /// Reads the files; plaintext when none is given.
    pub fn load(&self) -> Result<Transport, TlsError> {
        // Already installed (by an earlier call, or by the program): that one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            )),
            (None, None) => None,
            _ => {
                return Err(TlsError::Settings(
                    "--tls-cert and --tls-key go together".into(),
                ));
            }
        };
        let ca = match &self.tls_ca {
            Some(ca) => Some(Certificate::from_pem(read("--tls-ca", ca)?)),
            None => None,
        };
        let tls = (identity.is_some() || ca.is_some()).then_some(Tls { identity, ca });
        Ok(Transport {
            tls,
            insecure: self.insecure,
        })
    }
}

impl Transport {
    /// Files for the three flags, as `coordinator certs` writes them (`ca.pem`,
    /// `NAME.pem`, `NAME.key`).
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        TlsArgs {
            tls_cert: Some(cert.into()),
            tls_key: Some(key.into()),
            tls_ca: Some(ca.into()),
            insecure: false,
        }
        .load()
    }

    /// Whether TLS is on.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The server side: its identity, and the CA that client certificates must chain to.
    /// `None` for plaintext, which is refused off loopback unless `insecure` (and warned
    /// about when allowed off loopback).
    pub fn server(
        &self,
        bind: SocketAddr,
        service: &str,
    ) -> Result<Option<ServerTlsConfig>, TlsError> {
        let Some(tls) = &self.tls else {
            if !bind.ip().is_loopback() {
                if !self.insecure {
                    return Err(TlsError::Settings(format!(
                        "{service} refuses to serve plaintext on {bind}: give --tls-cert, --tls-key \
                         and --tls-ca (see `coordinator certs`), or --insecure"
                    )));
                }
                tracing::warn!(
                    "{service} serves PLAINTEXT on {bind} (--insecure): tokens and data cross the network unencrypted"
                );
            }
            return Ok(None);
        };
        let identity = tls.identity.clone().ok_or_else(|| {
            TlsError::Settings(format!("{service} over TLS needs --tls-cert and --tls-key"))
        })?;
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &tls.ca {
            config = config.client_ca_root(ca.clone());
        }
        Ok(Some(config))
    }

    /// Refuses a service on a non-loopback address that would take calls without the
    /// cluster token, unless `insecure`; warns whenever it runs without one.
    pub fn check_token(
        &self,
        bind: SocketAddr,
        has_token: bool,
        service: &str,
    ) -> Result<(), TlsError> {
        if has_token {
            return Ok(());
        }
        if !bind.ip().is_loopback() && !self.insecure {
            return Err(TlsError::Settings(format!(
                "{service} refuses to serve {bind} without a cluster token (anyone who reaches \
                 it could use it): set TAMING_CLUSTER_TOKEN or --token, or give --insecure"
            )));
        }
        tracing::warn!("{service} on {bind} takes calls without a cluster token");
        Ok(())
    }

    /// The client side for `addr` (`host:port`): the CA that verifies the server and this
    /// process's certificate. `None` for plaintext, which is refused for a host that is not
    /// loopback unless `insecure`.
    pub fn client(&self, addr: &str) -> Result<Option<ClientTlsConfig>, TlsError> {
        let host = host_of(addr);
        let Some(tls) = &self.tls else {
            if !is_loopback(host) && !self.insecure {
                return Err(TlsError::Settings(format!(
                    "refusing to send the cluster token in plaintext to {addr}: give --tls-ca \
                     (and --tls-cert/--tls-key), or --insecure"
                )));
            }
            return Ok(None);
        };
        let mut config = ClientTlsConfig::new().domain_name(host.trim_matches(['[', ']']));
        if let Some(ca) = &tls.ca {
            config = config.ca_certificate(ca.clone());
        }
        if let Some(identity) = &tls.identity {
            config = config.identity(identity.clone());
        }
        Ok(Some(config))
    }

    /// `https://host:port` with TLS, `http://host:port` without (URLs pass unchanged).
    pub fn url(&self, addr: &str) -> String {
        if addr.contains("://") {
            return addr.to_string();
        }
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{addr}")
    }
}

/// The host of `host:port` or of a URL.
fn host_of(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    match rest.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => rest,
    }
}

/// Whether a host names this machine's loopback (`localhost`, 127.0.0.0/8, `::1`).
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_found_in_addresses_and_urls() {
        for (addr, host) in [
            ("coord:50051", "coord"),
            ("https://coord:50051", "coord"),
            ("http://127.0.0.1:9/x", "127.0.0.1"),
            ("[::1]:7000", "[::1]"),
        ] {
            assert_eq!(host_of(addr), host, "{addr}");
        }
        assert!(is_loopback("localhost") && is_loopback("127.0.0.2") && is_loopback("[::1]"));
        assert!(!is_loopback("coord") && !is_loopback("10.0.0.1"));
    }

    #[test]
    fn plaintext_off_loopback_needs_insecure() {
        let plain = Transport::default();
        assert!(plain.client("127.0.0.1:1").unwrap().is_none());
        let e = plain.client("coord:50051").unwrap_err().to_string();
        assert!(e.contains("coord:50051") && e.contains("--insecure"), "{e}");
        let e = plain
            .server("0.0.0.0:50051".parse().unwrap(), "the coordinator")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0.0.0.0:50051") && e.contains("--tls-cert"),
            "{e}"
        );
        let insecure = Transport {
            insecure: true,
            ..Transport::default()
        };
        assert!(insecure.client("coord:50051").unwrap().is_none());
        assert!(
            insecure
                .server("0.0.0.0:1".parse().unwrap(), "x")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_certificate_without_its_key_is_refused_naming_both_flags() {
        let args = TlsArgs {
            tls_cert: Some("a.pem".into()),
            ..TlsArgs::default()
        };
        let e = args.load().unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("--tls-key"), "{e}");
        let args = TlsArgs {
            tls_ca: Some("/no/such/ca.pem".into()),
            ..TlsArgs::default()
        };
        let e = args.load().unwrap_err().to_string();
        assert!(
            e.contains("--tls-ca") && e.contains("/no/such/ca.pem"),
            "{e}"
        );
    }
}
