"""Sampling backends for the online regimes: the built-in `sample` (transformers `generate`) or vLLM.

Selected by ``stage2.sampling.backend`` (``builtin`` | ``vllm``). Both are callables with the
signature of :func:`kdlab.models.sampling.sample` (``(lm, prompt_ids_BxP, prompt_mask_BxP, *,
max_new_tokens, temperature, top_k, top_p, eos_token_id, generator, return_logits) -> Samples``), so
the data sources call whichever the config picked.

The vLLM backend runs one `vllm.LLM` engine per sampler model, on the GPU beside training: the teacher
(loaded from its stage-1 directory, fixed) and, for on-policy regimes, the student (loaded from the
student init, then given the current training weights before every sampling call, as TRL's colocated
vLLM mode does). It follows vLLM's documented offline API: prompts as ``{"prompt_token_ids": [...]}``,
``SamplingParams(max_tokens, temperature, top_k, top_p, seed, logprobs=0, ignore_eos, stop_token_ids,
detokenize=False)``, ``LLM.generate(prompts, sampling_params, use_tqdm=False)`` returning
``RequestOutput.outputs[0].token_ids`` and per-token ``logprobs``. The engine is created with
``logprobs_mode="processed_logprobs"`` so the reported log-probs are those of the distribution sampled
from (after temperature / top-k / top-p), as `Samples.logprobs_BxR` defines them.

What differs from the built-in sampler: vLLM returns no full-vocabulary logits, so online-teacher
batches get no free targets (``return_logits`` gives ``logits_BxRxV=None`` and the training step runs a
teacher forward instead); samples are reproducible from (seed, step) through per-request seeds, but
are not the same tokens the built-in sampler draws. It has not been run in this repository's CPU test
suite (there is no GPU there); the suite checks the glue against a stand-in with vLLM's interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from kdlab.models.lm import LM, left_pad
from kdlab.models.sampling import Samples, eos_ids, sample

BACKENDS = ("builtin", "vllm")


class VLLMUnavailable(RuntimeError):
    """vLLM was asked for but cannot run here (a RuntimeError: the CLI reports it as an error line)."""


def import_vllm():
    """The vllm module, or a `VLLMUnavailable` error that says what to do."""
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailable(
            "stage2.sampling.backend='vllm' needs vLLM, which is not installed in this environment "
            f"({err}). vLLM runs on Linux with CUDA GPUs: `pip install 'kdlab[vllm]'` in a GPU environment, "
            "or set stage2.sampling.backend=builtin (transformers generate; works everywhere).") from None
    return vllm


class VLLMBackend:
    """Samples the teacher and the student with vLLM engines; call it like `kdlab.models.sampling.sample`.

    Args:
        teacher: the teacher LM object the data sources sample from (recognised by identity).
        teacher_dir: its saved directory (`LM.save` / `save_pretrained`), loaded by vLLM.
        student_dir: the student init's directory; the on-policy engine starts from it and is given the
            current student weights before every call. None: no student engine (teacher-only regimes).
        gpu_memory_utilization: fraction of GPU memory *each* engine may take (KV cache included); the
            rest is left to training.
        seed: engine seed (sampling itself is seeded per call from the data source's generator).
        engine_kwargs: more `vllm.LLM(...)` arguments (dtype, max_model_len, enforce_eager, ...).
    """

    def __init__(self, teacher: LM, teacher_dir: str | Path, student_dir: str | Path | None = None, *,
                 gpu_memory_utilization: float = 0.3, seed: int = 0, **engine_kwargs):
        self.vllm = import_vllm()
        if not torch.cuda.is_available():
            raise VLLMUnavailable("stage2.sampling.backend='vllm' needs a CUDA GPU and none is visible; "
                                  "use stage2.sampling.backend=builtin on this machine")
        self.teacher = teacher
        self.dirs = {"teacher": Path(teacher_dir), "student": Path(student_dir) if student_dir else None}
        self.engine_kwargs = dict(gpu_memory_utilization=gpu_memory_utilization, seed=seed, **engine_kwargs)
        self.engines: dict[str, object] = {}

    def _engine(self, role: str):
        if role not in self.engines:
            path = self.dirs[role]
            if path is None:
                raise ValueError("the vLLM backend has no student engine (student_dir=None) for on-policy sampling")
            has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
            self.engines[role] = self.vllm.LLM(
                model=str(path),
                # The synthetic world's models have no tokenizer: token ids in, token ids out.
                skip_tokenizer_init=not has_tokenizer,
                # In this process, beside training (as TRL's colocate mode): no separate engine process.
                distributed_executor_backend="external_launcher",
                logprobs_mode="processed_logprobs",
                enable_prefix_caching=False,  # the student's weights change between calls
                **self.engine_kwargs,
            )
        return self.engines[role]

    @torch.no_grad()
    def sync_weights(self, lm: LM) -> None:
        """Give the student engine the training model's current weights (colocated, same GPU)."""
        engine = self._engine("student")
        # The path TRL's colocate mode uses to reach the in-process model runner (vLLM v1 engine).
        runner_model = engine.llm_engine.model_executor.driver_worker.model_runner.model
        runner_model.load_weights(((name, p.detach()) for name, p in lm.hf.named_parameters()))
        engine.reset_prefix_cache()

    @torch.no_grad()
    def __call__(self, lm: LM, prompt_ids_BxP: Tensor, prompt_mask_BxP: Tensor | None = None, *,
                 max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | tuple[int, ...] | None = None,
                 generator: torch.Generator | None = None, return_logits: bool = False,
                 row_seeds: Tensor | None = None) -> Samples:
        role = "teacher" if lm is self.teacher else "student"
        if role == "student":
            self.sync_weights(lm)
        engine = self._engine(role)
        if prompt_mask_BxP is None:
            prompt_mask_BxP = torch.ones_like(prompt_ids_BxP, dtype=torch.bool)
        ids, mask = left_pad(prompt_ids_BxP.cpu(), prompt_mask_BxP.cpu().bool())
        B = ids.shape[0]
        prompts = [{"prompt_token_ids": ids[b][mask[b]].tolist()} for b in range(B)]
        # One seed per request: the caller's per-row seeds (a row samples the same whichever rank asks),
        # else drawn from the source's generator; reproducible from (seed, step) either way.
        if row_seeds is not None:
            seeds = (row_seeds.cpu() % (2**31 - 1)).tolist()
        else:
            seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator).tolist()
        eos = eos_ids(eos_token_id)
        options = dict(max_tokens=max_new_tokens, temperature=temperature, logprobs=0, detokenize=False,
                       ignore_eos=not eos, stop_token_ids=list(eos) or None)
        if top_k is not None:
            options["top_k"] = top_k
        if top_p is not None:
            options["top_p"] = top_p
        params = [self.vllm.SamplingParams(seed=s, **options) for s in seeds]
        outputs = engine.generate(prompts, params, use_tqdm=False)
        return samples_from_outputs(outputs, max_new_tokens, eos_token_id, lm.device)


def samples_from_outputs(outputs, max_new_tokens: int, eos_token_id: int | tuple[int, ...] | None,
                         device) -> Samples:
    """vLLM `RequestOutput`s -> `Samples` (right-padded with the first EOS to ``max_new_tokens``; mask True
    through the EOS)."""
    B, R = len(outputs), max_new_tokens
    eos = eos_ids(eos_token_id)
    pad = eos[0] if eos else 0
    ids = torch.full((B, R), pad, dtype=torch.long)
    mask = torch.zeros(B, R, dtype=torch.bool)
    logp = torch.zeros(B, R, dtype=torch.float32)
    for b, out in enumerate(outputs):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)[:R]
        ids[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[b, :len(tokens)] = True
        for t, (tok, entry) in enumerate(zip(tokens, completion.logprobs or [])):
            logp[b, t] = float(entry[tok].logprob)  # {token_id: Logprob}; the sampled token is always there
    dev = torch.device(device)
    return Samples(ids.to(dev), mask.to(dev), logp.to(dev), None)


def check_backend(backend: str) -> None:
    """Fail before any work when the configured backend cannot run here."""
    if backend == "vllm":
        import_vllm()


def make_sampler(backend: str, *, teacher: LM | None = None, teacher_dir: str | Path | None = None,
                 student_dir: str | Path | None = None, gpu_memory_utilization: float = 0.3,
                 seed: int = 0) -> Callable[..., Samples]:
    """The sampler callable for ``stage2.sampling.backend``."""
    if backend == "builtin":
        return sample
    if backend == "vllm":
        if teacher is not None and teacher.is_encoder_decoder:
            raise ValueError("stage2.sampling.backend='vllm' serves decoder-only models; this world's models are "
                             "encoder-decoder (T5): use stage2.sampling.backend='builtin'")
        return VLLMBackend(teacher, teacher_dir, student_dir, gpu_memory_utilization=gpu_memory_utilization,
                           seed=seed)
    raise ValueError(f"stage2.sampling.backend={backend!r}; allowed: {', '.join(BACKENDS)}")
