//! bitsandbytes 4-bit (NF4) checkpoints: reading transformers' own 4-bit saves, writing the same
//! layout byte for byte, and refusing malformed ones with messages that name file and tensor.
//!
//! Fixtures: `tests/fixtures/bnb/` from `scripts/fixtures_bnb.py` (transformers 5.23.0,
//! bitsandbytes 0.50.2, CPU). `gqa-bnb4` is tiny `gqa` quantized with double quant, blocksize 64;
//! `tied-bnb4-nodq` is tiny `tied` without double quant; `gqa-qlora-nf4` is our own
//! `quantize_checkpoint` output for `gqa` (regenerate it with `QLORA_REGEN_BNB_FIXTURE=1 cargo
//! test --test bnb qlora_fixture`), which the script loads with transformers (`interop.json`).

use qlora::config::ModelConfig;
use qlora::quant::bnb::{
    bnb_entries, is_prequantized, is_quantized_linear, load_prequantized,
    parse_quantization_config, quantize_checkpoint, quantize_checkpoint_with, QuantizeOptions,
    QUANT_STATE_FP4, QUANT_STATE_NF4,
};
use qlora::quant::{dequantize_nf4, quantize_nf4, Absmax, NF4_TABLE};
use qlora::weights::{llama_tensor_names, Checkpoint};
use qlora::Error;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny(name: &str) -> PathBuf {
    fixtures().join("tiny").join(name)
}

fn bnb(name: &str) -> PathBuf {
    fixtures().join("bnb").join(name)
}

/// The decoder linear weights of a tiny model, with their `[out, in]` shapes.
fn linears(model: &str) -> Vec<(String, Vec<usize>)> {
    let cfg = ModelConfig::from_file(&tiny(model).join("config.json")).unwrap();
    let v: Vec<_> = llama_tensor_names(&cfg)
        .into_iter()
        .filter(|(n, _)| is_quantized_linear(n))
        .collect();
    assert_eq!(v.len(), 7 * cfg.num_hidden_layers);
    v
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> Tensors {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_tensors(path: &Path, t: &Tensors) {
    let views: Vec<(String, TensorView<'_>)> = t
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = Some([("format".to_string(), "pt".to_string())].into());
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// Checks that our bnb loader reads transformers' 4-bit save of `model` as exactly what our own
/// quantizer makes from the f32 weights.
fn check_prequantized_equals_ours(model: &str, saved: &str, double_quant: bool) {
    let src = Checkpoint::open(&tiny(model)).unwrap();
    let ckpt = Checkpoint::open(&bnb(saved)).unwrap();
    for (name, shape) in linears(model) {
        assert!(is_prequantized(&ckpt, &name), "{name}");
        assert!(!is_prequantized(&src, &name), "{name}");
        let theirs = load_prequantized(&ckpt, &name, &shape).unwrap();
        let w = src.load_f32(&name, &shape).unwrap();
        let ours = quantize_nf4(&w, &shape, 64, double_quant).unwrap();
        assert_eq!(theirs.packed, ours.packed, "{name}: packed codes");
        assert_eq!(theirs.absmax, ours.absmax, "{name}: absmax");
        assert_eq!(theirs, ours, "{name}");
        let (a, b) = (dequantize_nf4(&theirs), dequantize_nf4(&ours));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: dequantized"
        );
        assert!(matches!(theirs.absmax, Absmax::Double { .. }) == double_quant);
    }
    for n in ["model.embed_tokens.weight", "model.norm.weight"] {
        assert!(!is_prequantized(&ckpt, n));
    }
}

#[test]
fn transformers_save_double_quant_reads_as_our_quantization() {
    check_prequantized_equals_ours("gqa", "gqa-bnb4", true);
}

#[test]
fn transformers_save_no_double_quant_reads_as_our_quantization() {
    check_prequantized_equals_ours("tied", "tied-bnb4-nodq", false);
}

#[test]
fn quantization_config_of_transformers_saves() {
    let p = bnb("gqa-bnb4").join("config.json");
    let c = parse_quantization_config(&read_json(&p), &p)
        .unwrap()
        .unwrap();
    assert_eq!(c.quant_type, "nf4");
    assert!(c.double_quant);
    assert_eq!(c.compute_dtype, "float32");
    assert_eq!(c.quant_storage, "uint8");
    assert!(c.skip_modules.is_empty());
    let p = bnb("tied-bnb4-nodq").join("config.json");
    let c = parse_quantization_config(&read_json(&p), &p)
        .unwrap()
        .unwrap();
    assert!(!c.double_quant);
    let p = tiny("gqa").join("config.json");
    assert!(parse_quantization_config(&read_json(&p), &p)
        .unwrap()
        .is_none());
}

#[test]
fn quantization_config_refusals() {
    let p = bnb("gqa-bnb4").join("config.json");
    let base = read_json(&p);
    let with = |key: &str, v: Value| {
        let mut c = base.clone();
        c["quantization_config"][key] = v;
        parse_quantization_config(&c, &p).unwrap_err().to_string()
    };
    let e = with("bnb_4bit_quant_type", "fp4".into());
    assert!(e.contains("fp4 is not supported; only nf4"), "{e}");
    assert!(e.contains("config.json"), "{e}");
    let e = with("load_in_8bit", true.into());
    assert!(e.contains("8-bit"), "{e}");
    let e = with("quant_method", "gptq".into());
    assert!(e.contains("gptq"), "{e}");
    let e = with("bnb_4bit_quant_storage", "bfloat16".into());
    assert!(e.contains("quant_storage"), "{e}");
    let mut c = base.clone();
    c["quantization_config"]
        .as_object_mut()
        .unwrap()
        .remove("bnb_4bit_quant_type");
    let e = parse_quantization_config(&c, &p).unwrap_err().to_string();
    assert!(e.contains("fp4"), "default quant type is fp4: {e}");
}

/// Compares our writer's output folder with transformers' own save of the same model.
fn check_same_as_transformers(ours: &Path, theirs: &Path) {
    let a = read_tensors(&ours.join("model.safetensors"));
    let b = read_tensors(&theirs.join("model.safetensors"));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "key sets"
    );
    for (k, (da, sa, ba)) in &a {
        let (db, sb, bb) = &b[k];
        assert_eq!((da, sa), (db, sb), "{k}: dtype/shape");
        if k.ends_with(QUANT_STATE_NF4) {
            let ja: Value = serde_json::from_slice(ba).unwrap();
            let jb: Value = serde_json::from_slice(bb).unwrap();
            assert_eq!(ja, jb, "{k}: quant_state JSON");
        }
        assert!(ba == bb, "{k}: bytes differ");
    }
    // Same layout, same header: the files are identical.
    assert!(
        fs::read(ours.join("model.safetensors")).unwrap()
            == fs::read(theirs.join("model.safetensors")).unwrap(),
        "model.safetensors not byte-identical"
    );
    let qa = read_json(&ours.join("config.json"))["quantization_config"].clone();
    let qb = read_json(&theirs.join("config.json"))["quantization_config"].clone();
    assert_eq!(qa, qb, "quantization_config");
    // The rest of the config is the source's.
    let mut ca = read_json(&ours.join("config.json"));
    let mut cb = read_json(&theirs.join("config.json"));
    ca.as_object_mut().unwrap().remove("quantization_config");
    cb.as_object_mut().unwrap().remove("quantization_config");
    assert_eq!(ca, cb);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(ours.join(f).is_file(), "{f} copied");
    }
}

#[test]
fn quantize_checkpoint_matches_transformers_double_quant() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gqa-nf4");
    let mut calls = Vec::new();
    let r = quantize_checkpoint(&tiny("gqa"), &out, 64, true, false, |d, t| {
        calls.push((d, t))
    })
    .unwrap();
    assert_eq!(r.tensors_quantized, 14);
    assert_eq!(
        r.bytes_out,
        fs::metadata(out.join("model.safetensors")).unwrap().len()
    );
    assert_eq!(calls.last(), Some(&(21, 21)));
    assert!(calls.windows(2).all(|w| w[0].0 + 1 == w[1].0));
    check_same_as_transformers(&out, &bnb("gqa-bnb4"));
    // No temporary folder left behind.
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("gqa-nf4")]);
    // And it reads back as what we quantized.
    let ckpt = Checkpoint::open(&out).unwrap();
    let src = Checkpoint::open(&tiny("gqa")).unwrap();
    for (name, shape) in linears("gqa") {
        let t = load_prequantized(&ckpt, &name, &shape).unwrap();
        let w = src.load_f32(&name, &shape).unwrap();
        assert_eq!(t, quantize_nf4(&w, &shape, 64, true).unwrap());
    }
}

#[test]
fn quantize_checkpoint_matches_transformers_no_double_quant() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tied-nf4");
    let r = quantize_checkpoint(&tiny("tied"), &out, 64, false, false, |_, _| {}).unwrap();
    assert_eq!(r.tensors_quantized, linears("tied").len());
    check_same_as_transformers(&out, &bnb("tied-bnb4-nodq"));
}

#[test]
fn bnb_entries_of_one_weight() {
    let w: Vec<f32> = (0..7 * 13)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
        .collect();
    let t = quantize_nf4(&w, &[7, 13], 64, true).unwrap();
    let e = bnb_entries("m.weight", &t, "bfloat16");
    let names: Vec<_> = e.iter().map(|x| x.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "m.weight",
            "m.weight.absmax",
            "m.weight.nested_absmax",
            "m.weight.nested_quant_map",
            "m.weight.quant_map",
            "m.weight.quant_state.bitsandbytes__nf4"
        ]
    );
    assert_eq!(e[0].2, vec![46, 1]);
    assert_eq!(e[1].1, Dtype::U8);
    assert_eq!(e[1].2, vec![2]);
    let qs: Value = serde_json::from_slice(&e[5].3).unwrap();
    assert_eq!(qs["dtype"], "bfloat16");
    assert_eq!(qs["shape"], serde_json::json!([7, 13]));
    assert_eq!(qs["nested_blocksize"], 256);
    let t = quantize_nf4(&w, &[7, 13], 64, false).unwrap();
    let e = bnb_entries("m.weight", &t, "float16");
    assert_eq!(e.len(), 4);
    assert_eq!((e[1].1, e[1].2.clone()), (Dtype::F32, vec![2]));
    let qm: Vec<f32> = e[2]
        .3
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(qm, NF4_TABLE);
    assert_eq!(
        String::from_utf8(e[3].3.clone()).unwrap(),
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [7, 13]}"#
    );
}

#[test]
fn sharded_output_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sharded");
    let opts = QuantizeOptions {
        max_shard_bytes: 100_000,
        ..QuantizeOptions::default()
    };
    quantize_checkpoint_with(&tiny("gqa"), &out, &opts, |_, _| {}).unwrap();
    assert!(!out.join("model.safetensors").exists());
    let index = read_json(&out.join("model.safetensors.index.json"));
    let shards: std::collections::BTreeSet<_> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(shards.len() >= 3, "{shards:?}");
    assert!(shards.contains("model-00001-of-00003.safetensors") || shards.len() > 3);
    let ckpt = Checkpoint::open(&out).unwrap();
    let single = Checkpoint::open(&bnb("gqa-bnb4")).unwrap();
    assert_eq!(ckpt.len(), single.len());
    for (name, shape) in linears("gqa") {
        assert_eq!(
            load_prequantized(&ckpt, &name, &shape).unwrap(),
            load_prequantized(&single, &name, &shape).unwrap()
        );
    }
    for t in single.tensors() {
        assert_eq!(
            ckpt.bytes(&t.name).unwrap().1,
            single.bytes(&t.name).unwrap().1
        );
    }
}

/// The committed `gqa-qlora-nf4` folder is what `quantize_checkpoint` writes today; with
/// `QLORA_REGEN_BNB_FIXTURE=1` it is rewritten instead.
#[test]
fn qlora_fixture_is_current() {
    let dst = bnb("gqa-qlora-nf4");
    if std::env::var_os("QLORA_REGEN_BNB_FIXTURE").is_some() {
        quantize_checkpoint(&tiny("gqa"), &dst, 64, true, true, |_, _| {}).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    quantize_checkpoint(&tiny("gqa"), &out, 64, true, false, |_, _| {}).unwrap();
    let mut names: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for n in names {
        assert!(
            fs::read(out.join(&n)).unwrap() == fs::read(dst.join(&n)).unwrap(),
            "{n:?} differs from the committed fixture"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed checkpoints: each error names the file and the tensor.

const W: &str = "model.layers.0.mlp.down_proj.weight";
const W_SHAPE: [usize; 2] = [64, 172];

/// A copy of `gqa-bnb4` (or `tied-bnb4-nodq`) with `f` applied to its tensors.
fn mutated(saved: &str, f: impl FnOnce(&mut Tensors)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut t = read_tensors(&bnb(saved).join("model.safetensors"));
    f(&mut t);
    write_tensors(&dir.path().join("model.safetensors"), &t);
    fs::copy(
        bnb(saved).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

fn load_err(dir: &Path, name: &str, shape: &[usize]) -> (Error, String) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let e = load_prequantized(&ckpt, name, shape).unwrap_err();
    let s = e.to_string();
    assert!(s.contains("model.safetensors"), "names the file: {s}");
    (e, s)
}

fn edit_quant_state(t: &mut Tensors, name: &str, f: impl FnOnce(&mut Value)) {
    let key = format!("{name}.{QUANT_STATE_NF4}");
    let mut v: Value = serde_json::from_slice(&t[&key].2).unwrap();
    f(&mut v);
    let bytes = serde_json::to_vec(&v).unwrap();
    t.insert(key, (Dtype::U8, vec![bytes.len()], bytes));
}

#[test]
fn fp4_quant_state_is_unsupported() {
    // An fp4 weight as bnb saves it: the quant_state key says fp4.
    let dir = mutated("gqa-bnb4", |t| {
        edit_quant_state(t, W, |v| v["quant_type"] = "fp4".into());
        let v = t.remove(&format!("{W}.{QUANT_STATE_NF4}")).unwrap();
        t.insert(format!("{W}.{QUANT_STATE_FP4}"), v);
    });
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert!(is_prequantized(&ckpt, W));
    let (e, s) = load_err(dir.path(), W, &W_SHAPE);
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert!(
        s.contains("fp4 is not supported; only nf4") && s.contains(W),
        "{s}"
    );
    // An nf4 key whose JSON says fp4.
    let dir = mutated("gqa-bnb4", |t| {
        edit_quant_state(t, W, |v| v["quant_type"] = "fp4".into())
    });
    let (e, s) = load_err(dir.path(), W, &W_SHAPE);
    assert!(matches!(e, Error::BadTensor { .. }), "{e:?}");
    assert!(s.contains("only nf4") && s.contains(QUANT_STATE_NF4), "{s}");
}

#[test]
fn absmax_of_wrong_length() {
    let key = format!("{W}.absmax");
    let dir = mutated("gqa-bnb4", |t| {
        let e = t.get_mut(&key).unwrap();
        e.2.pop();
        e.1 = vec![e.2.len()];
    });
    let (_, s) = load_err(dir.path(), W, &W_SHAPE);
    assert!(s.contains(&key), "{s}");
    assert!(
        s.contains("expected 172") && s.contains("found 171"),
        "expected/found: {s}"
    );
    // Without double quant (F32 absmax).
    let w = "model.layers.0.mlp.down_proj.weight";
    let key = format!("{w}.absmax");
    let dir = mutated("tied-bnb4-nodq", |t| {
        let e = t.get_mut(&key).unwrap();
        e.2.truncate(e.2.len() - 8);
        e.1 = vec![e.2.len() / 4];
    });
    let (_, s) = load_err(dir.path(), w, &[48, 128]);
    assert!(
        s.contains(&key) && s.contains("expected 96") && s.contains("found 94"),
        "{s}"
    );
}

#[test]
fn quant_state_shape_mismatch() {
    let dir = mutated("gqa-bnb4", |t| {
        edit_quant_state(t, W, |v| v["shape"] = serde_json::json!([64, 171]))
    });
    let (_, s) = load_err(dir.path(), W, &W_SHAPE);
    assert!(
        s.contains(QUANT_STATE_NF4) && s.contains("[64, 171]") && s.contains("[64, 172]"),
        "{s}"
    );
    // Also a quant_state that agrees with itself but not with the model's shape.
    let dir = mutated("gqa-bnb4", |_| {});
    let (_, s) = load_err(dir.path(), W, &[172, 64]);
    assert!(s.contains("does not match the expected shape"), "{s}");
    // Partial nested fields.
    let dir = mutated("gqa-bnb4", |t| {
        edit_quant_state(t, W, |v| {
            v.as_object_mut().unwrap().remove("nested_offset");
        })
    });
    let (_, s) = load_err(dir.path(), W, &W_SHAPE);
    assert!(s.contains("only some of"), "{s}");
}

#[test]
fn quant_map_not_nf4() {
    let key = format!("{W}.quant_map");
    let dir = mutated("gqa-bnb4", |t| {
        let e = t.get_mut(&key).unwrap();
        e.2[4..8].copy_from_slice(&(-0.7f32).to_le_bytes());
    });
    let (_, s) = load_err(dir.path(), W, &W_SHAPE);
    assert!(
        s.contains(&key) && s.contains("not bitsandbytes' NF4 code"),
        "{s}"
    );
}

#[test]
fn nan_in_absmax() {
    let w = "model.layers.1.self_attn.q_proj.weight";
    let key = format!("{w}.absmax");
    let dir = mutated("tied-bnb4-nodq", |t| {
        t.get_mut(&key).unwrap().2[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let (_, s) = load_err(dir.path(), w, &[48, 48]);
    assert!(s.contains(&key) && s.contains("value 2 is NaN"), "{s}");
    // Double quant: the nested absmax.
    let key = format!("{W}.nested_absmax");
    let dir = mutated("gqa-bnb4", |t| {
        t.get_mut(&key).unwrap().2[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    let (_, s) = load_err(dir.path(), W, &W_SHAPE);
    assert!(s.contains(&key) && s.contains("inf"), "{s}");
}

#[test]
fn packed_weight_of_wrong_size() {
    let dir = mutated("gqa-bnb4", |t| {
        let e = t.get_mut(W).unwrap();
        e.2.pop();
        e.1 = vec![e.2.len(), 1];
    });
    let (_, s) = load_err(dir.path(), W, &W_SHAPE);
    assert!(
        s.contains(&format!("`{W}`")) && s.contains("5503 bytes"),
        "{s}"
    );
}

#[test]
fn output_folder_exists() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "x").unwrap();
    let e = quantize_checkpoint(&tiny("gqa"), &out, 64, true, false, |_, _| {}).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("not empty") && s.contains(&out.display().to_string()),
        "{s}"
    );
    assert!(out.join("keep.txt").exists(), "untouched");
    // An empty folder is fine; overwrite replaces a non-empty one.
    quantize_checkpoint(&tiny("gqa"), &out, 64, true, true, |_, _| {}).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").is_file());
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    quantize_checkpoint(&tiny("gqa"), &empty, 64, false, false, |_, _| {}).unwrap();
}

#[test]
fn source_without_config() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::copy(
        tiny("gqa").join("model.safetensors"),
        src.join("model.safetensors"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let e = quantize_checkpoint(&src, &out, 64, true, false, |_, _| {}).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("config.json") && s.contains(&src.display().to_string()),
        "{s}"
    );
    assert!(!out.exists());
    // Nothing temporary left either.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn already_quantized_source_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = quantize_checkpoint(
        &bnb("gqa-bnb4"),
        &dir.path().join("o"),
        64,
        true,
        false,
        |_, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("already quantized"), "{e}");
}
