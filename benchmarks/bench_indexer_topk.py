"""glm5.ops.indexer_topk on CUDA (tensor-core and SIMT paths) vs torch's logits-then-topk, GLM-5 shapes.

For each context length S: the last T queries of a causal S-token sequence, 32 indexer heads x 128,
top-2048, bf16 inputs. Baselines, both on the GPU in plain torch:
- torch-fast: bf16 [T*HI, DI] x [DI, S] matmul, fp32 relu and head-weighted sum, mask, torch.topk;
- reference: glm5.ops.reference.indexer_topk (fp32 einsum, stable sort; the specification).
Every kernel run is checked to select the expected number of keys per query first.

    python benchmarks/bench_indexer_topk.py                      # S = 16K, 64K; T = 128
    python benchmarks/bench_indexer_topk.py --seq-lens 65536 --queries 128,1024
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
from glm5.ops import reference  # noqa: E402

HI, DI, TOPK = 32, 128, 2048


def inputs(S: int, T: int, dtype: torch.dtype) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(S + T)
    q = torch.randn(T, HI, DI, generator=g, device="cuda").to(dtype)
    k = torch.randn(S, DI, generator=g, device="cuda").to(dtype)
    w = (torch.randn(T, HI, generator=g, device="cuda") * (HI * DI) ** -0.5).to(dtype)
    ke = torch.arange(S - T + 1, S + 1, dtype=torch.int32, device="cuda")
    return q, k, w, torch.zeros_like(ke), ke


def torch_fast(q, k, w, ks, ke, topk):
    T, S = q.shape[0], k.shape[0]
    dots = (q.reshape(T * HI, DI) @ k.T).float().relu_().view(T, HI, S)
    logits = torch.einsum("ths,th->ts", dots, w.float())
    pos = torch.arange(S, device=q.device)
    logits.masked_fill_((pos < ks[:, None]) | (pos >= ke[:, None]), float("-inf"))
    return torch.topk(logits, min(topk, S), dim=1)


def with_env(fn, **env):
    def run():
        old = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for name, value in old.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="16384,65536")
    ap.add_argument("--queries", default="128")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) fp32 reference")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"device: {torch.cuda.get_device_name()}, {args.dtype}, HI={HI}, DI={DI}, topk={TOPK}")
    for T in map(int, args.queries.split(",")):
        for S in map(int, args.seq_lens.split(",")):
            x = inputs(S, T, dtype)
            expect = (x[4] - x[3]).clamp(max=TOPK).cpu()
            fns = {
                "glm5 (tc)": lambda: glm5.ops.indexer_topk(*x, topk=TOPK),
                "glm5 (simt)": with_env(lambda: glm5.ops.indexer_topk(*x, topk=TOPK), GLM5_INDEXER_SIMT="1"),
                "torch-fast": lambda: torch_fast(*x, TOPK),
            }
            for qb in ("1", "2", "4"):
                fns[f"glm5 (tc, qb={qb})"] = with_env(lambda: glm5.ops.indexer_topk(*x, topk=TOPK),
                                                      GLM5_INDEXER_TOPK_QB=qb)
            if not args.no_reference:
                fns["reference"] = lambda: reference.indexer_topk(*x, topk=TOPK)
            for name, fn in fns.items():
                if name.startswith("glm5"):
                    idx, _ = fn()
                    got = (idx >= 0).sum(1).cpu()
                    assert torch.equal(got, expect.to(got.dtype)), f"{name}: wrong number of selected keys"
            t = bu.bench_many(fns, device="cuda", warmup=1, min_reps=3, max_reps=20, budget_s=3.0)
            base = t["torch-fast"].median
            print(f"T={T:>5} S={S:>7}: " + ", ".join(
                f"{name} {tm.median * 1e3:.3f} ms ({base / tm.median:.2f}x torch-fast)" for name, tm in t.items()))


if __name__ == "__main__":
    main()
