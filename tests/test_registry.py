"""One registry of strategies (kvlib/caches/registry.py): a cache written outside kvlib joins it
by name and then works everywhere a built-in strategy does; the models never name a strategy."""

import ast
from pathlib import Path

import pytest
import torch

import kvlib
from kvlib.caches import STRATEGIES, KVCache, Traits, register

ROOT = Path(__file__).resolve().parents[1]


class ListCache(KVCache):
    """A reader's cache: keys and values kept in Python lists, concatenated on every read."""

    name = "list"
    traits = Traits()

    def __init__(self) -> None:
        super().__init__()
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.register_buffer("keys", None, persistent=False)
        self.register_buffer("values", None, persistent=False)

    def update(self, keys, values):
        self._check(keys, values, self.keys)
        self.k.append(keys)
        self.v.append(values)
        self.keys, self.values = torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)
        self.seen += keys.shape[2]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.k, self.v, self.keys, self.values = [], [], None, None


@pytest.fixture
def registered():
    register("list", ListCache)
    yield "list"
    del STRATEGIES["list"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_a_registered_cache_generates_the_tokens_of_recomputation(registered, preset):
    model = kvlib.load_model(preset, seed=3)
    prompt = torch.tensor([[5, 17, 42, 7, 9]])
    ref = kvlib.generate(model, prompt, 30)  # no cache: every step recomputes
    out = kvlib.generate(model, prompt, 30, cache=registered)
    assert torch.equal(out.tokens, ref.tokens)
    assert all(isinstance(c, ListCache) for c in model.caches)
    assert model.pos == prompt.shape[1] + 29  # the caches own the position


def test_a_registered_cache_passes_check_cache(registered):
    assert len(kvlib.check_cache(ListCache, verbose=False)) >= 5


def test_set_kv_cache_checks_a_registered_cache_s_options(registered, tiny):
    with pytest.raises(ValueError, match=r"window applies to .*not 'list'"):
        tiny.set_kv_cache("list", window=4)
    with pytest.raises(ValueError, match=r"the 'list' cache takes no option bits"):
        tiny.set_kv_cache("list", bits=4)


def test_register_refuses_what_is_not_a_cache_and_taken_names():
    with pytest.raises(TypeError, match="KVCache subclass"):
        register("dict", dict)
    with pytest.raises(ValueError, match="'concat' is already ConcatCache"):
        register("concat", ListCache)
    with pytest.raises(ValueError, match="unknown cache 'nope'.*register your own"):
        kvlib.load_model("tiny").set_kv_cache("nope")


def test_every_strategy_declares_its_traits_and_name():
    for name, cls in STRATEGIES.items():
        assert cls.name == name, (name, cls)
        assert isinstance(cls.traits, Traits) and "traits" in vars(cls), name


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_models_and_generation_name_no_strategy():
    """Models build caches through the registry; the one name they hold is set_kv_cache's
    default. Generation reads traits, not names."""
    names = set(STRATEGIES) - {"none"}  # "none" is also a plain English word in messages
    for path in [*sorted((ROOT / "kvlib" / "models").glob("*.py")), ROOT / "kvlib" / "generate.py"]:
        found = names & _string_constants(path)
        allowed = {"concat"} if path.name == "base.py" else set()  # set_kv_cache's default
        assert found <= allowed, f"{path.relative_to(ROOT)} names strategies {sorted(found)}"
    for path in (ROOT / "kvlib" / "models").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("caches"):
                got = {a.name for a in node.names}
                assert got <= {"KVCache", "LayerSpec", "Traits", "attention_mask", "build"}, (
                    path.name, got)


def test_a_cache_that_reuses_slots_must_say_where_its_tokens_are():
    class Ring(ListCache):
        traits = Traits(reuses_slots=True)

    with pytest.raises(NotImplementedError, match="reuses slots.*write slot_positions"):
        Ring().slot_positions()
    assert ListCache().slot_positions() == []  # appending: slot p holds position p
    for name, cls in STRATEGIES.items():
        if cls.traits.reuses_slots:
            assert "slot_positions" in vars(cls), name


def test_a_subclass_with_its_own_init_is_built_by_that_init(tiny):
    """QuantizedCache.for_layer passes bits, group_size and residual; a reader's subclass whose
    __init__ takes none of them is built with what its own __init__ takes."""
    from kvlib.caches import QuantizedCache

    class Roomy(QuantizedCache):
        def __init__(self) -> None:
            super().__init__(bits=8, group_size=8, residual=1024)

    register("roomy", Roomy)
    try:
        prompt = torch.tensor([[3, 1, 4, 1, 5]])
        out = kvlib.generate(tiny, prompt, 12, cache="roomy")
        assert all(type(c) is Roomy and c.residual == 1024 for c in tiny.caches)
        assert torch.equal(out.tokens, kvlib.generate(tiny, prompt, 12).tokens)
        with pytest.raises(ValueError, match="takes no option bits"):
            tiny.set_kv_cache("roomy", bits=4)
    finally:
        del STRATEGIES["roomy"]
