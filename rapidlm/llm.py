"""`LLM`: the user-facing object. Load once, then generate, stream or chat."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rapidlm.compress.apply import load_with_recipe
from rapidlm.compress.configs import Recipe
from rapidlm.compress.saved import is_compressed_folder, manifest_recipe
from rapidlm.engine.engine import Engine, Prompt
from rapidlm.engine.outputs import RequestOutput, StreamChunk
from rapidlm.engine.sampling import SamplingParams
from rapidlm.errors import ConfigError
from rapidlm.loading.loader import DEFAULT_MODEL, resolve_model
from rapidlm.runtime.device import resolve_device, resolve_dtype, set_threads
from rapidlm.runtime.model_runner import ModelRunner

Message = dict[str, Any]


class LLM:
    """A loaded model ready to generate.

    >>> llm = LLM()  # SmolLM2-135M-Instruct, fastest dtype for this machine
    >>> llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].text

    compile=True compiles the single-sequence decode step with torch.compile at start-up (minutes on a small
    CPU the first time; PyTorch caches the result on disk), for ~1.7x faster batch-1 decoding.

    quantization: a shorthand ("native", "int8", "int4-g32", "int4-g128", "int4-g128-gptq", "int4-g128-awq",
    "w8a8", "kv-int8", joinable with '+'), a recipe file (YAML/JSON) or a rapidlm.compress Recipe/config.
    None runs the checkpoint as loaded (on this CPU: a GGUF's 4/8-bit blocks natively). A folder written by
    `rapidlm compress` carries its own recipe.

    dense_prefill ("auto", "on", "off"): with bf16 activations on a CPU, keep a bf16 copy of the 4-/8-bit
    projection weights (2 bytes a weight) for prompt chunks of 64+ tokens, where the bf16 GEMM is faster than
    the quantized kernels; decode steps still read the quantized weights. "auto": on when the copy is <= 1 GiB.
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        threads: int | None = None,
        compile: bool = False,
        quantization: str | os.PathLike | Recipe | None = None,
        show_progress: bool = False,
        dense_prefill: str = "auto",
    ) -> None:
        set_threads(threads)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if quantization is not None and is_compressed_folder(resolve_model(model)):
            raise ConfigError("this model folder is already compressed; load it without quantization=")
        loaded, recipe, self.quantize_report = load_with_recipe(
            model, quantization, self.dtype, self.device, max_model_len, show_progress
        )
        if loaded.format == "rapidlm":
            recipe = manifest_recipe(loaded.path)
        self.recipe = recipe
        if loaded.tokenizer is None:  # pragma: no cover - load_model always builds one here
            raise RuntimeError("model loaded without a tokenizer")
        self.config = loaded.config
        self.model_path = loaded.path
        self.tokenizer = loaded.tokenizer
        kv_int8 = recipe is not None and recipe.kv_int8
        self.runner = ModelRunner(
            loaded.model,
            loaded.config,
            self.device,
            self.dtype,
            compile=compile,
            kv_int8=kv_int8,
            dense_prefill=dense_prefill,
        )
        self.engine = Engine(self.runner, self.tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ---- plain prompts ----------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one or several prompts (text or token ids), decoded together as one batch."""
        outputs: dict[int, RequestOutput] = {}
        for chunk in self.stream(prompts, sampling_params):
            if chunk.output is not None:
                outputs[chunk.index] = chunk.output
        return [outputs[i] for i in range(len(outputs))]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[StreamChunk]:
        """Yield text deltas as they are decoded; joining a request's deltas gives its final text."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        seqs = self.engine.make_sequences(prompt_list, params)
        for step in self.engine.run(seqs):
            yield from step

    # ---- chat -------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of {'role', 'content'} dicts) or to several."""
        return self.generate(self._chat_prompts(messages), sampling_params)

    def stream_chat(
        self, messages: Sequence[Message], sampling_params: SamplingParams | None = None
    ) -> Iterator[StreamChunk]:
        return self.stream([self.chat_prompt(messages)], sampling_params)

    def _chat_prompts(self, messages: Sequence[Message] | Sequence[Sequence[Message]]) -> list[list[int]]:
        if messages and isinstance(messages[0], dict):
            return [self.chat_prompt(messages)]  # type: ignore[arg-type]
        return [self.chat_prompt(conv) for conv in messages]  # type: ignore[arg-type]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt as token ids
    for i, p in enumerate(prompts):
        if not isinstance(p, str) and not (isinstance(p, list) and all(isinstance(t, int) for t in p)):
            raise TypeError(f"prompts[{i}] must be a string or a list of token ids, got {type(p).__name__}")
    return prompts


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
