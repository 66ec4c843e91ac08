//! A real Azure Blob server for the tests: Azurite (Microsoft's storage emulator), started once
//! per test binary on a free loopback port, with a container and the variables that point
//! `object_store`'s Azure client at it (`AZURE_STORAGE_USE_EMULATOR`,
//! `AZURITE_BLOB_STORAGE_URL`).

use std::process::Command;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{http, server};

/// The container every test uses.
pub const CONTAINER: &str = "taming";

/// Azurite's well-known development account and key (public, the same in every install).
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob endpoint (`http://127.0.0.1:PORT`).
pub fn azurite() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(start_azurite)
}

/// The Azure variables children need.
pub fn azure_env() -> Vec<(&'static str, String)> {
    azure_env_for(azurite())
}

/// `az://taming/<path>`.
pub fn url(path: &str) -> String {
    format!("az://{CONTAINER}/{path}")
}

fn azure_env_for(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
        ("AZURITE_BLOB_STORAGE_URL", endpoint.to_string()),
    ]
}

fn start_azurite() -> String {
    let program = server::program(
        "AZURITE_BLOB",
        "node/node_modules/.bin/azurite-blob",
        "azurite-blob",
    );
    let mut cmd = Command::new(program);
    // Blobs and their index in memory; the folder only gets Azurite's debug files, if any.
    cmd.current_dir(std::env::temp_dir());
    let port = server::start("azurite-blob", cmd, |port| {
        let args = "--blobHost 127.0.0.1 --inMemoryPersistence --disableTelemetry --silent \
                    --skipApiVersionCheck --blobPort";
        let mut args: Vec<String> = args.split_whitespace().map(String::from).collect();
        args.push(port.to_string());
        args
    });
    let endpoint = format!("http://127.0.0.1:{port}");
    create_container(&format!("127.0.0.1:{port}"));
    server::export(&azure_env_for(&endpoint));
    endpoint
}

/// `Create Container`, signed with the account key (Shared Key authorization: Azurite
/// checks it as Azure does). Azurite may accept connections a moment before it answers
/// them (a reply-less close reads as code 0): such an attempt is repeated for up to 10 s.
fn create_container(addr: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut retried = false;
    loop {
        let (code, body) = create_container_once(addr);
        if code != 0 || std::time::Instant::now() > deadline {
            // 409 after a reply-less attempt: that attempt created it.
            assert!(
                code == 201 || (retried && code == 409),
                "creating the container: {code} {}",
                String::from_utf8_lossy(&body)
            );
            return;
        }
        retried = true;
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// One signed `Create Container` request: its status code (0: no reply) and body.
fn create_container_once(addr: &str) -> (u16, Vec<u8>) {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let version = "2021-08-06";
    let path = format!("/{ACCOUNT}/{CONTAINER}");
    // VERB, eleven empty standard headers, the x-ms- headers, then the resource.
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
         /{ACCOUNT}{path}\nrestype:container"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&STANDARD.decode(KEY).expect("base64 key"))
        .expect("any key length");
    mac.update(to_sign.as_bytes());
    let signature = STANDARD.encode(mac.finalize().into_bytes());
    http::request(
        addr,
        &format!(
            "PUT {path}?restype=container HTTP/1.1\r\nHost: {addr}\r\nx-ms-date: {date}\r\n\
             x-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{signature}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
}
