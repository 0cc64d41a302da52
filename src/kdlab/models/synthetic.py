"""Tiny Llama configurations and the seeded synthetic oracle of the embedded world.

The oracle is a randomly initialised Llama whose next-token conditionals are sharpened by a logit
scale, so they are peaked but not deterministic (a reasonable stand-in for a trained LM at toy
scale). The scale is folded into the lm_head weight, so the oracle is a plain HF model that saves,
loads and runs anywhere a Llama does.
"""

from __future__ import annotations

import math

import torch

from kdlab.models.lm import LM

__all__ = ["tiny_llama_config", "make_synthetic_oracle", "mean_token_entropy"]


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    **kw,
):
    """A ``transformers.LlamaConfig`` for small experiments.

    Defaults that differ from ``LlamaConfig``'s: SDPA attention, untied input/output embeddings,
    ``intermediate_size = 4 * hidden_size``, and no BOS/EOS/PAD ids (the synthetic world has fixed
    lengths and no special tokens). Anything in ``kw`` overrides (e.g. ``eos_token_id=3``,
    ``num_key_value_heads=2``).
    """
    from transformers import LlamaConfig

    args = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size if intermediate_size is not None else 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    args.update(kw)
    return LlamaConfig(**args)


def make_synthetic_oracle(
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    *,
    seed: int = 0,
    logit_scale: float = 4.0,
    init_std: float = 0.1,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    eos_token_id: int | None = None,
) -> LM:
    """A seeded random Llama with sharpened conditionals (float32, CPU, eval mode).

    ``eos_token_id``: a token that ends a response (None: every response runs to its maximum length). The weights
    do not depend on it: the oracle ends a response wherever its random conditionals put mass on that token.

    Weights are drawn here from a private ``torch.Generator(seed)`` in parameter-name order (not by
    transformers' initialiser, whose scheme may change between versions, and without touching the
    global RNG): matrices ~ N(0, init_std²), norm gains = 1, and the lm_head rows ~ N(0, 1/H) so that,
    after the final RMSNorm (unit RMS hidden state), the raw logits have standard deviation ≈ 1.
    The lm_head is then multiplied by ``logit_scale``:

        p*(y_t | x, y<t) = softmax(logit_scale · W h_t),   W_ij ~ N(0, 1/H),

    so ``logit_scale`` is roughly the standard deviation of the oracle's logits; larger is more
    peaked (use :func:`mean_token_entropy` to pick it). Same arguments -> bitwise identical weights.
    """
    from transformers import AutoModelForCausalLM

    if logit_scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    if init_std <= 0:
        raise ValueError(f"init_std must be > 0, got {init_std}")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is not a token of the vocabulary (0..{vocab_size - 1})")
    cfg = tiny_llama_config(
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings,
        eos_token_id=eos_token_id,
    )
    hf = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(hf.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm gains
            elif name.endswith("lm_head.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (logit_scale / math.sqrt(hidden_size)))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * init_std)
    return LM(hf)


@torch.inference_mode()
def mean_token_entropy(
    lm: LM,
    *,
    num_prompts: int = 64,
    prompt_len: int = 16,
    response_len: int = 32,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Mean per-token entropy (nats) of ``lm``'s conditionals along its own samples.

    H̄ = E_x E_{y~p(·|x)} (1/R) Σ_t H(p(· | x, y<t)), with prompts x uniform over the vocabulary.
    log V is a uniform model; 0 a deterministic one. Used to choose the oracle's ``logit_scale``.
    """
    from kdlab.models.sampling import sample

    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, num_prompts, batch_size):
        n = min(batch_size, num_prompts - start)
        prompts_BxP = torch.randint(0, lm.vocab_size, (n, prompt_len), generator=g)
        s = sample(lm, prompts_BxP, max_new_tokens=response_len, generator=g)
        logp_BxRxV = lm.response_logits(prompts_BxP, None, s.response_ids_BxR).log_softmax(-1)
        ent_BxR = -(logp_BxRxV.exp() * logp_BxRxV).sum(-1)
        total += float(ent_BxR.sum())
        count += ent_BxR.numel()
    return total / count
