//! The data pipeline against a real S3 server (moto): reading and splitting across ranks,
//! resume, packing (and a pack killed mid-upload), Parquet multipart upload, precompute over
//! two ranks, and a service instance killed mid-stream.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;

use burn::tensor::{Device, Tensor, TensorData};
use common::{code_rows, dataloader, image_folder, s3, upload_fashion_mnist, url};
use taming_dataloader::client::RemoteLoader;
use taming_dataloader::codes;
use taming_dataloader::failpoint::UPLOAD_FAILPOINT_ENV;
use taming_dataloader::shards::{list_split, resolve};
use taming_dataloader::{LoaderConfig, LoaderState, Preprocess, ReaderConfig, ShardLoader};
use taming_model::checkpoint::native;
use taming_model::quantize::QuantizeMode;
use taming_model::{DdConfig, QuantizerConfig, Vqgan, VqganConfig};
use taming_tests::process::{Proc, spawn_announcing, succeed};

fn cfg(batch: usize, reader: ReaderConfig) -> LoaderConfig {
    LoaderConfig {
        batch_size: batch,
        preprocess: Preprocess {
            size: 32,
            random_crop: true,
            flip: true,
        },
        reader,
        require_masks: false,
    }
}

fn ranks(rank: usize) -> ReaderConfig {
    ReaderConfig {
        rank,
        world_size: 3,
        read_slots: 2,
        shuffle_buffer: 32,
        shuffle_shards: true,
        seed: 21,
    }
}

#[test]
fn s3_shards_are_split_across_three_ranks_exactly_once_and_resume_exactly() {
    s3();
    upload_fashion_mnist("split");
    let shards = resolve(&url("split/train-{000000..000003}.tar")).unwrap();
    assert_eq!(shards, list_split(url("split"), "train").unwrap());
    let mut seen = HashSet::new();
    let mut total = 0;
    for rank in 0..3 {
        let mut loader =
            ShardLoader::open(&shards, cfg(64, ranks(rank)), &LoaderState::default()).unwrap();
        while let Some(b) = loader.next_in_epoch().unwrap() {
            total += b.keys.len();
            seen.extend(b.keys);
        }
    }
    assert_eq!(
        (total, seen.len()),
        (2000, 2000),
        "each sample exactly once"
    );

    let mut straight =
        ShardLoader::open(&shards, cfg(50, ranks(1)), &LoaderState::default()).unwrap();
    let batches: Vec<_> = (0..6).map(|_| straight.next_batch().unwrap()).collect();
    let mut resumed = ShardLoader::open(&shards, cfg(50, ranks(1)), &batches[2].state).unwrap();
    for expected in &batches[3..] {
        let got = resumed.next_batch().unwrap();
        assert_eq!((&got.keys, &got.images), (&expected.keys, &expected.images));
    }
}

#[test]
fn pack_writes_complete_shards_to_s3() {
    s3();
    let tmp = tempfile::tempdir().unwrap();
    image_folder(tmp.path());
    succeed(
        dataloader()
            .args([
                "pack",
                "--layout",
                "imagefolder",
                "--shard-mb",
                "0.002",
                "--out",
            ])
            .arg(url("packed"))
            .arg("--input")
            .arg(tmp.path()),
    );
    let shards = list_split(url("packed"), "train").unwrap();
    assert!(shards.len() >= 2, "{shards:?}");
    let reader = ReaderConfig {
        shuffle_shards: false,
        ..ReaderConfig::default()
    };
    let mut loader = ShardLoader::open(&shards, cfg(100, reader), &LoaderState::default()).unwrap();
    let batch = loader.next_in_epoch().unwrap().unwrap();
    assert_eq!(batch.keys.len(), 8);
    assert_eq!(batch.labels.iter().filter(|l| **l == Some(1)).count(), 4);

    // Packing class folder `a` with `args` fails; its stderr.
    let refused = |args: &[&str]| {
        let run = dataloader()
            .arg("pack")
            .args(args)
            .arg("--input")
            .arg(tmp.path().join("a"))
            .output()
            .unwrap();
        assert!(!run.status.success(), "pack {args:?} succeeded");
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let err = refused(&["--out", "s3://no-such-bucket/x"]);
    assert!(
        err.contains("s3://no-such-bucket/x/train-000000.tar"),
        "{err}"
    );
    let err = refused(&["--label-offset", "1", "--out", &url("x")]);
    assert!(
        err.contains("--label-offset is only for --layout pairs"),
        "{err}"
    );
}

/// 48 PNGs of 192x192 noise in class folder `a` (about 110 KB each: 5.3 MB, which no
/// compression shrinks, so one shard of them goes up as a multipart upload of two parts).
fn noise_folder(dir: &Path) {
    std::fs::create_dir_all(dir.join("a")).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..48 {
        let img = image::RgbImage::from_fn(192, 192, |_, _| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
        });
        img.save(dir.join(format!("a/{i:02}.png"))).unwrap();
    }
}

/// A pack killed after the first part of its shard's multipart upload leaves no shard under
/// the shard's name (S3 and a local folder), and a rerun writes it whole.
#[test]
fn a_pack_killed_mid_upload_leaves_no_shard_and_a_rerun_writes_it_whole() {
    s3();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    noise_folder(&input);
    let local = tmp.path().join("local-out");
    for out in [url("killed"), local.to_string_lossy().into_owned()] {
        let pack = |failpoint: Option<&str>| {
            let mut cmd = dataloader();
            cmd.args([
                "pack",
                "--layout",
                "imagefolder",
                "--shard-mb",
                "64",
                "--out",
            ])
            .arg(&out)
            .arg("--input")
            .arg(&input);
            if let Some(f) = failpoint {
                cmd.env(UPLOAD_FAILPOINT_ENV, f);
            }
            cmd.output().unwrap()
        };
        let shard = codes::join(&out, "train-000000.tar");
        let killed = pack(Some("abort-after-parts:1"));
        assert!(!killed.status.success(), "{out}: the pack was not killed");
        let stderr = String::from_utf8_lossy(&killed.stderr);
        assert!(
            stderr.contains("aborting after 1 uploaded part"),
            "{stderr}"
        );
        assert!(
            codes::download(&shard).is_err(),
            "{out}: a half-uploaded shard is visible"
        );

        let rerun = pack(None);
        assert!(
            rerun.status.success(),
            "{out}: {}",
            String::from_utf8_lossy(&rerun.stderr)
        );
        let bytes = codes::download(&shard).unwrap();
        assert!(
            bytes.len() > codes::PART_BYTES,
            "{out}: {} bytes, one part",
            bytes.len()
        );
        let reader = ReaderConfig {
            shuffle_shards: false,
            ..ReaderConfig::default()
        };
        let mut loader = ShardLoader::open(
            std::slice::from_ref(&shard),
            cfg(100, reader),
            &LoaderState::default(),
        )
        .unwrap();
        assert_eq!(
            loader.next_in_epoch().unwrap().unwrap().keys.len(),
            48,
            "{out}"
        );
    }
}

/// Without credentials (and no instance metadata service) S3 is refused at once with one
/// error saying what to set, and nothing is written.
#[test]
fn missing_credentials_get_one_clear_error_and_nothing_is_written() {
    s3();
    let tmp = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([9, 9, 9]));
    img.save(tmp.path().join("a.png")).unwrap();
    // A metadata endpoint where nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metadata = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = dataloader()
        .args(["pack", "--out", &url("nocreds"), "--input"])
        .arg(tmp.path())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_METADATA_ENDPOINT", &metadata)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no S3 credentials")
            && err.contains("AWS_ACCESS_KEY_ID")
            && err.contains(&metadata)
            && err.contains("s3://taming"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "one error: {err}"
    );
    assert!(
        list_split(url("nocreds"), "train")
            .unwrap_or_default()
            .is_empty()
    );
}

#[test]
fn large_code_parquet_goes_up_as_a_multipart_upload_and_reads_back() {
    s3();
    let rows = code_rows(6000, &url("x/train-000000.tar"));
    let size = codes::encode_parquet(&rows).unwrap().len();
    assert!(
        size > codes::PART_BYTES,
        "{size} bytes: big enough for a multipart upload"
    );
    let target = url("codes-big/codes-r0000-00000.parquet");
    codes::write_codes(&target, &rows).unwrap();
    assert_eq!(codes::read_codes(&target).unwrap(), rows);
}

fn tiny_vqgan(dir: &std::path::Path, in_channels: usize) -> (VqganConfig, Vqgan) {
    let config = VqganConfig {
        ddconfig: DdConfig {
            ch: 32,
            out_ch: in_channels,
            ch_mult: vec![1, 1],
            num_res_blocks: 1,
            attn_resolutions: vec![],
            dropout: 0.0,
            resamp_with_conv: true,
            in_channels,
            resolution: 32,
            z_channels: 8,
            double_z: false,
        },
        n_embed: 32,
        embed_dim: 8,
        quantizer: QuantizerConfig::default(),
    };
    let device = Device::flex();
    let model = Vqgan::new(&config, &device).unwrap();
    native::save_model(dir, &config, &model, &Default::default(), false).unwrap();
    (config, model)
}

#[test]
fn precompute_over_two_ranks_writes_code_parquet_and_the_manifest_last() {
    s3();
    upload_fashion_mnist("pre");
    let tmp = tempfile::tempdir().unwrap();
    let (_, model) = tiny_vqgan(&tmp.path().join("vqgan"), 3);
    let out = url("pre-codes");
    let run = |rank: &str| {
        dataloader()
            .args([
                "precompute-codes",
                "--batch",
                "32",
                "--rows-per-file",
                "150",
                "--world-size",
                "2",
            ])
            .args(["--rank", rank, "--out", &out, "--data"])
            .arg(url("pre/train-{000000..000001}.tar"))
            .arg("--vqgan")
            .arg(tmp.path().join("vqgan"))
            .output()
            .unwrap()
    };
    let first = run("0");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        codes::read_manifest(&out).is_err(),
        "no manifest while a rank is missing"
    );
    let second = run("1");
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let manifest = codes::read_manifest(&out).unwrap();
    assert_eq!(manifest.rows, 1000);
    assert!(manifest.files.len() >= 8, "{} files", manifest.files.len());
    let mut rows = Vec::new();
    for f in &manifest.files {
        rows.extend(codes::read_codes(&codes::join(&out, &f.path)).unwrap());
    }
    let keys: HashSet<_> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 1000);
    assert!(
        rows.iter()
            .all(|r| (r.height, r.width, r.codes.len()) == (16, 16, 256))
    );
    assert!(
        rows.iter()
            .all(|r| r.label.is_some() && r.shard.starts_with(&url("pre/train-")))
    );

    // The codes are the model's: re-encode the first batch of the first shard here.
    let shard = vec![url("pre/train-000000.tar")];
    let plain = LoaderConfig {
        batch_size: 4,
        preprocess: Preprocess {
            size: 32,
            random_crop: false,
            flip: false,
        },
        reader: ReaderConfig {
            shuffle_shards: false,
            ..ReaderConfig::default()
        },
        require_masks: false,
    };
    let batch = ShardLoader::open(&shard, plain, &LoaderState::default())
        .unwrap()
        .next_batch()
        .unwrap();
    let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), &Device::flex());
    let expected = model
        .encode(x, QuantizeMode::EVAL)
        .indices
        .try_into_vec_as::<i64>()
        .unwrap();
    for (i, key) in batch.keys.iter().enumerate() {
        let row = rows.iter().find(|r| &r.key == key).unwrap();
        let want: Vec<i32> = expected[i * 256..(i + 1) * 256]
            .iter()
            .map(|&v| v as i32)
            .collect();
        assert_eq!(row.codes, want, "codes of {key}");
    }
}

fn serve() -> (Proc, String) {
    let (proc, said) = spawn_announcing(
        dataloader()
            .args(["serve", "--bind", "127.0.0.1:0"])
            .stderr(Stdio::null()),
        &["listening on "],
    );
    (proc, said[0].clone())
}

#[test]
fn a_killed_service_instance_is_replaced_with_nothing_duplicated_or_lost() {
    s3();
    upload_fashion_mnist("svc");
    let (mut a, addr_a) = serve();
    let (mut b, addr_b) = serve();
    let shards = vec![url("svc/val-000000.tar"), url("svc/train-000000.tar")];
    let reader = ReaderConfig {
        read_slots: 2,
        shuffle_buffer: 16,
        ..ReaderConfig::default()
    };
    let mut client = RemoteLoader::new(
        vec![addr_a, addr_b],
        shards,
        cfg(20, reader),
        LoaderState::default(),
    )
    .single_epoch();
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.extend(client.next_in_epoch().unwrap().unwrap().keys);
    }
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    while let Some(batch) = client.next_in_epoch().unwrap() {
        keys.extend(batch.keys);
    }
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    assert!(client.failovers() >= 1);
    let distinct: HashSet<_> = keys.iter().collect();
    assert_eq!((keys.len(), distinct.len()), (1000, 1000));
}

#[test]
fn precompute_with_a_cond_stage_vqgan_writes_segmentation_codes() {
    s3();
    let tmp = tempfile::tempdir().unwrap();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..6u32 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, (i * 40) as u8])
        });
        let mask = image::GrayImage::from_fn(32, 32, |x, _| image::Luma([(x / 8) as u8]));
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let mut seg = std::io::Cursor::new(Vec::new());
        mask.write_to(&mut seg, image::ImageFormat::Png).unwrap();
        files.push((format!("{i:04}.png"), png.into_inner()));
        files.push((format!("{i:04}.seg.png"), seg.into_inner()));
    }
    // An image without its label map: skipped with a warning naming it, not the whole batch.
    files.push(("0006.png".into(), files[0].1.clone()));
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, &data[..]).unwrap();
    }
    codes::upload(
        &url("seg/train-000000.tar"),
        tar.into_inner().unwrap().into(),
    )
    .unwrap();
    tiny_vqgan(&tmp.path().join("image"), 3);
    tiny_vqgan(&tmp.path().join("cond"), 4);
    let out = url("seg-codes");
    let run = succeed(
        dataloader()
            .args(["precompute-codes", "--out", &out, "--data"])
            .arg(url("seg/train-000000.tar"))
            .arg("--vqgan")
            .arg(tmp.path().join("image"))
            .arg("--cond-vqgan")
            .arg(tmp.path().join("cond")),
    );
    let manifest = codes::read_manifest(&out).unwrap();
    let rows = codes::read_codes(&codes::join(&out, &manifest.files[0].path)).unwrap();
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r.key != "0006"));
    assert!(
        rows.iter()
            .all(|r| r.cond_codes.as_ref().is_some_and(|c| c.len() == 256))
    );
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        log.contains("0006") && log.contains("no label map"),
        "{log}"
    );
}
