"""torch.compile(fullgraph=True) over whole model blocks: the custom ops' fake kernels and autograd
must let Dynamo trace a decoder layer (MLA + indexer top-k + sparse MLA + MoE) without graph breaks."""

from __future__ import annotations

import pytest
import torch

import glm5
from glm5.model import GLM5ForCausalLM
from glm5.model.transformer import pack_ranges
from model_helpers import tiny_config


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["dense-mlp", "moe"])
def test_decoder_layer_compiles_fullgraph(layer_idx):
    torch.manual_seed(0)
    model = GLM5ForCausalLM(tiny_config())
    layer = model.model.layers[layer_idx]
    B, S = 2, 24  # longer than index_topk (16): the sparse path really selects
    positions, ks, ke = pack_ranges(B, S, torch.device("cpu"), None)
    cos, sin = model.rope(positions)
    h = torch.randn(B * S, model.config.hidden_size, requires_grad=True)

    def block(h_TD):
        out, _topk, _ = layer(h_TD, cos, sin, ks, ke, mode="sparse")
        return out

    with glm5.ops.use_impl("kernel"):  # the model tests default to the references (conftest.py)
        eager = block(h)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(h)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), h)
    (g_comp,) = torch.autograd.grad(compiled.square().sum(), h)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-5)
