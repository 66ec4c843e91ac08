//! `az://` against a real Azure Blob server (Azurite): `dataloader pack` writes shards there,
//! the loader lists, expands and reads them back, code Parquet goes up whole and in blocks and
//! reads back, and a missing container or missing account get one error naming the URL. And
//! `gs://` without credentials is refused at once with what to set (no GCS server that
//! `object_store` can talk to installs offline: gcp-storage-emulator sends no ETag headers).

mod common;

use std::process::Command;

use common::{code_rows, image_folder};
use taming_dataloader::codes::{self, CodeRow};
use taming_dataloader::shards::{list_split, resolve};
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader};
use taming_tests::azure::{azure_env, url};
use taming_tests::process::succeed;

/// The `dataloader` binary with Azurite's environment.
fn dataloader() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dataloader"));
    cmd.envs(azure_env());
    cmd
}

/// Packs two class folders of four images into at least two shards under `prefix`, then
/// reads every sample back through a brace-expanded shard list.
fn pack_and_read(prefix: &str) {
    let tmp = tempfile::tempdir().unwrap();
    image_folder(tmp.path());
    succeed(
        dataloader()
            .args("pack --layout imagefolder --shard-mb 0.002 --out".split_whitespace())
            .arg(url(prefix))
            .arg("--input")
            .arg(tmp.path()),
    );
    let shards = list_split(url(prefix), "train").unwrap();
    assert!(shards.len() >= 2, "{shards:?}");
    let last = shards.len() - 1;
    let spec = url(&format!("{prefix}/train-{{000000..{last:06}}}.tar"));
    assert_eq!(resolve(&spec).unwrap(), shards);
    let cfg = LoaderConfig {
        batch_size: 100,
        preprocess: Preprocess {
            size: 16,
            random_crop: false,
            flip: false,
        },
        reader: ReaderConfig {
            shuffle_shards: false,
            ..ReaderConfig::default()
        },
        require_masks: false,
    };
    let mut loader = ShardLoader::open(&shards, cfg, &LoaderState::default()).unwrap();
    let batch = loader.next_in_epoch().unwrap().unwrap();
    assert_eq!(batch.keys.len(), 8);
    assert_eq!(batch.labels.iter().filter(|l| **l == Some(1)).count(), 4);
    assert!(loader.next_in_epoch().unwrap().is_none(), "one epoch of 8");
}

fn parquet_round_trip(rows: &[CodeRow], name: &str) {
    let target = url(&format!("codes/{name}.parquet"));
    codes::write_codes(&target, rows).unwrap();
    assert_eq!(codes::read_codes(&target).unwrap(), rows);
}

/// `pack` into `out` fails with one error line that names `expect` and the URL.
fn pack_is_refused(mut cmd: Command, out: &str, expect: &str) {
    let tmp = tempfile::tempdir().unwrap();
    image_folder(tmp.path());
    let run = cmd
        .args(["pack", "--out", out, "--input"])
        .arg(tmp.path().join("a"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains(out) && err.contains(expect), "{err}");
    assert!(list_split(out, "train").unwrap_or_default().is_empty());
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1);
}

#[test]
fn azure_blob_shards_are_packed_listed_and_read_and_codes_go_up_whole_or_in_blocks() {
    pack_and_read("packed");
    parquet_round_trip(&code_rows(20, &url("x/train-000000.tar")), "small");
    let big = code_rows(6000, &url("x/train-000000.tar"));
    let size = codes::encode_parquet(&big).unwrap().len();
    assert!(size > codes::PART_BYTES, "{size} bytes: a multipart upload");
    parquet_round_trip(&big, "big");

    pack_is_refused(
        dataloader(),
        "az://no-such-container/x",
        "az://no-such-container/x/train-000000.tar",
    );
    let mut no_account = dataloader();
    no_account.env_remove("AZURE_STORAGE_USE_EMULATOR");
    pack_is_refused(no_account, &url("nocreds"), "AZURE_STORAGE_ACCOUNT_NAME");
}

/// No credentials, no gcloud login (an empty HOME) and no metadata server (a closed port):
/// one error saying what to set, before any request.
#[test]
fn gcs_without_credentials_is_refused_at_once_with_what_to_set() {
    let home = tempfile::tempdir().unwrap();
    // Port 1 (tcpmux) is privileged and unused: nothing answers there. Not a port freed
    // from a listener: the Azure test may be starting Azurite on one at the same time.
    let metadata = "127.0.0.1:1";
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dataloader"));
    for var in std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("GOOGLE_"))
    {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home.path())
        .env("GCE_METADATA_HOST", metadata);
    pack_is_refused(cmd, "gs://taming/packed", "no GCS credentials");
}
