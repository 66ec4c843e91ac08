//! Every config in configs/stage1/ and configs/stage2/ parses and describes a model that can
//! be built.

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
            "fashion_mnist_seg",
            "imagenet_f16_1024",
            "imagenet_f16_16384",
            "photo_crops",
            "photo_crops_f8_lowdim",
            "photo_crops_fsq",
            "photo_crops_lfq",
            "photo_crops_rotation",
            "photo_crops_simvq"
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

#[test]
fn stage2_configs_parse_and_size_their_transformers() {
    use taming_model::transformer::Conditioning;
    use taming_worker::defaults::parse_stage2_config;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/stage2");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg = parse_stage2_config(&text, &path.display().to_string()).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let (n_embed, cond) = if name.contains("8192") {
            (
                8192,
                Conditioning::Segmentation {
                    n_embed: 1024,
                    classes: 183,
                },
            )
        } else {
            (1024, Conditioning::Class { n_classes: 1000 })
        };
        let window = cfg.window.unwrap_or([8, 8]);
        let model = cfg.model(n_embed, window, cond);
        model.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.gpt.vocab_size, n_embed + model.cond.vocab(), "{name}");
        assert_eq!(
            model.gpt.block_size,
            model.cond_len() + window[0] * window[1] - 1
        );
        seen.push(name);
    }
    seen.sort();
    assert_eq!(seen, ["faceshq_f16", "fashion_mnist", "scene_f16_8192"]);
    let big = std::fs::read_to_string(dir.join("faceshq_f16.yaml")).unwrap();
    let cfg = parse_stage2_config(&big, "faceshq").unwrap();
    assert_eq!(
        (cfg.gpt.n_layer, cfg.gpt.n_head, cfg.gpt.n_embd),
        (24, 16, 1024)
    );
}

#[test]
fn a_stage2_config_with_an_unknown_key_names_it() {
    let err = taming_worker::defaults::parse_stage2_config(
        "gpt: {n_layer: 1, n_head: 1, n_embd: 8}\nbatch_size: 2\nwarmup: 3\n",
        "bad.yaml",
    )
    .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("bad.yaml") && text.contains("warmup"),
        "{text}"
    );
}
