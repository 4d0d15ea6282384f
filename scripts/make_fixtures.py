#!/usr/bin/env python3
"""Reference oracle: regenerates the small golden fixtures under tests/fixtures/tiny/.

Python is never a runtime dependency of qlora. This script only produces small files
(tokenizer, tiny random Llama checkpoints, golden logits/losses/greedy ids, eval losses,
Llama-2 tokenizer ids over guanaco) that the Rust tests compare against.

Everything is seeded and computed on CPU in float32 with a single thread, so running the
script twice gives byte-identical files. Installed package versions must equal the pins in
scripts/requirements-fixtures.txt (checked at start).

    python3 -m venv .venv
    .venv/bin/pip install -r scripts/requirements-fixtures.txt
    .venv/bin/python scripts/make_fixtures.py            # all sections
    .venv/bin/python scripts/make_fixtures.py --only golden

Sections (run in this order; each reads what the earlier ones wrote under --out):
    tokenizer  small byte-level BPE tokenizer          -> tokenizer/
    models     tiny random LlamaForCausalLM folders    -> gqa/, gqa-bf16/, tied/, llama3/
    golden     logits, per-token losses, greedy ids    -> <model>/golden.safetensors, golden.json
    eval       eval-loss golden on a 6-row dataset     -> eval.jsonl, eval_golden.json
    llama2_ids Llama-2 tokenizer over all of guanaco   -> guanaco_llama2_ids.json
Later sections (NF4 via bitsandbytes, PEFT adapters) are meant to be added as new functions
registered in SECTIONS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "scripts" / "requirements-fixtures.txt"
GUANACO = ROOT / "tests" / "fixtures" / "guanaco-llama2-1k" / "train.jsonl"
LLAMA2_DIR = ROOT / "tests" / "fixtures" / "llama-2-7b-chat-hf"

# Keep the tokenizers library single-threaded and quiet (determinism of BPE training).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")


def check_versions() -> dict[str, str]:
    """Assert installed versions equal the pins; return them (recorded in the fixtures)."""
    pins: dict[str, str] = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"unpinned requirement in {REQUIREMENTS}: {line!r}"
        pins[name.strip()] = version.strip()
    bad = []
    for name, want in pins.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != want:
            bad.append(f"{name}: installed {have}, pinned {want}")
    if bad:
        sys.exit("version mismatch (install scripts/requirements-fixtures.txt):\n  " + "\n  ".join(bad))
    return pins


VERSIONS = check_versions()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

# --------------------------------------------------------------------------------------
# Shared constants
# --------------------------------------------------------------------------------------

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_VOCAB = 384
TOKENIZER_TRAIN_ROWS = 300

MAX_NEW_TOKENS = 32
MIN_MARGIN = 1e-2  # top-1 minus top-2 logit at every greedy step must exceed this (brief: 1e-3; we pick seeds for 10x that)
INIT_STD = 0.2  # larger than the default 0.02, so logits are spread out
NORM_STD = 0.1  # RMSNorm weights are 1 + NORM_STD * N(0, 1)
MAX_SEED_TRIES = 50

COMMON_CONFIG = dict(
    vocab_size=None,  # filled in from the tokenizer
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=None,
    initializer_range=INIT_STD,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)

# name -> (LlamaConfig overrides, base seed, saved dtype). gqa-bf16 reuses gqa's weights.
MODEL_SPECS: dict[str, dict] = {
    "gqa": dict(
        config=dict(
            hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        seed=1000,
    ),
    "tied": dict(
        config=dict(
            hidden_size=48, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, head_dim=12, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        seed=2000,
    ),
    "llama3": dict(
        config=dict(
            hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        seed=3000,
    ),
}
GOLDEN_MODELS = ["gqa", "gqa-bf16", "tied", "llama3"]

# Prompt texts for the golden outputs. The chat prompt is rendered from the Llama-2 chat
# template; the guanaco one is a prefix of a row (it starts with a literal "<s>").
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
ENGLISH_PROMPT = "Hello world! How are you?"
GUANACO_PROMPT_ROW, GUANACO_PROMPT_CHARS = 2, 66

# eval.jsonl: (guanaco row index, number of chars kept or None for the whole row), plus
# one plain English row without "<s>".
EVAL_ROWS = [(0, 200), (1, 200), (2, 200), (298, None), (338, None)]
EVAL_PLAIN = "Llamas are social animals and live with others as a herd. Their wool is soft."
EVAL_MODELS = ["gqa", "tied"]
EVAL_MAX_SEQ_LENS = [32, 256]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def guanaco_rows() -> list[str]:
    with GUANACO.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


_NUMBER_LIST = re.compile(r"\[[0-9eE.,+\-\s]*\]")


def write_json(path: Path, obj) -> None:
    """Indented JSON with every list of plain numbers kept on one line."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",") if x.strip()) + "]", text)
    assert json.loads(text) == obj
    path.write_text(text + "\n", encoding="utf-8")


def load_tiny_tokenizer(out: Path) -> Tokenizer:
    return Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))


def encode_no_double_bos(tok: Tokenizer, text: str) -> list[int]:
    """tokenizer(text, add_special_tokens=True), dropping the template BOS when the text
    itself already starts with a literal "<s>" (the "no double BOS" rule of the Rust code)."""
    ids = tok.encode(text, add_special_tokens=True).ids
    if len(ids) >= 2 and ids[0] == BOS_ID and ids[1] == BOS_ID:
        ids = ids[1:]
    return ids


def prompt_texts() -> list[str]:
    from jinja2 import Environment  # transformers dependency; renders the chat template

    template = json.loads((LLAMA2_DIR / "tokenizer_config.json").read_text())["chat_template"]

    def raise_exception(msg):
        raise ValueError(msg)

    env = Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    chat = env.from_string(template).render(messages=CHAT_MESSAGES, bos_token="<s>", eos_token="</s>")
    guanaco = guanaco_rows()[GUANACO_PROMPT_ROW][:GUANACO_PROMPT_CHARS]
    return [guanaco, ENGLISH_PROMPT, chat]


def load_model(path: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


@torch.no_grad()
def logits_of(model, ids: list[int]) -> torch.Tensor:
    """Full-sequence float32 logits [T, V]."""
    return model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy continuation by full recomputation; returns (new ids, min top1-top2 margin)."""
    seq = list(ids)
    margin = math.inf
    for _ in range(n):
        last = logits_of(model, seq)[-1]
        top = torch.topk(last, 2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        seq.append(int(top.indices[0]))
    return seq[len(ids):], margin


@torch.no_grad()
def greedy_generate(model, ids: list[int], n: int) -> list[int]:
    """The same with transformers generate() (KV cache), EOS disabled so it always runs n steps."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
        bos_token_id=BOS_ID, pad_token_id=UNK_ID, num_beams=1,
    )
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         generation_config=cfg)
    return out[0, len(ids):].tolist()


def token_losses(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Per-token cross-entropy [T-1]: position t predicts ids[t+1] (transformers' label shift)."""
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


# --------------------------------------------------------------------------------------
# Section: tokenizer
# --------------------------------------------------------------------------------------

def section_tokenizer(out: Path) -> None:
    rows = guanaco_rows()[:TOKENIZER_TRAIN_ROWS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(rows, trainer=trainer)
    # Like Llama: BOS prepended to single sequences (and to each of a pair).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()

    d = out / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    llama2_cfg = json.loads((LLAMA2_DIR / "tokenizer_config.json").read_text())
    write_json(d / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": llama2_cfg["chat_template"],
    })

    # Sanity: literal specials parse to 1/2; transformers loads it and agrees with tokenizers.
    from transformers import AutoTokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = tok.encode("<s>[INST] hi [/INST] ok </s>", add_special_tokens=False).ids
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID, ids
    hf = AutoTokenizer.from_pretrained(str(d))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (BOS_ID, EOS_ID, UNK_ID)
    for text in prompt_texts() + guanaco_rows()[:20]:
        want = tok.encode(text, add_special_tokens=True).ids
        assert hf(text)["input_ids"] == want, text
        assert want[0] == BOS_ID
        assert hf.decode(tok.encode(text, add_special_tokens=False).ids) == text, text
    chat = hf.apply_chat_template(CHAT_MESSAGES, tokenize=False)
    assert chat == prompt_texts()[2], chat
    print(f"tokenizer: vocab {tok.get_vocab_size()}, chat prompt {chat!r}")


# --------------------------------------------------------------------------------------
# Section: models
# --------------------------------------------------------------------------------------

def init_weights(model, seed: int) -> None:
    """Explicit, version-independent init: N(0, INIT_STD) for every matrix, 1 + NORM_STD*N(0,1)
    for RMSNorm weights. Drawn in named_parameters() order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * noise)
            else:
                assert p.dim() == 2, name
                p.copy_(INIT_STD * noise)


def prompt_ids(tok: Tokenizer) -> list[list[int]]:
    return [encode_no_double_bos(tok, t) for t in prompt_texts()]


def min_greedy_margin(model, prompts: list[list[int]]) -> float:
    return min(greedy(model, p, MAX_NEW_TOKENS)[1] for p in prompts)


def build_model(config, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    init_weights(model, seed)
    model.eval()
    return model


def bf16_rounded(model):
    """A float32 copy of the model with bf16-rounded weights (what gqa-bf16 computes)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return m


def save_model_folder(model, tok_dir: Path, d: Path, dtype: torch.dtype) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(str(d))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / f, d / f)
    # Standard HF key names; lm_head only when untied.
    keys = set(load_file(str(d / "model.safetensors")).keys())
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys, keys
    assert ("lm_head.weight" in keys) == (not model.config.tie_word_embeddings), keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys, keys
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"}
    assert {p.name for p in d.iterdir()} == expected, sorted(p.name for p in d.iterdir())


def section_models(out: Path) -> None:
    from transformers import LlamaConfig

    tok = load_tiny_tokenizer(out)
    prompts = prompt_ids(tok)
    for name, spec in MODEL_SPECS.items():
        config = LlamaConfig(**{**COMMON_CONFIG, **spec["config"], "vocab_size": tok.get_vocab_size()})
        config.architectures = ["LlamaForCausalLM"]
        config._attn_implementation = "eager"
        for seed in range(spec["seed"], spec["seed"] + MAX_SEED_TRIES):
            model = build_model(config, seed)
            margin = min_greedy_margin(model, prompts)
            if name == "gqa":  # the bf16 copy must have clear margins too
                margin = min(margin, min_greedy_margin(bf16_rounded(model), prompts))
            if margin > MIN_MARGIN:
                break
            print(f"  {name}: seed {seed} min margin {margin:.2e} too small, next seed")
        else:
            sys.exit(f"{name}: no seed with greedy margins > {MIN_MARGIN}")
        model.generation_config.bos_token_id = BOS_ID
        model.generation_config.eos_token_id = EOS_ID
        save_model_folder(model, out / "tokenizer", out / name, torch.float32)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: seed {seed}, {n} params, min margin {margin:.4f}")
        if name == "gqa":
            save_model_folder(model, out / "tokenizer", out / "gqa-bf16", torch.bfloat16)
            print("gqa-bf16: same weights saved as bf16")


# --------------------------------------------------------------------------------------
# Section: golden
# --------------------------------------------------------------------------------------

def section_golden(out: Path) -> None:
    tok = load_tiny_tokenizer(out)
    texts = prompt_texts()
    prompts = prompt_ids(tok)
    for p in prompts:
        assert p[0] == BOS_ID and p[1] != BOS_ID and 5 <= len(p) <= 40, (len(p), p)
    for name in GOLDEN_MODELS:
        model = load_model(out / name)  # bf16 checkpoint is upcast: f32 math on bf16 weights
        tensors: dict[str, torch.Tensor] = {}
        greedy_ids, margins = [], []
        for i, ids in enumerate(prompts):
            logits = logits_of(model, ids)
            losses = token_losses(logits, ids)
            hf_loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
            assert torch.allclose(hf_loss, losses.mean(), rtol=1e-5, atol=1e-6), (hf_loss, losses.mean())
            tensors[f"logits.{i}"] = logits.contiguous()
            tensors[f"losses.{i}"] = losses.contiguous()
            new, margin = greedy(model, ids, MAX_NEW_TOKENS)
            assert len(new) == MAX_NEW_TOKENS
            assert greedy_generate(model, ids, MAX_NEW_TOKENS) == new, f"{name}: generate() disagrees"
            assert margin > MIN_MARGIN, f"{name} prompt {i}: margin {margin}"
            greedy_ids.append(new)
            margins.append(margin)
        save_file(tensors, str(out / name / "golden.safetensors"), metadata={"format": "pt"})
        write_json(out / name / "golden.json", {
            "note": "float32 math (transformers LlamaForCausalLM, eager attention, eval, no_grad, "
                    "1 CPU thread). golden.safetensors: logits.{i} f32 [T, V] for prompts[i]; "
                    "losses.{i} f32 [T-1], losses[t] = cross-entropy of logits[t] against "
                    "prompts[i][t+1]. greedy[i]: 32 greedy new ids (argmax, EOS does not stop). "
                    "margins[i]: min top1-top2 logit over the greedy steps of prompt i. "
                    "Prompt ids = tokenizer(text, add_special_tokens=True) with a doubled "
                    "leading BOS dropped.",
            "model": name,
            "prompt_texts": texts,
            "prompts": prompts,
            "greedy": greedy_ids,
            "max_new_tokens": MAX_NEW_TOKENS,
            "margins": margins,
            "min_margin": min(margins),
            "versions": VERSIONS,
        })
        print(f"golden {name}: lengths {[len(p) for p in prompts]}, min margin {min(margins):.4f}, "
              f"mean loss {[round(float(tensors[f'losses.{i}'].mean()), 4) for i in range(len(prompts))]}")


# --------------------------------------------------------------------------------------
# Section: eval
# --------------------------------------------------------------------------------------

def eval_texts() -> list[str]:
    rows = guanaco_rows()
    texts = [rows[i] if n is None else rows[i][:n] for i, n in EVAL_ROWS]
    return texts + [EVAL_PLAIN]


def section_eval(out: Path) -> None:
    tok = load_tiny_tokenizer(out)
    texts = eval_texts()
    with (out / "eval.jsonl").open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    row_ids = [encode_no_double_bos(tok, t) for t in texts]
    assert max(len(ids) for ids in row_ids) <= max(EVAL_MAX_SEQ_LENS), "largest max_seq_len must not truncate"
    assert sum(ids[1] == BOS_ID for ids in row_ids) == 0 and all(ids[0] == BOS_ID for ids in row_ids)
    result: dict = {
        "note": "Per row: ids = tokenizer(text, add_special_tokens=True); if it starts with two BOS "
                "(text began with '<s>') drop the first; truncate to max_seq_len. A row of n ids "
                "gives n-1 predictions (labels = ids shifted, as transformers). loss = sum of "
                "per-token NLL over all rows / total predictions (tokens); perplexity = exp(loss). "
                "Per-token NLL in float32, summed in float64.",
        "row_ids": row_ids,
    }
    for name in EVAL_MODELS:
        model = load_model(out / name)
        result[name] = {}
        for max_len in EVAL_MAX_SEQ_LENS:
            total, count = 0.0, 0
            for ids in row_ids:
                ids = ids[:max_len]
                losses = token_losses(logits_of(model, ids), ids)
                total += float(losses.double().sum())
                count += len(ids) - 1
            loss = total / count
            result[name][str(max_len)] = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
            print(f"eval {name} max_seq_len {max_len}: loss {loss:.6f} ppl {math.exp(loss):.4f} tokens {count}")
    result["versions"] = VERSIONS
    write_json(out / "eval_golden.json", result)


# --------------------------------------------------------------------------------------
# Section: llama2_ids
# --------------------------------------------------------------------------------------

def section_llama2_ids(out: Path) -> None:
    tok = Tokenizer.from_file(str(LLAMA2_DIR / "tokenizer.json"))
    rows = guanaco_rows()
    assert len(rows) == 1000, len(rows)
    lines, double_bos = [], 0
    for text in rows:
        ids = tok.encode(text, add_special_tokens=False).ids
        with_bos = tok.encode(text, add_special_tokens=True).ids
        if with_bos == [BOS_ID] + ids:
            double_bos += 1
        digest = hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()
        lines.append(json.dumps({"len": len(ids), "sha256": digest, "head": ids[:16]}, separators=(",", ":")))
    assert double_bos == len(rows), f"add_special_tokens=True != [1] + ids for {len(rows) - double_bos} rows"
    header = {
        "note": "Llama-2 tokenizer.json (tokenizers library) over guanaco-llama2-1k train.jsonl, "
                "encode(text, add_special_tokens=False); rows already start with a literal '<s>' "
                "(id 1). sha256 = hex sha256 of the ids as little-endian u32. "
                "add_special_tokens=True gives [1] + ids (double BOS) for "
                "rows_with_double_bos rows.",
        "rows_with_double_bos": double_bos,
        "versions": VERSIONS,
    }
    body = ",\n".join(lines)
    text = json.dumps(header, indent=1)[:-2] + ',\n "rows": [\n' + body + "\n ]\n}\n"
    json.loads(text)  # well-formed
    (out / "guanaco_llama2_ids.json").write_text(text, encoding="utf-8")
    print(f"llama2_ids: {len(rows)} rows, {sum(json.loads(l)['len'] for l in lines)} ids, "
          f"double BOS with add_special_tokens=True for {double_bos} rows")


SECTIONS = {
    "tokenizer": section_tokenizer,
    "models": section_models,
    "golden": section_golden,
    "eval": section_eval,
    "llama2_ids": section_llama2_ids,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "tiny",
                    help="output folder (default: tests/fixtures/tiny)")
    ap.add_argument("--only", choices=list(SECTIONS), action="append",
                    help="run only this section (repeatable); default: all, in order")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    np.random.seed(0)
    for name, fn in SECTIONS.items():
        if args.only is None or name in args.only:
            fn(args.out)


if __name__ == "__main__":
    main()
