//! Every config in configs/stage1/ parses and describes a model that can be built.

use std::path::PathBuf;

use taming_worker::stage1::Stage1Config;

#[test]
fn shipped_configs_parse_and_their_models_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/stage1");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg: Stage1Config =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cfg.model
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(cfg.batch_size > 0 && cfg.base_learning_rate > 0.0);
        seen.push(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "faceshq_f16_1024",
            "fashion_mnist",
            "imagenet_f16_1024",
            "imagenet_f16_16384"
        ]
    );
}

#[test]
fn reference_recipes_refuse_to_train_without_their_lpips_files() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/stage1/imagenet_f16_1024.yaml");
    let cfg: Stage1Config = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("lpips.vgg16") && err.contains("vgg16-397923af.pth"),
        "{err}"
    );
}
