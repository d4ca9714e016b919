"""Reference (oracle) implementations of the NLD decoding modes on a transformers model.

Used by ``make_golden.py`` to record golden outputs of the diffusion mode and of linear
self-speculation (LinearSpec), following ``spec/decoding.md`` sections 1-3 literally, at
temperature 0 (argmax), batch size 1, in plain Python loops.

The network is transformers' ``Ministral3ForCausalLM`` (float32, eager attention) and is run
WITHOUT a KV cache: every forward recomputes the whole sequence ``[committed prefix + block]``
under an explicit 4D attention mask:

* prefix rows (queries at positions ``0 .. L-1``) are causal;
* block rows (positions ``L .. L+B-1``) see the whole prefix, and within the block either every
  block position (bidirectional) or only the positions ``<=`` their own (causal).

The logits at the block rows are the block's logits. This equals a cached implementation: the
cache only ever holds the causal K/V of committed tokens, which is exactly what the causal prefix
rows recompute (the K/V of a prefix token do not depend on anything after it).

How the mask reaches transformers (5.x): ``Ministral3Model.forward`` hands ``attention_mask`` to
``masking_utils.create_causal_mask``, which returns a 4D tensor unchanged (“already prepared, or
custom”). The eager attention then ADDS it to the scaled scores, so it must be an additive float
mask: 0 where attention is allowed and ``torch.finfo(float32).min`` elsewhere (the same values
transformers' own eager causal mask uses). A boolean 4D mask would be added as 0/1 by the eager
path and silently ignored as a mask; only the SDPA path accepts booleans. ``make_golden.py``
checks the path: the custom causal mask reproduces the plain forward, and a bidirectional mask
matches the SDPA implementation given the equivalent boolean mask.

Argmax is "the first index of the maximum" (``numpy.argmax``). Confidences are
``softmax(logits)`` over the full vocabulary in float32; the threshold comparison is done in
float32 (``p >= float32(threshold)``), as ``p >= threshold`` does in torch and in JAX when ``p``
is a float32 array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Ministral3ForCausalLM

NEG = torch.finfo(torch.float32).min  # additive "not allowed" value (as transformers' eager mask)


# ---------------------------------------------------------------------------------------------
# The network: one no-cache forward of [prefix + block] with an explicit mask.
# ---------------------------------------------------------------------------------------------


def block_mask(prefix_len: int, block_len: int, bidirectional: bool) -> torch.Tensor:
    """Boolean [T, T] mask (True = query row may attend key column), T = prefix + block."""
    t = prefix_len + block_len
    rows = torch.arange(t)[:, None]
    cols = torch.arange(t)[None, :]
    allowed = cols <= rows  # causal everywhere ...
    if bidirectional:
        # ... except that block rows also see the later block positions.
        allowed = allowed | ((rows >= prefix_len) & (cols >= prefix_len))
    return allowed


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """[T, T] boolean -> [1, 1, T, T] float32 additive mask for the eager attention."""
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.tensor(NEG, dtype=torch.float32))[None, None]


@torch.no_grad()
def forward_logits(
    model: Ministral3ForCausalLM, prefix: list[int], block: list[int], bidirectional: bool
) -> np.ndarray:
    """float32 logits [len(block), V] of ``block`` placed right after ``prefix``.

    Positions are 0 .. T-1 (the prefix starts at position 0). The prefix may be empty (prefill:
    the "block" is then the prompt, run causally).
    """
    ids = torch.tensor([list(prefix) + list(block)], dtype=torch.int64)
    t = ids.shape[1]
    mask = additive_mask(block_mask(len(prefix), len(block), bidirectional))
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=torch.arange(t)[None],
        use_cache=False,
    )
    logits = out.logits[0, len(prefix) :].float().numpy()
    assert logits.shape[0] == len(block)
    return logits


@torch.no_grad()
def draft_logits(
    base: Ministral3ForCausalLM, draft: Ministral3ForCausalLM, prefix: list[int], block: list[int]
) -> np.ndarray:
    """float32 logits [len(block), V] of the bidirectional draft pass.

    With an adapter the no-cache recompute above is NOT equivalent: the cache the draft reads
    holds the prefix K/V written by the base model (verify runs LoRA off), while a recompute
    through the LoRA copy would give the prefix LoRA-shaped K/V. So the prefix goes through
    ``base`` into a KV cache, and only the block goes through ``draft``, reading that cache.
    """
    if draft is base:
        return forward_logits(base, prefix, block, bidirectional=True)
    n = len(prefix)
    cache = base(input_ids=torch.tensor([list(prefix)]), position_ids=torch.arange(n)[None],
                 use_cache=True).past_key_values
    allowed = block_mask(n, len(block), bidirectional=True)[n:]  # block rows: [B, n + B]
    out = draft(input_ids=torch.tensor([list(block)]), attention_mask=additive_mask(allowed),
                position_ids=torch.arange(n, n + len(block))[None], past_key_values=cache,
                use_cache=True)
    return out.logits[0].float().numpy()


def argmax(row: np.ndarray) -> int:
    """First index of the maximum."""
    return int(np.argmax(row))


def softmax_f32(row: np.ndarray) -> np.ndarray:
    """Full-vocabulary softmax in float32 (torch's, as the spec computes it)."""
    return torch.softmax(torch.from_numpy(np.asarray(row, dtype=np.float32)), dim=-1).numpy()


def prefill_seed(model: Ministral3ForCausalLM, prompt: list[int]) -> int:
    """Causal forward over the prompt; the argmax at the last prompt position is the seed."""
    return argmax(forward_logits(model, [], prompt, bidirectional=False)[-1])


def truncate_after_eos(tokens: list[int], eos: int) -> list[int]:
    """Keep everything up to and including the first EOS (all of it if there is none)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else list(tokens)


# ---------------------------------------------------------------------------------------------
# Diagnostics: how close every recorded decision was to flipping (for the fixture README).
# ---------------------------------------------------------------------------------------------


@dataclass
class Margins:
    """Smallest margins seen over all decisions of the runs that shared this object."""

    argmax_gap: float = math.inf  # top-1 minus top-2 logit at every argmax that was used
    threshold_gap: float = math.inf  # |p - threshold| over masked positions, threshold mode
    topk_gap: float = math.inf  # p(k-th chosen) - p(best not chosen), schedule mode
    confidences: list[float] = field(default_factory=list)  # top-1 p of masked positions

    def see_argmax(self, row: np.ndarray) -> None:
        top = np.sort(row)
        self.argmax_gap = min(self.argmax_gap, float(top[-1] - top[-2]))


# ---------------------------------------------------------------------------------------------
# Diffusion mode (block diffusion, "FastDiffuser"), spec/decoding.md section 2.
# ---------------------------------------------------------------------------------------------


@dataclass
class DiffusionResult:
    tokens: list[int]  # emitted tokens, truncated after the first EOS
    num_forwards: int  # denoise steps + commits (prefill not counted)
    steps_per_block_used: list[int]  # denoise forwards of each block that was run


def even_schedule(num_masks: int, steps: int) -> list[int]:
    """k_i = m0 // S + (1 if i < m0 % S else 0): remainder front-loaded."""
    return [num_masks // steps + (1 if i < num_masks % steps else 0) for i in range(steps)]


def eos_done(x: list[int], is_mask: list[bool], eos: int) -> bool:
    """Some position holds (a committed) EOS and no mask lies to its left."""
    for j in range(len(x)):
        if is_mask[j]:
            return False  # a mask comes before any EOS
        if x[j] == eos:
            return True
    return False


def diffusion_generate(
    model: Ministral3ForCausalLM,
    prompt: list[int],
    *,
    block_size: int,
    threshold: float | None,
    steps_per_block: int | None,
    max_new_tokens: int,
    eos_token_id: int,
    mask_token_id: int,
    margins: Margins | None = None,
    mask_by_value: bool = False,
) -> DiffusionResult:
    """Greedy block diffusion; no-cache forwards (see the module docstring).

    Masks are tracked by position: the seed and every committed token are tokens, even when equal
    to the mask id. ``mask_by_value=True`` instead re-derives them as ``x == mask_token_id`` at
    every step (as LLaDA-style code does); it only serves to find the runs where the two
    conventions differ (those that emit the mask id).
    """
    m = margins if margins is not None else Margins()
    if threshold is not None:
        # Threshold mode: the step cap S defaults to the block size (never reached: every step
        # commits at least one of the B-1 masks).
        steps = block_size if steps_per_block is None else steps_per_block
    else:
        assert steps_per_block is not None, "schedule mode needs steps_per_block"
        steps = steps_per_block

    # PREFILL: the seed is the first emitted token.
    prefill = forward_logits(model, [], prompt, bidirectional=False)[-1]
    m.see_argmax(prefill)
    seed = argmax(prefill)
    if seed == eos_token_id:
        return DiffusionResult([seed], 0, [])

    prefix = list(prompt)  # committed tokens (what a KV cache would hold)
    emitted: list[int] = []
    nfe = 0
    steps_used: list[int] = []
    num_blocks = math.ceil(max_new_tokens / block_size)

    for _block in range(num_blocks):
        if seed == eos_token_id:
            # The seed of this block (from the previous commit) is EOS: emit it, stop.
            emitted.append(seed)
            break

        # Block init: x = [seed, MASK * (B-1)]. Masks are tracked by position (a committed token
        # equal to the mask id would stay committed); make_golden.py asserts this never arises.
        x = [seed] + [mask_token_id] * (block_size - 1)
        is_mask = [False] + [True] * (block_size - 1)
        if mask_by_value:  # diagnostic variant only (see the docstring)
            is_mask = [t == mask_token_id for t in x]
        schedule = even_schedule(sum(is_mask), steps) if threshold is None else None

        # Denoise loop.
        step = 0
        while True:
            if mask_by_value:
                is_mask = [t == mask_token_id for t in x]
            if not any(is_mask):
                break  # no masks left
            if eos_done(x, is_mask, eos_token_id):
                break  # a committed EOS with no mask to its left
            if step == steps:
                break  # step budget spent
            logits = forward_logits(model, prefix, x, bidirectional=True)
            nfe += 1
            cand = [argmax(logits[j]) for j in range(block_size)]
            conf = [-math.inf] * block_size
            for j in range(block_size):
                if is_mask[j]:
                    m.see_argmax(logits[j])
                    conf[j] = float(softmax_f32(logits[j])[cand[j]])
                    m.confidences.append(conf[j])
            masked = [j for j in range(block_size) if is_mask[j]]

            if threshold is not None:
                # Every masked position with p >= threshold (float32 compare) ...
                thr32 = float(np.float32(threshold))
                chosen = [j for j in masked if conf[j] >= thr32]
                for j in masked:
                    m.threshold_gap = min(m.threshold_gap, abs(conf[j] - thr32))
                # ... and always the single most confident one (lowest index on ties).
                best = max(masked, key=lambda j: (conf[j], -j))
                if best not in chosen:
                    chosen.append(best)
            else:
                # The k_i most confident masked positions (ties: lower position first).
                k = schedule[step]
                ranked = sorted(masked, key=lambda j: (-conf[j], j))
                chosen = ranked[:k]
                if 0 < k < len(ranked):
                    m.topk_gap = min(m.topk_gap, conf[ranked[k - 1]] - conf[ranked[k]])

            for j in chosen:  # commit: never re-masked afterwards
                x[j] = cand[j]
                is_mask[j] = False
            step += 1
        steps_used.append(step)

        # Commit: one causal forward over the finished block; its last position gives the seed.
        logits = forward_logits(model, prefix, x, bidirectional=False)
        nfe += 1
        m.see_argmax(logits[-1])
        seed = argmax(logits[-1])
        prefix += x
        emitted += x
        if eos_token_id in x:
            break  # stop after a block that contains EOS

    return DiffusionResult(truncate_after_eos(emitted, eos_token_id), nfe, steps_used)


# ---------------------------------------------------------------------------------------------
# Linear self-speculation ("LinearSpec"), spec/decoding.md section 3.
# ---------------------------------------------------------------------------------------------


@dataclass
class SelfSpecResult:
    tokens: list[int]  # emitted tokens (prefill seed included), EOS- and budget-truncated
    num_forwards: int  # 2 per cycle (prefill not counted)
    accepted: list[int]  # accepted draft count c of every cycle


def self_spec_generate(
    base: Ministral3ForCausalLM,
    draft: Ministral3ForCausalLM,
    prompt: list[int],
    *,
    block_size: int,
    max_new_tokens: int,
    eos_token_id: int,
    mask_token_id: int,
    margins: Margins | None = None,
) -> SelfSpecResult:
    """Greedy LinearSpec. ``draft`` is ``base`` (lora off) or the LoRA-merged copy (lora on)."""
    m = margins if margins is not None else Margins()
    prefill = forward_logits(base, [], prompt, bidirectional=False)[-1]
    m.see_argmax(prefill)
    seed = argmax(prefill)
    out = [seed]
    if seed == eos_token_id:
        return SelfSpecResult(out, 0, [])
    if len(out) >= max_new_tokens:
        return SelfSpecResult(out[:max_new_tokens], 0, [])

    prefix = list(prompt)
    nfe = 0
    accepted: list[int] = []
    while True:
        # DRAFT: one bidirectional pass over [seed, MASK * (B-1)]; d_j = argmax at j (no shift).
        x = [seed] + [mask_token_id] * (block_size - 1)
        dlog = draft_logits(base, draft, prefix, x)
        d = [None] + [argmax(dlog[j]) for j in range(1, block_size)]  # d[j] = d_j, j >= 1
        for j in range(1, block_size):
            m.see_argmax(dlog[j])

        # VERIFY: causal pass of [seed, d_1 .. d_{B-1}] with the base model; a_j predicts j+1.
        block = [seed] + d[1:]
        vlog = forward_logits(base, prefix, block, bidirectional=False)
        a = [argmax(vlog[j]) for j in range(block_size)]
        nfe += 2

        # ACCEPT: leading run of a_j == d_{j+1}, j = 0 .. B-2.
        c = 0
        while c < block_size - 1 and a[c] == d[c + 1]:
            c += 1
        accepted.append(c)
        for j in range(c + 1):
            m.see_argmax(vlog[j])

        # Emit a_0 .. a_c (c drafts + 1 bonus); commit seed + c drafts; a_c is the next seed.
        out += a[: c + 1]
        prefix += block[: c + 1]
        seed = a[c]

        if eos_token_id in out:
            return SelfSpecResult(truncate_after_eos(out, eos_token_id), nfe, accepted)
        if len(out) >= max_new_tokens:
            return SelfSpecResult(out[:max_new_tokens], nfe, accepted)


# ---------------------------------------------------------------------------------------------
# Greedy AR (no cache), for the self-spec == AR self-check.
# ---------------------------------------------------------------------------------------------


def ar_generate(
    model: Ministral3ForCausalLM, prompt: list[int], *, max_new_tokens: int, eos_token_id: int
) -> list[int]:
    """Greedy AR: stop at EOS (kept) or after max_new_tokens tokens (prefill seed included)."""
    seq = list(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        tok = argmax(forward_logits(model, [], seq, bidirectional=False)[-1])
        out.append(tok)
        seq.append(tok)
        if tok == eos_token_id:
            break
    return out
