"""`LM`: a thin wrapper over a Hugging Face language model: decoder-only (causal LM) or
encoder-decoder (T5 family, ``AutoModelForSeq2SeqLM``), behind one interface.

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
examples. Prompts padded any other way (right padding) are repacked to the left first. Prompt columns
that are padding in every row are dropped before the forward (a pool padded to its longest prompt
would otherwise pay for that length in every batch).

Encoder-decoder models (``config.is_encoder_decoder``): the prompt is the encoder input (with its
mask), and the decoder reads ``concat(decoder_start, response[:, :-1])`` (T5's ``_shift_right``), so
decoder position ``t`` is the distribution of response token ``t``. Everything downstream (losses,
metrics, sampling) sees the same (B, R, V) logits either way.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["LM", "CheckpointError", "bf16_autocast", "check_safetensors", "check_vocab_compatible", "left_pad", "set_dropout",
           "trim_left_padding"]


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


def trim_left_padding(ids_BxL: Tensor, mask_BxL: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row of a left-padded batch (exact: those
    positions are masked everywhere). Keeps at least one column."""
    any_L = mask_BxL.bool().any(0)
    first = int(any_L.to(torch.uint8).argmax()) if bool(any_L.any()) else ids_BxL.shape[1] - 1
    return (ids_BxL[:, first:], mask_BxL[:, first:]) if first > 0 else (ids_BxL, mask_BxL)


_DROPOUT_CONFIG_FIELDS = ("dropout_rate", "dropout", "attention_dropout", "hidden_dropout", "attention_probs_dropout_prob",
                          "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop", "activation_dropout")


def bf16_autocast(device, enabled: bool):
    """bfloat16 autocast for training and sampling forwards (`precision: bf16`), else a no-op."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def set_dropout(hf: torch.nn.Module, p: float) -> None:
    """Set every dropout of a model to ``p``: the ``nn.Dropout`` modules (T5 builds them from
    ``dropout_rate``), the float rates modules copy from their config at init (Llama/Qwen attention's
    ``attention_dropout``), and the config itself, so that a saved copy keeps the setting."""
    for obj in (*hf.modules(), getattr(hf, "config", None)):
        if isinstance(obj, torch.nn.Dropout):
            obj.p = p
        for name in _DROPOUT_CONFIG_FIELDS:  # float rates kept on modules (Llama attention) and configs
            if isinstance(getattr(obj, name, None), float):
                setattr(obj, name, p)


class LM:
    """A decoder-only or encoder-decoder LM with response-level accessors.

    Args:
        hf: a ``transformers`` causal LM (``AutoModelForCausalLM``) or sequence-to-sequence LM
            (``AutoModelForSeq2SeqLM``, e.g. T5). Put into eval mode here: kdlab turns dropout off
            (eval mode makes logits deterministic; pretrained T5 checkpoints ship with dropout 0.1).
        tokenizer: optional tokenizer, saved beside the weights by :meth:`save`.
    """

    def __init__(self, hf: torch.nn.Module, tokenizer=None):
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        inner = getattr(hf, "module", hf)  # a DDP-wrapped model keeps its config on .module
        self.is_encoder_decoder = bool(getattr(getattr(inner, "config", None), "is_encoder_decoder", False))
        # Not every causal LM accepts `logits_to_keep`; those that do skip the lm_head on the
        # prompt positions, which is most of the work for short responses and large vocabularies.
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(hf.forward).parameters

    @property
    def eos_token_id(self) -> int | tuple[int, ...] | None:
        """The token that ends a response (generation config, else model config), a tuple when the model
        lists several (Llama 3 and most chat models end a turn with any of them), or None for models
        without one (the synthetic world). `sample` accepts each form."""
        inner = getattr(self.hf, "module", self.hf)
        for source in (getattr(inner, "generation_config", None), getattr(inner, "config", None)):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, (list, tuple)):
                eos = tuple(int(e) for e in eos) if len(eos) > 1 else (eos[0] if eos else None)
            if eos is not None:
                return eos if isinstance(eos, tuple) else int(eos)
        return None

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

    @property
    def has_linear_head(self) -> bool:
        """Whether the logits are ``response_hidden @ lm_head_weight.T`` (the lean loss and the exact
        hidden-state targets need it)."""
        try:
            self.lm_head_weight
        except NotImplementedError:
            return False
        return True

    # ------------------------------------------------------------------------------------- forward
    def _inputs(self, prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR) -> dict:
        """Model keyword inputs: decoder-only ``concat(prompt, response[:, :-1])`` with mask and position
        ids; encoder-decoder: the prompt as encoder input, ``concat(start, response[:, :-1])`` as decoder input."""
        B, R = response_ids_BxR.shape
        if R == 0:
            raise ValueError("response_ids_BxR has length 0: there is nothing to score.")
        if prompt_ids_BxP.shape[1] == 0:
            raise ValueError("prompt_ids_BxP has length 0: the first response token needs a context.")
        dev = self.device
        if prompt_mask_BxP is None:
            prompt_mask_BxP = torch.ones_like(prompt_ids_BxP, dtype=torch.bool)
        else:
            prompt_ids_BxP, prompt_mask_BxP = trim_left_padding(*left_pad(prompt_ids_BxP, prompt_mask_BxP))
        if response_mask_BxR is None:
            response_mask_BxR = torch.ones_like(response_ids_BxR, dtype=torch.bool)
        p_ids, p_mask = prompt_ids_BxP.to(dev), prompt_mask_BxP.to(dev).bool()
        r_in, r_mask = response_ids_BxR[:, :-1].to(dev), response_mask_BxR[:, :-1].to(dev).bool()
        if self.is_encoder_decoder:
            start = getattr(getattr(self.hf, "module", self.hf).config, "decoder_start_token_id", None)
            if start is None:
                raise ValueError(f"{type(self.hf).__name__} has no config.decoder_start_token_id: set it "
                                 "(T5 uses its pad token id, 0)")
            start_Bx1 = torch.full((B, 1), int(start), dtype=torch.long, device=dev)
            ones_Bx1 = torch.ones(B, 1, dtype=torch.bool, device=dev)
            return dict(input_ids=p_ids, attention_mask=p_mask, decoder_input_ids=torch.cat([start_Bx1, r_in], 1),
                        decoder_attention_mask=torch.cat([ones_Bx1, r_mask], 1))
        ids, mask = torch.cat([p_ids, r_in], 1), torch.cat([p_mask, r_mask], 1)
        return dict(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask))

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
        R = response_ids_BxR.shape[1]
        inputs = self._inputs(prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR)
        kw = {"logits_to_keep": R} if self._has_logits_to_keep else {}
        logits = self.hf(**inputs, use_cache=False, **kw).logits
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
        R = response_ids_BxR.shape[1]
        inputs = self._inputs(prompt_ids_BxP, prompt_mask_BxP, response_ids_BxR, response_mask_BxR)
        if not self.is_encoder_decoder:
            return self.hf.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, -R:]
        cfg = self.hf.config
        if cfg.model_type not in ("t5", "mt5", "umt5"):
            raise NotImplementedError(f"response_hidden knows how T5-family decoders feed their lm_head, not "
                                      f"{cfg.model_type!r}; use response_logits and a dense loss (loss.lean=false)")
        enc = self.hf.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        hidden = self.hf.get_decoder()(input_ids=inputs["decoder_input_ids"],
                                       attention_mask=inputs["decoder_attention_mask"],
                                       encoder_hidden_states=enc.last_hidden_state,
                                       encoder_attention_mask=inputs["attention_mask"], use_cache=False).last_hidden_state
        # T5 with tied embeddings rescales the decoder output by d_model^-0.5 before its lm_head.
        if getattr(cfg, "scale_decoder_outputs", getattr(cfg, "tie_word_embeddings", False)):
            hidden = hidden * (cfg.d_model ** -0.5)
        return hidden

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
        """Load an LM from a local directory or a hub name: ``AutoModelForSeq2SeqLM`` when its config
        is encoder-decoder (T5), else ``AutoModelForCausalLM``.

        ``dtype=None`` keeps the checkpoint's dtype. ``trust_remote_code`` stays off unless the user
        asks: it runs Python shipped with the checkpoint. The tokenizer is loaded when present.
        A truncated or corrupt ``*.safetensors`` raises :class:`CheckpointError` naming the file.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        path = Path(dir_or_name)
        if path.is_dir():
            check_safetensors(sorted(path.glob("*.safetensors")))
        elif str(dir_or_name).startswith(("/", ".", "~")):
            raise CheckpointError(f"no model directory at {str(dir_or_name)!r}: check the 'hf:' path in the config")
        try:
            config = AutoConfig.from_pretrained(str(dir_or_name), trust_remote_code=trust_remote_code)
        except OSError as e:  # no such directory, no network, or a hub name that does not exist
            raise CheckpointError(
                f"cannot load the model {str(dir_or_name)!r}: {str(e).splitlines()[0]} Give a local model "
                "directory ('hf:/path/to/model'), or where the Hugging Face Hub cannot be reached, download the "
                f"model elsewhere (`hf download {dir_or_name} --local-dir DIR`) and use 'hf:DIR'.") from e
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        hf = auto.from_pretrained(
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
