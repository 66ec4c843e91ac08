//! Where shards live: URLs (`s3://`, `gs://`, `az://`, `file://`, `memory://`) or plain paths,
//! opened through `object_store` with endpoints and credentials from the standard environment
//! variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`,
//! `AZURE_STORAGE_ACCOUNT_NAME`, ...), and shard lists with brace expansion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as StorePath;
use url::Url;

use crate::error::DataError;

/// An object: the store that holds it and its path inside that store.
#[derive(Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The object's path in the store.
    pub path: StorePath,
    /// The URL or path as the user wrote it (for messages).
    pub url: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Resolves a URL or a plain (absolute or relative) path to a [`Location`].
pub fn locate(url: &str) -> Result<Location, DataError> {
    let bad = |reason: String| DataError::Url {
        url: url.to_string(),
        reason,
    };
    let parsed = match Url::parse(url) {
        Ok(u) if u.scheme().len() > 1 => u,
        _ => return locate_local(url),
    };
    if parsed.scheme() == "file" {
        let path = parsed
            .to_file_path()
            .map_err(|_| bad("not a local file URL".into()))?;
        return locate_local(&path.to_string_lossy());
    }
    let store = store_for(&parsed).map_err(bad)?;
    let path = StorePath::from_url_path(parsed.path()).map_err(|e| bad(e.to_string()))?;
    Ok(Location {
        store,
        path,
        url: url.to_string(),
    })
}

fn locate_local(path: &str) -> Result<Location, DataError> {
    let abs = std::path::absolute(path).map_err(|e| DataError::Url {
        url: path.to_string(),
        reason: e.to_string(),
    })?;
    let abs = lexical_normalize(&abs);
    let store_path = StorePath::from_absolute_path(&abs).map_err(|e| DataError::Url {
        url: path.to_string(),
        reason: e.to_string(),
    })?;
    Ok(Location {
        store: local_store(),
        path: store_path,
        url: path.to_string(),
    })
}

/// Resolves `.` and `..` without touching the file system (the path may not exist yet).
fn lexical_normalize(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn local_store() -> Arc<dyn ObjectStore> {
    static LOCAL: OnceLock<Arc<dyn ObjectStore>> = OnceLock::new();
    LOCAL
        .get_or_init(|| Arc::new(LocalFileSystem::new()))
        .clone()
}

/// One store per scheme and bucket, built once per process.
fn store_for(url: &Url) -> Result<Arc<dyn ObjectStore>, String> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let bucket = url.host_str().unwrap_or_default();
    let id = format!("{}://{bucket}", url.scheme());
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .expect("store map");
    if let Some(store) = stores.get(&id) {
        return Ok(store.clone());
    }
    let store = build_store(url, &id)?;
    stores.insert(id, store.clone());
    Ok(store)
}

fn build_store(url: &Url, id: &str) -> Result<Arc<dyn ObjectStore>, String> {
    let err = |e: object_store::Error| e.to_string();
    Ok(match url.scheme() {
        "memory" => Arc::new(InMemory::new()),
        "s3" | "s3a" => {
            let mut builder = AmazonS3Builder::from_env().with_url(id);
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .unwrap_or_default();
            if endpoint.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
            check_aws_credentials()?;
            Arc::new(builder.build().map_err(err)?)
        }
        "gs" => {
            check_gcp_credentials()?;
            Arc::new(
                GoogleCloudStorageBuilder::from_env()
                    .with_url(id)
                    .build()
                    .map_err(err)?,
            )
        }
        "az" | "abfs" | "abfss" | "azure" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(azure_hint)?,
        ),
        other => {
            return Err(format!(
                "unsupported scheme `{other}` (use s3://, gs://, az://, file://, memory:// or a path)"
            ));
        }
    })
}

/// Environment variables through which S3 credentials (or their absence, for public buckets)
/// are given; without any of them only the instance metadata service is left.
const AWS_CREDENTIAL_VARS: [&str; 5] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_SKIP_SIGNATURE",
];

/// Refuses S3 at once, with what to set, when no credentials are configured and no instance
/// metadata service answers (instead of a retried request to 169.254.169.254 failing later).
fn check_aws_credentials() -> Result<(), String> {
    if AWS_CREDENTIAL_VARS.iter().any(|v| is_set(v)) {
        return Ok(());
    }
    let endpoint = std::env::var("AWS_METADATA_ENDPOINT")
        .unwrap_or_else(|_| "http://169.254.169.254".to_string());
    let request = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60";
    probe_metadata(&endpoint, request).map_err(|why| {
        format!(
            "no S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set (nor \
             AWS_WEB_IDENTITY_TOKEN_FILE, container credentials, or AWS_SKIP_SIGNATURE=true for \
             a public bucket), and no instance metadata service answers at {endpoint} ({why})"
        )
    })
}

/// Environment variables through which GCS credentials are given.
const GCP_CREDENTIAL_VARS: [&str; 6] = [
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_BEARER_TOKEN",
    "GOOGLE_SKIP_SIGNATURE",
];

/// Refuses GCS at once, with what to set, when no credentials are configured, there is no
/// gcloud application-default login, and no GCE metadata server answers (instead of ten
/// retried token requests failing later).
fn check_gcp_credentials() -> Result<(), String> {
    let adc = std::env::var_os("HOME").map(|home| {
        std::path::Path::new(&home).join(".config/gcloud/application_default_credentials.json")
    });
    if GCP_CREDENTIAL_VARS.iter().any(|v| is_set(v)) || adc.is_some_and(|p| p.is_file()) {
        return Ok(());
    }
    let host = std::env::var("GCE_METADATA_HOST").unwrap_or_else(|_| "169.254.169.254".into());
    let request = "GET /computeMetadata/v1/ HTTP/1.1\r\nMetadata-Flavor: Google";
    probe_metadata(&host, request).map_err(|why| {
        format!(
            "no GCS credentials: GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT, \
             GOOGLE_SERVICE_ACCOUNT_KEY, GOOGLE_BEARER_TOKEN, GOOGLE_SKIP_SIGNATURE=true for a \
             public bucket) is not set, there is no `gcloud auth application-default login`, \
             and no GCE metadata server answers at {host} ({why})"
        )
    })
}

/// Says what to set when the Azure client has no storage account.
fn azure_hint(e: object_store::Error) -> String {
    let text = e.to_string();
    if text.contains("Account must be specified") {
        format!(
            "{text}: set AZURE_STORAGE_ACCOUNT_NAME (with AZURE_STORAGE_ACCOUNT_KEY, a SAS token \
             or an Entra ID identity), or AZURE_STORAGE_USE_EMULATOR=true for Azurite"
        )
    } else {
        text
    }
}

fn is_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|x| !x.is_empty())
}

/// Sends `request` (its request line and extra headers) to an instance metadata service
/// (`http://host[:port]` or `host[:port]`), waiting at most a second, and wants HTTP 200.
fn probe_metadata(endpoint: &str, request: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    use std::time::Duration;
    let host = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let addr_text = if host.contains(':') {
        host.clone()
    } else {
        format!("{host}:80")
    };
    let addr = addr_text
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let wait = Duration::from_secs(1);
    let mut s = TcpStream::connect_timeout(&addr, wait).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    write!(
        s,
        "{request}\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(|e| e.to_string())?;
    let status = String::from_utf8_lossy(&head[9..12]).into_owned();
    if status == "200" {
        Ok(())
    } else {
        Err(format!("it answered HTTP {status}"))
    }
}

/// Expands `{a..b}` numeric ranges (zero padding kept from `a`) and `{x,y,z}` alternatives,
/// as WebDataset and braceexpand do; several groups multiply.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, DataError> {
    let bad = |reason: &str| DataError::Url {
        url: pattern.to_string(),
        reason: reason.to_string(),
    };
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|i| open + i)
        .ok_or_else(|| bad("unclosed `{`"))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let choices = brace_choices(body).map_err(|r| bad(&r))?;
    let tails = expand_braces(tail)?;
    let mut out = Vec::with_capacity(choices.len() * tails.len());
    for c in &choices {
        for rest in &tails {
            out.push(format!("{head}{c}{rest}"));
        }
    }
    Ok(out)
}

fn brace_choices(body: &str) -> Result<Vec<String>, String> {
    if let Some((a, b)) = body.split_once("..") {
        let (lo, hi): (u64, u64) = (
            a.parse().map_err(|_| format!("`{a}` is not a number"))?,
            b.parse().map_err(|_| format!("`{b}` is not a number"))?,
        );
        if lo > hi {
            return Err(format!("empty range {{{body}}}"));
        }
        if hi - lo > 10_000_000 {
            return Err(format!("range {{{body}}} is too large"));
        }
        let width = if a.starts_with('0') { a.len() } else { 0 };
        return Ok((lo..=hi).map(|i| format!("{i:0width$}")).collect());
    }
    if body.contains(',') {
        return Ok(body.split(',').map(str::to_string).collect());
    }
    Err(format!("`{{{body}}}` is neither a range nor a list"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_keep_zero_padding_and_groups_multiply() {
        let v = expand_braces("s3://b/{train,val}-{008..011}.tar").unwrap();
        assert_eq!(v.len(), 8);
        assert_eq!(v[0], "s3://b/train-008.tar");
        assert!(v.contains(&"s3://b/val-011.tar".to_string()));
        assert_eq!(expand_braces("a-{1..3}").unwrap(), ["a-1", "a-2", "a-3"]);
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
    }

    #[test]
    fn bad_braces_name_the_pattern() {
        for p in ["x-{1..", "x-{3..1}", "x-{a..b}", "x-{abc}"] {
            let e = expand_braces(p).unwrap_err().to_string();
            assert!(e.contains(p), "{e}");
        }
    }

    #[test]
    fn unknown_scheme_is_refused_clearly() {
        let e = locate("ftp://host/x.tar").unwrap_err().to_string();
        assert!(
            e.contains("ftp://host/x.tar") && e.contains("unsupported scheme"),
            "{e}"
        );
    }
}
