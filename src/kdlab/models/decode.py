"""A decoding loop for Llama-architecture models (Llama, Qwen2) with a preallocated KV cache (the fast path of `sample`).

`kdlab.models.sampling.sample` calls :func:`sample_llama` when :func:`supports` accepts the model and
`generate` otherwise. The sampled distribution is the one `sample` documents,

    q_t = softmax(filter(z_t / T)),    z_t = logits of p(· | x, y<t),

with HF's filter semantics (temperature, then top-k keeping ties, then top-p keeping the smallest
set of most-probable tokens whose mass reaches top_p, at least one token).

Why a second loop (issue 3's rule: only if >= 1.5x faster than `generate` on bench/sampling.py): for
small models each decode step is latency-bound, and most of `generate`'s ~2 ms per step on the issue-7
student (2 layers, hidden 128, batch 16, 2 CPU threads) is Python around a few dozen small kernels:
mask construction, cache objects, logits processors, stopping criteria, the module tree's kwargs
plumbing. This loop runs the model's own submodules (norms, projections, MLP, rotary embedding,
`apply_rotary_pos_emb`) under `inference_mode`, computes the rotary tables for all positions once,
writes keys/values into one preallocated (B, H_kv, P+R, D) buffer per layer, runs the lm_head on
the last position only, and draws each token by inverse CDF from B uniforms of the caller's
generator. Numbers: docs/LOG.md and bench/RESULTS.md ("Sampling").

Only the wiring of a Llama decoder layer is written here (pre-norm residual blocks, grouped-query
SDPA with scale head_dim**-0.5, projection biases where the model has them), which Qwen2 shares;
`supports` refuses anything that could make it differ from the model's own forward (another
architecture, attention dropout in training mode, sliding windows, logit post-processing, layer
types), and tests pin the log-probs to `LM.response_logprobs` for both families.
"""

from __future__ import annotations

import importlib
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["supports", "sample_llama"]

_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> its compiled one-token step


# The model classes whose decoder layer is Llama's wiring, and their module-name prefix. Qwen2 differs from Llama
# only by biases on the q/k/v projections (which `_fuse` carries) and an optional sliding window (refused below).
FAMILIES = {"LlamaForCausalLM": "Llama", "Qwen2ForCausalLM": "Qwen2"}


def supports(hf: torch.nn.Module) -> bool:
    """True when :func:`sample_llama` computes exactly the model's own forward."""
    family = FAMILIES.get(type(hf).__name__)
    if family is None or hf.training:
        return False
    cfg = hf.config
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "sliding_window", None):
        return False
    if any(getattr(cfg, a, None) not in (None, 1.0) for a in ("final_logit_softcapping", "logit_scale")):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        return False
    model = hf.get_decoder()
    if not all(hasattr(model, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    # The loop re-implements exactly these module types (fused projections, F.rms_norm).
    return all(type(m).__name__ == family + n for layer in model.layers for m, n in (
        (layer.self_attn, "Attention"), (layer.mlp, "MLP"), (layer.input_layernorm, "RMSNorm"),
        (layer.post_attention_layernorm, "RMSNorm"))) and type(model.norm).__name__ == family + "RMSNorm"


def _filter(scores_BxV: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """HF's TopK then TopP warpers: removed entries become -inf."""
    if top_k is not None and top_k < scores_BxV.shape[-1]:
        kth = torch.topk(scores_BxV, top_k).values[..., -1:]
        scores_BxV = scores_BxV.masked_fill(scores_BxV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BxV, order_BxV = torch.sort(scores_BxV, descending=False)
        cum = sorted_BxV.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most probable token
        scores_BxV = scores_BxV.masked_fill(remove.scatter(-1, order_BxV, remove), float("-inf"))
    return scores_BxV


def _fuse(*linears) -> tuple[Tensor, Tensor | None]:
    """One (sum of outs, in) weight (and bias) for linears applied to the same input: one matmul, not several."""
    w = torch.cat([m.weight for m in linears])
    b = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    return w, b


def _rms_norm(norm, x: Tensor) -> Tensor:
    """LlamaRMSNorm (weight * x / sqrt(mean(x^2) + eps), in float32) as one kernel."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype) * norm.weight


def _layer(layer, fused, h_BxLxH: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
           start: int, mask, rotary) -> Tensor:
    """One Llama decoder layer on positions start..start+L-1, writing their keys/values into the cache."""
    attn, mlp = layer.self_attn, layer.mlp
    (w_qkv, b_qkv), (w_gu, b_gu), sizes = fused
    B, L, _ = h_BxLxH.shape
    D = attn.head_dim
    q, k, v = F.linear(_rms_norm(layer.input_layernorm, h_BxLxH), w_qkv, b_qkv).split(sizes, -1)
    q, k, v = (y.view(B, L, -1, D).transpose(1, 2) for y in (q, k, v))
    q, k = rotary(q, k, cos, sin)
    end = start + L
    k_cache[:, :, start:end] = k
    v_cache[:, :, start:end] = v
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    gqa = q.shape[1] != keys.shape[1]
    if isinstance(mask, Tensor):
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)
    else:  # mask == "causal" (prefill without padding) or None (one query attending to every key)
        a = F.scaled_dot_product_attention(q, keys, values, is_causal=mask == "causal", scale=attn.scaling,
                                           enable_gqa=gqa)
    h_BxLxH = h_BxLxH + attn.o_proj(a.transpose(1, 2).reshape(B, L, -1))
    gate, up = F.linear(_rms_norm(layer.post_attention_layernorm, h_BxLxH), w_gu, b_gu).chunk(2, -1)
    return h_BxLxH + mlp.down_proj(mlp.act_fn(gate) * up)


def _prefill_mask(mask_BxP: Tensor | None):
    """`_layer`'s attention mask for a left-padded prompt run from position 0: "causal" without padding, else
    B×1×P×P, causal over real keys; pad queries attend to themselves only (a fully masked row would give NaN in
    SDPA; their outputs are never used)."""
    if mask_BxP is None or bool(mask_BxP.all()):
        return "causal"
    P, dev = mask_BxP.shape[1], mask_BxP.device
    causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
    return ((causal & mask_BxP.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool, device=dev))[:, None]


@torch.inference_mode()
def _decode(hf, ids_BxP: Tensor, mask_BxP: Tensor | None, R: int, temperature: float, top_k, top_p,
            eos: tuple[int, ...], generator, row_seeds, return_logits: bool, compile_step: bool):
    rotary = importlib.import_module(type(hf).__module__).apply_rotary_pos_emb
    model, head = hf.get_decoder(), hf.get_output_embeddings()
    dev = ids_BxP.device
    B, P = ids_BxP.shape
    layers = model.layers[: hf.config.num_hidden_layers]
    # Positions skip left padding (as LM._inputs and generate do); the first response token sits at
    # the number of real prompt tokens.
    if mask_BxP is None:
        pos_BxPR = torch.arange(P + R, device=dev).expand(B, P + R)
    else:
        n_real_B = mask_BxP.sum(-1, keepdim=True)
        pos_BxPR = torch.cat([(mask_BxP.long().cumsum(-1) - 1).clamp_min(0),
                              n_real_B + torch.arange(R, device=dev)], 1)
    h = model.embed_tokens(ids_BxP)
    cos_all, sin_all = model.rotary_emb(h, pos_BxPR)  # (B, P+R, D) each, computed once
    a0 = layers[0].self_attn
    H_kv = a0.k_proj.out_features // a0.head_dim
    # The weights change between calls (training), so they are concatenated per call (cheap).
    fused = [(_fuse(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj), _fuse(l.mlp.gate_proj, l.mlp.up_proj),
              [l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features, l.self_attn.v_proj.out_features])
             for l in layers]
    # Zeros for the compiled step, which attends over every slot (masked, but 0 x NaN garbage would be NaN).
    new = h.new_zeros if compile_step else h.new_empty
    caches = [(new(B, H_kv, P + R, a0.head_dim), new(B, H_kv, P + R, a0.head_dim)) for _ in layers]
    prefill_mask = _prefill_mask(mask_BxP)
    if mask_BxP is None:
        key_mask = None
    else:
        keep_BxPR = torch.cat([mask_BxP.bool(), mask_BxP.new_ones(B, R, dtype=torch.bool)], 1)
        key_mask = keep_BxPR[:, None, None, :]  # B×1×1×(P+R), sliced to the keys seen so far

    def run(h, start, mask):
        L = h.shape[1]
        cos, sin = cos_all[:, start:start + L], sin_all[:, start:start + L]
        for layer, fz, (kc, vc) in zip(layers, fused, caches):
            h = _layer(layer, fz, h, cos, sin, kc, vc, start, mask, rotary)
        return head(_rms_norm(model.norm, h[:, -1])).float()  # lm_head on the last position only

    ids_BxR = torch.empty(B, R, dtype=torch.long, device=dev)
    logp_BxR = torch.zeros(B, R, dtype=torch.float32, device=dev)
    logits_BxRxV = None
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    done_B = torch.zeros(B, dtype=torch.bool, device=dev) if eos else None
    draw = (temperature, top_k, top_p)
    uniforms = uniform_stream(B, R, temperature, generator, row_seeds, dev)
    if compile_step:
        step = _compiled_step(hf)
        key_ok_BxPR = keep_BxPR if mask_BxP is not None else torch.ones(B, P + R, dtype=torch.bool, device=dev)
    z_BxV = run(h, 0, prefill_mask)
    tok_B, lq_B = _draw(z_BxV, uniforms(0), *draw)
    for t in range(R):
        if t > 0:
            mask = key_mask[..., :P + t] if key_mask is not None else None
            if compile_step:  # the same position as the eager branch, in one compiled call
                pos_1 = torch.full((1,), P + t - 1, dtype=torch.long, device=dev)
                z_BxV, tok_B, lq_B = step(tok_B, pos_1, cos_all, sin_all, key_ok_BxPR, fused, caches,
                                          uniforms(t), draw)
            else:
                z_BxV = run(model.embed_tokens(tok_B[:, None]), P + t - 1, mask)
                tok_B, lq_B = _draw(z_BxV, uniforms(t), *draw)
        if return_logits:
            if logits_BxRxV is None:
                logits_BxRxV = z_BxV.new_zeros(B, R, z_BxV.shape[-1])
            logits_BxRxV[:, t] = z_BxV
        logp_BxR[:, t] = lq_B
        if done_B is not None:
            tok_B = tok_B.masked_fill(done_B, eos[0])  # finished rows repeat the first EOS (masked below)
            done_B = done_B | torch.isin(tok_B, eos_t)
        ids_BxR[:, t] = tok_B
        if t == R - 1 or (done_B is not None and bool(done_B.all())):
            ids_BxR[:, t + 1:] = eos[0] if eos else 0
            break
    return ids_BxR, logp_BxR, logits_BxRxV


def uniform_stream(B: int, R: int, temperature: float, generator, row_seeds: Tensor | None, dev):
    """``t -> `` the B uniforms in (0, 1] (float64) that draw response token t of each row; None when greedy.

    Without ``row_seeds`` they come from the caller's generator, B per step, in step order (each t is
    asked for once, in order). With ``row_seeds`` (B ints) row b's R uniforms come from its own stream
    seeded by ``row_seeds[b]``, so a row draws the same tokens whichever rows share its batch: a rank
    that samples only its slice of a global batch draws what one process sampling all of it would.
    """
    if temperature == 0:
        return lambda t: None
    if row_seeds is None:
        gen_dev = generator.device if generator is not None else dev
        return lambda t: 1.0 - torch.rand(B, generator=generator, dtype=torch.float64, device=gen_dev).to(dev)
    if len(row_seeds) != B:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {B} rows")
    u_RxB = 1.0 - torch.stack([torch.rand(R, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                               for s in row_seeds.tolist()], 1).to(dev)
    return lambda t: u_RxB[t]  # contiguous, like the generator's draws (the compiled step sees the same strides)


def _draw(z_BxV: Tensor, u_B: Tensor | None, temperature: float, top_k, top_p) -> tuple[Tensor, Tensor]:
    """The next tokens and their log q: argmax (u None), else the inverse-CDF draw of ``u_B``."""
    if u_B is None:
        return z_BxV.argmax(-1), z_BxV.new_zeros(z_BxV.shape[0])
    logq_BxV = _filter(z_BxV / temperature, top_k, top_p).log_softmax(-1)
    # Inverse-CDF draw in float64: one uniform per row (from `uniform_stream`).
    cdf_BxV = logq_BxV.double().exp().cumsum(-1)
    tok_B = (cdf_BxV < (u_B * cdf_BxV[:, -1]).unsqueeze(-1)).sum(-1)
    # A draw past the last kept token (rounding) takes the last token with mass.
    last_B = (cdf_BxV < cdf_BxV[:, -1:]).sum(-1)
    tok_B = torch.minimum(tok_B, last_B)
    return tok_B, logq_BxV.gather(-1, tok_B[:, None])[:, 0]


def _compiled_step(hf):
    """``hf``'s one-token decode step (embed the last token, every layer over the whole preallocated
    cache, lm_head, draw), ``torch.compile``d with static shapes: one graph per (batch, length) in
    which Inductor fuses the norms, rotary, cache write, attention and SwiGLU of each layer around
    its matmuls. Compiled once per model and shape; the weights are graph inputs, so training
    updates need no recompilation.

    The position is a tensor and attention covers every cache slot with keys after it masked, so
    all R − 1 steps share one graph (eager slices the cache to the keys seen so far instead).
    """
    if hf not in _COMPILED_STEPS:
        rotary = importlib.import_module(type(hf).__module__).apply_rotary_pos_emb
        model, head = hf.get_decoder(), hf.get_output_embeddings()
        layers = model.layers[: hf.config.num_hidden_layers]

        def step(tok_B, pos_1, cos_all, sin_all, key_ok_BxL, fused, caches, u_B, draw):
            B = tok_B.shape[0]
            cos, sin = cos_all.index_select(1, pos_1), sin_all.index_select(1, pos_1)
            L = key_ok_BxL.shape[1]
            mask = (key_ok_BxL & (torch.arange(L, device=tok_B.device) <= pos_1))[:, None, None, :]
            h = model.embed_tokens(tok_B[:, None])
            for layer, ((w_qkv, b_qkv), (w_gu, b_gu), sizes), (k_cache, v_cache) in zip(layers, fused, caches):
                attn, mlp = layer.self_attn, layer.mlp
                q, k, v = F.linear(_rms_norm(layer.input_layernorm, h), w_qkv, b_qkv).split(sizes, -1)
                q, k, v = (y.view(B, 1, -1, attn.head_dim).transpose(1, 2) for y in (q, k, v))
                q, k = rotary(q, k, cos, sin)
                k_cache.index_copy_(2, pos_1, k)
                v_cache.index_copy_(2, pos_1, v)
                if q.shape[1] != k_cache.shape[1]:  # grouped-query attention: repeat the KV heads
                    rep = q.shape[1] // k_cache.shape[1]
                    keys, values = k_cache.repeat_interleave(rep, 1), v_cache.repeat_interleave(rep, 1)
                else:
                    keys, values = k_cache, v_cache
                # One query: the plain formula, which Inductor fuses (its flash kernel is a library call).
                scores = (q @ keys.transpose(-1, -2)) * attn.scaling
                a = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values
                h = h + attn.o_proj(a.transpose(1, 2).reshape(B, 1, -1))
                gate, up = F.linear(_rms_norm(layer.post_attention_layernorm, h), w_gu, b_gu).chunk(2, -1)
                h = h + mlp.down_proj(mlp.act_fn(gate) * up)
            z_BxV = head(_rms_norm(model.norm, h[:, -1])).float()
            return (z_BxV, *_draw(z_BxV, u_B, *draw))

        _COMPILED_STEPS[hf] = torch.compile(step, dynamic=False, fullgraph=True)
    return _COMPILED_STEPS[hf]


def sample_llama(hf, ids_BxP: Tensor, mask_BxP: Tensor | None, *, max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, eos_token_id: int | tuple[int, ...] | None,
                 generator: torch.Generator | None, return_logits: bool, compile_step: bool = False,
                 row_seeds: Tensor | None = None):
    """`sample`'s result for a model that :func:`supports` accepts (arguments as `sample` validates them).

    ``ids_BxP`` is left-padded with ``mask_BxP`` (None: no padding). Without a generator the global
    RNG is used (and advanced). ``compile_step`` runs the R − 1 single-token steps through
    :func:`_compiled_step` (the same draws from the same uniforms; logits equal to rounding).
    """
    from kdlab.models.sampling import Samples, eos_ids, response_mask

    if mask_BxP is not None and bool(mask_BxP.all()):
        mask_BxP = None  # no padding: causal SDPA without a mask tensor
    out = _decode(hf, ids_BxP, mask_BxP, max_new_tokens, temperature, top_k, top_p, eos_ids(eos_token_id), generator,
                  row_seeds, return_logits, compile_step)
    # Inference-mode tensors cannot enter autograd, and callers train on these: clone outside that mode.
    ids_BxR, logp_BxR, logits_BxRxV = (t.clone() if t is not None else None for t in out)
    mask_BxR = response_mask(ids_BxR, eos_token_id)
    return Samples(ids_BxR, mask_BxR, logp_BxR.masked_fill(~mask_BxR, 0.0), logits_BxRxV)
