"""`glm5 generate`: continue prompts with a GLM-5 model from the command line.

    glm5 generate --preset debug --prompt-ids 1,2,3 --max-new-tokens 16          # random weights (smoke test)
    glm5 generate --checkpoint path/to/hf_dir --prompt "def f(x):" --temperature 0.7 --top-p 0.9 --seed 0
    glm5 generate --checkpoint runs/pretrain --prompt "import os" --speculative   # MTP drafts, greedy

--checkpoint takes a Hugging Face `glm_moe_dsa` directory (config.json + safetensors, via
glm5.from_pretrained), or a glm5 training checkpoint (glm5.train.checkpoint: a step_N folder, or a
folder holding checkpoints/step_N, the newest valid one is used) whose config.json names the model
(a preset name or ModelConfig fields under "model"). Text prompts need a tokenizer.json: --tokenizer,
or one found in the checkpoint folder or up to two folders above it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"glm5 generate: token ids must be integers separated by commas, got {text!r}") from None


def _model_config_from_run(cfg: dict, where: Path):
    """The ModelConfig of a training run's config.json: a preset name or a dict of ModelConfig fields."""
    from glm5.model import ModelConfig, preset

    for key in ("model", "model_config"):
        m = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(m, str):
            return preset(m)
        if isinstance(m, dict):
            if isinstance(m.get("preset"), str) and not any(k in m for k in ("hidden_size", "num_hidden_layers")):
                return preset(m["preset"])
            names = {f.name for f in dataclasses.fields(ModelConfig) if f.init}
            return ModelConfig(**{k: v for k, v in m.items() if k in names})
    raise SystemExit(f"glm5 generate: {where} names no model (expected a preset name or ModelConfig fields under 'model')")


def load_model(path: str | Path, dtype: torch.dtype | None = None):
    """A GLM5ForCausalLM from a Hugging Face directory or a glm5 training checkpoint (module doc)."""
    import glm5
    from glm5.model import GLM5ForCausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()).get("model_type") == "glm_moe_dsa":
        return glm5.from_pretrained(path, dtype=dtype)
    from glm5.train import checkpoint as tc

    step_dir = path
    if not (path / "manifest.json").is_file():
        for ckpt_dir in (path / "checkpoints", path):
            found = tc.list_checkpoints(ckpt_dir)
            if found:
                step_dir = found[-1][1]
                break
        else:
            raise SystemExit(f"glm5 generate: {path} is neither a Hugging Face glm_moe_dsa directory nor a glm5 checkpoint")
    ckpt = tc.load_checkpoint(step_dir, restore_rng=False)
    model = GLM5ForCausalLM(_model_config_from_run(ckpt.config, step_dir / "config.json"), init=False)
    model.load_state_dict(ckpt.model_state, strict=True)
    return model.cast_(dtype) if dtype is not None else model


def find_tokenizer(path: str | Path | None):
    """tokenizer.json in path or up to two folders above it (None when there is none)."""
    if path is None:
        return None
    p = Path(path)
    for d in (p, p.parent, p.parent.parent):
        if (d / "tokenizer.json").is_file():
            return d / "tokenizer.json"
    return None


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue prompts with a GLM-5 model (checkpoint or random preset)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Hugging Face glm_moe_dsa directory or glm5 training checkpoint")
    src.add_argument("--preset", help="a glm5.model preset with random weights (seeded by --seed), e.g. debug")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (needs a tokenizer); repeat for a batch")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids; repeat for a batch")
    p.add_argument("--tokenizer", help="tokenizer.json (default: found next to the checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (prompt b uses seed + b); also seeds --preset weights")
    p.add_argument("--speculative", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="MTP speculative decoding (greedy) with N drafts per step (default: the config's mtp_steps)")
    p.add_argument("--stop-ids", default=None,
                   help="comma-separated stop token ids (default: the config's eos and the tokenizer's end-of-text; 'none' = no stop)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="model dtype (default: as loaded; fp32 for --preset)")
    p.add_argument("--attn-mode", choices=("sparse", "sparse_mha", "dense"), default=None)
    p.add_argument("--ops", choices=("auto", "kernel", "reference"), default="auto", help="glm5.ops implementation")
    p.add_argument("--json", action="store_true", help="print the results as JSON lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import glm5
    from glm5.model import GLM5ForCausalLM, preset
    from glm5.model.generate import mean_accept_length

    dtype = _DTYPES[args.dtype] if args.dtype else None
    if args.preset:
        torch.manual_seed(0 if args.seed is None else args.seed)
        model = GLM5ForCausalLM(preset(args.preset))
        if dtype is not None:
            model.cast_(dtype)
    else:
        model = load_model(args.checkpoint, dtype)
    model.eval()
    cfg = model.config

    tok = None
    tok_path = args.tokenizer or find_tokenizer(args.checkpoint)
    if tok_path is not None:
        from glm5.train.tokenizer import Tokenizer

        tok = Tokenizer.from_file(tok_path)
    if args.prompt and tok is None:
        raise SystemExit("glm5 generate: --prompt needs a tokenizer.json (--tokenizer), or pass --prompt-ids")
    prompts = [tok.encode(t) for t in args.prompt] + [_ids(t) for t in args.prompt_ids]
    if not prompts:
        raise SystemExit("glm5 generate: give at least one --prompt or --prompt-ids")

    if args.stop_ids is None:  # the config's eos ids and the tokenizer's end-of-text
        eos = cfg.eos_token_id
        stop = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        stop += [tok.eos_id] if tok is not None else []
    else:
        stop = [] if args.stop_ids.strip().lower() == "none" else _ids(args.stop_ids)
    spec = False if args.speculative is None else (True if args.speculative == 0 else args.speculative)

    t0 = time.perf_counter()
    with glm5.ops.use_impl(None if args.ops == "auto" else args.ops):
        results = model.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 stop=stop, seed=args.seed, speculative=spec, progress=not args.no_progress,
                                 attn_mode=args.attn_mode)
        impl = glm5.ops.get_impl()
    dt = time.perf_counter() - t0
    n = sum(len(r.tokens) for r in results)
    for p, r in zip(prompts, results):
        text = tok.decode(r.tokens) if tok is not None else None
        if args.json:
            print(json.dumps({"prompt_ids": p, "tokens": r.tokens, "logprobs": r.logprobs, "text": text,
                              "finish_reason": r.finish_reason, "mean_accept_length": r.mean_accept_length}))
        else:
            print(text if text is not None else " ".join(map(str, r.tokens)))
    line = f"{n} tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tok/s, {len(prompts)} prompt(s), ops {impl})"
    acc = mean_accept_length(results)
    if acc is not None:
        line += f", mean accept length {acc:.2f}"
    print(line, file=sys.stderr)
    return 0
