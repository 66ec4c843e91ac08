//! `dataloader serve` as deployed: the cluster token on the data plane, no tokenless service
//! on a public address unless `--insecure`, local shards only below `--data-root`.

use std::path::Path;
use std::process::{Command, Stdio};

use taming_dataloader::client::RemoteLoader;
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ReaderConfig};
use taming_tests::process::{Proc, spawn_announcing};

/// The binary with no token in its environment.
fn dataloader() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dataloader"));
    cmd.env_remove("TAMING_CLUSTER_TOKEN");
    cmd
}

/// `dataloader serve ARGS`, its address, and the file its stderr goes to.
fn serve(args: &[&str], log: &Path) -> (Proc, String) {
    let (proc, said) = spawn_announcing(
        dataloader()
            .arg("serve")
            .args(args)
            .stderr(std::fs::File::create(log).unwrap()),
        &["listening on "],
    );
    (proc, said[0].clone())
}

fn cfg() -> LoaderConfig {
    LoaderConfig {
        batch_size: 4,
        preprocess: Preprocess {
            size: 28,
            random_crop: false,
            flip: false,
        },
        reader: ReaderConfig::default(),
        require_masks: false,
    }
}

#[test]
fn a_tokenless_service_on_a_public_address_needs_insecure() {
    let out = dataloader()
        .args(["serve", "--bind", "0.0.0.0:0"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0.0.0.0:0") && err.contains("--token") && err.contains("--insecure"),
        "{err}"
    );
    // An empty token is none.
    let out = dataloader()
        .args(["serve", "--bind", "0.0.0.0:0"])
        .env("TAMING_CLUSTER_TOKEN", "")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());

    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("insecure.log");
    let (_service, addr) = serve(&["--bind", "0.0.0.0:0", "--insecure"], &log);
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("without a cluster token"), "{said}");
    // Loopback without a token starts, with a warning too.
    let log = tmp.path().join("loopback.log");
    let _local = serve(&["--bind", "127.0.0.1:0"], &log);
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("without a cluster token"), "{said}");
}

/// The token from the environment, as deployments give it; the client sends the one it is
/// given. Local shards are read below `--data-root` only.
#[test]
fn the_token_and_the_data_roots_guard_the_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let data = taming_tests::process::root().join("data/fashion-mnist");
    let (_service, said) = spawn_announcing(
        dataloader()
            .args(["serve", "--bind", "127.0.0.1:0", "--data-root"])
            .arg(&data)
            .env("TAMING_CLUSTER_TOKEN", "cluster-secret")
            .stderr(std::fs::File::create(tmp.path().join("log")).unwrap()),
        &["listening on "],
    );
    let addr = said[0].clone();
    let shards = vec![data.join("val-000000.tar").to_string_lossy().into_owned()];
    let client = |token: Option<&str>, shards: Vec<String>| {
        RemoteLoader::new(vec![addr.clone()], shards, cfg(), LoaderState::default())
            .token(token)
            .single_epoch()
            .next_in_epoch()
    };
    let batch = client(Some("cluster-secret"), shards.clone())
        .unwrap()
        .unwrap();
    assert_eq!(batch.keys.len(), 4);
    for (token, why) in [
        (None, "missing cluster token"),
        (Some("cluster-secre"), "wrong cluster token"),
    ] {
        let err = client(token, shards.clone()).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }
    let err = client(Some("cluster-secret"), vec!["/etc/passwd".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shards") && err.contains("outside the data roots"),
        "{err}"
    );

    let out = dataloader()
        .args(["serve", "--data-root", "/no/such/dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/dir"), "{err}");
}
