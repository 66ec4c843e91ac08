//! What a `worker train` run leaves, read by the tools people read it with: TensorBoard's
//! reader (the PyPI `tbparse`) finds every scalar of every `metrics.csv` row and the
//! validation grid; the validation columns are what `vqgan eval` measures on the exported
//! model over the same split (rFID included, with Inception weights).

#[path = "../../model/tests/common/fid_weights.rs"]
mod fid_weights;
#[path = "../../model/tests/common/torch_writer.rs"]
mod torch_writer;

use std::path::Path;
use std::process::Command;

use taming_tests::process::{bin, root, succeed, tiny_config};
use taming_tests::python;

/// `metrics.csv` as (header, rows of fields).
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    (header, rows)
}

/// Scalars through tbparse; image tags through TensorBoard's own event reader (tbparse's
/// image support needs TensorFlow).
const TBPARSE: &str = r#"
import glob, json, sys
from tbparse import SummaryReader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
scalars = SummaryReader(sys.argv[1]).scalars
images = set()
for path in glob.glob(sys.argv[1] + "/events.out.tfevents.*"):
    events = EventAccumulator(path, size_guidance={"images": 0})
    events.Reload()
    images.update(events.Tags()["images"])
print(json.dumps({
    "scalars": [[r.step, r.tag, r.value] for r in scalars.itertuples()],
    "images": sorted(images),
}))
"#;

#[test]
fn a_run_writes_tensorboard_events_and_validation_that_vqgan_eval_confirms() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let data = root().join("data/fashion-mnist");
    succeed(
        Command::new(bin("worker"))
            .args([
                "train",
                "--stage",
                "vqgan",
                "--steps",
                "4",
                "--eval-every",
                "2",
            ])
            .args(["--checkpoint-every", "4", "--quiet"])
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out),
    );
    let (header, rows) = read_csv(&out.join("metrics.csv"));
    assert_eq!(rows.len(), 4, "{rows:?}");
    let val = ["val_l1", "val_psnr", "val_ssim", "val_usage"];
    assert!(header.ends_with(&val.map(String::from)), "{header:?}");

    // Every non-empty cell of every row is a scalar at its step.
    let report = python::run(TBPARSE, &[out.join("tb").to_string_lossy().into_owned()]);
    let tb: serde_json::Value = serde_json::from_str(&report).unwrap();
    let scalars = tb["scalars"].as_array().unwrap();
    for row in &rows {
        let step: u64 = row[0].parse().unwrap();
        for (name, cell) in header.iter().zip(row).skip(1) {
            if cell.is_empty() {
                continue;
            }
            let value: f64 = cell.parse().unwrap();
            let found = scalars.iter().any(|s| {
                s[0].as_u64() == Some(step)
                    && s[1] == name.as_str()
                    && (s[2].as_f64().unwrap() - value).abs() <= 1e-6 * value.abs().max(1.0)
            });
            assert!(found, "step {step} {name} = {value} not in the event file");
        }
    }
    assert!(
        tb["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "val_grid"),
        "{tb}"
    );

    // The last row's validation is `vqgan eval` on the exported model, over the same split.
    let eval = tmp.path().join("eval.json");
    succeed(
        Command::new(bin("vqgan"))
            .args(["eval", "--split", "val", "--batch-size", "7"])
            .arg("--model")
            .arg(out.join("model"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&eval),
    );
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&eval).unwrap()).unwrap();
    let last = rows.last().unwrap();
    let cell = |name: &str| -> f64 {
        let i = header.iter().position(|h| h == name).unwrap();
        last[i].parse().unwrap()
    };
    for (column, key) in val.iter().zip(["l1", "psnr", "ssim", "codebook_usage"]) {
        let (ours, theirs) = (cell(column), eval[key].as_f64().unwrap());
        assert!(
            (ours - theirs).abs() <= 1e-4 * theirs.abs().max(1.0),
            "{column} {ours} against vqgan eval's {key} {theirs}"
        );
    }
}

/// Losses that stop being finite: each such step is skipped and counted (`skipped`), and
/// three within the window send the run back to its latest checkpoint with the learning rate
/// halved; the run then finishes, with one row per step in metrics.csv.
#[test]
fn non_finite_steps_are_skipped_and_three_roll_the_run_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = succeed(
        Command::new(bin("worker"))
            .args([
                "train",
                "--stage",
                "vqgan",
                "--steps",
                "8",
                "--eval-every",
                "8",
            ])
            .args(["--checkpoint-every", "2", "--quiet"])
            .arg("--config")
            .arg(tiny_config(tmp.path()))
            .arg("--data")
            .arg(root().join("data/fashion-mnist"))
            .arg("--out")
            .arg(&out)
            .env("TAMING_FAILPOINT", "nan-at-steps:4-6"),
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("rolled back to the latest checkpoint"),
        "{stderr}"
    );
    let (header, rows) = read_csv(&out.join("metrics.csv"));
    let steps: Vec<u64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "{rows:?}");
    let skipped = header.iter().position(|h| h == "skipped").unwrap();
    let counts: Vec<f64> = rows.iter().map(|r| r[skipped].parse().unwrap()).collect();
    // Steps 4, 5 and 6 skipped: back to the checkpoint of step 4 (its skip counted there);
    // 5 and 6 skipped again (the failpoint holds), 7 and 8 train at half the rate.
    assert_eq!(counts, [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 3.0], "{rows:?}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoints/ckpt-00000008/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["lr_scale"], 0.5, "{state}");
    assert_eq!(state["skipped"], 3, "{state}");
}

/// The first `n` samples of a tar shard, as another shard (Python's tarfile).
const FIRST_SAMPLES: &str = r#"
import sys, tarfile
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
keys = []
with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
    for m in tin.getmembers():
        key = m.name.split(".")[0]
        if key not in keys:
            if len(keys) == n:
                break
            keys.append(key)
        tout.addfile(m, tin.extractfile(m))
print(len(keys))
"#;

/// With `eval.inception`, validation adds rFID (the validation images against their
/// reconstructions through pytorch-fid's Inception, here with the FID fixture's generated
/// weights) at the evaluations `eval.fid_every` names: every step is evaluated, rFID only at
/// step 3 (the others `NaN`), and the last row's `val_rfid` is what `vqgan eval --inception`
/// reports for the exported model over the same images.
#[test]
fn rfid_in_validation_is_vqgan_evals() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("inception.pth");
    let layout = root().join("model/tests/fixtures/fid/weights.json");
    std::fs::write(&weights, fid_weights::weights_file(&layout)).unwrap();
    // The embedded training shards and a validation shard of their first 8 images.
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let source = root().join("data/fashion-mnist");
    for entry in std::fs::read_dir(&source).unwrap() {
        let name = entry.unwrap().file_name();
        if name.to_string_lossy().starts_with("train-") {
            std::os::unix::fs::symlink(source.join(&name), data.join(&name)).unwrap();
        }
    }
    let args = [source.join("val-000000.tar"), data.join("val-000000.tar")]
        .map(|p| p.to_string_lossy().into_owned());
    let kept = python::run(
        FIRST_SAMPLES,
        &[args[0].clone(), args[1].clone(), "8".into()],
    );
    assert_eq!(kept.trim(), "8");

    let config = tiny_config(tmp.path());
    let mut yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    yaml["eval"] = serde_yaml::from_str(&format!(
        "{{inception: {}, any_weights: true, fid_every: 3}}",
        weights.display()
    ))
    .unwrap();
    std::fs::write(&config, serde_yaml::to_string(&yaml).unwrap()).unwrap();
    let out = tmp.path().join("run");
    succeed(
        Command::new(bin("worker"))
            .args([
                "train",
                "--stage",
                "vqgan",
                "--steps",
                "3",
                "--eval-every",
                "1",
            ])
            .args(["--checkpoint-every", "3", "--quiet", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out),
    );
    let (header, rows) = read_csv(&out.join("metrics.csv"));
    let column = header
        .iter()
        .position(|h| h == "val_rfid")
        .expect("val_rfid");
    let rfid: Vec<f64> = rows.iter().map(|r| r[column].parse().unwrap()).collect();
    assert_eq!(rfid.len(), 3);
    assert!(
        rfid[0].is_nan() && rfid[1].is_nan(),
        "rFID only every 3 steps: {rfid:?}"
    );
    let l1 = header.iter().position(|h| h == "val_l1").expect("val_l1");
    assert!(
        rows.iter()
            .all(|r| r[l1].parse::<f64>().unwrap().is_finite())
    );
    let ours = rfid[2];

    let eval = tmp.path().join("eval.json");
    succeed(
        Command::new(bin("vqgan"))
            .args([
                "eval",
                "--split",
                "val",
                "--batch-size",
                "3",
                "--any-weights",
            ])
            .arg("--inception")
            .arg(&weights)
            .arg("--model")
            .arg(out.join("model"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&eval),
    );
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&eval).unwrap()).unwrap();
    assert_eq!(eval["images"], 8);
    let theirs = eval["rfid"].as_f64().unwrap();
    assert!(ours.is_finite() && ours > 0.0, "val_rfid {ours}");
    assert!(
        (ours - theirs).abs() <= 1e-3 * theirs,
        "val_rfid {ours} against vqgan eval's rfid {theirs}"
    );
}
