// The one schema file of glm5: every op's signature lives here. Backends register themselves at the
// bottom of the file that implements them (csrc/cpu/*.cpp: CPU, csrc/cuda/*/api.cu: CUDA); fake
// kernels and autograd live in Python (glm5.ops). Layouts and semantics: glm5/ops/reference.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import glm5._C` only has to load this library so the static registrars below run; no Python
// bindings: every op is reached through torch.ops.glm5.* (visible to torch.compile and export).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(glm5, m) {
  m.set_python_module("glm5.ops");

  // ---- DeepSeek Sparse Attention ------------------------------------------------------------
  // Lightning indexer: logits[t,s] = sum_j w[t,j] * relu(q[t,j,:] . k[s,:]) for ks[t] <= s < ke[t].
  m.set_python_module("glm5.ops.lightning_indexer");  // where its fake kernels are registered
  m.def("indexer_logits(Tensor q, Tensor k, Tensor w, Tensor ks, Tensor ke) -> Tensor");
  m.def("indexer_logits_bwd(Tensor grad, Tensor q, Tensor k, Tensor w, Tensor ks, Tensor ke)"
        " -> (Tensor dq, Tensor dk, Tensor dw)");
  // Fused top-k over the same scores, streaming over S (never a [T,S] buffer).
  m.def("indexer_topk(Tensor q, Tensor k, Tensor w, Tensor ks, Tensor ke, int topk)"
        " -> (Tensor indices, Tensor scores)");
  // Sparse MLA in MQA (absorbed) form: every head of query t attends to kv[indices[t]].
  m.set_python_module("glm5.ops.sparse_attention");  // where its fake kernels are registered
  m.def("sparse_mla_fwd(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v)"
        " -> (Tensor out, Tensor lse)");
  m.def("sparse_mla_bwd(Tensor grad_out, Tensor q, Tensor kv, Tensor indices, Tensor out, Tensor lse,"
        " float sm_scale, int d_v) -> (Tensor dq, Tensor dkv)");
  m.set_python_module("glm5.ops");
  // Indexer training loss: per-query KL(p_t || softmax(indexer logits_t)); dense when indices is None.
  m.set_python_module("glm5.ops.indexer_loss");  // where its fake kernels are registered
  m.def("indexer_kl_loss_fwd(Tensor q_idx, Tensor k_idx, Tensor w, Tensor q, Tensor kv, Tensor lse,"
        " Tensor ks, Tensor ke, float sm_scale, Tensor? indices=None) -> Tensor");
  m.def("indexer_kl_loss_bwd(Tensor grad, Tensor q_idx, Tensor k_idx, Tensor w, Tensor q, Tensor kv,"
        " Tensor lse, Tensor ks, Tensor ke, float sm_scale, Tensor? indices=None)"
        " -> (Tensor dq_idx, Tensor dk_idx, Tensor dw)");

  // ---- Mixture of experts ---------------------------------------------------------------------
  m.set_python_module("glm5.ops.moe");  // where the MoE fake kernels are registered
  // Sigmoid router: select by scores + bias (optionally group-limited), weight by the plain scores.
  m.def("moe_route(Tensor logits, Tensor? bias, int topk, int n_group=1, int topk_group=1,"
        " bool norm_topk_prob=True, float routed_scaling_factor=1.0) -> (Tensor topk_idx, Tensor topk_w)");
  // Tokens sorted by expert into a fixed-capacity buffer of N*topk + E*(alignment-1) rows (padding
  // rows are zero), row_map[n,k] = row of (token n, slot k), offsets [E+1] int64 (aligned starts).
  m.def("moe_permute(Tensor x, Tensor topk_idx, int num_experts, int alignment=1)"
        " -> (Tensor x_sorted, Tensor row_map, Tensor offsets)");
  // out[n] = sum_k topk_w[n,k] * y_sorted[row_map[n,k]].
  m.def("moe_unpermute(Tensor y_sorted, Tensor row_map, Tensor topk_w) -> Tensor");
  // Its backward: dy_sorted[row_map[n,k]] = topk_w[n,k] * grad[n] (unreferenced rows zero) and
  // dtopk_w[n,k] = grad[n] . y_sorted[row_map[n,k]]; moe_permute's backward is moe_unpermute itself.
  m.def("moe_unpermute_bwd(Tensor grad, Tensor y_sorted, Tensor row_map, Tensor topk_w)"
        " -> (Tensor dy_sorted, Tensor dtopk_w)");
  // M-grouped GEMM, contiguous layout: y[off[e]:off[e+1]] = x[off[e]:off[e+1]] @ w[e]^T
  // (w [E,N,K]; with trans_w, w is [E,K,N] and the product is x @ w[e]).
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor offsets, bool trans_w=False) -> Tensor");
  // K-grouped GEMM for the weight gradient: dw[e] = dy[off[e]:off[e+1]]^T @ x[off[e]:off[e+1]].
  m.def("grouped_gemm_wgrad(Tensor dy, Tensor x, Tensor offsets) -> Tensor");
}
