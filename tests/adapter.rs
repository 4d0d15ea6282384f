//! PEFT LoRA adapter files: parsing PEFT's config, loading PEFT's weights, writing adapters PEFT
//! can read, initialization, and the errors for adapters we cannot use. Fixtures under
//! `tests/fixtures/peft/` are written by `scripts/fixtures_peft.py` (peft 0.21.2).

use qlora::config::ModelConfig;
use qlora::lora::{
    kaiming_uniform_bound, load_adapter, peft_key, save_adapter, trainable_params,
    trainable_report, LoraConfig, LoraModule, LoraTarget, LoraWeights, CONFIG_FILE, WEIGHTS_FILE,
};
use qlora::weights::DType;
use qlora::Error;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn peft_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/peft").join(name)
}

fn model(name: &str) -> ModelConfig {
    ModelConfig::from_file(
        &root()
            .join("tests/fixtures/tiny")
            .join(name)
            .join("config.json"),
    )
    .unwrap()
}

/// All tensors of a safetensors file as (dtype, shape, bytes).
fn read_st(path: &Path) -> (Vec<u8>, Vec<String>) {
    let bytes = std::fs::read(path).unwrap();
    let names = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(String::from).collect();
        n.sort();
        n
    };
    (bytes, names)
}

fn f32_tensor(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), safetensors::Dtype::F32);
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v.shape().to_vec(), data)
}

/// Writes a safetensors file from (name, dtype, shape, bytes).
fn write_st(path: &Path, tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The tensors of the PEFT fixture adapter, for building corrupted variants.
fn gqa_lora_tensors() -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(peft_dir("gqa-lora").join(WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A copy of the gqa-lora adapter whose weights file is replaced by `tensors`.
fn adapter_with(
    tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        peft_dir("gqa-lora").join(CONFIG_FILE),
        dir.path().join(CONFIG_FILE),
    )
    .unwrap();
    write_st(&dir.path().join(WEIGHTS_FILE), tensors);
    dir
}

#[test]
fn parses_peft_config() {
    let cfg = LoraConfig::from_file(&peft_dir("gqa-lora").join(CONFIG_FILE)).unwrap();
    assert_eq!(cfg.r, 4);
    assert_eq!(cfg.lora_alpha, 8.0);
    assert_eq!(cfg.lora_dropout, 0.0);
    // PEFT wrote ["v_proj", "q_proj", "down_proj"]; canonical order here.
    assert_eq!(cfg.target_modules, vec!["q_proj", "v_proj", "down_proj"]);
    assert!(!cfg.use_rslora);
    assert_eq!(cfg.scaling(), 2.0);
    assert_eq!(
        cfg.base_model_name_or_path.as_deref(),
        Some("tests/fixtures/tiny/gqa")
    );
    assert_eq!(cfg.target_layers, None);
}

#[test]
fn parses_all_linear_rslora_and_loads_bf16() {
    let m = model("gqa");
    let dir = peft_dir("gqa-all-linear-rslora");
    let cfg = LoraConfig::from_file(&dir.join(CONFIG_FILE)).unwrap();
    // PEFT expands all-linear to every linear module path except lm_head.
    assert_eq!(
        cfg.targets(),
        LoraTarget::ALL_LINEAR.to_vec(),
        "{:?}",
        cfg.target_modules
    );
    assert_eq!(cfg.target_layers, Some(vec![0, 1]));
    assert!(cfg.use_rslora);
    assert_eq!(cfg.r, 2);
    assert_eq!(cfg.scaling(), (16.0f64 / 2f64.sqrt()) as f32);
    assert!((cfg.lora_dropout - 0.05).abs() < 1e-7);

    let (cfg2, w) = load_adapter(&dir, &m).unwrap();
    assert_eq!(cfg2, cfg);
    assert_eq!(w.modules.len(), 14);
    let down = w.get(&LoraModule::layer(1, LoraTarget::DownProj)).unwrap();
    assert_eq!((down.a.len(), down.b.len()), (2 * 172, 64 * 2));
    // bf16 values widen exactly: every value has at most 8 significant bits.
    for x in down.a.iter().chain(&down.b) {
        assert_eq!(x.to_bits() & 0xffff, 0);
    }
    assert!(down.b.iter().any(|&x| x != 0.0));

    // A config written by hand with the shorthand expands the same way.
    let text = r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": "all-linear", "some_future_field": [1, 2]}"#;
    let c = LoraConfig::from_json_str(text).unwrap();
    assert_eq!(c.targets(), LoraTarget::ALL_LINEAR.to_vec());
    assert_eq!(c.target_layers, None);
    assert_eq!(
        LoraConfig::new(8, 16.0, &["all-linear"])
            .unwrap()
            .target_modules,
        c.target_modules
    );
    // An adapter on only some layers (full module paths) is refused for the model.
    let text = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16,
        "target_modules": ["model.layers.0.self_attn.q_proj"]}"#;
    let c = LoraConfig::from_json_str(text).unwrap();
    assert_eq!(c.target_layers, Some(vec![0]));
    let err = c.validate_for(&m).unwrap_err();
    assert!(err.to_string().contains("subset of layers"), "{err}");
}

#[test]
fn loads_peft_adapter() {
    let m = model("gqa");
    let dir = peft_dir("gqa-lora");
    let (cfg, w) = load_adapter(&dir, &m).unwrap();
    assert_eq!(w.r, 4);
    assert_eq!(w.modules.len(), 6);
    assert_eq!(w.num_params(), trainable_params(&cfg, &m));
    assert_eq!(
        w.num_params(),
        2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (172 + 64))
    );
    let (bytes, names) = read_st(&dir.join(WEIGHTS_FILE));
    assert_eq!(names.len(), 12);
    for (module, pair) in &w.modules {
        let (out_f, in_f) = module.target.shape(&m);
        assert_eq!((pair.in_features, pair.out_features), (in_f, out_f));
        assert_eq!(pair.rank(), 4);
        let (sa, a) = f32_tensor(&bytes, &peft_key(module, true));
        let (sb, b) = f32_tensor(&bytes, &peft_key(module, false));
        assert_eq!(sa, vec![4, in_f]);
        assert_eq!(sb, vec![out_f, 4]);
        assert_eq!(pair.a, a);
        assert_eq!(pair.b, b);
        // PEFT's A init respects our Kaiming bound (1/√in).
        let bound = kaiming_uniform_bound(in_f);
        assert!(pair.a.iter().all(|x| x.abs() <= bound), "{module}");
        assert!(pair.b.iter().any(|&x| x != 0.0));
    }
    assert_eq!(
        peft_key(&LoraModule::layer(1, LoraTarget::VProj), true),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    );
    assert_eq!(
        peft_key(&LoraModule::layer(0, LoraTarget::DownProj), false),
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    );
    assert_eq!(
        peft_key(&LoraModule::lm_head(), true),
        "base_model.model.lm_head.lora_A.weight"
    );
    // A value spot-check against the file by key.
    let q0 = w.get(&LoraModule::layer(0, LoraTarget::QProj)).unwrap();
    let (_, raw) = f32_tensor(
        &bytes,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    );
    assert_eq!(q0.b[5 * 4 + 3], raw[23]);
}

#[test]
fn save_load_round_trip_is_bit_exact() {
    let m = model("gqa");
    let (cfg, w) = load_adapter(&peft_dir("gqa-lora"), &m).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out/adapter");
    save_adapter(&dir, &cfg, &w, DType::F32, false).unwrap();
    let (cfg2, w2) = load_adapter(&dir, &m).unwrap();
    assert_eq!(cfg2, cfg);
    for (module, pair) in &w.modules {
        let p2 = &w2.modules[module];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&pair.a), bits(&p2.a));
        assert_eq!(bits(&pair.b), bits(&p2.b));
    }
    // Same keys, shapes and bytes as PEFT's own file.
    let (ours, names) = read_st(&dir.join(WEIGHTS_FILE));
    let (theirs, names_peft) = read_st(&peft_dir("gqa-lora").join(WEIGHTS_FILE));
    assert_eq!(names, names_peft);
    for n in &names {
        assert_eq!(f32_tensor(&ours, n), f32_tensor(&theirs, n), "{n}");
    }
    // The config carries PEFT's fields.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["bias"], "none");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(json["use_dora"], false);
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );

    // The all-linear adapter written back uses bare names and reloads equal.
    let (cfg_al, w_al) = load_adapter(&peft_dir("gqa-all-linear-rslora"), &m).unwrap();
    let dir2 = tmp.path().join("al");
    save_adapter(&dir2, &cfg_al, &w_al, DType::F32, false).unwrap();
    let (cfg_al2, w_al2) = load_adapter(&dir2, &m).unwrap();
    assert_eq!(cfg_al2.target_modules, cfg_al.target_modules);
    assert!(cfg_al2.use_rslora);
    assert!((cfg_al2.lora_dropout - 0.05).abs() < 1e-7);
    assert_eq!(w_al2, w_al);
}

#[test]
fn saves_bf16_and_f16() {
    let m = model("gqa");
    let (cfg, w) = load_adapter(&peft_dir("gqa-lora"), &m).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, st_dtype) in [
        (DType::BF16, safetensors::Dtype::BF16),
        (DType::F16, safetensors::Dtype::F16),
    ] {
        let dir = tmp.path().join(format!("{dtype}"));
        save_adapter(&dir, &cfg, &w, dtype, false).unwrap();
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (_, v) in st.tensors() {
            assert_eq!(v.dtype(), st_dtype);
        }
        let (_, w2) = load_adapter(&dir, &m).unwrap();
        for (module, pair) in &w.modules {
            let p2 = &w2.modules[module];
            for (x, y) in pair.a.iter().chain(&pair.b).zip(p2.a.iter().chain(&p2.b)) {
                let want = match dtype {
                    DType::BF16 => half::bf16::from_f32(*x).to_f32(),
                    _ => half::f16::from_f32(*x).to_f32(),
                };
                assert_eq!(y.to_bits(), want.to_bits());
            }
        }
    }
    assert!(matches!(
        save_adapter(&tmp.path().join("x"), &cfg, &w, DType::I8, false),
        Err(Error::InvalidArg(_))
    ));
}

#[test]
fn refuses_to_overwrite() {
    let m = model("gqa");
    let cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]).unwrap();
    let w = LoraWeights::init(&cfg, &m, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_adapter(tmp.path(), &cfg, &w, DType::F32, false).unwrap();
    let before = std::fs::read(tmp.path().join(WEIGHTS_FILE)).unwrap();
    let w2 = LoraWeights::init(&cfg, &m, 2).unwrap();
    let err = save_adapter(tmp.path(), &cfg, &w2, DType::F32, false).unwrap_err();
    match &err {
        Error::Io { path, source } => {
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
            assert!(path.ends_with(WEIGHTS_FILE), "{}", path.display());
        }
        e => panic!("expected an AlreadyExists I/O error, got {e}"),
    }
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(
        std::fs::read(tmp.path().join(WEIGHTS_FILE)).unwrap(),
        before
    );
    // Explicit overwrite replaces it.
    save_adapter(tmp.path(), &cfg, &w2, DType::F32, true).unwrap();
    let (_, back) = load_adapter(tmp.path(), &m).unwrap();
    assert_eq!(back, w2);
    // A lone adapter_config.json also counts as an existing adapter.
    let tmp2 = tempfile::tempdir().unwrap();
    std::fs::write(tmp2.path().join(CONFIG_FILE), "{}").unwrap();
    assert!(save_adapter(tmp2.path(), &cfg, &w, DType::F32, false).is_err());
}

#[test]
fn save_is_atomic() {
    let m = model("gqa");
    let cfg = LoraConfig::new(2, 4.0, &["k_proj", "lm_head"]).unwrap();
    let w = LoraWeights::init(&cfg, &m, 3).unwrap();
    // Success: exactly the two files, no temporaries.
    let tmp = tempfile::tempdir().unwrap();
    save_adapter(tmp.path(), &cfg, &w, DType::F32, false).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec![CONFIG_FILE, WEIGHTS_FILE]);
    let (_, back) = load_adapter(tmp.path(), &m).unwrap();
    assert_eq!(back, w);
    assert!(back.get(&LoraModule::lm_head()).is_some());

    // Failure mid-way (the config cannot be renamed into place: a directory has its name):
    // no adapter_model.safetensors appears and no temporary file is left behind.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join(CONFIG_FILE)).unwrap();
    std::fs::write(tmp.path().join(CONFIG_FILE).join("x"), "x").unwrap();
    let err = save_adapter(tmp.path(), &cfg, &w, DType::F32, true).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![CONFIG_FILE.to_string()],
        "left behind: {names:?}"
    );

    // Nothing written for invalid weights either (non-finite values).
    let tmp = tempfile::tempdir().unwrap();
    let mut bad = w.clone();
    bad.modules.values_mut().next().unwrap().b[0] = f32::NAN;
    assert!(save_adapter(tmp.path(), &cfg, &bad, DType::F32, false).is_err());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

fn config_err(json: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join(CONFIG_FILE);
    std::fs::write(&p, json).unwrap();
    let err = LoraConfig::from_file(&p).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::BadFile { .. }), "{msg}");
    assert!(
        msg.contains(CONFIG_FILE),
        "error does not name the file: {msg}"
    );
    msg
}

#[test]
fn rejects_unsupported_configs() {
    let base = std::fs::read_to_string(peft_dir("gqa-lora").join(CONFIG_FILE)).unwrap();
    let with = |key: &str, val: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
        v[key] = val;
        v.to_string()
    };
    use serde_json::json;
    let cases: Vec<(String, &str)> = vec![
        (with("peft_type", json!("LOHA")), "peft_type"),
        (with("bias", json!("all")), "bias"),
        (with("bias", json!("lora_only")), "bias"),
        (with("fan_in_fan_out", json!(true)), "fan_in_fan_out"),
        (with("use_dora", json!(true)), "use_dora"),
        (
            with("layers_to_transform", json!([0])),
            "layers_to_transform",
        ),
        (with("rank_pattern", json!({"q_proj": 8})), "rank_pattern"),
        (
            with("alpha_pattern", json!({"q_proj": 32})),
            "alpha_pattern",
        ),
        (
            with("modules_to_save", json!(["lm_head"])),
            "modules_to_save",
        ),
        (with("task_type", json!("SEQ_CLS")), "task_type"),
        (with("r", json!(0)), "`r`"),
        (with("lora_dropout", json!(1.5)), "lora_dropout"),
        (with("target_modules", json!(["c_attn"])), "target_modules"),
        (
            with("target_modules", json!(["embed_tokens"])),
            "target_modules",
        ),
        (with("target_modules", json!(".*proj")), "target_modules"),
        (
            with("target_modules", json!(["mlp.q_proj"])),
            "target_modules",
        ),
        ("{not json".to_string(), "malformed JSON"),
        ("{\"r\": 8}".to_string(), "peft_type"),
    ];
    for (json, field) in cases {
        let msg = config_err(&json);
        assert!(msg.contains(field), "expected `{field}` in: {msg}");
    }
    // Neutral values of those fields are fine, unknown fields are ignored.
    LoraConfig::from_json_str(&with("layers_to_transform", json!(null))).unwrap();
    LoraConfig::from_json_str(&with("brand_new_field", json!({"a": 1}))).unwrap();
    assert!(LoraConfig::new(0, 8.0, &["q_proj"]).is_err());
    assert!(LoraConfig::new(8, 8.0, &["wq"]).is_err());
}

#[test]
fn rejects_bad_weights() {
    let m = model("gqa");
    let tensors = gqa_lora_tensors();
    let check = |ts: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
                 model: &ModelConfig,
                 want: &str| {
        let dir = adapter_with(ts);
        let err = load_adapter(dir.path(), model).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(WEIGHTS_FILE),
            "error does not name the file: {msg}"
        );
        assert!(msg.contains(want), "expected {want:?} in: {msg}");
        err
    };

    // Missing B.
    let missing: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
        .cloned()
        .collect();
    let err = check(&missing, &m, "layers.1.self_attn.q_proj.lora_B");
    assert!(matches!(err, Error::MissingTensor { .. }));

    let extra = |name: &str, shape: Vec<usize>| {
        let mut t = tensors.clone();
        let n: usize = shape.iter().product();
        t.push((
            name.to_string(),
            safetensors::Dtype::F32,
            shape,
            vec![0u8; 4 * n],
        ));
        t
    };
    check(
        &extra(
            "base_model.model.model.embed_tokens.lora_embedding_A",
            vec![4, 384],
        ),
        &m,
        "embeddings",
    );
    check(
        &extra(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            vec![64],
        ),
        &m,
        "DoRA",
    );
    check(
        &extra("base_model.model.lm_head.weight", vec![384, 64]),
        &m,
        "unexpected tensor",
    );
    check(
        &extra(
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
            vec![4, 64],
        ),
        &m,
        "not in target_modules",
    );
    // Another architecture: q_proj of llama3-tiny has 96 outputs, not 64.
    let err = check(&tensors, &model("llama3"), "another architecture");
    assert!(matches!(err, Error::BadTensor { .. }));
    // Fewer layers than the adapter.
    let mut one_layer = m.clone();
    one_layer.num_hidden_layers = 1;
    check(&tensors, &one_layer, "layer 1 does not exist");
    // Non-float dtype.
    let mut ints = tensors.clone();
    ints[0].1 = safetensors::Dtype::I32;
    check(&ints, &m, "dtype");
    // Non-finite value.
    let mut nan = tensors.clone();
    nan[1].3[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    check(&nan, &m, "non-finite");
}

#[test]
fn kaiming_init_statistics() {
    let m = model("gqa");
    let cfg = LoraConfig::new(16, 32.0, &["all-linear"]).unwrap();
    let w = LoraWeights::init(&cfg, &m, 42).unwrap();
    assert_eq!(w.modules.len(), 14);
    // Bound = gain·√(3/fan_in) with gain = √(2/(1+5)): exactly 1/√in.
    assert!((kaiming_uniform_bound(64) - 0.125).abs() < 1e-8);
    assert!((kaiming_uniform_bound(172) as f64 - 1.0 / 172f64.sqrt()).abs() < 1e-8);
    for (module, pair) in &w.modules {
        assert!(
            pair.b.iter().all(|&x| x == 0.0),
            "{module}: B must start at zero"
        );
        let bound = kaiming_uniform_bound(pair.in_features);
        let n = pair.a.len() as f64;
        let max = pair.a.iter().fold(0f32, |acc, x| acc.max(x.abs()));
        assert!(max <= bound, "{module}: {max} > {bound}");
        assert!(max > 0.9 * bound, "{module}: {max} not near {bound}");
        let mean = pair.a.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = pair
            .a
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let b = bound as f64;
        // uniform(−b, b): mean 0 (sd b/√(3n)), variance b²/3.
        assert!(
            mean.abs() < 4.0 * b / (3.0 * n).sqrt(),
            "{module}: mean {mean}"
        );
        assert!(
            (var / (b * b / 3.0) - 1.0).abs() < 0.1,
            "{module}: var {var}"
        );
    }
    // Seeded: same seed same weights, another seed different.
    assert_eq!(LoraWeights::init(&cfg, &m, 42).unwrap(), w);
    assert_ne!(LoraWeights::init(&cfg, &m, 43).unwrap(), w);
}

#[test]
fn trainable_parameter_counts() {
    let llama2 =
        ModelConfig::from_file(&root().join("tests/fixtures/llama-2-7b-chat-hf/config.json"))
            .unwrap();
    let cfg = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]).unwrap();
    // 32 layers × 2 modules × r·(4096 + 4096).
    assert_eq!(trainable_params(&cfg, &llama2), 4_194_304);
    assert_eq!(qlora::lora::base_params(&llama2), 6_738_415_616);
    // PEFT's print_trainable_parameters: 4,194,304 || all 6,742,609,920 || 0.0622%.
    assert_eq!(
        trainable_report(&cfg, &llama2),
        "4,194,304 trainable of 6,742,609,920 total, 0.06%"
    );
    let all = LoraConfig::new(64, 16.0, &["all-linear"]).unwrap();
    // r·(in+out) per layer: q,o 2·8192, k,v 2·8192, gate,up 2·(4096+11008), down 4096+11008.
    let per_layer = 64 * (4 * 8192 + 3 * (4096 + 11008));
    assert_eq!(trainable_params(&all, &llama2), 32 * per_layer);
    assert_eq!(
        qlora::lora::format_trainable(5, 1000),
        "5 trainable of 1,000 total, 0.50%"
    );
}
