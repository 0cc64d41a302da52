"""Batched ancestral sampling from an :class:`~kdlab.models.LM`.

Each step t draws y_t ~ q_t(·) with

    q_t = softmax(filter(z_t / T)),    z_t = logits of p(· | x, y<t),

where ``filter`` keeps the ``top_k`` largest entries and/or the smallest set of most-probable tokens
whose mass reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020), and returns log q_t(y_t).
With T = 1 and no filters q_t = p, so the returned log-probs equal ``LM.response_logprobs``.

Implementation: Llama and Qwen2 models (``kdlab.models.decode.supports``) run kdlab's own decoding loop in
``kdlab.models.decode`` (preallocated KV cache, about 2x faster than ``generate`` on bench/sampling.py,
above issue 3's 1.5x bar for keeping a second loop); every other model (causal LMs of other
architectures, encoder-decoder LMs such as T5) goes through ``model.generate`` (KV cache, left
padding, EOS handling). Both return the same Samples.
What the generate wrapper adds:

- every generation option that could change the sampled distribution is set explicitly, because
  ``generate`` fills unset options from the checkpoint's ``generation_config.json`` (a hub model's
  ``repetition_penalty`` or ``top_k=50`` would otherwise silently change q_t);
- a ``torch.Generator`` drives it: ``generate`` only uses the global RNG, so a seed drawn from the
  generator seeds a forked global RNG (the caller's global RNG state is left untouched);
- log q_t(y_t) from the processed scores (after temperature / top-k / top-p), and a right-padded,
  ``max_new_tokens``-wide response with a mask that is False after the first EOS.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

from kdlab.models import decode
from kdlab.models.lm import LM, _position_ids, left_pad, trim_left_padding

__all__ = ["Samples", "sample", "eos_ids", "response_mask", "NextTokenLogits"]


class _RowDraw(LogitsProcessor):
    """A logits processor that draws each row's next token by kdlab's inverse-CDF draw from its own
    uniforms (``uniforms(t)``, t = the response position) and leaves only that token finite, so that
    greedy ``generate`` emits it; it records log q of the drawn tokens."""

    def __init__(self, uniforms, draw: tuple):
        self.uniforms, self.draw, self.logq_B = uniforms, draw, []

    def __call__(self, input_ids, scores_BxV: Tensor) -> Tensor:
        tok_B, lq_B = decode._draw(scores_BxV.float(), self.uniforms(len(self.logq_B)), *self.draw)
        self.logq_B.append(lq_B)
        return torch.full_like(scores_BxV, float("-inf")).scatter_(1, tok_B[:, None], 0.0)


EOS = int | tuple[int, ...] | list[int] | None  # one end-of-response token, several (Llama 3, chat models), or none


def eos_ids(eos_token_id: EOS) -> tuple[int, ...]:
    """``eos_token_id`` as a tuple (empty: no EOS). The first id pads the slots after a response ends."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (list, tuple)):
        return tuple(int(e) for e in eos_token_id)
    return (int(eos_token_id),)


def response_mask(ids_BxR: Tensor, eos_token_id: EOS) -> Tensor:
    """True up to and including each row's first end-of-response token (any of ``eos_token_id``)."""
    eos = eos_ids(eos_token_id)
    if not eos:
        return torch.ones_like(ids_BxR, dtype=torch.bool)
    is_eos = torch.isin(ids_BxR, torch.tensor(eos, device=ids_BxR.device)).long()
    return (is_eos.cumsum(-1) - is_eos) == 0  # no EOS strictly before t

# Options of transformers' GenerationConfig that alter the next-token distribution or the length,
# pinned to their neutral values (an explicit kwarg overrides the checkpoint's generation_config).
_NEUTRAL_GENERATION = dict(
    min_p=None,
    top_h=None,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    bad_words_ids=None,
    sequence_bias=None,
    min_length=0,
    min_new_tokens=None,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    suppress_tokens=None,
    begin_suppress_tokens=None,
    exponential_decay_length_penalty=None,
    guidance_scale=None,
    renormalize_logits=False,
    remove_invalid_values=False,
    watermarking_config=None,
    stop_strings=None,
    num_beams=1,
    num_return_sequences=1,
    max_length=None,
)


class Samples(NamedTuple):
    """Responses, right-padded to ``max_new_tokens``.

    response_ids_BxR: sampled tokens; after EOS the slots hold ``eos_token_id`` and are masked.
    response_mask_BxR: True for generated tokens up to and including the first EOS.
    logprobs_BxR: log q_t(y_t) of the distribution sampled from (after temperature / top-k / top-p),
        float32, 0 where masked (and 0 everywhere for greedy decoding, a point mass).
    logits_BxRxV: with ``return_logits=True``, the model's raw logits at every response position
        (before temperature / top-k / top-p), float32; else None. They are the sampler model's full
        next-token distributions, so a caller that needs them (online distillation from the teacher)
        does not run the model again on its own samples.
    """

    response_ids_BxR: Tensor
    response_mask_BxR: Tensor
    logprobs_BxR: Tensor
    logits_BxRxV: Tensor | None = None


def sample(
    lm: LM,
    prompt_ids_BxP: Tensor,
    prompt_mask_BxP: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: EOS = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    compile_step: bool = False,
    row_seeds: Tensor | None = None,
) -> Samples:
    """Sample ``max_new_tokens`` continuations of left-padded prompts.

    ``temperature=0`` is greedy decoding. Rows stop at their first ``eos_token_id`` (one id or a
    list, any of which ends a row; None: no EOS, every row runs ``max_new_tokens``). The result is
    always ``max_new_tokens`` wide so batches concatenate. With a ``generator`` the same generator
    state gives the same samples (on the same device and library versions); without one, the global
    RNG is used and advanced. ``row_seeds`` (B ints) instead gives each row its own random stream: a
    row then draws the same tokens whichever rows share its batch (the online regimes use this so that
    each rank samples only its rows of the global batch), on both paths below.
    ``compile_step`` (Llama models; ignored by ``generate``) runs kdlab's decode step through
    ``torch.compile``: the same draws, compiled once per model and batch shape
    (``stage2.compile_student`` / ``compile_teacher`` for the online regimes' samplers).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")

    dev = lm.device
    ids_BxP = prompt_ids_BxP.to(dev)
    B, P = ids_BxP.shape
    if prompt_mask_BxP is None:
        mask_BxP = torch.ones_like(ids_BxP)
    else:  # generate needs left padding; accept any padding like LM does
        ids_BxP, mask_BxP = trim_left_padding(*left_pad(ids_BxP, prompt_mask_BxP.to(dev)))
        mask_BxP = mask_BxP.long()
        P = ids_BxP.shape[1]
    if decode.supports(lm.hf):  # Llama models: kdlab's own loop, same distribution (kdlab.models.decode)
        return decode.sample_llama(lm.hf, ids_BxP, None if prompt_mask_BxP is None else mask_BxP,
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, eos_token_id=eos_token_id, generator=generator,
                                   return_logits=return_logits, compile_step=compile_step, row_seeds=row_seeds)
    eos = eos_ids(eos_token_id)
    pad = eos[0] if eos else 0
    greedy = temperature == 0
    kwargs = dict(
        _NEUTRAL_GENERATION,
        input_ids=ids_BxP,
        attention_mask=mask_BxP,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=None if greedy else top_k,
        top_p=None if greedy else top_p,
        eos_token_id=list(eos) or None,
        pad_token_id=pad,
        output_scores=not greedy,
        output_logits=return_logits,
        return_dict_in_generate=True,
        use_cache=True,
    )
    row_draw = None
    if row_seeds is not None and not greedy:
        # generate has no per-row RNG: it decodes greedily over scores on which kdlab's own draw has
        # already chosen the token (decode._draw, the same draw as kdlab's loop from the same uniforms).
        row_draw = _RowDraw(decode.uniform_stream(B, max_new_tokens, temperature, None, row_seeds, dev),
                            (temperature, top_k, top_p))
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None, output_scores=False,
                      logits_processor=LogitsProcessorList([row_draw]))
    if generator is None or row_draw is not None:
        with torch.no_grad():
            out = lm.hf.generate(**kwargs)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        fork_devices = [dev.index if dev.index is not None else torch.accelerator.current_device_index()] \
            if dev.type != "cpu" else []
        with torch.no_grad(), torch.random.fork_rng(devices=fork_devices, device_type=dev.type):
            torch.manual_seed(seed)
            out = lm.hf.generate(**kwargs)

    # A decoder-only model returns prompt + response; an encoder-decoder one decoder_start + response.
    ids_BxRp = out.sequences[:, 1:] if lm.is_encoder_decoder else out.sequences[:, P:]
    Rp = ids_BxRp.shape[1]  # generate stops early when every row has hit EOS
    ids_BxR = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
    ids_BxR[:, :Rp] = ids_BxRp
    mask_BxR = response_mask(ids_BxR, eos)
    logp_BxR = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
    if row_draw is not None:
        logq_BxRp = torch.stack(row_draw.logq_B, 1)
        logp_BxR[:, :Rp] = logq_BxRp[:, :Rp]
        logp_BxR = logp_BxR.masked_fill(~mask_BxR, 0.0)
    elif not greedy:
        # One (B, V) step at a time: stacking all scores would materialise B×R×V.
        for t, scores_BxV in enumerate(out.scores):
            logq_BxV = scores_BxV.float().log_softmax(-1)
            logp_BxR[:, t] = logq_BxV.gather(-1, ids_BxR[:, t : t + 1]).squeeze(-1)
        logp_BxR = logp_BxR.masked_fill(~mask_BxR, 0.0)
    logits_BxRxV = None
    if return_logits:
        raw = torch.stack(out.logits, 1).float()  # B×Rp×V; positions after an early stop are masked
        logits_BxRxV = raw.new_zeros(B, max_new_tokens, raw.shape[-1])
        logits_BxRxV[:, :Rp] = raw
    return Samples(ids_BxR, mask_BxR, logp_BxR, logits_BxRxV)


class NextTokenLogits:
    """Next-token logits for a sampling loop that draws from more than one model, one token at a time
    (MiniLLM's teacher-mixed sampling, `kdlab.losses.minillm.sample_teacher_mixed`), with the model's KV cache
    kept between calls.

    ``step(seq_BxL)`` returns float32 logits B×V (on the CPU) of p(· | prompt, seq_BxL[:, P:]), where the first
    P columns are the prompt given here. The first call (L = P) runs the prompt; each later call must extend the
    previous call's sequence by exactly one token and runs only that token through the model. Left-padded
    prompts get the positions `LM.response_logits` gives them (padding skipped), so the logits equal a full
    forward's up to rounding. Encoder-decoder models run a full forward at every call (no cache kept).
    """

    def __init__(self, lm: LM, prompt_ids_BxP: Tensor, prompt_mask_BxP: Tensor | None = None):
        self.lm, self.P = lm, prompt_ids_BxP.shape[1]
        self.prompt_ids, self.prompt_mask = prompt_ids_BxP, prompt_mask_BxP
        dev = lm.device
        if prompt_mask_BxP is None:
            ids, mask = prompt_ids_BxP, torch.ones_like(prompt_ids_BxP, dtype=torch.bool)
        else:
            ids, mask = trim_left_padding(*left_pad(prompt_ids_BxP, prompt_mask_BxP))
        self._ids, self._mask = ids.to(dev), mask.to(dev).bool()
        self._n_real_B = self._mask.sum(-1)  # the first response token's position
        self._past, self._n = None, -1  # tokens of the response seen by the cache (-1: nothing run yet)
        # transformers 5.x renamed `past_key_values` to `cache` (both in and out); older model classes keep the old name
        params = inspect.signature(getattr(lm.hf, "module", lm.hf).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def __call__(self, seq_BxL: Tensor) -> Tensor:
        drawn = seq_BxL[:, self.P:]
        n = drawn.shape[1]
        if self.lm.is_encoder_decoder:
            r = torch.cat([drawn, drawn.new_zeros(drawn.shape[0], 1)], dim=1)  # a placeholder for the next token
            out = self.lm.response_logits(self.prompt_ids, self.prompt_mask, r.to(self.lm.device))
            return out[:, -1].float().cpu()
        if n != self._n + 1:
            raise ValueError(f"NextTokenLogits: the sequence has {n} response tokens; the cache holds {max(self._n, 0)} "
                             "(each call must add exactly one token to the previous call's sequence)")
        if n == 0:
            kw = {"logits_to_keep": 1} if self.lm._has_logits_to_keep else {}
            out = self.lm.hf(input_ids=self._ids, attention_mask=self._mask, position_ids=_position_ids(self._mask),
                             use_cache=True, **kw)
        else:
            dev = self._ids.device
            B = drawn.shape[0]
            self._mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], 1)
            pos_Bx1 = (self._n_real_B + (n - 1))[:, None]
            out = self.lm.hf(input_ids=drawn[:, -1:].to(dev), attention_mask=self._mask, position_ids=pos_Bx1,
                             use_cache=True, **{self._cache_arg: self._past})
        self._past, self._n = getattr(out, self._cache_arg), n
        return out.logits[:, -1].float().cpu()
