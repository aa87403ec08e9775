"""An ahead-of-time compiled decode step: ``AotDecoder(model, max_len)`` exports the decode step
of a Llama-family model or GPT-2 once (``torch.export``) and compiles it with AOTInductor into a
shared library that Python calls like a function, with no dynamo in between.

``torch.compile`` (``kvlib.compiling``) still runs Python before every step: dynamo looks the
graph up and checks its guards, and a wrapper moves the inputs; on mini-llama that is a good part
of what a compiled step costs above its floor. Here nothing of the step runs in Python. The price
is gpt-fast's static cache: everything that changes from step to step is an input of the one
graph, so the new token, its position (a tensor, not an int the graph would bake in) and the
prealloc cache's whole buffers, which the step writes into at that position and attends over
with a mask that hides the slots after it.

The buffers are the model's own "prealloc" caches: the prompt is prefilled by the model's forward,
the compiled step continues in the same buffers, and at the end the caches' counters are set to
the tokens they hold, so the model can go on eagerly. The weights are compiled in as constants:
a decoder is a snapshot of the weights it was made with.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import CausalLM, GPTModel, LlamaModel
from .models.base import check_token_ids
from .sampling import greedy
from .timing import Stopwatch


def static_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor,
                     pos: Tensor, mask: Tensor) -> Tensor:
    """The new token's keys and values ``(B, H_kv, 1, D)`` written into slot ``pos`` of the
    static buffers ``(B, H_kv, max_len, D)``, and its queries ``(B, H, 1, D)`` attending over
    every slot the mask lets through: ``(B, 1, H * D)``."""
    keys.index_copy_(2, pos, k)
    values.index_copy_(2, pos, v)
    B, H, _, D = q.shape
    Hk = keys.shape[1]
    y = F.scaled_dot_product_attention(  # a group's queries as rows, per kv head
        q.reshape(B, Hk, H // Hk, D), keys, values, attn_mask=mask)
    return y.reshape(B, 1, H * D)


class StaticStep(nn.Module):
    """One decode step of ``model`` (Llama family or GPT-2) over static buffers: logits ``(B,
    vocab)`` of the tokens ``tok`` ``(B, 1)`` at position ``pos`` ``(1,)``; ``kv`` is every
    layer's keys and values ``(B, H_kv, max_len, D)``, written at ``pos``. The layers' own
    modules compute it; only the cache and the attention are written here."""

    def __init__(self, model: LlamaModel | GPTModel, max_len: int) -> None:
        super().__init__()
        self.model = model
        w = next(model.parameters())
        if isinstance(model, LlamaModel):
            cos, sin = model.rope(0, max_len, like=w)  # (max_len, D)
            self.register_buffer("cos", cos.clone(), persistent=False)
            self.register_buffer("sin", sin.clone(), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=w.device), persistent=False)

    def forward(self, tok: Tensor, pos: Tensor, *kv: Tensor) -> Tensor:
        mask = (self.slots <= pos).view(1, 1, 1, -1)  # (1, 1, 1, max_len): this slot and before
        if isinstance(self.model, GPTModel):
            return self.gpt2(tok, pos, kv, mask)
        m = self.model
        x = m.embed_tokens(tok)  # (B, 1, C)
        cos, sin = self.cos[pos], self.sin[pos]  # (1, D)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            q, k, v = a.project(layer.input_layernorm(x), cos, sin)  # (B, H or H_kv, 1, D)
            x = x + a.o_proj(static_attention(q, k, v, kv[2 * i], kv[2 * i + 1], pos, mask))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.norm(x))[:, -1]  # (B, vocab)

    def gpt2(self, tok: Tensor, pos: Tensor, kv: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        m = self.model
        x = m.wte(tok) + m.wpe(pos)  # (B, 1, C): the token and its learned position
        B = x.shape[0]
        for i, block in enumerate(m.h):
            a = block.attn
            qkv = a.c_attn(block.ln_1(x)).view(B, 1, 3, a.n_heads, a.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, 1, D)
            x = x + a.c_proj(static_attention(q, k, v, kv[2 * i], kv[2 * i + 1], pos, mask))
            x = x + block.mlp(block.ln_2(x))
        return m.lm_head(m.ln_f(x))[:, -1]  # (B, vocab)


def check_aot(model: CausalLM, max_len: int) -> None:
    """A clear error for what ``AotDecoder`` does not compile."""
    if not isinstance(model, (LlamaModel, GPTModel)):
        raise TypeError(f"AotDecoder compiles the Llama family (Llama, Qwen3, the trained minis) "
                        f"and GPT-2, not {type(model).__name__}: use kvlib.generate(..., "
                        f"compile=True) for the others")
    if isinstance(model, LlamaModel) and model.cfg.attn_sinks:
        raise ValueError("AotDecoder writes plain attention; a model with learned sinks "
                         "(gpt-oss) needs kvlib.generate")
    if not isinstance(max_len, int) or max_len <= 1:
        raise ValueError(f"max_len must be a number of tokens above 1, got {max_len!r}")
    if model.hard_context and max_len > model.cfg.context_length:
        raise ValueError(f"max_len {max_len} passes {type(model).__name__}'s "
                         f"{model.cfg.context_length} learned positions: at most that many")


class AotDecoder:
    """``AotDecoder(model, max_len)``: greedy decoding of ``batch`` rows of ``model`` at most
    ``max_len`` tokens long through an AOTInductor-compiled step; ``compile_s`` is what making
    it took (seconds: the export and a C++ build)."""

    def __init__(self, model: CausalLM, max_len: int, batch: int = 1) -> None:
        check_aot(model, max_len)
        self.model, self.max_len, self.batch = model, max_len, batch
        self._dir = tempfile.TemporaryDirectory(prefix="kvlib-aot-")  # the built package
        with Stopwatch(next(model.parameters()).device) as sw:
            self._step = self._compile()
        self.compile_s = sw.seconds
        model.set_kv_cache("prealloc", max_len=max_len)  # the caches the decoder fills

    def _compile(self) -> Callable[..., Tensor]:
        """The step exported (``torch.export``) and built by AOTInductor, loaded to call."""
        model, batch, max_len = self.model, self.batch, self.max_len
        spec, w = model.layer_specs()[0], next(model.parameters())
        model.set_kv_cache("concat")  # no buffers of the model's own during the export
        kv = [torch.zeros(batch, spec.n_kv_heads, max_len, spec.head_dim, dtype=w.dtype,
                          device=w.device) for _ in range(2 * model.cfg.n_layers)]
        step = StaticStep(model, max_len).eval()
        example = (torch.zeros(batch, 1, dtype=torch.long, device=w.device),
                   torch.zeros(1, dtype=torch.long, device=w.device), *kv)
        with torch.no_grad():
            program = torch.export.export(step, example)
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(Path(self._dir.name) / "step.pt2"))
        return torch._inductor.aoti_load_package(package)

    def _buffers(self, ids: Tensor) -> list[Tensor]:
        """Every layer's keys and values of fresh prealloc caches, after the model's own prefill
        of ``ids`` (the caches allocate their buffers at their first tokens); ``_first`` is the
        prefill's last logits."""
        self.model.set_kv_cache("prealloc", max_len=self.max_len)
        logits = self.model(ids, use_cache=True, last_only=True, check_ids=False)
        self._first = logits[:, -1]  # (B, vocab)
        kv = [t for c in self.model.caches for t in (c.keys, c.values)]
        for t in kv:  # the slots after the prompt: masked, but attention weighs them by 0, and
            t[:, :, ids.shape[1]:].zero_()  # 0 times whatever torch.empty left (NaN) is NaN
        return kv

    @torch.inference_mode()
    def stream(self, ids: Tensor, new_tokens: int) -> Iterator[tuple[Tensor, float]]:
        """Each new token ``(B,)`` and the seconds it took, ``new_tokens`` times: first the
        prefill's, by the model itself, then the compiled steps'. At the end the model's caches
        hold the prompt and the new tokens."""
        B, T = ids.shape
        if B != self.batch:
            raise ValueError(f"this decoder was compiled for batch {self.batch}, got ids of "
                             f"shape {tuple(ids.shape)}: make an AotDecoder(model, max_len, "
                             f"batch={B})")
        if new_tokens < 1 or T + new_tokens > self.max_len:
            raise ValueError(f"{T} prompt tokens and {new_tokens} new ones: new_tokens must be "
                             f"at least 1 and the two at most max_len {self.max_len} (make an "
                             f"AotDecoder with a larger max_len)")
        check_token_ids(ids, self.model.cfg.vocab_size)
        with Stopwatch(ids.device) as sw:
            kv = self._buffers(ids)
            tok = greedy(self._first)  # (B, 1)
        held = T  # tokens in the buffers: the caches' counter is set from it at the end
        try:
            yield tok[:, 0], sw.seconds
            for p in range(T, T + new_tokens - 1):
                with Stopwatch(ids.device) as sw:
                    tok = greedy(self._step(tok, torch.tensor([p], device=ids.device), *kv))
                held = p + 1
                yield tok[:, 0], sw.seconds
        finally:
            for c in self.model.caches:  # one owner of the position: the caches' counter
                c.seen = held

    def generate(self, ids: Tensor, new_tokens: int) -> tuple[Tensor, list[float]]:
        """``ids`` ``(batch, T)`` and its ``new_tokens`` greedy continuations ``(batch, T +
        new_tokens)``, and each decode step's seconds (the prefill's token has none)."""
        out, seconds = [ids], []
        for i, (tok, s) in enumerate(self.stream(ids, new_tokens)):
            out.append(tok[:, None])
            if i:
                seconds.append(s)
        return torch.cat(out, dim=1), seconds
