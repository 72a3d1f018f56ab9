"""Tokenizers (from GGUF metadata or an HF folder) and chat templates rendered in a sandboxed Jinja.

The fast `tokenizers` library does the work; this module only builds it from the checkpoint and adds what a
generation engine needs: BOS/EOS ids and the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from rapidlm.errors import ModelFormatError, UnsupportedArchitectureError

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) -> the pre-tokenizer that splits text the same way.
_GPT2_BYTELEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


GGUF_PRE_TOKENIZERS: dict[str, Any] = {
    "default": lambda: _GPT2_BYTELEVEL,
    "gpt-2": lambda: _GPT2_BYTELEVEL,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_BYTELEVEL]),
    "llama-bpe": lambda: _regex_then_bytes(_LLAMA3_REGEX),
    "qwen2": lambda: _regex_then_bytes(_QWEN2_REGEX),
}


class Tokenizer:
    """Text <-> token ids, special tokens, and the model's chat template."""

    def __init__(
        self,
        backend: Backend,
        eos_token_ids: Sequence[int],
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token_ids = frozenset(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self._compiled_template: Any = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's template in an immutable sandbox (templates ship with
        downloaded checkpoints, so they are untrusted code)."""
        if not self.chat_template:
            raise ModelFormatError("this model has no chat template; use generate() with a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if self._compiled_template is None:
            self._compiled_template = _sandbox().from_string(self.chat_template)
        return self._compiled_template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF") -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise ModelFormatError(f"{source}: GGUF metadata has no tokenizer (tokenizer.ggml.model)")
        if kind != "gpt2":
            raise UnsupportedArchitectureError(
                f"{source}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE)"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise UnsupportedArchitectureError(
                f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(GGUF_PRE_TOKENIZERS)})"
            )
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        added = [
            AddedToken(tok, special=(t == _CONTROL), normalized=False)
            for tok, t in zip(tokens, types)
            if t in (_CONTROL, _USER_DEFINED)
        ]
        backend.add_tokens(added)  # matched whole in text, e.g. "<|im_start|>" in a rendered chat template

        def token(key: str) -> tuple[int | None, str | None]:
            idx = meta.get(key)
            return (None, None) if idx is None or idx >= len(tokens) else (int(idx), tokens[int(idx)])

        bos_id, bos = token("tokenizer.ggml.bos_token_id")
        eos_id, eos = token("tokenizer.ggml.eos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            )
        eos_ids = {i for i in (eos_id, token("tokenizer.ggml.eot_token_id")[0]) if i is not None}
        return cls(backend, eos_ids, bos, eos, meta.get("tokenizer.chat_template"))

    def save(self, folder: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json: what from_hf_folder reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self.backend.to_str(), encoding="utf-8")
        tcfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1), encoding="utf-8")
        gen = {"eos_token_id": sorted(self.eos_token_ids)}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=1), encoding="utf-8")

    @classmethod
    def from_hf_folder(cls, folder: Path, config: dict[str, Any] | None = None) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(f"{folder} has no tokenizer.json (only fast tokenizers are supported)")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:
            raise ModelFormatError(f"{path} is not a valid tokenizer file: {exc}") from exc
        tcfg = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()

        def content(tok: Any) -> str | None:
            return tok.get("content") if isinstance(tok, dict) else tok

        bos, eos = content(tcfg.get("bos_token")), content(tcfg.get("eos_token"))
        eos_ids: set[int] = set()
        for source in (gen.get("eos_token_id"), (config or {}).get("eos_token_id")):
            if source is not None:
                eos_ids.update(source if isinstance(source, list) else [source])
        if eos is not None and backend.token_to_id(eos) is not None:
            eos_ids.add(backend.token_to_id(eos))
        return cls(backend, eos_ids, bos, eos, template)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _raise(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _sandbox() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    return env
