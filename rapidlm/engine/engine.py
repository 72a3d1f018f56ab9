"""The step loop: prefill each prompt into its cache row, then decode all live rows together.

Per-token work is kept to what cannot be hoisted: one forward, one sampling call, one device->host copy of
the new ids, and the per-sequence bookkeeping (detokenize, stop checks). Token ids stay on the device
between steps and positions are advanced in place.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from rapidlm.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from rapidlm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StreamChunk
from rapidlm.engine.request import Sequence
from rapidlm.engine.sampling import SamplingParams, SequenceSampler, sample_batch
from rapidlm.errors import PromptTooLongError
from rapidlm.loading.tokenizer import Tokenizer
from rapidlm.runtime.model_runner import ModelRunner

Prompt = str | list[int]


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self._next_id = 0

    @property
    def max_model_len(self) -> int:
        return self.runner.max_seq_len

    def make_sequences(self, prompts: Seq[Prompt], params: Seq[SamplingParams]) -> list[Sequence]:
        """Tokenize and check every prompt before any compute, so a bad one fails the call up front."""
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str):
                ids, text = self.tokenizer.encode(prompt), prompt
            else:
                ids, text = [int(t) for t in prompt], None
            if not ids:
                raise PromptTooLongError(f"prompt {i} is empty: it encodes to no tokens")
            if len(ids) >= self.max_model_len:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens but the context holds {self.max_model_len}, "
                    "leaving no room to generate"
                )
            vocab = self.runner.cfg.vocab_size
            if max(ids) >= vocab or min(ids) < 0:
                raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab})")
            self._next_id += 1
            seqs.append(
                Sequence(
                    request_id=str(self._next_id),
                    index=i,
                    prompt=text,
                    prompt_ids=ids,
                    params=p,
                    sampler=SequenceSampler(p, ids, vocab, self.runner.device),
                    detok=IncrementalDetokenizer(self.tokenizer, ids, p.skip_special_tokens),
                    stops=StopStringMatcher(p.stop),
                    max_len=min(self.max_model_len, len(ids) + p.max_tokens),
                )
            )
        return seqs

    def run(self, seqs: list[Sequence]) -> Iterator[list[StreamChunk]]:
        """Generate for `seqs` as one batch; yield the chunks each step produced."""
        start = time.perf_counter()
        cache = self.runner.allocate(len(seqs), max(s.max_len for s in seqs))
        first: list[int] = []
        for row, seq in enumerate(seqs):
            t = time.perf_counter()
            logits = self.runner.prefill(cache, row, seq.prompt_ids)
            token = int(seq.sampler.sample(logits))
            now = time.perf_counter()
            seq.prefill_time, seq.first_token_time = now - t, now - start
            first.append(token)
        chunks = [self._append(seq, token, start) for seq, token in zip(seqs, first)]
        yield chunks

        live = [s for s in seqs if not s.finished]
        if not live:
            return
        keep = [row for row, s in enumerate(seqs) if not s.finished]
        cache.keep(keep)
        device = self.runner.device
        tokens = torch.tensor([s.output_ids[-1] for s in live], dtype=torch.long, device=device)  # (B,)
        positions = torch.tensor([s.next_position for s in live], dtype=torch.long, device=device)  # (B,)
        kv_len = max(s.next_position for s in live) + 1
        samplers = [s.sampler for s in live]  # rebuilt only when the batch shrinks
        while True:
            logits = self.runner.decode(cache, tokens, positions, kv_len)  # (B, V)
            tokens = sample_batch(logits, samplers)
            chunks = [self._append(s, t, start) for s, t in zip(live, tokens.tolist())]
            yield chunks
            if any(s.finished for s in live):
                keep = [i for i, s in enumerate(live) if not s.finished]
                if not keep:
                    return
                cache.keep(keep)
                live = [live[i] for i in keep]
                samplers = [s.sampler for s in live]
                index = torch.tensor(keep, device=device)
                tokens, positions = tokens[index], positions[index]
                kv_len = max(s.next_position for s in live)
            positions += 1
            kv_len += 1

    def _append(self, seq: Sequence, token: int, start: float) -> StreamChunk:
        """Record one new token (stop checks, detokenization) and return the text that is now safe to stream."""
        seq.append(token, self.tokenizer.eos_token_ids)
        if seq.finished:
            seq.finish_time = time.perf_counter() - start
        return StreamChunk(
            request_id=seq.request_id,
            index=seq.index,
            text=seq.take_delta(),
            token_ids=[token],
            finish_reason=seq.finish_reason,
            output=self.output(seq) if seq.finished else None,
        )

    @staticmethod
    def output(seq: Sequence) -> RequestOutput:
        metrics = RequestMetrics(
            prompt_tokens=len(seq.prompt_ids),
            output_tokens=len(seq.output_ids),
            time_to_first_token_s=seq.first_token_time,
            prefill_time_s=seq.prefill_time,
            decode_time_s=max(0.0, seq.finish_time - seq.first_token_time),
        )
        completion = CompletionOutput(0, seq.text, list(seq.output_ids), seq.finish_reason, seq.stop_reason)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_ids, [completion], seq.finished, metrics)
