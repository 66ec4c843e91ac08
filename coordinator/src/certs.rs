//! `coordinator certs`: a cluster CA and one certificate per service name (rcgen), for the
//! mutual TLS of every service: `ca.pem` (give it as `--tls-ca` everywhere), `ca.key` (keep
//! it to issue more), and `NAME.pem` / `NAME.key` per name (a service's `--tls-cert` and
//! `--tls-key`, valid as server and as client certificate), plus `secret.yaml`, a
//! Kubernetes Secret with the CA certificate and every name's pair (not the CA key).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A name that cannot go in a certificate or a file name.
    #[error("--names: `{0}` is not a DNS name or an IP address")]
    Name(String),
    /// rcgen refused.
    #[error("making the certificate for `{name}`: {source}")]
    Generate {
        /// The name.
        name: String,
        /// Why.
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Refusing to replace earlier certificates.
    #[error("{} exists: certificates are not replaced (remove the folder first)", .0.display())]
    Exists(PathBuf),
}

/// Writes a CA and a certificate per name into `dir` (which must not hold a CA yet), valid
/// for `days` days; returns the files written.
pub fn write_certs(dir: &Path, names: &[String], days: u32) -> Result<Vec<PathBuf>, CertError> {
    for name in names {
        check_name(name)?;
    }
    if dir.join("ca.pem").exists() {
        return Err(CertError::Exists(dir.join("ca.pem")));
    }
    fn fail(name: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
        move |source| CertError::Generate {
            name: name.to_string(),
            source,
        }
    }
    let (not_before, not_after) = validity(days);
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail("the CA"))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "taming-rs cluster CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(fail("the CA"))?;
    let ca_cert = ca.self_signed(&ca_key).map_err(fail("the CA"))?;
    let mut files = vec![
        write(dir, "ca.pem", ca_cert.pem().as_bytes(), false)?,
        write(dir, "ca.key", ca_key.serialize_pem().as_bytes(), true)?,
    ];
    let issuer = Issuer::new(ca, ca_key);
    let mut secret = vec![("ca.pem".to_string(), ca_cert.pem())];
    for name in names {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(fail(name))?;
        params.subject_alt_names = alt_names(name).map_err(fail(name))?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(fail(name))?;
        let cert = params.signed_by(&key, &issuer).map_err(fail(name))?;
        files.push(write(
            dir,
            &format!("{name}.pem"),
            cert.pem().as_bytes(),
            false,
        )?);
        files.push(write(
            dir,
            &format!("{name}.key"),
            key.serialize_pem().as_bytes(),
            true,
        )?);
        secret.push((format!("{name}.pem"), cert.pem()));
        secret.push((format!("{name}.key"), key.serialize_pem()));
    }
    files.push(write(
        dir,
        "secret.yaml",
        secret_yaml(&secret).as_bytes(),
        true,
    )?);
    Ok(files)
}

/// A name as a DNS name or IP address; `localhost` also covers 127.0.0.1 and ::1.
fn alt_names(name: &str) -> Result<Vec<SanType>, rcgen::Error> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(vec![SanType::IpAddress(ip)]);
    }
    let mut sans = vec![SanType::DnsName(name.try_into()?)];
    if name == "localhost" {
        sans.push(SanType::IpAddress([127, 0, 0, 1].into()));
        sans.push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    }
    Ok(sans)
}

/// Names become file names and SANs: DNS labels (a leading `*.` allowed) or IP addresses.
fn check_name(name: &str) -> Result<(), CertError> {
    let dns = name.strip_prefix("*.").unwrap_or(name);
    let ok = name.parse::<IpAddr>().is_ok()
        || (!dns.is_empty()
            && dns.len() <= 253
            && dns.split('.').all(|l| {
                (1..=63).contains(&l.len())
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }));
    if ok {
        Ok(())
    } else {
        Err(CertError::Name(name.to_string()))
    }
}

/// From a day ago (clock skew) to `days` days from now.
fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::days(1),
        now + time::Duration::days(days.into()),
    )
}

/// A Kubernetes Secret `taming-tls` holding the files as text.
fn secret_yaml(files: &[(String, String)]) -> String {
    let mut out = String::from(
        "# Made by `coordinator certs`: the cluster CA's certificate and each service's pair.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: taming-tls\ntype: Opaque\nstringData:\n",
    );
    for (name, pem) in files {
        out.push_str(&format!("  {name}: |\n"));
        for line in pem.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// Writes `dir/name`; keys are made readable by their owner only.
fn write(dir: &Path, name: &str, bytes: &[u8], private: bool) -> Result<PathBuf, CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let err = |source| CertError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_certs(dir.path(), &["ok".into(), "../etc".into()], 30).unwrap_err();
        assert!(e.to_string().contains("`../etc`"), "{e}");
        assert!(!dir.path().join("ca.pem").exists());
    }

    #[test]
    fn a_ca_and_a_pair_per_name_are_written_keys_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let names = ["localhost".to_string(), "taming-coordinator".to_string()];
        write_certs(dir.path(), &names, 30).unwrap();
        for f in [
            "ca.pem",
            "ca.key",
            "localhost.pem",
            "localhost.key",
            "taming-coordinator.pem",
        ] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
        let mode = std::fs::metadata(dir.path().join("localhost.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let secret = std::fs::read_to_string(dir.path().join("secret.yaml")).unwrap();
        assert!(secret.contains("taming-coordinator.key: |") && !secret.contains("ca.key"));
        let e = write_certs(dir.path(), &names, 30).unwrap_err();
        assert!(matches!(e, CertError::Exists(_)), "{e}");
    }
}
