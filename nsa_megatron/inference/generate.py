"""Generation with an NSA GPTModel: (chunked) prefill into the KV cache, then batched decoding.

    gen = NSAGenerator(model, batch=len(prompts), capacity=max_prompt + max_new_tokens)
    out = gen.generate(prompts, max_new_tokens=64, top_p=0.9, temperature=0.8, seed=0)

The model is a Megatron ``GPTModel`` from ``nsa_megatron.model.gpt_model_provider``
(tensor/pipeline/context parallel size 1: load a TP>1 checkpoint into a TP=1 model, which
``dist_checkpointing`` reshards). Every decoder layer's attention is temporarily replaced by
a cache-aware wrapper (``layers.py``); embedding, norms, MLP/MoE and the output layer run
unchanged. Steps:

* prefill: prompts in chunks of ``prefill_chunk`` tokens; the first chunk of every prompt
  runs the training path (``nsa_attention`` on the pack), later chunks attend to the cache;
* decode: one token per sequence per step, all sequences together (different lengths);
  ``decode_attention`` (reference on CPU, Triton kernels on GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .kv_cache import StepPlan
from .layers import MegatronRope, StepContext, build_layer_caches, cached_attention, resolve_backend_for

__all__ = ["NSAGenerator", "sample_next"]


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens from logits [B, V]: greedy for temperature 0, else nucleus (top-p) sampling.

    Returns int64 [B].
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # the smallest prefix reaching top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    choice = torch.multinomial(sorted_p.cpu(), 1, generator=generator).to(order.device)
    return order.gather(-1, choice).squeeze(-1)


class NSAGenerator:
    """KV-cached inference for a batch of ``batch`` sequences of up to ``capacity`` tokens.

    Args:
        model: GPTModel with NSA (and optionally ``full``) layers, in eval mode.
        batch: sequences held by the cache.
        capacity: tokens per sequence (prompt + generated).
        backend: cache-path backend override ("reference" | "triton" | "auto"); None: the
            model's ``nsa_backend``.
        prefill_chunk: longest prompt piece run in one step.
        cache_dtype: dtype of the cached K/V (default: the model's parameter dtype).
    """

    def __init__(self, model, batch: int, capacity: int, *, backend: Optional[str] = None,
                 prefill_chunk: int = 4096, cache_dtype: Optional[torch.dtype] = None):
        if batch < 1 or capacity < 1 or prefill_chunk < 1:
            raise ValueError(f"batch, capacity and prefill_chunk must be >= 1, got {batch}, {capacity}, {prefill_chunk}")
        while hasattr(model, "module"):  # DDP / Float16Module wrappers
            model = model.module
        cfg = model.config
        if cfg.tensor_model_parallel_size != 1 or cfg.pipeline_model_parallel_size != 1:
            raise ValueError("model: generation runs at tensor/pipeline parallel size 1 (reshard the checkpoint)")
        self.model, self.config = model, cfg
        self.batch, self.capacity, self.prefill_chunk = batch, capacity, prefill_chunk
        param = next(model.parameters())
        self.device = param.device
        rope = MegatronRope(model.rotary_pos_emb, capacity, cfg) if hasattr(model, "rotary_pos_emb") else None
        self.ctx = StepContext(rope, resolve_backend_for(cfg.nsa_backend, backend, self.device))
        self.layers = list(model.decoder.layers)
        self.wrappers = build_layer_caches(self.layers, batch, capacity, self.ctx, cache_dtype or param.dtype,
                                           self.device)
        self.lengths = [0] * batch

    @property
    def layer_caches(self) -> list:
        """The per-layer caches (NSALayerCache or DenseLayerCache), decoder order."""
        return [w.cache for w in self.wrappers]

    @torch.no_grad()
    def step(self, seqs: Sequence[int], tokens: Sequence[torch.Tensor], logits_of: str = "last") -> torch.Tensor:
        """Append ``tokens[i]`` (int64 [c_i]) to sequence ``seqs[i]`` and run the model once.

        Args:
            logits_of: "last" (one row per sequence) or "all" (every token of the step).
        Returns:
            float logits [N, V] ("last") or [T, V] ("all").
        """
        if len(seqs) != len(tokens):
            raise ValueError(f"seqs and tokens must have the same length, got {len(seqs)}, {len(tokens)}")
        if logits_of not in ("last", "all"):
            raise ValueError(f"logits_of must be 'last' or 'all', got {logits_of!r}")
        for b in seqs:
            if not 0 <= b < self.batch:
                raise ValueError(f"seqs: sequence {b} is outside the cache batch {self.batch}")
        counts = [int(t.numel()) for t in tokens]
        starts = [self.lengths[b] for b in seqs]
        if any(a + c > self.capacity for a, c in zip(starts, counts)):
            raise ValueError(f"tokens: a sequence would exceed the cache capacity {self.capacity}")
        hp = self.wrappers_hp()
        plan = StepPlan(list(seqs), starts, counts, hp[0], hp[1], self.device)
        self.ctx.plan = plan
        lengths = list(self.lengths)
        for b, e in zip(seqs, plan.ends):
            lengths[b] = e
        self.ctx.lengths = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        ids = torch.cat([t.reshape(-1) for t in tokens]).to(self.device, torch.int64)[None]
        hidden = self.model.embedding(input_ids=ids, position_ids=plan.tok_pos[None])  # [T, 1, h]
        with cached_attention(self.layers, self.wrappers):
            hidden = self.model.decoder(hidden_states=hidden, attention_mask=None)
        self.lengths = lengths
        if logits_of == "last":
            hidden = hidden[torch.tensor(plan.cu_host[1:], device=self.device) - 1]
        weight = self.model.shared_embedding_or_output_weight() if self.model.share_embeddings_and_output_weights else None
        logits, _ = self.model.output_layer(hidden, weight=weight)
        return logits.squeeze(1).float()

    def wrappers_hp(self) -> tuple[int, int]:
        """(l, d) of the NSA layers (all layers share them); (1, 1) for a model without NSA."""
        for w in self.wrappers:
            if hasattr(w, "hp"):
                return w.hp["cmp_block"], w.hp["cmp_stride"]
        return 1, 1

    def reset(self) -> None:
        """Forget every sequence (cache contents are overwritten by the next steps)."""
        self.lengths = [0] * self.batch

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run ``prompts[b]`` into sequence b of an empty cache, ``prefill_chunk`` tokens per step.

        Returns:
            logits [B, V] of each prompt's last token.
        """
        if len(prompts) != self.batch or any(len(p) < 1 for p in prompts):
            raise ValueError(f"prompts: need {self.batch} non-empty prompts, got {[len(p) for p in prompts]}")
        self.reset()
        last = [None] * self.batch
        chunk, offset = self.prefill_chunk, 0
        while any(offset < len(p) for p in prompts):
            seqs = [b for b, p in enumerate(prompts) if offset < len(p)]
            toks = [torch.as_tensor(list(prompts[b][offset:offset + chunk]), dtype=torch.int64) for b in seqs]
            logits = self.step(seqs, toks)
            for i, b in enumerate(seqs):
                if offset + chunk >= len(prompts[b]):
                    last[b] = logits[i]
            offset += chunk
        return torch.stack(last)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: append tokens int64 [B] (one per sequence); returns logits [B, V]."""
        if tokens.shape != (self.batch,):
            raise ValueError(f"tokens must be [{self.batch}], got {tuple(tokens.shape)}")
        return self.step(list(range(self.batch)), list(tokens.reshape(-1, 1)))

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, eos_id: Optional[int] = None, seed: int = 0) -> list[list[int]]:
        """Greedy (temperature 0) or top-p sampling after a chunked prefill.

        Returns:
            the generated tokens of each prompt (stopping after ``eos_id``, which is kept).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max(len(p) for p in prompts) + max_new_tokens > self.capacity:
            raise ValueError(f"max_new_tokens: prompt + {max_new_tokens} tokens exceed capacity {self.capacity}")
        gen = torch.Generator().manual_seed(seed)
        out: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens == 0:
            return out
        logits = self.prefill(prompts)
        done = [False] * self.batch
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_p=top_p, generator=gen)
            for b, tok in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(tok)
                    done[b] = eos_id is not None and tok == eos_id
            if all(done) or step == max_new_tokens - 1:
                break
            logits = self.decode(nxt)
        return out
