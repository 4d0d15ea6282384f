//! Checkpoint loading and the tensor plan, against real safetensors files written into temporary
//! directories (single-file, sharded, hand-crafted and deliberately corrupted) and against the
//! real Llama-2-7B index and config.

use qlora::config::ModelConfig;
use qlora::weights::{
    llama_tensor_names, tensor_plan, Checkpoint, DType, PlannedTensor, TensorPlan, INDEX_FILE,
    SINGLE_FILE,
};
use qlora::Error;
use safetensors::tensor::TensorView;
use safetensors::Dtype as St;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// helpers

const FIXTURE_7B: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/llama-2-7b-chat-hf"
);

/// A tensor to write: name, dtype, shape, raw little-endian bytes.
type Raw = (&'static str, St, Vec<usize>, Vec<u8>);

fn write_st(path: &Path, tensors: &[Raw]) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A safetensors file written by hand: 8-byte LE header length, header JSON (unpadded), data.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut buf = (header.len() as u64).to_le_bytes().to_vec();
    buf.extend_from_slice(header.as_bytes());
    buf.extend_from_slice(data);
    fs::write(path, buf).unwrap();
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let weight_map: BTreeMap<&str, &str> = map.iter().copied().collect();
    let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    fs::write(dir.join(INDEX_FILE), json.to_string()).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u16_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `n` values exactly representable in f16 and bf16 (multiples of 1/4 below 64).
fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i % 251) as f32 - 125.0) * 0.25).collect()
}

/// The error of a result that must fail.
fn err<T: std::fmt::Debug>(r: qlora::Result<T>) -> Error {
    r.expect_err("expected an error")
}

fn assert_bad_file(e: &Error, file: &Path, needle: &str) {
    match e {
        Error::BadFile { path, msg } => {
            assert_eq!(path, file, "{e}");
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
        }
        other => panic!("expected BadFile for {}, got {other:?}", file.display()),
    }
    assert!(e.to_string().contains(&file.display().to_string()));
}

fn tiny_config(tie: bool, torch_dtype: Option<&str>) -> ModelConfig {
    let mut v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "vocab_size": 16, "tie_word_embeddings": tie,
    });
    if let Some(d) = torch_dtype {
        v["torch_dtype"] = d.into();
    }
    ModelConfig::from_json_str(&v.to_string()).unwrap()
}

fn config_7b() -> ModelConfig {
    ModelConfig::from_file(&Path::new(FIXTURE_7B).join("config.json")).unwrap()
}

// ---------------------------------------------------------------------------------------------
// the Llama-2-7B plan

#[derive(Deserialize)]
struct Shapes {
    tensors: BTreeMap<String, ShapeEntry>,
}

#[derive(Deserialize)]
struct ShapeEntry {
    dtype: String,
    shape: Vec<usize>,
    nbytes: usize,
    shard: String,
}

fn tensor_shapes_7b() -> Shapes {
    let text = fs::read_to_string(Path::new(FIXTURE_7B).join("tensor_shapes.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Checks a plan of the 7B checkpoint against `tensor_shapes.json`.
fn check_7b_plan(plan: &TensorPlan) {
    let shapes = tensor_shapes_7b();
    assert_eq!(shapes.tensors.len(), 323);
    let expected: BTreeMap<&String, &ShapeEntry> = shapes
        .tensors
        .iter()
        .filter(|(n, _)| !n.ends_with(".rotary_emb.inv_freq"))
        .collect();
    assert_eq!(expected.len(), 291);
    assert_eq!(plan.tensors.len(), 291);

    let planned: BTreeMap<&String, &PlannedTensor> =
        plan.tensors.iter().map(|t| (&t.name, t)).collect();
    assert_eq!(planned.len(), 291, "plan has duplicate names");
    assert_eq!(
        planned.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, want) in &expected {
        let got = planned[name];
        assert_eq!(got.shape, want.shape, "{name}");
        assert_eq!(got.dtype.to_string(), want.dtype, "{name}");
        assert_eq!(got.shard, want.shard, "{name}");
        assert_eq!(got.nbytes(), Some(want.nbytes), "{name}");
    }
    let total: usize = plan.tensors.iter().map(|t| t.nbytes().unwrap()).sum();
    assert_eq!(total, 13_476_831_232);
    assert_eq!(plan.total_bytes(), 13_476_831_232);

    // Stable order: the order of llama_tensor_names.
    let order: Vec<String> = llama_tensor_names(&config_7b())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let plan_order: Vec<&String> = plan.tensors.iter().map(|t| &t.name).collect();
    assert_eq!(plan_order, order.iter().collect::<Vec<_>>());
    assert!(plan.tensors.iter().all(|t| !t.name.contains("inv_freq")));
}

#[test]
fn plan_7b_matches_tensor_shapes() {
    let cfg = config_7b();
    let dir = Path::new(FIXTURE_7B);
    let plan = TensorPlan::new(dir, &cfg).unwrap();
    check_7b_plan(&plan);
    assert_eq!(plan.source, dir.join(INDEX_FILE));

    // The 32 inv_freq buffers in the index were ignored, and nothing else was.
    let inv_freq: Vec<String> = tensor_shapes_7b()
        .tensors
        .into_keys()
        .filter(|n| n.ends_with(".rotary_emb.inv_freq"))
        .collect();
    assert_eq!(inv_freq.len(), 32);
    assert_eq!(plan.ignored, inv_freq);

    // The plain function returns the same tensors.
    assert_eq!(tensor_plan(dir, &cfg).unwrap(), plan.tensors);
}

#[test]
fn plan_7b_without_inv_freq() {
    let tmp = TempDir::new().unwrap();
    let src = Path::new(FIXTURE_7B);
    fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    fs::copy(
        src.join("model.safetensors.index.no_inv_freq.json"),
        tmp.path().join(INDEX_FILE),
    )
    .unwrap();
    let cfg = ModelConfig::from_file(&tmp.path().join("config.json")).unwrap();
    let plan = TensorPlan::new(tmp.path(), &cfg).unwrap();
    check_7b_plan(&plan);
    assert!(plan.ignored.is_empty(), "{:?}", plan.ignored);
}

#[test]
fn opening_7b_without_shards_names_the_missing_shard() {
    let dir = Path::new(FIXTURE_7B);
    let e = err(Checkpoint::open(dir));
    assert_bad_file(
        &e,
        &dir.join(INDEX_FILE),
        "model-00001-of-00002.safetensors",
    );
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn llama_names_order_shapes_and_tying() {
    let cfg = tiny_config(false, None);
    let names = llama_tensor_names(&cfg);
    assert_eq!(names.len(), 1 + 9 * 2 + 2);
    let want_layer0 = [
        ("model.layers.0.input_layernorm.weight", vec![8]),
        ("model.layers.0.self_attn.q_proj.weight", vec![8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.v_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.o_proj.weight", vec![8, 8]),
        ("model.layers.0.post_attention_layernorm.weight", vec![8]),
        ("model.layers.0.mlp.gate_proj.weight", vec![12, 8]),
        ("model.layers.0.mlp.up_proj.weight", vec![12, 8]),
        ("model.layers.0.mlp.down_proj.weight", vec![8, 12]),
    ];
    assert_eq!(
        names[0],
        ("model.embed_tokens.weight".to_string(), vec![16, 8])
    );
    for (i, (n, s)) in want_layer0.iter().enumerate() {
        assert_eq!(names[1 + i], (n.to_string(), s.clone()));
    }
    assert_eq!(names[10].0, "model.layers.1.input_layernorm.weight");
    assert_eq!(names[19], ("model.norm.weight".to_string(), vec![8]));
    assert_eq!(names[20], ("lm_head.weight".to_string(), vec![16, 8]));

    let tied = llama_tensor_names(&tiny_config(true, None));
    assert_eq!(tied.len(), names.len() - 1);
    assert!(tied.iter().all(|(n, _)| n != "lm_head.weight"));
    assert_eq!(tied[..], names[..20]);
}

#[test]
fn dtype_display_size_and_torch_names() {
    let all = [
        (DType::F32, "F32", Some(4)),
        (DType::F16, "F16", Some(2)),
        (DType::BF16, "BF16", Some(2)),
        (DType::F64, "F64", Some(8)),
        (DType::I64, "I64", Some(8)),
        (DType::I32, "I32", Some(4)),
        (DType::I16, "I16", Some(2)),
        (DType::I8, "I8", Some(1)),
        (DType::U8, "U8", Some(1)),
        (DType::Bool, "BOOL", Some(1)),
        (DType::Other, "OTHER", None),
    ];
    for (d, s, size) in all {
        assert_eq!(d.to_string(), s);
        assert_eq!(d.size_in_bytes(), size);
    }
    assert_eq!(DType::from(St::BF16), DType::BF16);
    assert_eq!(DType::from(St::U16), DType::Other);
    assert_eq!(DType::from(St::F8_E4M3), DType::Other);
    assert_eq!(DType::from_torch_dtype("float16"), Some(DType::F16));
    assert_eq!(DType::from_torch_dtype("bfloat16"), Some(DType::BF16));
    assert_eq!(DType::from_torch_dtype("torch.float32"), Some(DType::F32));
    assert_eq!(DType::from_torch_dtype("int8"), None);
}

// ---------------------------------------------------------------------------------------------
// loading values

#[test]
fn single_file_loads_f32_f16_bf16_exactly() {
    let tmp = TempDir::new().unwrap();
    let f32s = [
        1.5f32,
        -0.0,
        f32::MIN_POSITIVE,
        f32::MAX,
        -7.25e-30,
        f32::INFINITY,
    ];
    // f16 bit patterns and their exact f32 values.
    let f16_cases: [(u16, f32); 8] = [
        (0x3C00, 1.0),
        (0xC100, -2.5),
        (0x7BFF, 65504.0),
        (0x0400, 2f32.powi(-14)), // smallest normal
        (0x0001, 2f32.powi(-24)), // smallest subnormal
        (0x8000, -0.0),
        (0x7C00, f32::INFINITY),
        (0x3555, 1365.0 / 4096.0),
    ];
    // bf16 is the top half of an f32.
    let bf16_bits: [u16; 6] = [0x3F80, 0xC049, 0x7F80, 0x0001, 0x8000, 0x7F7F];
    write_st(
        &tmp.path().join(SINGLE_FILE),
        &[
            ("a.f32", St::F32, vec![2, 3], f32_bytes(&f32s)),
            (
                "b.f16",
                St::F16,
                vec![8],
                u16_bytes(&f16_cases.map(|c| c.0)),
            ),
            ("c.bf16", St::BF16, vec![3, 2], u16_bytes(&bf16_bits)),
            ("d.scalar", St::F32, vec![], f32_bytes(&[42.0])),
            ("e.empty", St::F16, vec![0, 4], vec![]),
        ],
    );
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(ck.dir(), tmp.path());
    assert_eq!(ck.source(), tmp.path().join(SINGLE_FILE));
    assert_eq!(ck.len(), 5);

    assert_eq!(bits(&ck.load_f32("a.f32", &[2, 3]).unwrap()), bits(&f32s));
    assert_eq!(
        bits(&ck.load_f32("b.f16", &[8]).unwrap()),
        bits(&f16_cases.map(|c| c.1))
    );
    let want_bf16: Vec<u32> = bf16_bits.iter().map(|&b| (b as u32) << 16).collect();
    assert_eq!(bits(&ck.load_f32("c.bf16", &[3, 2]).unwrap()), want_bf16);
    assert_eq!(ck.load_f32("d.scalar", &[]).unwrap(), vec![42.0]);
    assert!(ck.load_f32("e.empty", &[0, 4]).unwrap().is_empty());

    let info = ck.get("b.f16").unwrap();
    assert_eq!(info.dtype, DType::F16);
    assert_eq!(info.shape, vec![8]);
    assert_eq!(info.file, tmp.path().join(SINGLE_FILE));
    let (info2, raw) = ck.bytes("c.bf16").unwrap();
    assert_eq!(info2.name, "c.bf16");
    assert_eq!(raw, &u16_bytes(&bf16_bits)[..]);
}

#[test]
fn sharded_checkpoint_sorted_lookup_and_load() {
    let tmp = TempDir::new().unwrap();
    let (s1, s2) = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    );
    let big = ramp(300_001); // crosses the parallel-conversion threshold
    write_st(
        &tmp.path().join(s1),
        &[
            ("z.weight", St::F16, vec![300_001], f16_bytes(&big)),
            ("m.weight", St::F32, vec![2], f32_bytes(&[3.0, 4.0])),
        ],
    );
    write_st(
        &tmp.path().join(s2),
        &[
            ("a.weight", St::BF16, vec![1, 300_001], bf16_bytes(&big)),
            (
                "ids",
                St::I64,
                vec![2],
                [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        ],
    );
    write_index(
        tmp.path(),
        &[
            ("z.weight", s1),
            ("m.weight", s1),
            ("a.weight", s2),
            ("ids", s2),
        ],
    );
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(ck.source(), tmp.path().join(INDEX_FILE));
    let names: Vec<&str> = ck.tensors().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a.weight", "ids", "m.weight", "z.weight"]);
    assert!(ck.contains("ids") && !ck.contains("nope"));
    assert!(ck.get("nope").is_none());
    assert_eq!(ck.get("z.weight").unwrap().file, tmp.path().join(s1));
    assert_eq!(ck.get("a.weight").unwrap().file, tmp.path().join(s2));
    assert_eq!(ck.get("ids").unwrap().dtype, DType::I64);

    assert_eq!(
        bits(&ck.load_f32("z.weight", &[300_001]).unwrap()),
        bits(&big)
    );
    assert_eq!(
        bits(&ck.load_f32("a.weight", &[1, 300_001]).unwrap()),
        bits(&big)
    );
    assert_eq!(ck.load_f32("m.weight", &[2]).unwrap(), vec![3.0, 4.0]);
    let (_, raw) = ck.bytes("ids").unwrap();
    assert_eq!(raw[..8], 7i64.to_le_bytes());
}

#[test]
fn tensors_only_from_the_index_and_single_file_preferred() {
    let tmp = TempDir::new().unwrap();
    let shard = "s.safetensors";
    write_st(
        &tmp.path().join(shard),
        &[
            ("listed", St::F32, vec![1], f32_bytes(&[1.0])),
            ("unlisted", St::F32, vec![1], f32_bytes(&[2.0])),
        ],
    );
    write_index(tmp.path(), &[("listed", shard)]);
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(
        ck.tensors().map(|t| &t.name).collect::<Vec<_>>(),
        ["listed"]
    );

    // With model.safetensors present too, it wins (as in transformers).
    write_st(
        &tmp.path().join(SINGLE_FILE),
        &[("single", St::F32, vec![1], f32_bytes(&[5.0]))],
    );
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(
        ck.tensors().map(|t| &t.name).collect::<Vec<_>>(),
        ["single"]
    );
}

/// Tensor data at odd file offsets: a 1-byte tensor first and an unpadded header.
#[test]
fn unaligned_data_loads_exactly() {
    let tmp = TempDir::new().unwrap();
    let n_big = 270_000;
    let big = ramp(n_big);
    let mut data = vec![9u8]; // u8 [1] at [0, 1)
    let h = [1.0f32, -2.0, 0.5];
    data.extend(f16_bytes(&h)); // [1, 7)
    data.extend(bf16_bytes(&h)); // [7, 13)
    data.extend(f32_bytes(&h)); // [13, 25)
    let big_start = data.len();
    data.extend(f16_bytes(&big));
    let big_end = data.len();
    let header = format!(
        r#"{{"__metadata__":{{"format":"pt"}},"a":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}},"h":{{"dtype":"F16","shape":[3],"data_offsets":[1,7]}},"b":{{"dtype":"BF16","shape":[3],"data_offsets":[7,13]}},"f":{{"dtype":"F32","shape":[3],"data_offsets":[13,25]}},"big":{{"dtype":"F16","shape":[{n_big}],"data_offsets":[{big_start},{big_end}]}}}}"#
    );
    // Pad the header so the data section is 8-aligned: the odd offsets above then misalign
    // every float tensor in the (page-aligned) map.
    let header = format!("{header:width$}", width = header.len().next_multiple_of(8));
    write_raw(&tmp.path().join(SINGLE_FILE), &header, &data);
    let ck = Checkpoint::open(tmp.path()).unwrap();
    for name in ["h", "b", "f", "big"] {
        let addr = ck.bytes(name).unwrap().1.as_ptr() as usize;
        assert_eq!(addr % 2, 1, "{name} is not misaligned");
    }
    assert_eq!(ck.load_f32("h", &[3]).unwrap(), h);
    assert_eq!(ck.load_f32("b", &[3]).unwrap(), h);
    assert_eq!(ck.load_f32("f", &[3]).unwrap(), h);
    assert_eq!(bits(&ck.load_f32("big", &[n_big]).unwrap()), bits(&big));
    assert_eq!(ck.bytes("a").unwrap().1, [9u8]);
    assert_eq!(ck.get("a").unwrap().dtype, DType::U8);
}

// ---------------------------------------------------------------------------------------------
// load errors

fn small_checkpoint() -> (TempDir, PathBuf) {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join(SINGLE_FILE);
    write_st(
        &file,
        &[
            ("w", St::F32, vec![2, 3], f32_bytes(&[0.0; 6])),
            ("ids", St::I64, vec![2], vec![0; 16]),
            ("u", St::U16, vec![2], vec![0; 4]),
        ],
    );
    (tmp, file)
}

#[test]
fn load_missing_tensor_names_source_and_tensor() {
    let (tmp, file) = small_checkpoint();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    for e in [
        err(ck.load_f32("model.norm.weight", &[8])),
        err(ck.bytes("model.norm.weight").map(|_| ())),
    ] {
        match &e {
            Error::MissingTensor { path, name } => {
                assert_eq!(path, &file);
                assert_eq!(name, "model.norm.weight");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            e.to_string(),
            format!("{}: missing tensor `model.norm.weight`", file.display())
        );
    }
}

#[test]
fn load_wrong_shape_and_dtype() {
    let (tmp, file) = small_checkpoint();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let e = err(ck.load_f32("w", &[3, 2]));
    assert!(matches!(&e, Error::BadTensor { path, name, .. } if path == &file && name == "w"));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor `w`: expected [3, 2], found [2, 3]",
            file.display()
        )
    );
    let e = err(ck.load_f32("w", &[6]));
    assert!(e.to_string().ends_with("expected [6], found [2, 3]"), "{e}");

    let e = err(ck.load_f32("ids", &[2]));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor `ids`: dtype I64, expected F32, F16 or BF16",
            file.display()
        )
    );
    // Dtypes folded into Other are still named as the header names them.
    let e = err(ck.load_f32("u", &[2]));
    assert!(
        e.to_string()
            .ends_with("dtype U16, expected F32, F16 or BF16"),
        "{e}"
    );
    // Raw bytes of any dtype are available.
    assert_eq!(ck.bytes("ids").unwrap().1.len(), 16);
}

// ---------------------------------------------------------------------------------------------
// directory and index errors

#[test]
fn empty_dir_and_missing_dir() {
    let tmp = TempDir::new().unwrap();
    let e = err(Checkpoint::open(tmp.path()));
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    assert!(
        msg.contains(SINGLE_FILE) && msg.contains(INDEX_FILE),
        "{msg}"
    );
    assert!(msg.contains("empty"), "{msg}");
    assert!(!msg.contains(".bin"), "{msg}");

    let gone = tmp.path().join("nope");
    let e = err(Checkpoint::open(&gone));
    assert!(
        matches!(&e, Error::Io { path, .. } if path == &gone),
        "{e:?}"
    );
    let e = err(tensor_plan(&gone, &tiny_config(false, None)));
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
}

#[test]
fn dir_with_only_bin_checkpoint_lists_contents() {
    let tmp = TempDir::new().unwrap();
    fs::write(tmp.path().join("config.json"), "{}").unwrap();
    fs::write(tmp.path().join("pytorch_model.bin"), [0u8; 16]).unwrap();
    let e = err(Checkpoint::open(tmp.path()));
    let msg = e.to_string();
    assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    assert!(msg.contains("config.json, pytorch_model.bin"), "{msg}");
    assert!(
        msg.contains("pytorch .bin checkpoints are not supported, convert to safetensors"),
        "{msg}"
    );
    // The plan fails the same way.
    let e = err(tensor_plan(tmp.path(), &tiny_config(false, None)));
    assert!(e.to_string().contains("not supported"), "{e}");
}

#[test]
fn malformed_index() {
    let tmp = TempDir::new().unwrap();
    let index = tmp.path().join(INDEX_FILE);
    let cfg = tiny_config(false, Some("float16"));
    let cases = [
        (
            r#"{"weight_map": {"a": "s.safetensors""#,
            "malformed index JSON",
        ),
        ("not json at all", "malformed index JSON"),
        (r#"{"metadata": {}}"#, "missing field `weight_map`"),
        (r#"{"weight_map": {"a": 3}}"#, "malformed index JSON"),
        (r#"{"weight_map": []}"#, "malformed index JSON"),
        (r#"{"weight_map": {}}"#, "weight_map is empty"),
        (
            r#"{"weight_map": {"a": "../s.safetensors"}}"#,
            "not a relative file name",
        ),
        (
            r#"{"weight_map": {"a": "/etc/passwd"}}"#,
            "not a relative file name",
        ),
        (r#"{"weight_map": {"a": ""}}"#, "not a relative file name"),
    ];
    for (text, needle) in cases {
        fs::write(&index, text).unwrap();
        assert_bad_file(&err(Checkpoint::open(tmp.path())), &index, needle);
        assert_bad_file(&err(tensor_plan(tmp.path(), &cfg)), &index, needle);
    }
}

#[test]
fn index_names_missing_shard() {
    let tmp = TempDir::new().unwrap();
    write_st(
        &tmp.path().join("a.safetensors"),
        &[("x", St::F32, vec![1], f32_bytes(&[1.0]))],
    );
    write_index(
        tmp.path(),
        &[("x", "a.safetensors"), ("y", "b.safetensors")],
    );
    let e = err(Checkpoint::open(tmp.path()));
    assert_bad_file(
        &e,
        &tmp.path().join(INDEX_FILE),
        "shard `b.safetensors` is missing",
    );
    assert!(e.to_string().contains("`y`"), "{e}");
}

#[test]
fn index_tensor_missing_from_its_shard() {
    let tmp = TempDir::new().unwrap();
    let shard = tmp.path().join("a.safetensors");
    write_st(&shard, &[("x", St::F32, vec![1], f32_bytes(&[1.0]))]);
    write_index(
        tmp.path(),
        &[("x", "a.safetensors"), ("ghost", "a.safetensors")],
    );
    let e = err(Checkpoint::open(tmp.path()));
    match &e {
        Error::BadTensor { path, name, msg } => {
            assert_eq!(path, &shard);
            assert_eq!(name, "ghost");
            assert!(msg.contains(INDEX_FILE), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// corrupted safetensors files

/// A valid two-tensor single-file checkpoint; returns its path and bytes.
fn valid_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join(SINGLE_FILE);
    write_st(
        &path,
        &[
            ("a", St::F32, vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
            ("b", St::F16, vec![4], f16_bytes(&[1.0; 4])),
        ],
    );
    let bytes = fs::read(&path).unwrap();
    (path, bytes)
}

/// Both entry points fail on `dir` with a BadFile naming `file` and containing `needle`.
fn assert_corrupt(dir: &Path, file: &Path, needle: &str) {
    assert_bad_file(&err(Checkpoint::open(dir)), file, needle);
    assert_bad_file(
        &err(TensorPlan::new(dir, &tiny_config(false, Some("float16")))),
        file,
        needle,
    );
}

#[test]
fn truncated_file() {
    let tmp = TempDir::new().unwrap();
    let (path, bytes) = valid_file(tmp.path());
    fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    assert_corrupt(tmp.path(), &path, "runs past the end of the file");
    assert_corrupt(tmp.path(), &path, "truncated");
    // Cut inside the header.
    fs::write(&path, &bytes[..20]).unwrap();
    assert_corrupt(tmp.path(), &path, "exceeds the file size");
    // Shorter than the length prefix.
    fs::write(&path, &bytes[..5]).unwrap();
    assert_corrupt(tmp.path(), &path, "too short");
    fs::write(&path, b"").unwrap();
    assert_corrupt(tmp.path(), &path, "too short");
}

#[test]
fn trailing_bytes() {
    let tmp = TempDir::new().unwrap();
    let (path, mut bytes) = valid_file(tmp.path());
    bytes.extend_from_slice(&[0; 4]);
    fs::write(&path, &bytes).unwrap();
    assert_corrupt(
        tmp.path(),
        &path,
        "4 unexpected bytes after the last tensor",
    );
}

#[test]
fn header_length_beyond_file_and_absurd() {
    let tmp = TempDir::new().unwrap();
    let (path, mut bytes) = valid_file(tmp.path());
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&(len + 100).to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    assert_corrupt(tmp.path(), &path, "exceeds the file size");

    for absurd in [u64::MAX, 1 << 40, 100_000_001] {
        bytes[..8].copy_from_slice(&absurd.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        assert_corrupt(tmp.path(), &path, "absurd");
    }
}

/// Rewrites the JSON header of a valid file (keeping the data) via `edit`.
fn rewrite_header(path: &Path, bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    write_raw(path, &header.to_string(), &bytes[8 + n..]);
}

#[test]
fn header_offsets_beyond_end() {
    let tmp = TempDir::new().unwrap();
    let (path, bytes) = valid_file(tmp.path());
    // `a` (F32, 16 bytes) comes first; `b` (F16, 8 bytes) ends the file at 24. Claim `b` is
    // 400 elements long, consistent with its offsets, but past the end of the file.
    rewrite_header(&path, &bytes, |h| {
        h["b"]["shape"] = serde_json::json!([400]);
        h["b"]["data_offsets"] = serde_json::json!([16, 816]);
    });
    assert_corrupt(tmp.path(), &path, "runs past the end of the file");
    assert_corrupt(
        tmp.path(),
        &path,
        "describes 816 bytes of data, the file holds 24",
    );
}

#[test]
fn header_offsets_not_matching_dtype_and_shape() {
    let tmp = TempDir::new().unwrap();
    let (path, bytes) = valid_file(tmp.path());
    rewrite_header(&path, &bytes, |h| {
        h["a"]["shape"] = serde_json::json!([2, 3]);
    });
    assert_corrupt(
        tmp.path(),
        &path,
        "tensor `a`: data_offsets [0, 16] span 16 bytes, but F32 [2, 3] needs 24",
    );
    rewrite_header(&path, &bytes, |h| {
        h["b"]["dtype"] = serde_json::json!("F32");
    });
    assert_corrupt(tmp.path(), &path, "tensor `b`");
}

#[test]
fn header_offsets_overlapping_or_with_gap() {
    let tmp = TempDir::new().unwrap();
    let (path, bytes) = valid_file(tmp.path());
    // `b` starts inside `a`.
    rewrite_header(&path, &bytes, |h| {
        h["b"]["data_offsets"] = serde_json::json!([8, 16]);
    });
    assert_corrupt(tmp.path(), &path, "overlap");
    // A gap between `a` and `b`.
    rewrite_header(&path, &bytes, |h| {
        h["a"]["shape"] = serde_json::json!([2, 1]);
        h["a"]["data_offsets"] = serde_json::json!([0, 8]);
    });
    assert_corrupt(tmp.path(), &path, "tensor `b`");
    // Start after end.
    rewrite_header(&path, &bytes, |h| {
        h["b"]["data_offsets"] = serde_json::json!([24, 16]);
    });
    assert_corrupt(tmp.path(), &path, "data_offsets");
}

#[test]
fn header_not_json_or_not_utf8() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join(SINGLE_FILE);
    write_raw(&path, "this is not json", &[]);
    assert_corrupt(tmp.path(), &path, "not valid safetensors JSON");
    write_raw(
        &path,
        r#"{"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}"#,
        &[0; 4],
    );
    assert_corrupt(tmp.path(), &path, "not valid safetensors JSON");
    let mut buf = 4u64.to_le_bytes().to_vec();
    buf.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
    fs::write(&path, buf).unwrap();
    assert_corrupt(tmp.path(), &path, "UTF-8");
}

#[test]
fn corrupt_shard_is_named() {
    let tmp = TempDir::new().unwrap();
    let good = tmp.path().join("a.safetensors");
    let bad = tmp.path().join("b.safetensors");
    write_st(&good, &[("x", St::F32, vec![1], f32_bytes(&[1.0]))]);
    write_st(&bad, &[("y", St::F32, vec![4], f32_bytes(&[1.0; 4]))]);
    let bytes = fs::read(&bad).unwrap();
    fs::write(&bad, &bytes[..bytes.len() - 1]).unwrap();
    write_index(
        tmp.path(),
        &[("x", "a.safetensors"), ("y", "b.safetensors")],
    );
    assert_bad_file(&err(Checkpoint::open(tmp.path())), &bad, "truncated");
}

// ---------------------------------------------------------------------------------------------
// the plan on small checkpoints

/// Writes every tensor of the tiny model into two shards (layer 0 and the embedding in F16 in
/// shard 1, the rest BF16 in shard 2), plus `extra` tensors in shard 2, and the index.
fn write_tiny_sharded(dir: &Path, cfg: &ModelConfig, extra: &[(&'static str, Vec<usize>)]) {
    let (s1, s2) = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    );
    let mut t1: Vec<Raw> = Vec::new();
    let mut t2: Vec<Raw> = Vec::new();
    let mut map = Vec::new();
    for (i, (name, shape)) in llama_tensor_names(cfg).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = ramp(n + i)[i..].to_vec();
        let name: &'static str = Box::leak(name.into_boxed_str());
        if name.starts_with("model.layers.0.") || name == "model.embed_tokens.weight" {
            t1.push((name, St::F16, shape, f16_bytes(&vals)));
            map.push((name, s1));
        } else {
            t2.push((name, St::BF16, shape, bf16_bytes(&vals)));
            map.push((name, s2));
        }
    }
    for (name, shape) in extra {
        let n: usize = shape.iter().product();
        t2.push((name, St::F32, shape.clone(), f32_bytes(&vec![0.5; n])));
        map.push((name, s2));
    }
    write_st(&dir.join(s1), &t1);
    write_st(&dir.join(s2), &t2);
    write_index(dir, &map);
}

#[test]
fn plan_and_load_tiny_sharded_model() {
    let tmp = TempDir::new().unwrap();
    let cfg = tiny_config(false, Some("float16"));
    write_tiny_sharded(
        tmp.path(),
        &cfg,
        &[
            ("model.layers.0.self_attn.rotary_emb.inv_freq", vec![2]),
            ("model.layers.0.self_attn.q_proj.bias", vec![8]),
        ],
    );
    let plan = TensorPlan::new(tmp.path(), &cfg).unwrap();
    assert_eq!(
        plan.ignored,
        [
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.rotary_emb.inv_freq"
        ]
    );
    let names = llama_tensor_names(&cfg);
    assert_eq!(plan.tensors.len(), names.len());
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(ck.len(), names.len() + 2);
    for (i, (t, (name, shape))) in plan.tensors.iter().zip(&names).enumerate() {
        assert_eq!((&t.name, &t.shape), (name, shape));
        // Shards are present, so the dtype comes from the headers, not torch_dtype.
        let in_first = name.starts_with("model.layers.0.") || name == "model.embed_tokens.weight";
        let (dtype, shard) = if in_first {
            (DType::F16, "model-00001-of-00002.safetensors")
        } else {
            (DType::BF16, "model-00002-of-00002.safetensors")
        };
        assert_eq!((t.dtype, t.shard.as_str()), (dtype, shard), "{name}");
        let info = ck.get(name).unwrap();
        assert_eq!(info.dtype, t.dtype);
        assert_eq!(info.file, tmp.path().join(&t.shard));
        let n: usize = shape.iter().product();
        assert_eq!(
            ck.load_f32(name, shape).unwrap(),
            ramp(n + i)[i..].to_vec(),
            "{name}"
        );
    }
    assert_eq!(
        plan.total_bytes(),
        plan.tensors.iter().map(|t| t.numel() * 2).sum::<usize>()
    );
}

#[test]
fn plan_missing_expected_tensor_names_index() {
    let tmp = TempDir::new().unwrap();
    let cfg = tiny_config(false, Some("float16"));
    write_tiny_sharded(tmp.path(), &cfg, &[]);
    // An index that forgets model.norm.weight (the shards themselves are fine).
    let text = fs::read_to_string(tmp.path().join(INDEX_FILE)).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight");
    fs::write(tmp.path().join(INDEX_FILE), v.to_string()).unwrap();
    let e = err(TensorPlan::new(tmp.path(), &cfg));
    match &e {
        Error::MissingTensor { path, name } => {
            assert_eq!(path, &tmp.path().join(INDEX_FILE));
            assert_eq!(name, "model.norm.weight");
        }
        other => panic!("{other:?}"),
    }
    // The checkpoint opens (the index is self-consistent); loading the tensor fails.
    let ck = Checkpoint::open(tmp.path()).unwrap();
    let e = err(ck.load_f32("model.norm.weight", &[8]));
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
}

#[test]
fn plan_shape_mismatch_in_present_shard() {
    let tmp = TempDir::new().unwrap();
    // Written with vocab 16, planned with vocab 32.
    write_tiny_sharded(tmp.path(), &tiny_config(false, None), &[]);
    let mut cfg = tiny_config(false, None);
    cfg.vocab_size = 32;
    let e = err(TensorPlan::new(tmp.path(), &cfg));
    match &e {
        Error::BadTensor { path, name, msg } => {
            assert_eq!(path, &tmp.path().join("model-00001-of-00002.safetensors"));
            assert_eq!(name, "model.embed_tokens.weight");
            assert_eq!(msg, "expected [32, 8], found [16, 8]");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn plan_tensor_missing_from_present_shard() {
    let tmp = TempDir::new().unwrap();
    let cfg = tiny_config(true, None);
    write_tiny_sharded(tmp.path(), &cfg, &[]);
    // The index claims model.norm.weight is in shard 1, which lacks it.
    let text = fs::read_to_string(tmp.path().join(INDEX_FILE)).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors".into();
    fs::write(tmp.path().join(INDEX_FILE), v.to_string()).unwrap();
    let e = err(TensorPlan::new(tmp.path(), &cfg));
    assert!(
        matches!(&e, Error::BadTensor { path, name, .. }
            if path.ends_with("model-00001-of-00002.safetensors") && name == "model.norm.weight"),
        "{e:?}"
    );
    let e = err(Checkpoint::open(tmp.path()));
    assert!(matches!(e, Error::BadTensor { .. }), "{e:?}");
}

#[test]
fn plan_absent_shards_use_torch_dtype() {
    let cfg_for = |d: Option<&str>| tiny_config(true, d);
    let tmp = TempDir::new().unwrap();
    let map: Vec<(String, &str)> = llama_tensor_names(&cfg_for(None))
        .into_iter()
        .map(|(n, _)| (n, "absent.safetensors"))
        .collect();
    let map_ref: Vec<(&str, &str)> = map.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    write_index(tmp.path(), &map_ref);

    let plan = tensor_plan(tmp.path(), &cfg_for(Some("bfloat16"))).unwrap();
    assert!(plan
        .iter()
        .all(|t| t.dtype == DType::BF16 && t.shard == "absent.safetensors"));
    assert!(plan.iter().all(|t| t.name != "lm_head.weight")); // tied
    let plan = tensor_plan(tmp.path(), &cfg_for(Some("float32"))).unwrap();
    assert!(plan.iter().all(|t| t.dtype == DType::F32));

    for d in [None, Some("int8")] {
        let e = err(tensor_plan(tmp.path(), &cfg_for(d)));
        assert_bad_file(&e, &tmp.path().join(INDEX_FILE), "torch_dtype");
        assert!(e.to_string().contains("absent.safetensors"), "{e}");
    }
}

#[test]
fn plan_single_file_and_tied_lm_head_ignored() {
    let tmp = TempDir::new().unwrap();
    let cfg = tiny_config(true, Some("float16"));
    let untied = tiny_config(false, None);
    let tensors: Vec<Raw> = llama_tensor_names(&untied)
        .into_iter()
        .map(|(n, s)| {
            let len: usize = s.iter().product();
            let n: &'static str = Box::leak(n.into_boxed_str());
            (n, St::F32, s, f32_bytes(&vec![1.0; len]))
        })
        .collect();
    write_st(&tmp.path().join(SINGLE_FILE), &tensors);
    let plan = TensorPlan::new(tmp.path(), &cfg).unwrap();
    assert_eq!(plan.source, tmp.path().join(SINGLE_FILE));
    assert_eq!(plan.tensors.len(), llama_tensor_names(&cfg).len());
    assert!(plan
        .tensors
        .iter()
        .all(|t| t.dtype == DType::F32 && t.shard == SINGLE_FILE));
    assert_eq!(plan.ignored, ["lm_head.weight"]);

    // Untied, the lm_head is planned; missing from the single file, it is named against it.
    assert_eq!(
        tensor_plan(tmp.path(), &untied)
            .unwrap()
            .last()
            .unwrap()
            .name,
        "lm_head.weight"
    );
    let partial: Vec<Raw> = tensors
        .into_iter()
        .filter(|t| t.0 != "lm_head.weight")
        .collect();
    write_st(&tmp.path().join(SINGLE_FILE), &partial);
    let e = err(tensor_plan(tmp.path(), &untied));
    assert!(
        matches!(&e, Error::MissingTensor { path, name }
            if path == &tmp.path().join(SINGLE_FILE) && name == "lm_head.weight"),
        "{e:?}"
    );
}

#[test]
fn checkpoint_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Checkpoint>();
    check::<TensorPlan>();
}
