"""Text generation in small pieces: prefill, decode one token, sample, and the loop.

``generate_stream`` yields every step as it happens (token, time, cache size) for widgets and
progress bars; ``generate`` runs it to the end and returns the tokens with the timings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .caches import STRATEGIES, strategy
from .caches.registry import parameters
from .compiling import compiled_decoding
from .models import CausalLM, check_token_ids
from .sampling import sample
from .speculative import DraftModel, PromptLookup, Sampling, check_draft, speculate
from .timing import Stopwatch, tokens_per_s


@dataclass
class Step:
    """One generated token per sequence, as ``generate_stream`` yields it."""

    index: int  # 0 is the token that the prefill produced
    tokens: Tensor  # (B,) the new token of every sequence
    seconds: float  # wall time of this step (the prefill for index 0)
    seq_len: int  # tokens in each sequence after this step
    cache_tokens: int  # tokens held by the cache of each layer
    cache_nbytes: int  # bytes held by the caches of all layers
    # speculative decoding: a round's first token carries its round's drafts checked and kept
    round_start: bool = False
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Speculation:
    """What the drafts of a speculative run achieved (``generate(..., draft=...)``)."""

    rounds: int  # forward passes of the model after the prefill
    drafted: int  # draft tokens it checked
    accepted: int  # of them kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Tokens committed per forward pass of the model: the accepted drafts and its own."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else float("nan")


@dataclass
class GenerationResult:
    tokens: Tensor  # (B, T): the prompt (left-padded if prompts differ) and the new tokens
    prefill_time: float  # seconds for the prompt's forward pass (it also gives the first token)
    step_times: list[float] = field(default_factory=list)  # seconds per decode step after that
    cache: str = "none"
    pad: Tensor | None = None  # (B,) padding before each row's prompt (prompts of many lengths)
    prompt_len: int = 0  # columns of ``tokens`` that hold the (padded) prompts
    eos_id: int | None = None
    speculation: Speculation | None = None  # with a draft: its rounds, drafts and acceptance

    @property
    def sequences(self) -> list[Tensor]:
        """Each row as a 1-D tensor: its own prompt (no padding) and its new tokens, up to and
        including its first ``eos_id``."""
        rows = []
        for b, row in enumerate(self.tokens):
            start = 0 if self.pad is None else int(self.pad[b])
            end = row.shape[0]
            if self.eos_id is not None:
                hits = (row[self.prompt_len :] == self.eos_id).nonzero()
                if len(hits):
                    end = self.prompt_len + int(hits[0]) + 1
            rows.append(row[start:end])
        return rows

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per sequence over the decode steps (the prefill excluded)."""
        return tokens_per_s(self.step_times)


def pad_prompts(prompts: list[Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor | None]:
    """Stack 1-D prompts of different lengths into ``(B, T)`` ids, each padded on the left with
    ``pad_id`` to the longest, and say how much padding each row got (``(B,)``, None if all the
    prompts have the same length). Left, so that every row's next token is in the last column."""
    if not prompts:
        raise ValueError("the list of prompts is empty: pass at least one 1-D tensor of ids")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor):
            raise TypeError(f"token ids must be a torch tensor (or a list of 1-D tensors, one "
                            f"per prompt), got a list of {type(p).__name__}; use "
                            "torch.tensor([ids]) for one prompt")
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a 1-D tensor of token ids with at least one "
                             f"token, got shape {tuple(p.shape)}; e.g. "
                             "torch.tensor(tok.encode(text))")
    lengths = torch.tensor([p.numel() for p in prompts], device=prompts[0].device)
    T = int(lengths.max())
    idx = prompts[0].new_full((len(prompts), T), pad_id)
    for b, p in enumerate(prompts):
        idx[b, T - p.numel() :] = p
    pad = T - lengths  # (B,)
    return idx, (pad if bool(pad.any()) else None)


def prefill(model: CausalLM, idx: Tensor) -> Tensor:
    """Run the prompt ``(B, T)`` once, filling the caches; return the next-token logits.

    A cache that recomputes a window sees only the prompt's last ``window`` tokens; one that
    takes one token per call once full (attention sinks, eviction) gets a first chunk of
    ``capacity`` tokens, then one token at a time. The ids are checked here, once, not in the
    forwards: a compiled forward would split its graph at the check."""
    check_token_ids(idx, model.cfg.vocab_size)
    model.reset_kv_cache()
    cache = model.caches[0]
    traits = cache.traits
    if traits.recomputes_window:
        idx = idx[:, -cache.window:]
    first = cache.capacity if traits.one_token_when_full else None
    if first is None or idx.shape[1] <= first:
        return model(idx, use_cache=True, last_only=True, check_ids=False)[:, -1, :]  # (B, vocab)
    logits = model(idx[:, :first], use_cache=True, last_only=True, check_ids=False)
    for t in range(first, idx.shape[1]):
        logits = model(idx[:, t : t + 1], use_cache=True, last_only=True, check_ids=False)
    return logits[:, -1, :]


def decode_one(model: CausalLM, seq: Tensor) -> Tensor:
    """Logits ``(B, vocab)`` for the token after ``seq``: feed only the newest token when the
    caches remember the rest, else recompute the whole (cropped) sequence. The forward skips the
    id range check: ``prefill`` checked the prompt and later tokens come from the model's own
    vocabulary."""
    cache = model.caches[0]
    traits = cache.traits
    if not traits.keeps_tokens:  # nothing cached: recompute
        model.reset_kv_cache()
        span = cache.window if traits.recomputes_window else None  # the last window only
        if span is None and model.hard_context:  # GPT-2 sees at most its last context_length
            span = model.cfg.context_length
        if span is not None:
            seq = seq[:, -span:]
        return model(seq, use_cache=True, last_only=True, check_ids=False)[:, -1, :]
    return model(seq[:, -1:], use_cache=True, last_only=True, check_ids=False)[:, -1, :]


def _validate(model: CausalLM, idx: Tensor, max_new_tokens: int, cache: str | None,
              temperature: float, top_k: int | None, pad: Tensor | None = None) -> str:
    name = "none" if cache is None else cache
    try:
        cls = strategy(name)
    except ValueError:
        raise ValueError(f"unknown cache {cache!r}; choose None or one of "
                         f"{[n for n in STRATEGIES if n != 'none']}") from None
    check_token_ids(idx, model.cfg.vocab_size)
    if pad is not None and not cls.traits.takes_padding:
        takers = [n for n, c in STRATEGIES.items() if c.traits.takes_padding]
        raise ValueError(
            f"prompts of different lengths work with caches {takers} (None for 'none'), not "
            f"{name!r}: its slots hold one position per slot for the whole batch. Generate the "
            "prompts one at a time, or serve them with kvlib.Engine (a paged cache)")
    if pad is not None and model.hard_context and not cls.traits.keeps_tokens \
            and idx.shape[1] + max_new_tokens > model.cfg.context_length:
        raise ValueError(
            f"the padded batch needs {idx.shape[1] + max_new_tokens} positions but GPT-2 has "
            f"{model.cfg.context_length}: ask for fewer new tokens or generate one at a time")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if model.hard_context:
        _check_hard_context(idx.shape[1], max_new_tokens, model.cfg.context_length,
                            cls.traits.keeps_tokens)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive number of tokens (or None), got {top_k}")
    return name


def _check_hard_context(T: int, max_new_tokens: int, ctx: int, keeps_tokens: bool) -> None:
    """GPT-2's learned positions end at ``ctx``: a prompt, or a run whose cache keeps its tokens
    (so its positions only grow), cannot go past them. (A RoPE model can; it warns once instead,
    see ``CausalLM.check_positions``.)"""
    if T > ctx:
        raise ValueError(f"the prompt has {T} tokens but the model's context is {ctx}: "
                         f"keep the last {ctx} tokens, e.g. idx[:, -{ctx}:]")
    if keeps_tokens and T + max_new_tokens > ctx:
        raise ValueError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} "
            f"tokens, but GPT-2 has {ctx} learned positions and a cache cannot go past them: "
            f"ask for at most {ctx - T} new tokens, or use cache=None, which recomputes over the "
            f"last {ctx} tokens"
        )


@torch.inference_mode()  # like no_grad, minus autograd's per-tensor bookkeeping
def generate_stream(model: CausalLM, idx: Tensor | list[Tensor], max_new_tokens: int,
                    cache: str | None = None, window: int | None = None,
                    temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                    eos_id: int | None = None, draft: CausalLM | str | None = None,
                    draft_tokens: int = 4, **cache_options) -> Iterator[Step]:
    """Yield a ``Step`` for every new token; arguments as for ``generate``."""
    if draft is not None:  # speculative decoding: chapter 12
        yield from speculative_stream(model, idx, max_new_tokens, cache, window, temperature,
                                      top_k, seed, eos_id, draft, draft_tokens, **cache_options)
        return
    pad = None
    if isinstance(idx, (list, tuple)):
        idx, pad = pad_prompts(list(idx))
    name = _validate(model, idx, max_new_tokens, cache, temperature, top_k, pad)
    model.set_kv_cache(name, max_len=idx.shape[1] + max_new_tokens, window=window,
                       **cache_options)
    model.set_padding(pad)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    B, T = idx.shape
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    seq = idx.new_empty(B, T + max_new_tokens)  # prompt + new tokens, written in place (no cat)
    seq[:, :T] = idx
    for i in range(max_new_tokens):
        with Stopwatch(idx.device) as sw:
            logits = prefill(model, idx) if i == 0 else decode_one(model, seq[:, : T + i])
            nxt = sample(logits, temperature, top_k, generator)  # (B, 1)
            if eos_id is not None:  # finished sequences keep emitting eos
                nxt = nxt.masked_fill(done[:, None], eos_id)
                done |= nxt[:, 0] == eos_id
        seq[:, T + i] = nxt[:, 0]
        yield Step(i, nxt[:, 0], sw.seconds, T + i + 1, model.caches[0].tokens_held,
                   model.kv_cache_nbytes)
        if eos_id is not None and bool(done.all()):
            break


@torch.inference_mode()
def speculative_stream(model: CausalLM, idx: Tensor | list[Tensor], max_new_tokens: int,
                       cache: str | None = None, window: int | None = None,
                       temperature: float = 0.0, top_k: int | None = None,
                       seed: int | None = None, eos_id: int | None = None,
                       draft: CausalLM | str = "lookup", draft_tokens: int = 4,
                       **cache_options) -> Iterator[Step]:
    """``generate_stream`` with speculative decoding (``kvlib.speculative``): ``draft`` (a
    smaller model of the same vocabulary, or ``"lookup"``) proposes ``draft_tokens`` tokens a
    round and the model checks them in one forward pass. A step per token; a round's first
    token says how many drafts it checked and kept."""
    pad = None
    if isinstance(idx, (list, tuple)):
        idx, pad = pad_prompts(list(idx))
    name = _validate(model, idx, max_new_tokens, cache, temperature, top_k, pad)
    check_draft(model, draft, draft_tokens, name)
    if "lookahead" in parameters(strategy(name)):  # a ring keeps the drafts to roll back
        cache_options.setdefault("lookahead", draft_tokens)
    model.set_kv_cache(name, max_len=idx.shape[1] + max_new_tokens, window=window,
                       **cache_options)
    model.set_padding(pad)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    drafter = PromptLookup(pad) if isinstance(draft, str) else DraftModel(
        draft, name, idx.shape[1] + max_new_tokens, window, pad, cache_options)
    steps = _speculative(model, idx, max_new_tokens, drafter, draft_tokens,
                         Sampling(temperature, top_k, generator))
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for step in steps:
        if eos_id is not None:  # finished sequences keep emitting eos
            step.tokens = step.tokens.masked_fill(done, eos_id)
            done |= step.tokens == eos_id
        yield step
        if eos_id is not None and bool(done.all()):
            break


def _speculative(model: CausalLM, idx: Tensor, max_new_tokens: int,
                 drafter: PromptLookup | DraftModel, k: int, how: Sampling) -> Iterator[Step]:
    """A step per token of each speculative round (``kvlib.speculative``); the round's wall time
    is shared evenly by the tokens it commits."""
    i, T = 0, idx.shape[1]
    if max_new_tokens == 0:
        return
    for r in speculate(model, idx, max_new_tokens, drafter, k, how):
        n = r.tokens.shape[1]
        for j in range(n):
            yield Step(i, r.tokens[:, j], r.seconds / n, T + i + 1, model.caches[0].tokens_held,
                       model.kv_cache_nbytes, round_start=j == 0 and i > 0,
                       drafted=r.drafted if j == 0 else 0, accepted=r.accepted if j == 0 else 0)
            i += 1


@torch.inference_mode()
def beam_search(model: CausalLM, idx: Tensor, max_new_tokens: int, num_beams: int,
                cache: str | None = None, window: int | None = None,
                **cache_options) -> tuple[Tensor, Tensor, list[float]]:
    """The ``num_beams`` most likely continuations of each prompt ``(B, T)``, as transformers'
    ``generate(num_beams=k, do_sample=False)`` keeps them (no end token): every step scores
    each beam's next tokens by the beam's summed log-probability plus theirs, keeps the best
    ``k`` of all ``k x vocab`` (the first step only from beam 0: the beams start equal), and
    reorders the caches so row ``i`` holds the past of the beam that beam ``i`` continues.

    Returns the beams ``(B, k, T + n)``, best first, their scores ``(B, k)`` and each step's
    seconds. The caches reorder with ``KVCache.reorder`` (``index_select`` on the batch)."""
    B, T = idx.shape
    K, n = num_beams, max_new_tokens
    model.set_kv_cache(name := _validate(model, idx, n, cache, 0.0, None), max_len=T + n,
                       window=window, **cache_options)
    beams = idx.new_empty(B, K, T + n)
    beams[:, :, :T] = idx[:, None]
    scores = torch.full((B, K), -1e9, device=idx.device)
    scores[:, 0] = 0.0  # all beams hold the prompt: expand from the first only
    rows = (torch.arange(B, device=idx.device) * K)[:, None]  # each prompt's first row
    times = []
    for i in range(n):
        with Stopwatch(idx.device) as sw:
            flat = beams.view(B * K, -1)[:, : T + i]
            logits = prefill(model, flat) if i == 0 else decode_one(model, flat)  # (B*K, V)
            V = logits.shape[-1]
            total = logits.float().log_softmax(dim=-1).view(B, K, V) + scores[..., None]
            scores, best = total.view(B, K * V).topk(2 * K)  # as transformers: 2k, then k
            scores, best = scores[:, :K], best[:, :K]  # (B, K)
            parent = best // V  # the beam each new beam continues
            beams = beams.gather(1, parent[..., None].expand(B, K, T + n))
            beams[:, :, T + i] = best % V
            if i + 1 < n and name != "none":
                for c in model.caches:
                    c.reorder((rows + parent).flatten())
        times.append(sw.seconds)
    return beams, scores, times


def generate(model: CausalLM, idx: Tensor | list[Tensor], max_new_tokens: int,
             cache: str | None = None,
             window: int | None = None, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, eos_id: int | None = None,
             draft: CausalLM | str | None = None, draft_tokens: int = 4,
             num_beams: int = 1, compile: bool = False, **cache_options) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after the prompt ``idx`` ``(B, T)``, or after each of
    a list of 1-D prompts of different lengths (padded on the left, see ``pad_prompts``; every
    prompt gets the tokens it gets alone; the result's ``.sequences`` drop the padding).

    cache: None (recompute everything each step), "concat", "prealloc", "sliding" (needs
    ``window``; with None, ``window`` masks the recomputation to the same span), "sinks"
    (``window`` and ``n_sink``, RoPE models), "recompute" (the last ``window`` tokens,
    recomputed each step), "bf16", "quantized" (``bits=8`` or ``4``, ``group_size``,
    ``residual``), "evict" (``budget``, ``n_sink``, ``window``) or "paged" (``block_size``; see
    ``kvlib.caches``), or a name registered with ``kvlib.caches.register``;
    ``cache_options`` go to the cache class. temperature 0 is greedy;
    otherwise sample, from the ``top_k`` most likely tokens if given, seeded by ``seed``.
    Stops early once every sequence has produced ``eos_id``.

    ``draft``: speculative decoding (``kvlib.speculative``), with a smaller model of the same
    vocabulary or ``"lookup"`` (prompt lookup) proposing ``draft_tokens`` tokens a round. Greedy,
    it gives the tokens of plain decoding; sampling, tokens from the same distribution. The
    result's ``speculation`` says how many drafts were kept.

    ``num_beams`` > 1: beam search (``beam_search``); the result holds each prompt's best beam.

    ``compile=True``: the forwards through ``torch.compile`` (``kvlib.compiling``), the same
    tokens; the first call compiles (tens of seconds), later ones reuse it.
    """
    if compile:
        with compiled_decoding(model, cache, draft, num_beams) as fast:
            return generate(fast, idx, max_new_tokens, cache, window, temperature, top_k, seed,
                            eos_id, **cache_options)
    if num_beams != 1:
        _check_beams(idx, num_beams, temperature, eos_id, draft)
        beams, _, times = beam_search(model, idx, max_new_tokens, num_beams, cache, window,
                                      **cache_options)
        return GenerationResult(beams[:, 0], times[0] if times else 0.0, times[1:],
                                "none" if cache is None else cache, None, idx.shape[1])
    prompts, pad = idx, None
    if isinstance(idx, (list, tuple)):
        idx, pad = pad_prompts(list(idx))
    tokens, times, rounds, drafted, accepted = [idx], [], 0, 0, 0
    steps = generate_stream(model, prompts, max_new_tokens, cache, window, temperature, top_k,
                            seed, eos_id, draft, draft_tokens, **cache_options)
    for step in steps:
        tokens.append(step.tokens[:, None])
        times.append(step.seconds)
        rounds, drafted = rounds + step.round_start, drafted + step.drafted
        accepted += step.accepted
    return GenerationResult(torch.cat(tokens, dim=1), times[0] if times else 0.0, times[1:],
                            "none" if cache is None else cache, pad, idx.shape[1], eos_id,
                            None if draft is None else Speculation(rounds, drafted, accepted))


def _check_beams(idx, num_beams: int, temperature: float, eos_id: int | None, draft) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a whole number, at least 1, got {num_beams!r}")
    if not isinstance(idx, Tensor):
        raise ValueError("beam search takes one (B, T) tensor of prompts of the same length, "
                         "not a list: search each prompt on its own")
    if temperature != 0.0 or draft is not None or eos_id is not None:
        raise ValueError("beam search here is greedy, without an end token or a draft: drop "
                         "temperature, eos_id and draft, or use num_beams=1")
