//! Fuzz targets, one per parser of untrusted input (issue 12, item 6), run on stable Rust as
//! property tests under `cargo test` with [bolero](https://github.com/camshaft/bolero).
//!
//! Property, for every target: any bytes give `Ok` or a clean `Err` — never a panic, an abort, a
//! hang or an allocation sized by a number in the input rather than by the input (see
//! `harness.rs` for how each is caught). Every target is seeded with the real fixture files and
//! mutates them (bit flips, byte edits, truncations, insertions of structural tokens, numbers
//! replaced by huge / negative / non-integer ones, binary lengths overwritten, deep nesting,
//! splices between seeds).
//!
//! `cargo test --test fuzz` runs each target's short CI budget (seconds); `scripts/fuzz_long.sh`
//! runs 100,000 cases per target and writes the figures the README's "Reliability" section
//! quotes. Replaying one failing case: `BOLERO_RANDOM_SEED=<seed from the failure> cargo test
//! --test fuzz <target>`. Why bolero, and the figures: the README, "Reliability" → "Fuzzing and
//! input guards".

mod guards;
mod harness;
mod regressions;

use harness::{fuzz, Outcome, Seed};
use qlora::config::ModelConfig;
use qlora::tokenizer::{Message, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[global_allocator]
static ALLOC: harness::Counting = harness::Counting;

/// The bytes of `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> Vec<u8> {
    let p = fixtures().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_config(rel: &str) -> ModelConfig {
    ModelConfig::from_file(&fixtures().join(rel)).unwrap()
}

/// A scratch folder for one target, reused by its cases.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
    pairs
        .iter()
        .map(|(r, c)| Message {
            role: r.to_string(),
            content: c.to_string(),
        })
        .collect()
}

fn conversations() -> &'static [Vec<Message>] {
    static C: OnceLock<Vec<Vec<Message>>> = OnceLock::new();
    C.get_or_init(|| {
        vec![
            msgs(&[("user", "Hi"), ("assistant", "Hello! How can I help?")]),
            msgs(&[
                ("system", "Be brief."),
                ("user", "2+2?"),
                ("assistant", "4"),
                ("user", "and 3+3?"),
            ]),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// safetensors headers (src/weights/shard.rs, checkpoint.rs, plan.rs)

#[test]
fn fuzz_safetensors_header() {
    let seeds = [
        "tiny/gqa/model.safetensors",
        "tiny/tied/model.safetensors",
        "tiny/gqa-bf16/model.safetensors",
        "peft/gqa-lora/adapter_model.safetensors",
    ]
    .map(|rel| Seed::safetensors(rel, fixture(rel)));
    let configs = [
        model_config("tiny/gqa/config.json"),
        model_config("tiny/tied/config.json"),
        model_config("tiny/gqa-bf16/config.json"),
        model_config("tiny/gqa/config.json"),
    ];
    let dir = scratch();
    fuzz("safetensors_header", &seeds, 600, |which, bytes| {
        write(dir.path(), "model.safetensors", bytes);
        let ckpt = match qlora::weights::Checkpoint::open(dir.path()) {
            Ok(c) => c,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        // Read every tensor the header describes.
        let infos: Vec<_> = ckpt.tensors().cloned().collect();
        for t in &infos {
            if t.dtype.is_loadable_float() {
                if let Err(e) = ckpt.load_f32(&t.name, &t.shape) {
                    return Outcome::Refused(e.to_string());
                }
            } else {
                let _ = ckpt.bytes(&t.name);
            }
        }
        if which < 3 {
            qlora::weights::TensorPlan::new(dir.path(), &configs[which]).into()
        } else {
            Outcome::Accepted
        }
    });
}

// ---------------------------------------------------------------------------------------------
// the shard index (src/weights/mod.rs `Index`, hub::index_shards / check_model_dir)

#[test]
fn fuzz_shard_index() {
    let seeds = [
        Seed::fixture("llama-2-7b-chat-hf/model.safetensors.index.json"),
        Seed::fixture("llama-2-7b-chat-hf/model.safetensors.index.no_inv_freq.json"),
        Seed::new("tiny two-shard index", tiny_shards_index()),
    ];
    let cfg7b = model_config("llama-2-7b-chat-hf/config.json");
    let tiny = model_config("tiny/gqa/config.json");
    // The 7B index plans against a folder without shards; the tiny one against two real shards.
    let (dir7b, dirtiny) = (scratch(), scratch());
    write(
        dir7b.path(),
        "config.json",
        &fixture("llama-2-7b-chat-hf/config.json"),
    );
    write(
        dirtiny.path(),
        "config.json",
        &fixture("tiny/gqa/config.json"),
    );
    write_tiny_shards(dirtiny.path());
    fuzz("shard_index", &seeds, 600, |which, bytes| {
        let (dir, cfg) = if which < 2 {
            (dir7b.path(), &cfg7b)
        } else {
            (dirtiny.path(), &tiny)
        };
        let index = write(dir, "model.safetensors.index.json", bytes);
        let _ = qlora::hub::index_shards(&index);
        let _ = qlora::hub::check_model_dir(dir);
        let plan = qlora::weights::TensorPlan::new(dir, cfg);
        if which == 2 {
            if let Ok(ckpt) = qlora::weights::Checkpoint::open(dir) {
                for t in ckpt.tensors().cloned().collect::<Vec<_>>() {
                    let _ = ckpt.load_f32(&t.name, &t.shape);
                }
            }
        }
        plan.into()
    });
}

/// Tiny gqa's tensors split over two shard files.
fn tiny_shard_files() -> Vec<(String, Vec<u8>)> {
    let bytes = fixture("tiny/gqa/model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let half = names.len() / 2;
    [&names[..half], &names[half..]]
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let views: Vec<(String, safetensors::tensor::TensorView)> = part
                .iter()
                .map(|n| (n.clone(), st.tensor(n).unwrap()))
                .collect();
            (
                format!("model-0000{}-of-00002.safetensors", i + 1),
                safetensors::serialize(views, None).unwrap(),
            )
        })
        .collect()
}

fn tiny_shards_index() -> Vec<u8> {
    let mut map = serde_json::Map::new();
    for (file, bytes) in tiny_shard_files() {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for n in st.names() {
            map.insert(n.to_owned(), serde_json::Value::String(file.clone()));
        }
    }
    serde_json::to_vec_pretty(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap()
}

fn write_tiny_shards(dir: &Path) {
    for (file, bytes) in tiny_shard_files() {
        write(dir, &file, &bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// config.json (src/config.rs, quant::bnb::parse_quantization_config)

#[test]
fn fuzz_config_json() {
    let seeds = [
        "tiny/gqa/config.json",
        "tiny/tied/config.json",
        "tiny/llama3/config.json",
        "tiny/gqa-bf16/config.json",
        "bnb/gqa-bnb4/config.json",
        "bnb/tied-bnb4-nodq/config.json",
        "llama-2-7b-chat-hf/config.json",
    ]
    .map(Seed::fixture);
    let dir = scratch();
    let lora = qlora::lora::LoraConfig::new(8, 16.0, &["all-linear"]).unwrap();
    fuzz("config_json", &seeds, 1200, |_, bytes| {
        let path = write(dir.path(), "config.json", bytes);
        let cfg = match qlora::loader::read_config(dir.path()) {
            Ok(c) => c,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        // What the rest of the program derives from a config, all of it bounded by the guard.
        let names = qlora::weights::llama_tensor_names(&cfg);
        assert_eq!(
            names.len(),
            2 + 9 * cfg.num_hidden_layers + usize::from(!cfg.tie_word_embeddings)
        );
        let _ = cfg.rope_inv_freq();
        let _ = (cfg.q_dim(), cfg.kv_dim(), cfg.param_count());
        let _ = qlora::lora::trainable_params(&lora, &cfg);
        let _ = qlora::lora::base_params(&cfg);
        let raw: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        qlora::quant::bnb::parse_quantization_config(&raw, &path).into()
    });
}

// ---------------------------------------------------------------------------------------------
// tokenizer_config.json and chat templates (src/tokenizer.rs)

#[test]
fn fuzz_tokenizer_config() {
    let seeds = [
        Seed::fixture("tiny/tokenizer/tokenizer_config.json"),
        Seed::fixture("llama-2-7b-chat-hf/tokenizer_config.json"),
        Seed::new(
            "chatml tokenizer_config.json",
            serde_json::to_vec_pretty(&serde_json::json!({
                "bos_token": {"content": "<s>", "lstrip": false},
                "eos_token": "</s>",
                "chat_template": [
                    {"name": "default", "template": CHATML},
                    {"name": "tool_use", "template": "{{ raise_exception('no tools') }}"}
                ]
            }))
            .unwrap(),
        ),
    ];
    let dir = scratch();
    write(
        dir.path(),
        "tokenizer.json",
        &fixture("tiny/tokenizer/tokenizer.json"),
    );
    fuzz("tokenizer_config", &seeds, 600, |_, bytes| {
        write(dir.path(), "tokenizer_config.json", bytes);
        let tok = match Tokenizer::from_dir(dir.path()) {
            Ok(t) => t,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let _ = tok.encode("<s>[INST] Hi [/INST] Hello </s>");
        if tok.has_chat_template() {
            for c in conversations() {
                for gen in [false, true] {
                    if let Err(e) = tok.apply_chat_template(c, gen) {
                        return Outcome::Refused(e.to_string());
                    }
                }
            }
        }
        Outcome::Accepted
    });
}

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

#[test]
fn fuzz_chat_template() {
    let cfg: serde_json::Value =
        serde_json::from_slice(&fixture("llama-2-7b-chat-hf/tokenizer_config.json")).unwrap();
    let llama2 = cfg["chat_template"].as_str().unwrap().to_owned();
    let seeds = [
        Seed::new("llama-2 chat template", llama2.into_bytes()),
        Seed::new("chatml template", CHATML.into()),
        Seed::new("llama-3 template", LLAMA3.into()),
        Seed::new("zephyr template", ZEPHYR.into()),
    ];
    fuzz("chat_template", &seeds, 2000, |which, bytes| {
        let template = String::from_utf8_lossy(bytes);
        let c = &conversations()[which % 2];
        qlora::tokenizer::render_chat_template(&template, c, "<s>", "</s>", which % 3 == 0).into()
    });
}

#[test]
fn fuzz_tokenizer_json() {
    let seeds = [Seed::fixture("tiny/tokenizer/tokenizer.json")];
    let dir = scratch();
    write(
        dir.path(),
        "tokenizer_config.json",
        &fixture("tiny/tokenizer/tokenizer_config.json"),
    );
    fuzz("tokenizer_json", &seeds, 400, |_, bytes| {
        write(dir.path(), "tokenizer.json", bytes);
        let tok = match Tokenizer::from_dir(dir.path()) {
            Ok(t) => t,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        match tok.encode("<s>[INST] Hello, wörld ✓ [/INST] 42 </s>") {
            Ok(ids) => tok.decode(&ids, false).into(),
            Err(e) => Outcome::Refused(e.to_string()),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// adapter_config.json and adapter files (src/lora/)

const ADAPTERS: [&str; 3] = [
    "peft/gqa-lora",
    "peft/gqa-all-linear-rslora",
    "peft/qlora-trained",
];

#[test]
fn fuzz_adapter_config() {
    let seeds = ADAPTERS.map(|a| Seed::fixture(&format!("{a}/adapter_config.json")));
    let model = model_config("tiny/gqa/config.json");
    fuzz("adapter_config", &seeds, 1200, |_, bytes| {
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let cfg = match qlora::lora::LoraConfig::from_json_str(text) {
            Ok(c) => c,
            Err(e) => return Outcome::Refused(e),
        };
        let _ = (cfg.scaling(), cfg.targets(), cfg.to_json());
        if let Err(e) = cfg.validate_for(&model) {
            return Outcome::Refused(e.to_string());
        }
        let _ = cfg.modules(&model);
        let _ = qlora::lora::trainable_params(&cfg, &model);
        Outcome::Accepted
    });
}

#[test]
fn fuzz_adapter_file() {
    let seeds = ADAPTERS.map(|a| {
        let rel = format!("{a}/adapter_model.safetensors");
        Seed::safetensors(&rel, fixture(&rel))
    });
    let model = model_config("tiny/gqa/config.json");
    let dirs: Vec<tempfile::TempDir> = ADAPTERS
        .iter()
        .map(|a| {
            let d = scratch();
            write(
                d.path(),
                "adapter_config.json",
                &fixture(&format!("{a}/adapter_config.json")),
            );
            d
        })
        .collect();
    fuzz("adapter_file", &seeds, 600, |which, bytes| {
        let dir = dirs[which].path();
        write(dir, "adapter_model.safetensors", bytes);
        qlora::lora::load_adapter(dir, &model).into()
    });
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes quant_state (src/quant/bnb/read.rs)

const BNB: [&str; 2] = ["bnb/gqa-bnb4", "bnb/tied-bnb4-nodq"];
const BNB_WEIGHT: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn fuzz_bnb_quant_state() {
    // Seeds 0–1: the quant_state JSON of one weight, written back into the real checkpoint;
    // seeds 2–3: the whole checkpoint, edits focused on its header.
    let files: Vec<Vec<u8>> = BNB
        .iter()
        .map(|b| fixture(&format!("{b}/model.safetensors")))
        .collect();
    let mut seeds: Vec<Seed> = files
        .iter()
        .zip(BNB)
        .map(|(bytes, b)| {
            let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
            let qs = st
                .tensor(&format!("{BNB_WEIGHT}.quant_state.bitsandbytes__nf4"))
                .unwrap();
            Seed::new(format!("{b} quant_state"), qs.data().to_vec())
        })
        .collect();
    seeds.extend(
        files
            .iter()
            .zip(BNB)
            .map(|(bytes, b)| Seed::safetensors(format!("{b}/model.safetensors"), bytes.clone())),
    );
    let configs: Vec<ModelConfig> = BNB
        .iter()
        .map(|b| model_config(&format!("{b}/config.json")))
        .collect();
    let dir = scratch();
    fuzz("bnb_quant_state", &seeds, 600, |which, bytes| {
        let model = which % 2;
        let cfg = &configs[model];
        let file = if which < 2 {
            with_quant_state(&files[model], bytes)
        } else {
            bytes.to_vec()
        };
        write(dir.path(), "model.safetensors", &file);
        let ckpt = match qlora::weights::Checkpoint::open(dir.path()) {
            Ok(c) => c,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let linears: Vec<(String, Vec<usize>)> = qlora::weights::llama_tensor_names(cfg)
            .into_iter()
            .filter(|(n, _)| qlora::quant::bnb::is_quantized_linear(n))
            .filter(|(n, _)| which >= 2 || n == BNB_WEIGHT)
            .collect();
        for (name, shape) in &linears {
            if let Err(e) = qlora::quant::bnb::load_prequantized(&ckpt, name, shape) {
                return Outcome::Refused(e.to_string());
            }
        }
        Outcome::Accepted
    });
}

/// The checkpoint `file` with the quant_state of [`BNB_WEIGHT`] replaced by `state`.
fn with_quant_state(file: &[u8], state: &[u8]) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(file).unwrap();
    let qs_name = format!("{BNB_WEIGHT}.quant_state.bitsandbytes__nf4");
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .names()
        .into_iter()
        .map(|n| {
            let v = if n == qs_name {
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::U8,
                    vec![state.len()],
                    state,
                )
                .unwrap()
            } else {
                st.tensor(n).unwrap()
            };
            (n.to_owned(), v)
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

// ---------------------------------------------------------------------------------------------
// JSONL / JSON / Parquet dataset rows (src/data.rs, src/train/data.rs)

/// The tiny tokenizer with Llama-2's chat template.
fn tiny_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_dir(&fixtures().join("tiny/tokenizer")).unwrap())
}

#[test]
fn fuzz_dataset_rows() {
    let guanaco: Vec<u8> = fixture("guanaco-llama2-1k/train.jsonl")
        .split_inclusive(|&b| b == b'\n')
        .take(4)
        .flatten()
        .copied()
        .collect();
    let chat_json = {
        let rows: Vec<serde_json::Value> = String::from_utf8(fixture("data/chat.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        serde_json::to_vec_pretty(&serde_json::json!({ "train": rows })).unwrap()
    };
    let seeds = [
        (".jsonl", Seed::fixture("data/chat.jsonl")),
        (".parquet", Seed::fixture("data/chat.parquet")),
        (".jsonl", Seed::fixture("tiny/eval.jsonl")),
        (".jsonl", Seed::new("guanaco rows 1-4", guanaco)),
        (".json", Seed::new("chat rows as a JSON object", chat_json)),
        (
            ".jsonl",
            Seed::new(
                "prompt/completion rows",
                b"{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n\n{\"prompt\": \"Capital of France?\", \"completion\": \" Paris\"}\n".to_vec(),
            ),
        ),
    ];
    let (exts, seeds): (Vec<&str>, Vec<Seed>) = seeds.into_iter().unzip();
    let dir = scratch();
    fuzz("dataset_rows", &seeds, 800, |which, bytes| {
        let path = write(dir.path(), &format!("rows{}", exts[which]), bytes);
        let rows = match qlora::data::load_rows(&path, None) {
            Ok(r) => r,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        let opts = qlora::train::data::SftOptions {
            text_field: "text".into(),
            messages_field: "messages".into(),
            completion_only_loss: which % 2 == 0 && which != 2 && which != 3,
            max_seq_len: 64,
        };
        let _ = qlora::data::texts(&rows, "text");
        qlora::train::data::build_examples(&rows, tiny_tokenizer(), &opts, &path).into()
    });
}

// ---------------------------------------------------------------------------------------------
// the TOML run config (src/train/config_file.rs, behind `qlora train --config`)

#[test]
fn fuzz_run_config_toml() {
    use qlora::train::config_file::{config_flags, FlagKind};
    let seeds = [
        Seed::new(
            "tests/cli_train.rs run.toml",
            b"max_steps = 3\nlora_r = 2\ntarget_modules = [\"q_proj\", \"down_proj\"]\nlogging_steps = 1\npacking = false\n".to_vec(),
        ),
        Seed::new(
            "README-style run.toml",
            b"# guanaco QLoRA\nmodel = \"NousResearch/Llama-2-7b-chat-hf\"\ndataset = \"guanaco-llama2-1k\"\noutput = \"out\"\nlearning_rate = 2e-4\nlora_r = 64\nlora_alpha = 16.0\nlora_dropout = 0.1\ntarget_modules = [\"all-linear\"]\nmax_seq_len = 512\nbatch_size = 4\ngrad_accum = 4\nwarmup_ratio = 0.03\nlr_scheduler = \"cosine\"\npacking = true\ncompletion_only_loss = false\n".to_vec(),
        ),
        Seed::new(
            "run.toml with every value type",
            b"eval_split = 0.05\nmax_rows = 400\nseed = -1\nresume = \"latest\"\nno_group_by_length = true\nsave_steps = 9223372036854775807\n".to_vec(),
        ),
    ];
    let kind = |long: &str| -> Option<FlagKind> {
        const SWITCHES: [&str; 6] = [
            "packing",
            "completion-only-loss",
            "no-group-by-length",
            "overwrite",
            "use-rslora",
            "dry-run",
        ];
        const VALUES: [&str; 24] = [
            "config",
            "model",
            "dataset",
            "output",
            "learning-rate",
            "lora-r",
            "lora-alpha",
            "lora-dropout",
            "target-modules",
            "max-seq-len",
            "batch-size",
            "grad-accum",
            "warmup-ratio",
            "lr-scheduler",
            "max-steps",
            "logging-steps",
            "eval-split",
            "max-rows",
            "seed",
            "resume",
            "save-steps",
            "epochs",
            "eval-steps",
            "optim",
        ];
        if SWITCHES.contains(&long) {
            Some(FlagKind::Switch)
        } else if VALUES.contains(&long) {
            Some(FlagKind::Value)
        } else {
            None
        }
    };
    fuzz("run_config_toml", &seeds, 2000, |_, bytes| {
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => return Outcome::Refused(e.to_string()),
        };
        config_flags("run.toml", text, kind).into()
    });
}

// ---------------------------------------------------------------------------------------------
// checkpoint trainer state (src/train/checkpoint.rs `load_checkpoint`)

#[test]
fn fuzz_trainer_state() {
    use qlora::train::checkpoint::{load_checkpoint, save_checkpoint, TrainerState};
    let model = model_config("tiny/gqa/config.json");
    let lora = qlora::lora::LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]).unwrap();
    let weights = qlora::lora::LoraWeights::init(&lora, &model, 7).unwrap();
    let mut optim = qlora::train::AdamWState::new();
    for (i, (name, n)) in [("a", 64usize), ("b", 300)].into_iter().enumerate() {
        let s = optim.entry(name, n);
        s.step = 3 + i as u64;
        s.m = (0..n).map(|k| k as f32 * 1e-3).collect();
        s.v = (0..n).map(|k| k as f32 * 1e-6).collect();
    }
    let state = TrainerState {
        step: 3,
        total_steps: 10,
        steps_per_epoch: 5,
        warmup_steps: 1,
        seed: 42,
        batch_size: 2,
        grad_accum: 1,
        max_seq_len: 64,
        tokens: 1234,
        elapsed_s: 1.5,
        losses: vec![(1, 5.9), (2, 5.7), (3, 5.5)],
        eval_losses: vec![(2, 5.8)],
    };
    let out = scratch();
    let ckpt = save_checkpoint(out.path(), &lora, &weights, &optim, &state).unwrap();
    // Every file of the checkpoint, whatever its writer puts there, is a seed.
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    let seeds: Vec<Seed> = files
        .iter()
        .map(|(name, bytes)| {
            if name.ends_with(".safetensors") {
                Seed::safetensors(name.clone(), bytes.clone())
            } else {
                Seed::new(name.clone(), bytes.clone())
            }
        })
        .collect();
    let dir = scratch();
    for (name, bytes) in &files {
        write(dir.path(), name, bytes);
    }
    fuzz("trainer_state", &seeds, 600, |which, bytes| {
        let name = &files[which].0;
        write(dir.path(), name, bytes);
        let sealed = reseal_manifest(dir.path(), &files, name, bytes);
        let r = load_checkpoint(dir.path(), &model);
        // Put the files back for the next case.
        write(dir.path(), name, &files[which].1);
        if sealed {
            let manifest = files.iter().find(|(n, _)| n == MANIFEST).expect("sealed");
            write(dir.path(), MANIFEST, &manifest.1);
        }
        r.into()
    });
}

const MANIFEST: &str = "manifest.json";

/// A checkpoint written with a manifest (`manifest.json`: each file's size and SHA-256, and the
/// SHA-256 of that list as compact JSON) is refused on any changed byte before its files are
/// parsed. So that the parsers behind it are fuzzed too, the manifest is re-sealed for the
/// mutated file; cases that mutate the manifest itself fuzz its own parser. Returns whether a
/// manifest was rewritten (none: a checkpoint without one, or the manifest is the mutated file).
fn reseal_manifest(dir: &Path, files: &[(String, Vec<u8>)], changed: &str, bytes: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let Some((_, original)) = files.iter().find(|(n, _)| n == MANIFEST) else {
        return false;
    };
    if changed == MANIFEST {
        return false;
    }
    let m: serde_json::Value = serde_json::from_slice(original).expect("the written manifest");
    let hex = |b: &[u8]| -> String {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    let entries: Vec<String> = m["files"]
        .as_array()
        .expect("manifest files")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("entry name");
            let (size, sha) = if name == changed {
                (bytes.len() as u64, hex(bytes))
            } else {
                (
                    e["size"].as_u64().expect("entry size"),
                    e["sha256"].as_str().expect("entry sha256").to_owned(),
                )
            };
            format!(
                "{{\"name\":{},\"size\":{size},\"sha256\":\"{sha}\"}}",
                serde_json::Value::from(name)
            )
        })
        .collect();
    let list = format!("[{}]", entries.join(","));
    let sealed = format!(
        "{{\"format\":{},\"files\":{list},\"files_sha256\":\"{}\"}}",
        m["format"],
        hex(list.as_bytes())
    );
    write(dir, MANIFEST, sealed.as_bytes());
    true
}
