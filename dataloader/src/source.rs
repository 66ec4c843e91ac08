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
    if let Some(abs) = local_path(url)? {
        let store_path = StorePath::from_absolute_path(&abs).map_err(|e| bad(e.to_string()))?;
        return Ok(Location {
            store: local_store(),
            path: store_path,
            url: url.to_string(),
        });
    }
    let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    let store = store_for(&parsed).map_err(bad)?;
    let path = StorePath::from_url_path(parsed.path()).map_err(|e| bad(e.to_string()))?;
    Ok(Location {
        store,
        path,
        url: url.to_string(),
    })
}

/// The local file a URL or path names (absolute, `.` and `..` resolved without touching the
/// file system: the path [`locate`] opens), or `None` for an object-store URL.
pub fn local_path(url: &str) -> Result<Option<std::path::PathBuf>, DataError> {
    let bad = |reason: String| DataError::Url {
        url: url.to_string(),
        reason,
    };
    let path = match Url::parse(url) {
        Ok(u) if u.scheme() == "file" => u
            .to_file_path()
            .map_err(|_| bad("not a local file URL".into()))?,
        Ok(u) if u.scheme().len() > 1 => return Ok(None),
        _ => std::path::PathBuf::from(url),
    };
    let abs = std::path::absolute(&path).map_err(|e| bad(e.to_string()))?;
    Ok(Some(lexical_normalize(&abs)))
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

/// Most names one brace pattern may expand to (`{000000..999999}` is a million shards).
pub const MAX_EXPANSION: u64 = 1 << 20;
/// Most bytes the names of one brace pattern may take together.
pub const MAX_EXPANSION_BYTES: u64 = 64 << 20;

/// What a brace pattern expands to, computed from the pattern alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expansion {
    /// Names.
    pub names: u64,
    /// Bytes of all names together, at most (names times the longest name).
    pub bytes: u64,
}

/// The size of [`expand_braces`]'s result, without expanding anything: the product of the
/// groups' sizes (saturating at `u64::MAX`).
pub fn brace_expansion(pattern: &str) -> Result<Expansion, DataError> {
    let parts = parse_braces(pattern)?;
    let (names, longest) = parts.iter().fold((1u64, 0u64), |(n, len), part| {
        (n.saturating_mul(part.count()), len + part.longest() as u64)
    });
    Ok(Expansion {
        names,
        bytes: names.saturating_mul(longest),
    })
}

/// Expands `{a..b}` numeric ranges (zero padding kept from `a`) and `{x,y,z}` alternatives,
/// as WebDataset and braceexpand do; several groups multiply. The size is checked before
/// anything is allocated: at most [`MAX_EXPANSION`] names of [`MAX_EXPANSION_BYTES`] in all.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, DataError> {
    let size = brace_expansion(pattern)?;
    if size.names > MAX_EXPANSION || size.bytes > MAX_EXPANSION_BYTES {
        return Err(DataError::Url {
            url: pattern.to_string(),
            reason: format!(
                "expands to {} names ({} bytes); at most {MAX_EXPANSION} names of \
                 {MAX_EXPANSION_BYTES} bytes in all",
                size.names, size.bytes
            ),
        });
    }
    let mut names = vec![String::new()];
    for part in parse_braces(pattern)? {
        names = match part {
            Part::Text(text) => names.into_iter().map(|n| n + text).collect(),
            part => names
                .iter()
                .flat_map(|n| part.choices().map(move |c| format!("{n}{c}")))
                .collect(),
        };
    }
    Ok(names)
}

/// A piece of a brace pattern.
enum Part<'a> {
    Text(&'a str),
    /// `{lo..hi}`, numbers padded to `width` digits.
    Range {
        lo: u64,
        hi: u64,
        width: usize,
    },
    List(Vec<&'a str>),
}

impl Part<'_> {
    fn count(&self) -> u64 {
        match self {
            Part::Text(_) => 1,
            Part::Range { lo, hi, .. } => (hi - lo).saturating_add(1),
            Part::List(items) => items.len() as u64,
        }
    }

    fn longest(&self) -> usize {
        match self {
            Part::Text(text) => text.len(),
            Part::Range { hi, width, .. } => hi.to_string().len().max(*width),
            Part::List(items) => items.iter().map(|i| i.len()).max().unwrap_or(0),
        }
    }

    fn choices(&self) -> Box<dyn Iterator<Item = String> + '_> {
        match self {
            Part::Text(text) => Box::new(std::iter::once(text.to_string())),
            Part::Range { lo, hi, width } => {
                let width = *width;
                Box::new((*lo..=*hi).map(move |i| format!("{i:0width$}")))
            }
            Part::List(items) => Box::new(items.iter().map(|i| i.to_string())),
        }
    }
}

fn parse_braces(pattern: &str) -> Result<Vec<Part<'_>>, DataError> {
    let bad = |reason: String| DataError::Url {
        url: pattern.to_string(),
        reason,
    };
    let mut parts = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|i| open + i)
            .ok_or_else(|| bad("unclosed `{`".into()))?;
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        parts.push(brace_group(&rest[open + 1..close]).map_err(bad)?);
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

fn brace_group(body: &str) -> Result<Part<'_>, String> {
    if let Some((a, b)) = body.split_once("..") {
        let (lo, hi): (u64, u64) = (
            a.parse().map_err(|_| format!("`{a}` is not a number"))?,
            b.parse().map_err(|_| format!("`{b}` is not a number"))?,
        );
        if lo > hi {
            return Err(format!("empty range {{{body}}}"));
        }
        let width = if a.starts_with('0') { a.len() } else { 0 };
        return Ok(Part::Range { lo, hi, width });
    }
    if body.contains(',') {
        return Ok(Part::List(body.split(',').collect()));
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

    /// `{0..9999999}{0..9999999}` would be 10^14 names: refused from the pattern alone,
    /// before anything is allocated.
    #[test]
    fn huge_expansions_are_refused_before_expanding() {
        let p = "s3://b/{0..9999999}{0..9999999}.tar";
        assert_eq!(brace_expansion(p).unwrap().names, 100_000_000_000_000);
        let e = expand_braces(p).unwrap_err().to_string();
        assert!(e.contains(p) && e.contains("100000000000000 names"), "{e}");
        let all = "x{0..18446744073709551615}{0..18446744073709551615}";
        assert_eq!(brace_expansion(all).unwrap().names, u64::MAX);
        assert!(expand_braces(all).is_err());
        // Few names, but long ones: the bytes are capped too.
        let long = format!("{}{{0..99999}}", "a".repeat(4000));
        let e = expand_braces(&long).unwrap_err().to_string();
        assert!(e.contains("bytes"), "{e}");
        assert_eq!(
            expand_braces("{0..1048575}").unwrap().len(),
            MAX_EXPANSION as usize
        );
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
