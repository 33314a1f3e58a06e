"""Generation speed: sparse vs dense decode at GLM-5 shapes, and prefill/decode of whole models, in one run.

1. Layer decode (GLM-5 shapes, `glm5-744b` preset): one MLA + DSA attention layer (random weights),
   its cache holding S latents [c | k_rope] (576 values) and S indexer keys (128), one new token per
   step (batch 1), through the model's own code (glm5.model.cache.PackedKVCache + MLAttention):
   - sparse: MLAttention.forward(mode="sparse"): projections, indexer, indexer_topk over the S cached
     keys, sparse_mla of the absorbed query over its top-2048 cached latents, output projection;
   - dense MQA: the same weights and projections, the absorbed query attending to all S cached latents
     (one [64, 576] x [576, S] matmul, fp32 softmax, [64, S] x [S, 512] matmul, as FlashMLA's dense decode).
   Timed whole (tokens/s of the layer) and in its attention part alone (sparse: indexer_topk +
   sparse_mla; dense: the MQA attention), set against the FLOP and byte bound of that part:
     FLOPs  dense 2*64*(576+512)*S   vs  sparse 2*32*128*S (indexer) + 2*64*(576+512)*min(2048, S)
     bytes  dense 576*S*e            vs  sparse 128*S*e (indexer keys) + 576*min(2048, S)*e
   (e = bytes per element). At S = 128K the FLOP ratio is 13.4x, the byte ratio 4.2x.
   At S <= 2048 (top-k covers every key) the two paths must agree: checked before timing.
2. Model prefill and decode tokens/s for the `debug` preset (fp32) and a mid preset (`glm5-small`,
   bf16, --mid-layers of its 16 layers), each with the compiled kernels and with the plain-PyTorch
   reference ops (glm5.ops.use_impl), timed round-robin: prefill = a batch of prompts through the model
   into a fresh cache (the last logits included), decode = one token for each sequence of the batch.

    python benchmarks/bench_decode.py            # S = 4K..128K + both presets (a few minutes on 2 cores)
    python benchmarks/bench_decode.py --quick    # ~1 minute
    python benchmarks/bench_decode.py --seq-lens 4096,131072 --no-model

Results: tables on stdout and benchmarks/results/bench_decode_<device>[_quick].json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402

import glm5  # noqa: E402
from glm5.model import GLM5ForCausalLM, preset  # noqa: E402
from glm5.model.attention import MLAttention, rope_cos_sin  # noqa: E402
from glm5.model.cache import PackedKVCache  # noqa: E402
from glm5.model.generate import _main_forward, sample  # noqa: E402
from glm5.model.transformer import KEEP_FP32, _init_weights  # noqa: E402

DEFAULT_SEQ_LENS = (4096, 8192, 16384, 32768, 65536, 131072)
QUICK_SEQ_LENS = (4096, 32768, 131072)


# ---------------------------------------------------------------------------------------------------
# 1. One attention layer at GLM-5 shapes
# ---------------------------------------------------------------------------------------------------


def layer_bound(S: int, cfg, elem_bytes: int) -> dict:
    """FLOPs and bytes of one decode query's attention part, dense MQA vs indexer + sparse MLA."""
    H, C, L = cfg.num_attention_heads, cfg.mqa_qk_dim, cfg.kv_lora_rank
    K = min(cfg.index_topk, S)
    f_dense = bu.attention_flops(H, C, L, S)
    f_sparse = bu.indexer_flops(cfg.index_n_heads, cfg.index_head_dim, S) + bu.attention_flops(H, C, L, K)
    b_dense = C * S * elem_bytes
    b_sparse = (cfg.index_head_dim * S + C * K) * elem_bytes
    return {"flops_dense": f_dense, "flops_sparse": f_sparse, "flop_ratio": f_dense / f_sparse,
            "bytes_dense": b_dense, "bytes_sparse": b_sparse, "byte_ratio": b_dense / b_sparse}


def projection_flops(attn: MLAttention) -> int:
    """FLOPs of one token's projections (every Linear of the layer, plus the absorbed-form einsums)."""
    cfg = attn.cfg
    linear = sum(m.weight.numel() for m in attn.modules() if isinstance(m, torch.nn.Linear))
    absorb = cfg.num_attention_heads * cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return 2 * (linear + absorb)


def make_layer(cfg, dtype: torch.dtype) -> MLAttention:
    torch.manual_seed(0)
    attn = MLAttention(cfg, 0, has_indexer=True)
    _init_weights(attn, cfg.initializer_range)
    for name, p in attn.named_parameters():
        p.data = p.data.to(torch.float32 if name.endswith(KEEP_FP32) else dtype)
    return attn.eval()


def layer_cache(cfg, S: int, dtype: torch.dtype) -> PackedKVCache:
    """A one-sequence cache of S random tokens (unit-RMS latents and indexer keys, as after their norms)."""
    cache = PackedKVCache(cfg, 1, S + 1, layers=[0], indexer_layers=[0], dtype=dtype, device="cpu")
    g = torch.Generator().manual_seed(S)
    for lo in range(0, S, 16384):  # chunked: no fp32 copy of the whole cache
        hi = min(S, lo + 16384)
        cache.kv[0][lo:hi] = torch.randn(hi - lo, cfg.mqa_qk_dim, generator=g).to(dtype)
        cache.idx_k[0][lo:hi] = torch.randn(hi - lo, cfg.index_head_dim, generator=g).to(dtype)
    cache.lengths[0] = S
    return cache


def dense_mqa(attn: MLAttention, q_THC: torch.Tensor, kv_SC: torch.Tensor) -> torch.Tensor:
    """One query's absorbed heads [1, H, C] over every cached latent [S, C]: o [1, H, L]."""
    p = torch.softmax((q_THC[0] @ kv_SC.T).float() * attn.sm_scale, dim=-1).to(kv_SC.dtype)  # [H, S]
    return (p @ kv_SC[:, : attn.kv_rank])[None]


def measure_layer(attn: MLAttention, S: int, dtype, bench_kw: dict, progress) -> dict:
    cfg = attn.cfg
    cache = layer_cache(cfg, S, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.hidden_size, generator=g).to(dtype)
    cos, sin = rope_cos_sin(torch.tensor([S]), cfg.qk_rope_head_dim, cfg.rope_theta, dtype)

    def step_sparse():
        _, ks, ke = cache.begin([0], [1])
        out = attn(x, cos, sin, ks, ke, mode="sparse", cache=cache).out_TD
        cache.truncate(0, S)
        return out

    def step_dense():
        cache.begin([0], [1])
        p = attn.project(x, cos, sin)
        kv, _ = cache.update(0, p.kv_TC, None)
        out = attn.latent_output(dense_mqa(attn, attn.absorbed_query(p), kv[: S + 1]))
        cache.truncate(0, S)
        return out

    # The attention part alone, on the inputs of this step.
    _, ks, ke = cache.begin([0], [1])
    p = attn.project(x, cos, sin)
    q_idx, k_new, w = attn.indexer(x, p.q_lat_TQ, cos, sin)
    kv, k_idx = cache.update(0, p.kv_TC, k_new)
    q_mqa = attn.absorbed_query(p)
    w = w.to(q_idx.dtype)
    K = min(cfg.index_topk, S + 1)

    def attn_sparse():
        topk, _ = glm5.ops.indexer_topk(q_idx, k_idx, w, ks, ke, K)
        return glm5.ops.sparse_mla(q_mqa, kv, topk, attn.sm_scale, attn.kv_rank)[0]

    def attn_dense():
        return dense_mqa(attn, q_mqa, kv[: S + 1])

    check = None
    if S + 1 <= cfg.index_topk:  # the top-k holds every key: sparse == dense up to rounding
        a, b = attn_sparse().float(), attn_dense().float()
        check = (a - b).abs().max().item() / b.abs().max().item()
        if check > 3e-2:
            raise RuntimeError(f"S={S}: sparse and dense MQA disagree with every key selected (rel err {check:.3g})")
    cache.truncate(0, S)
    t = bu.bench_many({"layer_sparse": step_sparse, "layer_dense": step_dense,
                       "attn_sparse": attn_sparse, "attn_dense": attn_dense}, **bench_kw)
    e = torch.finfo(dtype).bits // 8
    bound = layer_bound(S + 1, cfg, e)
    proj = projection_flops(attn)
    row = {"S": S, "bound": bound, "projection_flops": proj, "check_rel_err": check}
    for name, tm in t.items():
        row[name] = tm.as_dict() | {"tokens_per_s": 1.0 / tm.median}
    for part in ("attn", "layer"):
        row[f"{part}_speedup"] = t[f"{part}_dense"].median / t[f"{part}_sparse"].median
    row["layer_flop_ratio"] = (bound["flops_dense"] + proj) / (bound["flops_sparse"] + proj)
    # batch-1 decode reads every weight once per token: the layer's byte bound counts them
    row["weight_bytes"] = wb = sum(p.numel() * p.element_size() for p in attn.parameters())
    row["layer_byte_ratio"] = (bound["bytes_dense"] + wb) / (bound["bytes_sparse"] + wb)
    row["attn_sparse"]["gflops"] = bound["flops_sparse"] / t["attn_sparse"].median / 1e9
    row["attn_dense"]["gflops"] = bound["flops_dense"] / t["attn_dense"].median / 1e9
    row["attn_dense"]["gbytes_per_s"] = bound["bytes_dense"] / t["attn_dense"].median / 1e9
    progress.step(f"layer S={S:>6}: sparse {row['layer_sparse']['tokens_per_s']:7.1f} tok/s, dense MQA "
                  f"{row['layer_dense']['tokens_per_s']:7.1f} tok/s; attention part {row['attn_speedup']:.2f}x "
                  f"(FLOP bound {bound['flop_ratio']:.1f}x, byte bound {bound['byte_ratio']:.1f}x)")
    return row


# ---------------------------------------------------------------------------------------------------
# 2. Whole models: prefill and decode, kernels vs reference ops
# ---------------------------------------------------------------------------------------------------


def with_impl(impl: str, fn):
    def run():
        with glm5.ops.use_impl(impl):
            return fn()
    return run


def measure_speculative(model, prompts, impl: str, n_tokens: int, prefill_s: float) -> dict:
    """Cost of one speculative step (MTP drafts + one verify forward over n_draft + 1 tokens per
    sequence) in plain greedy steps: speculative decoding pays off above this mean accept length.
    Random weights accept ~1 token per step, so the step counts come from the runs themselves."""
    last = {}

    def run(kind, spec):
        def fn():
            with glm5.ops.use_impl(impl):
                last[kind] = model.generate(prompts, n_tokens, speculative=spec)
        return fn

    t = bu.bench_many({"plain": run("plain", False), "speculative": run("speculative", True)},
                      warmup=0, min_reps=3, max_reps=3)
    if [r.tokens for r in last["plain"]] != [r.tokens for r in last["speculative"]]:
        raise RuntimeError("speculative decoding gave other tokens than greedy decoding")
    res = last["speculative"]
    out = {}
    for kind in ("plain", "speculative"):
        steps = max(len(r.accept_lengths) for r in res) if kind == "speculative" else n_tokens - 1  # prefill gives token 1
        out[kind] = {"step_s": max(t[kind].median - prefill_s, 1e-9) / steps}
    n_draft = model.config.mtp_steps
    return {"impl": impl, "n_draft": n_draft, "new_tokens": n_tokens,
            "plain_step_s": out["plain"]["step_s"], "speculative_step_s": out["speculative"]["step_s"],
            "break_even_accept_length": out["speculative"]["step_s"] / out["plain"]["step_s"],
            "mean_accept_length_random_weights": sum(a for r in res for a in r.accept_lengths) / max(1, sum(len(r.accept_lengths) for r in res))}


def measure_model(name: str, cfg, dtype, batch: int, prompt_len: int, impls: list[str], bench_kw: dict, progress,
                  spec_tokens: int = 16) -> dict:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy of a large model
    try:
        model = GLM5ForCausalLM(cfg).eval().cast_(dtype)  # cast_ keeps KEEP_FP32 in fp32
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    seqs = list(range(batch))
    caches = {impl: PackedKVCache.for_model(model, batch, prompt_len + cfg.mtp_steps + 1) for impl in impls}

    def prefill(cache):
        def run():
            cache.lengths = [0] * batch
            h = _main_forward(model, cache, seqs, prompts, model.attn_mode)
            return model.lm_head(h[torch.arange(1, batch + 1) * prompt_len - 1])
        return run

    def decode(cache, n=1):
        def run():  # n tokens per sequence on a prompt_len-token cache, then rolled back
            h = _main_forward(model, cache, seqs, [[7] * n] * batch, model.attn_mode)
            tok, _ = sample(model.lm_head(h), 0.0, 1.0)
            for b in seqs:
                cache.truncate(b, prompt_len)
            return tok
        return run

    fns = {}
    with torch.no_grad():
        for impl in impls:
            with glm5.ops.use_impl(impl):
                prefill(caches[impl])()  # fills the cache the decode steps read
            fns[f"prefill_{impl}"] = with_impl(impl, prefill(caches[impl]))
        # prefill timing refills the caches with the same tokens, so decode reads a full cache either way
        t = bu.bench_many(fns, **bench_kw)
        dec = {f"decode_{impl}": with_impl(impl, decode(caches[impl])) for impl in impls}
        if cfg.num_nextn_predict_layers and cfg.mtp_steps:  # a speculative verify: n_draft + 1 tokens per sequence
            dec["verify"] = with_impl(impls[0], decode(caches[impls[0]], cfg.mtp_steps + 1))
        t |= bu.bench_many(dec, **bench_kw)
    n_params = sum(p.numel() for p in model.parameters())
    row = {"model": name, "dtype": str(dtype).removeprefix("torch."), "layers": cfg.num_hidden_layers, "params": n_params,
           "batch": batch, "prompt_len": prompt_len, "index_topk": cfg.index_topk}
    for impl in impls:
        row[f"prefill_{impl}"] = t[f"prefill_{impl}"].as_dict() | {"tokens_per_s": batch * prompt_len / t[f"prefill_{impl}"].median}
        row[f"decode_{impl}"] = t[f"decode_{impl}"].as_dict() | {"tokens_per_s": batch / t[f"decode_{impl}"].median}
    if len(impls) == 2:
        row["kernel_speedup"] = {k: row[f"{k}_reference"]["median_s"] / row[f"{k}_kernel"]["median_s"] for k in ("prefill", "decode")}
    if "verify" in t:
        row["speculative"] = measure_speculative(model, prompts, impls[0], spec_tokens, row[f"prefill_{impls[0]}"]["median_s"])
        row["speculative"]["verify_over_decode"] = t["verify"].median / t[f"decode_{impls[0]}"].median
    progress.step(f"{name}: " + ", ".join(f"{k} {impl} {row[f'{k}_{impl}']['tokens_per_s']:.0f} tok/s"
                                          for k in ("prefill", "decode") for impl in impls))
    del model, caches
    return row


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def format_tables(res: dict) -> str:
    L = []
    if res["layer"]:
        c = res["config"]
        L.append(f"Layer decode, GLM-5 shapes ({c['dtype']}, batch 1, one attention layer; tok/s = 1 / median step time)")
        L.append(f"{'S':>7} | {'sparse tok/s':>12} | {'dense tok/s':>11} | {'layer x':>7} | {'flop bnd':>8} | {'byte bnd':>8} || "
                 f"{'attn sparse ms':>14} | {'attn dense ms':>13} | {'attn x':>6} | {'FLOP bnd':>8} | {'byte bnd':>8} | "
                 f"{'dense GB/s':>10} | {'dense GFLOP/s':>13}")
        for r in res["layer"]:
            b = r["bound"]
            L.append(f"{r['S']:>7} | {r['layer_sparse']['tokens_per_s']:12.1f} | {r['layer_dense']['tokens_per_s']:11.1f} | "
                     f"{r['layer_speedup']:6.2f}x | {r['layer_flop_ratio']:7.1f}x | {r['layer_byte_ratio']:7.2f}x || "
                     f"{r['attn_sparse']['median_s'] * 1e3:14.2f} | "
                     f"{r['attn_dense']['median_s'] * 1e3:13.2f} | {r['attn_speedup']:5.2f}x | {b['flop_ratio']:7.1f}x | "
                     f"{b['byte_ratio']:7.1f}x | {r['attn_dense']['gbytes_per_s']:10.1f} | {r['attn_dense']['gflops']:13.1f}")
        L.append(f"(projections: {res['layer'][0]['projection_flops'] / 1e9:.2f} GFLOP and {res['layer'][0]['weight_bytes'] / 1e6:.0f} MB "
                 f"of weights read per token; matmul ceiling "
                 f"{res['matmul_gflops']:.0f} GFLOP/s {c['dtype']})")
    if res["model"]:
        L.append("")
        L.append("Models: prefill (batch x prompt tokens into a fresh cache) and decode (one token per sequence), tokens/s")
        L.append(f"{'model':>22} | {'dtype':>8} | {'batch x len':>11} | {'prefill kernel':>14} | {'prefill ref':>11} | "
                 f"{'x':>5} | {'decode kernel':>13} | {'decode ref':>10} | {'x':>5}")
        for r in res["model"]:
            def tps(k):
                return f"{r[k]['tokens_per_s']:.0f}" if k in r else "-"
            ks = r.get("kernel_speedup", {})
            L.append(f"{r['model']:>22} | {r['dtype']:>8} | {r['batch']:>4} x {r['prompt_len']:<4} | {tps('prefill_kernel'):>14} | "
                     f"{tps('prefill_reference'):>11} | {ks.get('prefill', float('nan')):4.1f}x | {tps('decode_kernel'):>13} | "
                     f"{tps('decode_reference'):>10} | {ks.get('decode', float('nan')):4.1f}x")
    spec = [r for r in res["model"] if "speculative" in r]
    if spec:
        L.append("")
        L.append("MTP speculative decoding (greedy, same tokens checked): cost of one step (drafts + verify) in plain steps")
        for r in spec:
            s = r["speculative"]
            L.append(f"{r['model']:>22} | {s['n_draft']} drafts | plain step {s['plain_step_s'] * 1e3:.1f} ms, speculative step "
                     f"{s['speculative_step_s'] * 1e3:.1f} ms -> pays off above a mean accept length of "
                     f"{s['break_even_accept_length']:.2f} (random weights accept {s['mean_accept_length_random_weights']:.2f}); "
                     f"the verify forward over {s['n_draft'] + 1} tokens per sequence costs {s['verify_over_decode']:.2f} decode steps")
    return "\n".join(L)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="cache lengths of the layer decode (default 4096..131072; --quick 4096,32768,131072)")
    p.add_argument("--dtype", choices=sorted(bu.DTYPES), default="bf16", help="layer-decode dtype (default bf16)")
    p.add_argument("--mid-preset", default="glm5-small")
    p.add_argument("--mid-layers", type=int, default=4, help="layers kept of the mid preset (default 4)")
    p.add_argument("--quick", action="store_true", help="~1 minute: three cache lengths, fewer repeats, smaller batches")
    p.add_argument("--no-layer", action="store_true")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the core count)")
    p.add_argument("--out", type=Path, default=None, help="results path stem (default benchmarks/results/bench_decode_cpu[_quick])")
    args = p.parse_args(argv)
    args.seq_lens = args.seq_lens or list(QUICK_SEQ_LENS if args.quick else DEFAULT_SEQ_LENS)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = bu.DTYPES[args.dtype]
    bench_kw = {"warmup": 1, "min_reps": 2, "budget_s": 0.3} if args.quick else {"warmup": 1, "min_reps": 3, "budget_s": 1.5}
    impls = ["kernel", "reference"] if glm5.HAS_EXT else ["reference"]
    if not glm5.HAS_EXT:
        print(f"NOTE: glm5 kernels not built ({glm5.EXT_ERROR}): timing the reference ops only", file=sys.stderr)
    models = [] if args.no_model else [
        ("debug", preset("debug"), torch.float32, *((2, 256) if args.quick else (4, 256))),
        (f"{args.mid_preset} ({args.mid_layers} layers)", preset(args.mid_preset).replace(num_hidden_layers=args.mid_layers),
         torch.bfloat16, *((1, 256) if args.quick else (2, 256))),
    ]
    progress = bu.Progress((0 if args.no_layer else len(args.seq_lens)) + len(models))
    res = {
        "config": {"seq_lens": args.seq_lens, "dtype": args.dtype, "quick": args.quick, "bench": bench_kw, "impls": impls,
                   "threads": torch.get_num_threads(),
                   "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])},
        "load_avg_1m_at_start": os.getloadavg()[0],
        "layer": [], "model": [],
    }
    if not args.no_layer:
        res["matmul_gflops"] = bu.matmul_ceiling(dtype, n=2048, min_reps=3, budget_s=0.5)["gflops"]
        cfg = preset("glm5-744b")
        attn = make_layer(cfg, dtype)
        with torch.no_grad():
            measure_layer(attn, 2047, dtype, {"warmup": 0, "min_reps": 1, "max_reps": 1}, bu.Progress(1))  # sparse == dense check
            for S in args.seq_lens:
                res["layer"].append(measure_layer(attn, S, dtype, bench_kw, progress))
        del attn
    for name, cfg, mdtype, batch, plen in models:
        res["model"].append(measure_model(name, cfg, mdtype, batch, plen, impls, bench_kw, progress))
    if res["layer"]:
        res["layer_summary"] = {r["S"]: {"attn_speedup": r["attn_speedup"], "flop_bound": r["bound"]["flop_ratio"],
                                         "byte_bound": r["bound"]["byte_ratio"], "layer_speedup": r["layer_speedup"]}
                                for r in res["layer"]}
    res["load_avg_1m_at_end"] = os.getloadavg()[0]
    res["table"] = format_tables(res)
    print(res["table"])
    stem = args.out or bu.RESULTS_DIR / f"bench_decode_cpu{'_quick' if args.quick else ''}"
    path = bu.write_json(Path(f"{stem}.json"), res)
    print(f"\nwrote {path}")
    return res


if __name__ == "__main__":
    main()
