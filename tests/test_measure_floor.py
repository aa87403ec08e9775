"""kvlib.measure.floor: the floor reads every weight matrix once, for GPT-2 and for a Llama-shaped
model (separate projections, grouped-query attention, an untied head, no biases)."""

import pytest
import torch
from torch import nn

import kvlib
from kvlib.bench import (
    Floor,
    FloorChain,
    attention_points,
    cache_shapes,
    floor_nbytes,
    floor_step,
    floor_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_floor_reads_every_weight_once(make_model):
    for model in (make_model("tiny"), make_model("tiny", n_layers=3, vocab_size=500)):
        mats = floor_weights(model)
        assert len(mats) == 4 * model.cfg.n_layers + 1
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert {id(m.weight) for m in linears} == {id(w) for w, _ in mats}  # head once: tied
        assert mats[-1][0] is model.wte.weight
        # what a decode step needs in full: every parameter except the position table (one row
        # per token) and the LayerNorms (a few vectors)
        skip = {id(model.wpe.weight)} | {id(p) for m in model.modules()
                                         if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                           if id(p) not in skip)
        assert floor_nbytes(model) == weight_bytes
        C, V, L = model.cfg.emb_dim, model.cfg.vocab_size, model.cfg.n_layers
        assert weight_bytes == 4 * (L * (12 * C * C + 9 * C) + V * C)


def test_floor_step_is_a_chain_over_the_weights(make_model):
    model = make_model("tiny")
    cfg = model.cfg
    chain = FloorChain.of(model)
    assert chain.mats == floor_weights(model) and chain.n_heads == cfg.n_heads
    assert chain.attend_at == {4 * i: i for i in range(cfg.n_layers)}  # after each c_attn
    x = torch.randn(2, cfg.emb_dim)
    kv = [(torch.randn(2, cfg.n_heads, 5, cfg.head_dim),) * 2 for _ in range(cfg.n_layers)]
    with torch.no_grad():
        out = floor_step(chain, x, kv)
        assert out.shape == (2, cfg.vocab_size)
        assert not torch.equal(out, floor_step(chain, x))  # the KV reads feed the chain
    f = Floor(model, batch=1, kv_len=7)
    f.measure(2)
    assert len(f.times) == 2 and f.kv_nbytes == cfg.n_layers * 2 * 7 * cfg.emb_dim * 4


def test_a_floor_leaves_the_models_caches_empty_and_of_their_strategy(make_model):
    model = make_model("tiny")
    model.set_kv_cache("none")
    Floor(model, batch=2, kv_len=9)
    assert [c.name for c in model.caches] == ["none"] * model.cfg.n_layers
    assert all(c.get_seq_length() == 0 for c in model.caches)


class _GQAAttention(kvlib.models.CachedAttention):
    """Llama-style attention: separate q/k/v/o projections, no biases, 2 key/value heads for 4
    query heads, and 4 x 16 = 64 query features from a 32-wide stream (as in Qwen3)."""

    def __init__(self, width: int = 32, heads: int = 4, kv_heads: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.shape = heads, kv_heads, dim
        self.q_proj = nn.Linear(width, heads * dim, bias=False)
        self.k_proj = nn.Linear(width, kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(width, kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, width, bias=False)

    def forward(self, x: torch.Tensor, use_cache: bool) -> torch.Tensor:
        (B, T, _), (H, H_kv, D) = x.shape, self.shape
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H_kv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H_kv, D).transpose(1, 2)
        y = kvlib.models.attend(q, k, v, self.kv_cache if use_cache else None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class _GQABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _GQAAttention()
        self.gate_proj = nn.Linear(32, 48, bias=False)
        self.up_proj = nn.Linear(32, 48, bias=False)
        self.down_proj = nn.Linear(48, 32, bias=False)

    def forward(self, x: torch.Tensor, use_cache: bool) -> torch.Tensor:
        x = x + self.self_attn(x, use_cache)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ToyLlama(kvlib.CausalLM):
    """A two-layer Llama-shaped CausalLM with an untied head, to check the floor on a family
    other than GPT-2."""

    hard_context = False
    # the floor reads n_heads here; the key/value heads and head dim (16, not 32 / 4) come from
    # the layer specs, which a family declares for its caches
    cfg = kvlib.GPTConfig(vocab_size=300, context_length=64, emb_dim=32, n_heads=4, n_layers=2)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(300, 32)
        self.layers = nn.ModuleList(_GQABlock() for _ in range(2))
        self.lm_head = nn.Linear(32, 300, bias=False)  # untied
        self.set_kv_cache()

    def layer_specs(self):
        _, kv_heads, dim = self.layers[0].self_attn.shape
        return [kvlib.caches.LayerSpec(kv_heads, dim, 64)] * len(self.layers)

    def forward(self, idx, use_cache=False, last_only=False, check_ids=True):
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, use_cache)
        return self.lm_head(x[:, -1:] if last_only else x)


def test_floor_of_a_llama_shaped_model():
    model = ToyLlama().eval()
    mats = floor_weights(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(mats) == 7 * 2 + 1 and names[-1] == "lm_head"  # q k v o gate up down, head
    assert mats[-1][0] is model.lm_head.weight and all(b is None for _, b in mats)
    assert attention_points(model) == {0: 0, 7: 1}  # after each q_proj
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if not n.startswith("embed_tokens"))  # a lookup reads one row
    assert floor_nbytes(model) == weights
    model.set_kv_cache("prealloc", max_len=20)
    assert cache_shapes(model) == [(2, 16), (2, 16)]  # (key/value heads, head dim)
    assert model.caches[0].name == "prealloc" and model.caches[0].get_seq_length() == 0
    floor = Floor(model, batch=3, kv_len=5)
    assert floor.kv_nbytes == 2 * 2 * (3 * 2 * 5 * 16) * 4  # layers x (K, V) x floats x 4 bytes
    floor.measure(2)
    assert len(floor.times) == 2
    with torch.no_grad():
        assert floor_step(floor.chain, floor.x, floor.kv).shape == (3, 300)
