"""`LM`: a thin wrapper over a Hugging Face decoder-only causal LM.

The wrapper does three things and nothing else: it turns a (left-padded prompt, right-padded
response) batch into one causal sequence with the right attention mask and position ids, it picks
the R output positions that predict the response tokens, and it saves/loads checkpoints with
errors that say what to do. Losses, sampling and metrics live outside (STYLE practice 5).

Batch layout (docs/DESIGN.md, "Module interfaces"):

    prompt     [pad pad p0 p1 p2]      prompt_mask_BxP   = [0 0 1 1 1]   (left-padded)
    response   [r0 r1 r2 pad pad]      response_mask_BxR = [1 1 1 0 0]   (right-padded, False after EOS)

The model input is ``concat(prompt, response[:, :-1])`` (length P+R-1): the last response token is
never an input because nothing is predicted from it. Output position ``P-1+t`` is the distribution
of response token ``t``. Position ids are ``cumsum(mask) - 1`` clamped at 0, so every example sees
positions 0, 1, 2, ... whatever its padding, and padded batches give the numbers of unpadded single
examples. Prompts padded any other way (right padding) are repacked to the left first.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LM", "CheckpointError", "check_safetensors", "check_vocab_compatible", "left_pad"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read; the message names the file and what to do."""


def _position_ids(mask_BxL: Tensor) -> Tensor:
    """Positions that skip padding: ``cumsum(mask) - 1`` clamped at 0 (pads reuse position 0)."""
    return (mask_BxL.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(ids_BxL: Tensor, mask_BxL: Tensor) -> tuple[Tensor, Tensor]:
    """Move every row's padding to the left, keeping the order of its real tokens.

    The output position that predicts response token 0 must be the last real prompt token, which
    is column P-1 only under left padding; right- (or otherwise) padded prompts are repacked here
    so callers may pass either. A stable sort of the mask (False < True) does it in one gather.
    """
    mask_BxL = mask_BxL.bool()
    order_BxL = torch.sort(mask_BxL.to(torch.uint8), dim=-1, stable=True).indices
    return ids_BxL.gather(-1, order_BxL.to(ids_BxL.device)), mask_BxL.gather(-1, order_BxL)


class LM:
    """Decoder-only causal LM with response-level accessors.

    Args:
        hf: a ``transformers`` causal LM (``AutoModelForCausalLM`` output). Put into eval mode here:
            none of kdlab's models use dropout, and eval mode makes logits deterministic.
        tokenizer: optional tokenizer, saved beside the weights by :meth:`save`.
    """

    def __init__(self, hf: torch.nn.Module, tokenizer=None):
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        # Not every causal LM accepts `logits_to_keep`; those that do skip the lm_head on the
        # prompt positions, which is most of the work for short responses and large vocabularies.
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(hf.forward).parameters

    # ----------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Width V of the output distribution (the lm_head rows, which may exceed the tokenizer's)."""
        out = self.hf.get_output_embeddings()
        return int(out.weight.shape[0]) if out is not None else int(self.hf.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def lm_head_weight(self) -> Tensor:
        """The output projection W (V, H): ``logits = hidden @ W.T`` for the memory-lean loss.

        Models that post-process logits (soft-capping, a logit scale) would make that identity false,
        so they are refused rather than silently giving a different loss.
        """
        cfg = self.hf.config
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(cfg, attr, None) not in (None, 1.0):
                raise NotImplementedError(
                    f"{type(self.hf).__name__} post-processes logits ({attr}={getattr(cfg, attr)}), so "
                    "hidden @ lm_head.T is not its logits; use response_logits and a dense loss instead."
                )
        out = self.hf.get_output_embeddings()
        if out is None or getattr(out, "bias", None) is not None:
            raise NotImplementedError(
                f"{type(self.hf).__name__} has no bias-free linear lm_head; use response_logits instead."
            )
        return out.weight

    # ------------------------------------------------------------------------------------- forward
    def _inputs(self, prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR):
        """Model inputs for ``concat(prompt, response[:, :-1])`` with mask and position ids."""
        B, R = response_ids_BxR.shape
        if R == 0:
            raise ValueError("response_ids_BxR has length 0: there is nothing to score.")
        if prompt_ids_BxP.shape[1] == 0:
            raise ValueError("prompt_ids_BxP has length 0: the first response token needs a context.")
        dev = self.device
        if prompt_mask_BxP is None:
            prompt_mask_BxP = torch.ones_like(prompt_ids_BxP, dtype=torch.bool)
        else:
            prompt_ids_BxP, prompt_mask_BxP = left_pad(prompt_ids_BxP, prompt_mask_BxP)
        if response_mask_BxR is None:
            response_mask_BxR = torch.ones_like(response_ids_BxR, dtype=torch.bool)
        ids = torch.cat([prompt_ids_BxP.to(dev), response_ids_BxR[:, :-1].to(dev)], 1)
        mask = torch.cat([prompt_mask_BxP.to(dev).bool(), response_mask_BxR[:, :-1].to(dev).bool()], 1)
        return ids, mask, _position_ids(mask), R

    def response_logits(
        self,
        prompt_ids_BxP: Tensor,
        prompt_mask_BxP: Tensor | None,
        response_ids_BxR: Tensor,
        response_mask_BxR: Tensor | None = None,
    ) -> Tensor:
        """Logits ``z[b, t]`` of p(response token t | prompt, response<t), float32, shape (B, R, V).

        Positions where ``response_mask_BxR`` is False hold whatever the model outputs there; callers
        mask them (the losses do).
        """
        ids, mask, pos, R = self._inputs(prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR)
        kw = {"logits_to_keep": R} if self._has_logits_to_keep else {}
        logits = self.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw).logits
        return logits[:, -R:].float()

    def response_hidden(
        self,
        prompt_ids_BxP: Tensor,
        prompt_mask_BxP: Tensor | None,
        response_ids_BxR: Tensor,
        response_mask_BxR: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (after the last norm) at the positions of :meth:`response_logits`.

        Shape (B, R, H), in the model's dtype. ``response_hidden(...) @ lm_head_weight.T`` equals
        ``response_logits(...)`` up to dtype; the memory-lean loss uses this to never build B×R×V.
        """
        ids, mask, pos, R = self._inputs(prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR)
        out = self.hf.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state[:, -R:]

    def response_logprobs(
        self,
        prompt_ids_BxP: Tensor,
        prompt_mask_BxP: Tensor | None,
        response_ids_BxR: Tensor,
        response_mask_BxR: Tensor | None = None,
    ) -> Tensor:
        """``log p(y_t | x, y<t)`` for each given response token, float32 (B, R), 0 where masked."""
        logits_BxRxV = self.response_logits(prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR)
        ids_BxR = response_ids_BxR.to(logits_BxRxV.device)
        # log_softmax(z)[y] = z[y] - logsumexp(z): gathers one column instead of normalising B×R×V twice.
        logp_BxR = logits_BxRxV.gather(-1, ids_BxR.unsqueeze(-1)).squeeze(-1) - logits_BxRxV.logsumexp(-1)
        if response_mask_BxR is not None:
            logp_BxR = logp_BxR.masked_fill(~response_mask_BxR.bool().to(logp_BxR.device), 0.0)
        return logp_BxR

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (transformers 5 writes safetensors only)
        and the tokenizer when there is one. Returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return directory

    @classmethod
    def load(
        cls,
        dir_or_name: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        trust_remote_code: bool = False,
    ) -> "LM":
        """Load a causal LM from a local directory or a hub name (``AutoModelForCausalLM``).

        ``dtype=None`` keeps the checkpoint's dtype. ``trust_remote_code`` stays off unless the user
        asks: it runs Python shipped with the checkpoint. The tokenizer is loaded when present.
        A truncated or corrupt ``*.safetensors`` raises :class:`CheckpointError` naming the file.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(dir_or_name)
        if path.is_dir():
            check_safetensors(sorted(path.glob("*.safetensors")))
        hf = AutoModelForCausalLM.from_pretrained(
            str(dir_or_name), dtype=dtype if dtype is not None else "auto", trust_remote_code=trust_remote_code
        )
        if device is not None:
            hf = hf.to(device)
        tokenizer = None
        if not path.is_dir() or any(
            (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(dir_or_name), trust_remote_code=trust_remote_code)
            except (OSError, ValueError):
                tokenizer = None  # weights without a tokenizer (the synthetic world has none)
        return cls(hf, tokenizer)


def check_safetensors(files, advice: str = "re-save the model, re-copy the file, or resume from an earlier checkpoint") -> None:
    """Open each ``*.safetensors`` file and check its header against its size; raise
    :class:`CheckpointError` naming the first bad file, the cause, and ``advice``.

    ``from_pretrained`` reports a truncated file as a bare deserialisation error without the path;
    an interrupted save or copy is the usual cause, so say which file and what to do.
    """
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    st.get_slice(k)  # touches each tensor's header entry without reading data
        except Exception as e:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or corrupt ({type(e).__name__}: {e}). "
                f"It was probably written by an interrupted save or copy: {advice}."
            ) from e


def check_vocab_compatible(a: "LM | int", b: "LM | int", names: tuple[str, str] = ("teacher", "student")) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same output vocabulary width.

    Token-level divergences compare distributions over the same token ids, so the widths must match.
    Either side may be an ``LM`` or a vocabulary size (e.g. a cache's ``vocab_size``).
    """
    va = a if isinstance(a, int) else a.vocab_size
    vb = b if isinstance(b, int) else b.vocab_size
    if va != vb:
        raise ValueError(
            f"vocabulary sizes differ: {names[0]} has {va} tokens, {names[1]} has {vb}. "
            "Token-level distillation compares distributions over the same token ids; cross-tokenizer "
            "distillation is not supported yet. Use a "
            f"{names[1]} built on the {names[0]}'s tokenizer (same vocab_size), or resize the "
            "embeddings of the smaller model if the extra ids are unused padding."
        )
