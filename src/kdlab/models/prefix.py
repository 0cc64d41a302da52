"""A frozen Llama or Qwen2 teacher's prompts, run once (`stage2.teacher_prompt_cache`).

A live teacher target is ``LM.response_logits(prompt, response)``: one forward over the prompt and the
response. Prompts come from a fixed pool (an offline dataset's, or the online regimes' prompt set) and the
teacher does not change during stage 2, so the prompt's share of that forward is the same every time a
prompt comes back. :class:`PromptCachedTeacher` keeps, per distinct prompt, what the rest of the forward
needs from it:

    each layer's keys and values at the prompt's real tokens  (L × 2 × H_kv × n × D floats)
    the logits of the first response token                    (V floats; the prompt's last position)

and runs only the response tokens through the layers, attending to the cached keys. The logits are the
full forward's up to float rounding (tests/test_prefix.py pins them to ``LM.response_logits``). On the
issue-7 teacher (prompt 16 of 63 input tokens) the response-only forward does 25 % fewer matmul FLOPs.

The layer wiring is `kdlab.models.decode`'s (a Llama decoder layer over a preallocated KV buffer), so the
same `decode.supports` check decides which teachers qualify. Prompts enter the cache on first use and,
with :meth:`PromptCachedTeacher.warm`, all at once before training; a byte budget caps it (prompts that do
not fit run the full forward each time).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from kdlab.models import decode
from kdlab.models.lm import LM, left_pad, trim_left_padding

__all__ = ["PromptCachedTeacher", "prompt_bytes", "distinct_prompts", "PROMPT_CACHE_AUTO_BYTES", "PROMPT_CACHE_MIN_USES"]

PROMPT_CACHE_AUTO_BYTES = 1 << 30  # stage2.teacher_prompt_cache='auto': the cache's cap (1 GiB)
# 'auto' runs the pool up front only when a prompt comes back: the pool pass costs one prompt pass per distinct
# prompt, the cache saves one per use after the first, so it pays from two uses per prompt on average.
PROMPT_CACHE_MIN_USES = 2.0


def prompt_bytes(hf, n_tokens: int) -> int:
    """Bytes one cached prompt of ``n_tokens`` real tokens takes: keys and values in the model's dtype (its
    hidden states'), the first response token's logits in float32."""
    cfg = hf.config
    a0 = hf.get_decoder().layers[0].self_attn
    kv_heads = a0.k_proj.out_features // a0.head_dim
    kv_item = hf.get_input_embeddings().weight.element_size()
    return kv_item * cfg.num_hidden_layers * 2 * kv_heads * n_tokens * a0.head_dim + 4 * cfg.vocab_size


def distinct_prompts(pools) -> int:
    """How many different prompts (real tokens; padding ignored) the (ids, mask) pools hold together."""
    return len({PromptCachedTeacher._key(r) for ids, mask in pools for r in PromptCachedTeacher._real(ids, mask)})


class PromptCachedTeacher:
    """``response_logits`` of a frozen Llama or Qwen2 teacher, with the prompts' keys and values cached.

    The same call as `LM.response_logits` (it stands in for the teacher wherever live targets are made).
    Rows whose prompt is not cached, and batches the fast path does not cover (a response mask with a gap
    before its end), run the teacher's full forward. ``compile_forward`` runs the response pass through
    ``torch.compile`` (static shapes first, one recompile with dynamic shapes when another batch shape comes), as
    ``stage2.compile_teacher`` does for the plain forward. ``budget_bytes`` (None: no limit) caps the cache; prompts past it are not stored.
    """

    def __init__(self, lm: LM, budget_bytes: int | None = None, compile_forward: bool = False,
                 _shared: dict | None = None):
        if not decode.supports(lm.hf):
            raise ValueError(f"the teacher prompt cache covers Llama and Qwen2 decoders (kdlab.models.decode.supports); "
                             f"{type(lm.hf).__name__} is not one")
        self.lm, self.hf = lm, lm.hf
        self.device = lm.device
        self._rotary = importlib.import_module(type(lm.hf).__module__).apply_rotary_pos_emb
        self._model, self._head = lm.hf.get_decoder(), lm.hf.get_output_embeddings()
        self._layers = self._model.layers[: lm.hf.config.num_hidden_layers]
        # shared between this teacher and its compiled twin (`with_compile`): one cache, one set of weights
        self._s = _shared if _shared is not None else {"entries": {}, "bytes": 0, "budget": budget_bytes,
                                                       "fused": None, "hits": 0, "misses": 0, "refused": 0}
        self.compile_forward = compile_forward
        self._compiled = None

    # ------------------------------------------------------------------------------------------ state
    def with_compile(self, on: bool) -> "PromptCachedTeacher":
        """This teacher with (or without) the compiled response pass, sharing the cache."""
        return PromptCachedTeacher(self.lm, compile_forward=on, _shared=self._s)

    @property
    def stats(self) -> dict:
        """Prompts held, bytes, the rows answered from the cache (hits) or by a full forward (misses), and the
        prompts left out for the budget (refused)."""
        s = self._s
        return {"prompts": len(s["entries"]), "bytes": s["bytes"], "hits": s["hits"], "misses": s["misses"],
                "refused": s["refused"]}

    def _fused(self):
        # The teacher is frozen: its fused projections are made once (decode.py makes them per call).
        if self._s["fused"] is None:
            self._s["fused"] = [
                (decode._fuse(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj),
                 decode._fuse(l.mlp.gate_proj, l.mlp.up_proj),
                 [l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features, l.self_attn.v_proj.out_features])
                for l in self._layers]
        return self._s["fused"]

    @staticmethod
    def _real(ids_BxP: Tensor, mask_BxP: Tensor | None) -> list[Tensor]:
        if mask_BxP is None:
            return list(ids_BxP)
        return [row[m.bool()] for row, m in zip(ids_BxP, mask_BxP)]

    @staticmethod
    def _key(real_ids: Tensor) -> bytes:
        return real_ids.to("cpu", torch.int64).numpy().tobytes()

    # ------------------------------------------------------------------------------------ the prompts
    @torch.no_grad()
    def warm(self, prompt_ids_NxP: Tensor, prompt_mask_NxP: Tensor | None = None, chunk: int = 64) -> int:
        """Cache every distinct prompt of the pool that fits the budget; returns how many were added."""
        real = self._real(prompt_ids_NxP, prompt_mask_NxP)
        seen, todo = set(self._s["entries"]), []
        for r in real:
            k = self._key(r)
            if k not in seen:
                seen.add(k)
                todo.append(r)
        added = 0
        for i in range(0, len(todo), chunk):
            added += self._add(todo[i:i + chunk])
        return added

    def _add(self, real: list[Tensor]) -> int:
        """Run these prompts (real tokens) and store those that fit the budget."""
        budget, used, fit = self._s["budget"], self._s["bytes"], []
        for r in real:  # in order, while the budget lasts
            need = prompt_bytes(self.hf, len(r))
            if budget is None or used + need <= budget:
                fit.append(r)
                used += need
        self._s["refused"] += len(real) - len(fit)
        real = fit
        if not real:
            return 0
        B, P = len(real), max(len(r) for r in real)
        ids = torch.zeros(B, P, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.bool)
        for b, r in enumerate(real):  # left padding, as LM._inputs lays prompts out
            ids[b, P - len(r):], mask[b, P - len(r):] = r.cpu(), True
        caches, logits0_BxV = self._prompt_pass(ids.to(self.device), mask.to(self.device))
        for b, r in enumerate(real):
            n = len(r)  # row b's real tokens are its last n positions
            kv_Lx2xHxnxD = torch.stack([torch.stack([kc[b, :, P - n:], vc[b, :, P - n:]]) for kc, vc in caches])
            self._s["entries"][self._key(r)] = (kv_Lx2xHxnxD, logits0_BxV[b].clone())
            self._s["bytes"] += prompt_bytes(self.hf, n)
        return B

    @torch.no_grad()
    def _prompt_pass(self, ids_BxP: Tensor, mask_BxP: Tensor) -> tuple[list, Tensor]:
        """Each layer's (keys, values) (B × H_kv × P × D each) and the first response token's logits (B × V,
        float32) of left-padded prompts."""
        rotary, model, head, layers = self._rotary, self._model, self._head, self._layers
        B, P = ids_BxP.shape
        pos = (mask_BxP.long().cumsum(-1) - 1).clamp_min(0)
        h = model.embed_tokens(ids_BxP)
        cos, sin = model.rotary_emb(h, pos)
        a0 = layers[0].self_attn
        H_kv = a0.k_proj.out_features // a0.head_dim
        caches = [(h.new_zeros(B, H_kv, P, a0.head_dim), h.new_zeros(B, H_kv, P, a0.head_dim)) for _ in layers]
        attn_mask = decode._prefill_mask(mask_BxP)
        for layer, fz, (kc, vc) in zip(layers, self._fused(), caches):
            h = decode._layer(layer, fz, h, cos, sin, kc, vc, 0, attn_mask, rotary)
        return caches, head(decode._rms_norm(model.norm, h[:, -1])).float()

    # ------------------------------------------------------------------------------------ the targets
    def response_logits(self, prompt_ids_BxP: Tensor, prompt_mask_BxP: Tensor | None, response_ids_BxR: Tensor,
                        response_mask_BxR: Tensor | None = None) -> Tensor:
        """`LM.response_logits` of the teacher: float32 (B, R, V)."""
        R = response_ids_BxR.shape[1]
        if prompt_mask_BxP is not None:
            prompt_ids_BxP, prompt_mask_BxP = trim_left_padding(*left_pad(prompt_ids_BxP, prompt_mask_BxP))
        # the keys are made on the CPU: one copy of the batch's prompts, not one per row (a GPU sync each)
        real = self._real(prompt_ids_BxP.cpu(), None if prompt_mask_BxP is None else prompt_mask_BxP.cpu())
        keys = [self._key(r) for r in real]
        entries = self._s["entries"]
        missing = {k: r for r, k in zip(real, keys) if k not in entries}  # distinct prompts not cached yet
        if missing:  # first sight of these prompts: run them once (a full forward costs the same)
            self._add(list(missing.values()))
        trailing = response_mask_BxR is None or bool((response_mask_BxR[:, 1:] <= response_mask_BxR[:, :-1]).all())
        if R < 2 or not trailing or any(k not in entries for k in keys):
            self._s["misses"] += len(keys)
            return self.lm.response_logits(prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR)
        self._s["hits"] += len(keys)
        got = [entries[k] for k in keys]
        P = max(e[0].shape[-2] for e in got)
        n_real_B = torch.tensor([e[0].shape[-2] for e in got], device=self.device)
        if all(e[0].shape[-2] == P for e in got):
            kv = torch.stack([e[0] for e in got])
        else:  # left-pad each prompt's keys/values to the batch's longest
            kv = torch.stack([torch.nn.functional.pad(e[0], (0, 0, P - e[0].shape[-2], 0)) for e in got])
        logits0 = torch.stack([e[1] for e in got])
        r_in = response_ids_BxR[:, :-1].to(self.device)
        fn = self._response_pass
        if self.compile_forward:
            if self._compiled is None:
                # static first, then one recompile with dynamic shapes if another batch shape comes (as `compiled`)
                self._compiled = torch.compile(self._response_pass)
            fn = self._compiled
        with torch.no_grad():
            rest = fn(kv.to(self.device), n_real_B, r_in, self._fused())
        return torch.cat([logits0.to(rest.device)[:, None], rest], 1)

    def _response_pass(self, kv_BxLx2xHxPxD: Tensor, n_real_B: Tensor, r_in_BxL: Tensor, fused) -> Tensor:
        """Logits (B × L × V, float32) of response tokens 1..L given tokens 0..L-1 after the cached prompts."""
        rotary, model, head, layers = self._rotary, self._model, self._head, self._layers
        B, L = r_in_BxL.shape
        P = kv_BxLx2xHxPxD.shape[-2]
        dev = r_in_BxL.device
        pos_BxL = n_real_B[:, None] + torch.arange(L, device=dev)
        h = model.embed_tokens(r_in_BxL)
        cos, sin = model.rotary_emb(h, pos_BxL)
        # keys: the prompt's real positions (left-padded to P), then the response causally
        prompt_ok_BxP = torch.arange(P, device=dev)[None, :] >= (P - n_real_B)[:, None]
        causal_LxL = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([prompt_ok_BxP[:, None, :].expand(B, L, P), causal_LxL.expand(B, L, L)], -1)[:, None]
        kv = kv_BxLx2xHxPxD.to(h.dtype)
        for i, (layer, fz) in enumerate(zip(layers, fused)):
            k_cache = torch.cat([kv[:, i, 0], kv.new_zeros(B, kv.shape[3], L, kv.shape[5])], 2)
            v_cache = torch.cat([kv[:, i, 1], kv.new_zeros(B, kv.shape[3], L, kv.shape[5])], 2)
            h = decode._layer(layer, fz, h, cos, sin, k_cache, v_cache, P, mask, rotary)
        return head(decode._rms_norm(model.norm, h)).float()
