"""kvlib.train: a tiny run on a tiny corpus lowers the loss, resumes bit for bit, and writes the
weights, metrics and card that load_model and the card read. Last, the shipped models against
their own card (skipped while kvlib/trained/<name>/model.safetensors does not exist)."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kvlib
from kvlib import loading
from kvlib.corpus import split_of
from kvlib.evaluate import load_test_slice
from kvlib.train import (
    Batches,
    TrainConfig,
    Trainer,
    ablate,
    build_data,
    card_text,
    fixed_windows,
    lr_at,
    main,
)

pytestmark = pytest.mark.usefixtures("one_thread")
KVLIB = Path(kvlib.__file__).parent
TINY = {
    "mini-gpt2": {"vocab_size": 400, "context_length": 32, "emb_dim": 32, "n_heads": 2,
                  "n_layers": 1},
    "mini-llama": {"vocab_size": 400, "context_length": 32, "emb_dim": 32, "n_heads": 2,
                   "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 64, "n_layers": 1},
}


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    """A stdlib of a dozen files (kvlib's own sources), named so that every split has some."""
    root = tmp_path_factory.mktemp("stdlib")
    sources = sorted(KVLIB.rglob("*.py"))
    want, i = {"test": 2, "valid": 2, "train": 8}, 0
    while any(want.values()):
        name = f"mod_{i}.py"
        if want[split_of(name)]:
            want[split_of(name)] -= 1
            (root / name).write_text(sources[i % len(sources)].read_text())
        i += 1
    return root


@pytest.fixture(scope="module")
def data(corpus_root):
    return build_data(400, str(corpus_root))


def tiny_config(tmp_path, model="mini-gpt2", **kw) -> TrainConfig:
    settings = dict(model=model, steps=8, batch_size=4, warmup_steps=2, lr=3e-3, eval_every=4,
                    checkpoint_every=3, valid_windows=4, test_windows=4,
                    model_overrides=TINY[model], checkpoint_dir=str(tmp_path / "ckpt"),
                    out=str(tmp_path / "trained" / model), progress=False)
    return TrainConfig(**{**settings, **kw})


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lr_at(cfg, 100, 100) == pytest.approx(0.1) and lrs[55] == pytest.approx(0.55)


def test_batches_are_a_function_of_the_step(data):
    ids = data.ids["train"]
    a, b = Batches(ids, 4, 16, seed=1), Batches(ids, 4, 16, seed=1)
    x, y = a(3)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(a(3)[0], b(3)[0]) and not torch.equal(a(3)[0], Batches(ids, 4, 16, 2)(3)[0])
    order = a.order(0)  # one epoch visits every window once, in a seeded order
    assert sorted(order.tolist()) == list(range(a.n_windows))
    for step in (0, 5):
        for b, row in enumerate(a(step)[0]):
            start = int(order[step * 4 + b]) * 16
            assert row.tolist() == ids[start : start + 16].tolist()


@pytest.mark.parametrize("model", list(TINY))
def test_a_few_steps_lower_the_loss(tmp_path, data, model):
    trainer = Trainer(tiny_config(tmp_path, model, steps=30), data)
    before = trainer.validate()
    trainer.run()
    assert trainer.step == 30 and trainer.stopped_by == "steps"
    assert trainer.history["valid_loss"][-1] < before - 0.5
    assert (tmp_path / "ckpt" / "last.pt").is_file()


@pytest.mark.parametrize("model", list(TINY))
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, data, model):
    whole = Trainer(tiny_config(tmp_path / "a", model), data).run()
    rng = torch.get_rng_state()
    cfg = tiny_config(tmp_path / "b", model)
    Trainer(cfg, data).run(stop_at=5)  # interrupted between two checkpoints' steps
    torch.manual_seed(999)  # whatever happened in between
    resumed = Trainer.resume(cfg, data)
    assert resumed.step == 5
    resumed.run()
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert whole.history["loss"] == resumed.history["loss"]
    assert torch.equal(torch.get_rng_state(), rng)  # the random state came back too
    for a, b in zip(whole.optimizer.state.values(), resumed.optimizer.state.values(),
                    strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_run(tmp_path, data):
    cfg = tiny_config(tmp_path, steps=2)
    Trainer(cfg, data).run()
    with pytest.raises(ValueError, match="another run.*lr"):
        Trainer.resume(replace(cfg, lr=1e-3), data)
    Trainer.resume(replace(cfg, minutes=5.0), data)  # a new time budget is fine
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer.resume(replace(cfg, checkpoint_dir=str(tmp_path / "none")), data)


def test_minutes_alone_choose_the_number_of_steps(tmp_path, data):
    cfg = tiny_config(tmp_path, steps=None, minutes=0.01, warmup_steps=3)
    trainer = Trainer(cfg, data).run()
    assert trainer.total_steps is not None and trainer.step >= 3
    assert trainer.stopped_by in ("steps", "time")
    with pytest.raises(ValueError, match="--steps N"):
        TrainConfig()
    assert cfg.command(40).startswith("python -m kvlib.train --model mini-gpt2 --steps 40 --seed")


def test_the_command_line_writes_what_load_model_and_the_card_read(tmp_path, corpus_root,
                                                                    monkeypatch):
    cfg = tiny_config(tmp_path, steps=4)
    sets = [a for k, v in TINY["mini-gpt2"].items() for a in ("--set", f"{k}={v}")]
    metrics = main(["--model", "mini-gpt2", "--steps", "4", "--batch-size", "4", "--lr", "0.003",
                    "--warmup-steps", "2", "--test-windows", "4", "--valid-windows", "4",
                    "--corpus-root", str(corpus_root), "--out", cfg.out, "--checkpoint-dir",
                    cfg.checkpoint_dir, "--no-progress", *sets])
    out = Path(cfg.out)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "vocab.json",
                                               "metrics.json", "loss.png", "test_slice.json",
                                               "test_long.json"}
    long = load_test_slice(out / "test_long.json")  # one file of the test split, from its start
    assert long.shape[0] == 1 and long[0, -1] != kvlib.tokenizer_for(kvlib.load_model(out)).eot_id
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    model = kvlib.load_model(out)  # what a reader gets: float32, the vocabulary attached
    assert model.cfg.vocab_size == 400 and kvlib.tokenizer_for(model).vocab_size == 400
    again = kvlib.perplexity(model, load_test_slice(out / "test_slice.json"), batch_size=16)
    assert again.perplexity == pytest.approx(metrics["test"]["perplexity"], rel=1e-5)
    assert metrics["test"]["perplexity"] == pytest.approx(math.exp(metrics["test"]["mean_nll"]))
    assert metrics["steps"] == 4 and metrics["tokens_seen"] == 4 * 4 * 32
    assert "--set n_layers=1" in metrics["reproduce"] and "--lr 0.003" in metrics["reproduce"]
    card = (out.parent / "README.md").read_text()
    assert f"{metrics['test']['perplexity']:.3f}" in card and "mini-gpt2/loss.png" in card
    monkeypatch.setattr(loading, "TRAINED_DIR", out.parent)
    (out.parent / "README.md").unlink()
    main(["--card"])  # only the card, from the metrics files
    assert (out.parent / "README.md").read_text() == card


def test_a_rerun_is_recorded_in_the_metrics_and_the_card(tmp_path, corpus_root, monkeypatch):
    args = ["--model", "mini-llama", "--steps", "3", "--batch-size", "2", "--warmup-steps", "1",
            "--test-windows", "2", "--valid-windows", "2", "--corpus-root", str(corpus_root),
            "--no-progress", *[a for k, v in TINY["mini-llama"].items()
                               for a in ("--set", f"{k}={v}")]]
    shipped, rerun = tmp_path / "trained" / "mini-llama", tmp_path / "rerun"
    main([*args, "--out", str(shipped), "--checkpoint-dir", str(tmp_path / "c1")])
    card = (shipped.parent / "README.md").read_text()
    assert "Not rerun yet" in card
    main([*args, "--out", str(rerun), "--checkpoint-dir", str(tmp_path / "c2"), "--no-card"])
    monkeypatch.setattr(loading, "TRAINED_DIR", shipped.parent)
    main(["--record-rerun", str(rerun)])
    metrics = json.loads((shipped / "metrics.json").read_text())
    assert metrics["rerun"]["same_weights"] is True  # same seed, machine and threads
    assert metrics["rerun"]["perplexity"] == metrics["test"]["perplexity"]
    card = (shipped.parent / "README.md").read_text()
    assert "bit for bit the same weights" in card and "(+0.00% from" in card
    main([*args[:-2 * len(TINY["mini-llama"])], "--seed", "7", "--out", str(rerun),
          "--checkpoint-dir", str(tmp_path / "c3"), "--no-card",
          *[a for k, v in TINY["mini-llama"].items() for a in ("--set", f"{k}={v}")]])
    with pytest.raises(ValueError, match="not a rerun"):
        main(["--record-rerun", str(rerun)])
    # the weights a retraining replaced, measured against the shipped ones on their own slice
    main(["--model", "mini-llama", "--compare-with", str(rerun), "--corpus-root",
          str(corpus_root)])
    metrics = json.loads((shipped / "metrics.json").read_text())
    prev = metrics["previous"]
    assert prev["perplexity"] == pytest.approx(metrics["test"]["perplexity"], rel=1e-5)
    assert prev["previous_perplexity"] != prev["perplexity"]  # seed 7: other weights
    assert prev["windows"] == [2, TINY["mini-llama"]["context_length"]]
    assert "Against the weights these replaced" in (shipped.parent / "README.md").read_text()


def test_the_card_says_what_to_do_without_metrics():
    text = card_text([])
    assert "No model has been trained yet" in text and "python -m kvlib.train" in text


# --- the shipped models reproduce their card --------------------------------------------------


@pytest.fixture(params=loading.TRAINED)
def shipped(request):
    name = request.param
    folder = loading.TRAINED_DIR / name
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"kvlib/trained/{name}/model.safetensors does not exist yet (train it: "
                    f"python -m kvlib.train --model {name} --steps N)")
    return name, folder, json.loads((folder / "metrics.json").read_text())


def test_shipped_model_reproduces_its_held_out_perplexity(shipped):
    name, folder, metrics = shipped
    model = kvlib.load_model(name)
    windows = load_test_slice(folder / "test_slice.json")
    assert tuple(windows.shape) == (metrics["test"]["windows"], metrics["test"]["window_tokens"])
    got = kvlib.perplexity(model, windows, batch_size=16).perplexity
    assert got == pytest.approx(metrics["test"]["perplexity"], rel=0.02)
    card = (loading.TRAINED_DIR / "README.md").read_text()
    assert f"{metrics['test']['perplexity']:.3f}" in card


def test_shipped_model_generates_the_same_tokens_with_every_cache(shipped):
    name, _, _ = shipped
    model = kvlib.load_model(name)
    tok = kvlib.tokenizer_for(model)
    prompt = torch.tensor([tok.encode("def read_config(path):\n")])
    ref = kvlib.generate(model, prompt, 40).tokens
    for cache in ("concat", "prealloc"):
        assert torch.equal(kvlib.generate(model, prompt, 40, cache=cache).tokens, ref), cache
    windowed = kvlib.generate(model, prompt, 40, window=16).tokens
    assert torch.equal(kvlib.generate(model, prompt, 40, cache="sliding", window=16).tokens,
                       windowed)
    if name == "mini-llama":  # RoPE: the streaming strategies too
        total = ref.shape[1]
        for cache, opts in (("sinks", {"window": total - 4, "n_sink": 4}),
                            ("recompute", {"window": total})):
            got = kvlib.generate(model, prompt, 40, cache=cache, **opts).tokens
            assert torch.equal(got, ref), cache


def test_shipped_models_come_with_a_long_held_out_text(shipped):
    name, _, metrics = shipped
    long = kvlib.held_out(name)
    model = kvlib.load_model(name)
    assert long.shape == (1, 4096) and (long < model.cfg.vocab_size).all()
    assert kvlib.held_out(name, long=False).shape == (metrics["test"]["windows"],
                                                     metrics["test"]["window_tokens"])


# --- start tokens, passkey episodes, longer contexts, ablations --------------------------------

LONGER = {m: {**TINY[m], "context_length": 96} for m in TINY}  # room for passkey episodes


def test_windows_open_with_the_start_token_only_when_asked(data):
    ids, eot = data.ids["train"], data.tokenizer.eot_id
    plain, bos = Batches(ids, 4, 16, seed=1), Batches(ids, 4, 16, seed=1, bos_id=eot)
    firsts = []
    for step in range(6):
        x, y = bos(step)
        assert x.shape == y.shape == (4, 16) and (x[:, 0] == eot).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for b in range(4):  # then the stream, advancing seq_len tokens a window
            _, _, k = bos.source(step * 4 + b)
            assert y[b].tolist() == ids[k * 16 : k * 16 + 16].tolist()
        firsts += plain(step)[0][:, 0].tolist()
    assert sum(f != eot for f in firsts) > len(firsts) // 2  # cut at random places
    assert plain.n_windows == (len(ids) - 1) // 16 and bos.n_windows == len(ids) // 16
    windows = fixed_windows(data.ids["valid"], 3, 16, bos_id=eot)
    assert windows.shape == (3, 16) and (windows[:, 0] == eot).all()
    assert windows[0, 1:].tolist() == data.ids["valid"][:15].tolist()


def test_passkey_episodes_are_mixed_in_at_their_share(data):
    import re

    from kvlib.passkey import Passkeys, is_held_out

    ids, tok = data.ids["train"], data.tokenizer
    keys = Passkeys(tok)
    batches = Batches(ids, 4, 96, 5, tok.eot_id, keys, share=0.25)
    kinds = [batches.source(i)[0] for i in range(batches.n_rows)]  # one epoch
    assert kinds.count("window") == batches.n_windows  # every window still once
    assert kinds.count("episode") == batches.n_episodes == round(batches.n_windows / 3)
    seen = 0
    for i, kind in enumerate(kinds[:40]):
        row = batches.row(i)
        assert row.shape == (97,) and row[0] == tok.eot_id
        if kind == "episode":
            text = tok.decode(row.tolist())
            (name, value), = re.findall(r"(?:\n|<\|endoftext\|>)([A-Z_]+) = (\d{5})\n", text)
            assert f"\nassert {name} == {value}\n" in text and not is_held_out(int(value))
            seen += 1
    assert seen
    again = Batches(ids, 4, 96, 5, tok.eot_id, keys, share=0.25)
    assert torch.equal(again(7)[0], batches(7)[0]) and torch.equal(again(2)[0], batches(2)[0])
    with pytest.raises(ValueError, match="share of passkey episodes"):
        Batches(ids, 4, 96, 5, share=1.0)
    with pytest.raises(ValueError, match="Passkeys"):
        Batches(ids, 4, 96, 5, share=0.1)
    with pytest.raises(ValueError, match="too short for a passkey episode"):
        # no room for the distance once the name and value take a token each, whichever
        # tokenizer the corpus (kvlib's own sources, so it changes with them) gave
        too_short = Batches(ids, 4, keys.min_distance, 5, None, keys, share=0.5)
        for step in range(8):  # 32 rows, about half of them episodes: the first one raises
            too_short(step)
    with pytest.raises(ValueError, match="recall_share"):
        TrainConfig(steps=1, recall_share=-0.1)


@pytest.mark.parametrize("model", list(TINY))
def test_resume_is_bit_for_bit_with_start_tokens_and_episodes(tmp_path, data, model):
    kw = dict(bos=True, recall_share=0.25, model_overrides=LONGER[model])
    whole = Trainer(tiny_config(tmp_path / "a", model, **kw), data).run()
    cfg = tiny_config(tmp_path / "b", model, **kw)
    Trainer(cfg, data).run(stop_at=5)
    torch.manual_seed(999)
    resumed = Trainer.resume(cfg, data)
    resumed.run()
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert whole.history["loss"] == resumed.history["loss"]
    # the probes too, at every evaluation both ran (the interrupted run also evaluated at 5)
    for key in ("valid_loss", "valid_sink", "valid_recall"):
        then = dict(zip(resumed.history["valid_step"], resumed.history[key], strict=True))
        for step, value in zip(whole.history["valid_step"], whole.history[key], strict=True):
            assert then[step] == value, (key, step)
    n_layers = len(whole.model.attention_layers)
    evaluations = len(whole.history["valid_step"])
    assert len(whole.history["valid_sink"]) == len(whole.history["valid_recall"]) == evaluations
    assert all(len(s) == n_layers and all(0 <= m <= 1 for m in s)
               for s in whole.history["valid_sink"])
    assert all(0 <= r <= 1 for r in whole.history["valid_recall"])
    assert (whole.valid[:, 0] == data.tokenizer.eot_id).all()
    with pytest.raises(ValueError, match="another run.*bos"):
        Trainer.resume(replace(cfg, bos=False), data)
    assert "--bos" in cfg.command() and "--recall-share 0.25" in cfg.command()


def test_a_longer_context_with_start_tokens_reaches_the_files_and_the_card(tmp_path,
                                                                           corpus_root):
    out = tmp_path / "trained" / "mini-llama"
    m = main(["--model", "mini-llama", "--steps", "3", "--batch-size", "2", "--warmup-steps",
              "1", "--test-windows", "3", "--valid-windows", "2", "--corpus-root",
              str(corpus_root), "--out", str(out), "--checkpoint-dir", str(tmp_path / "c"),
              "--no-progress", "--bos", "--recall-share", "0.2",
              *[a for k, v in LONGER["mini-llama"].items() for a in ("--set", f"{k}={v}")]])
    eot = kvlib.tokenizer_for(kvlib.load_model(out)).eot_id
    windows = load_test_slice(out / "test_slice.json")
    assert windows.shape == (3, 96) and (windows[:, 0] == eot).all()
    assert load_test_slice(out / "test_long.json")[0, 0] == eot
    assert m["test_full"]["window_tokens"] == 96 and m["tokens_seen"] == 3 * 2 * 96
    assert m["recall"] and {r["distance"] for r in m["recall"]} <= set(range(28, 96))
    assert all(0 <= r["accuracy"] <= 1 and r["chance"] < 1e-4 for r in m["recall"])
    assert "--bos" in m["reproduce"] and "--recall-share 0.2" in m["reproduce"]
    card = (out.parent / "README.md").read_text()
    assert "Their context is 96 tokens" in card and "opens with `<|endoftext|>`" in card
    assert "20% of the rows are passkey episodes" in card and "Passkey recall on 64" in card


def test_ablate_trains_the_variants_and_tabulates_them(tmp_path, corpus_root):
    folder = tmp_path / "ablations"
    args = ["--recall-share", "0.2", "--model", "mini-gpt2", "--steps", "3", "--batch-size",
            "2", "--warmup-steps", "1", "--test-windows", "2", "--valid-windows", "2",
            "--corpus-root", str(corpus_root), "--out", str(folder), "--no-progress",
            *[a for k, v in LONGER["mini-gpt2"].items() for a in ("--set", f"{k}={v}")]]
    main(["--ablate", "cut", "bos+recall", *args])
    rows = json.loads((folder / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == ["cut", "bos+recall"]
    cut, bos = rows
    assert cut["train"]["bos"] is False and bos["train"]["bos"] is True
    assert cut["train"]["recall_share"] == 0 and bos["train"]["recall_share"] == 0.2
    assert len(bos["first_token_attention_per_layer"]) == 1  # one layer
    assert all(0 <= m <= 1 for r in rows for m in r["first_token_attention_per_layer"])
    assert cut["window"] == 24 and cut["sinks_cache"] == "evict"  # GPT-2: no moved sinks
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("perplexity_full", "perplexity_sliding",
                                                 "perplexity_sinks"))
        assert r["recall_distance"] == 48 and r["recall_sliding"] == 0.0  # out of view
    table = (folder / "ablation.md").read_text()
    assert "| cut | 3 |" in table and "| bos+recall | 3 |" in table
    assert (folder / "bos+recall" / "model.safetensors").is_file()
    assert not (folder / "README.md").exists()  # no card: these are not models to ship
    weights = (folder / "cut" / "model.safetensors").stat().st_mtime_ns
    (folder / "ablation.md").unlink()
    main(["--ablate", "bos+recall", "cut", "--resume", *args])  # both measured: only the table
    assert (folder / "ablation.md").read_text() == table
    assert (folder / "cut" / "model.safetensors").stat().st_mtime_ns == weights
    base = tiny_config(tmp_path)
    with pytest.raises(ValueError, match="unknown variant"):
        ablate(base, ["cut+bos"], tmp_path)
    with pytest.raises(ValueError, match="--recall-share"):
        ablate(base, ["bos+recall"], tmp_path)


def test_a_second_phase_starts_from_the_first_runs_weights(tmp_path, corpus_root):
    """``--init-from`` an earlier run's folder: the weights begin as that run's (so the first
    step's loss is the earlier model's), the metrics and the card say so with both commands,
    and another architecture is refused."""
    first_out, second_out = tmp_path / "one" / "mini-llama", tmp_path / "two" / "mini-llama"
    common = ["--model", "mini-llama", "--batch-size", "2", "--warmup-steps", "1",
              "--test-windows", "3", "--valid-windows", "2", "--corpus-root", str(corpus_root),
              "--no-progress", *[a for k, v in LONGER["mini-llama"].items()
                                 for a in ("--set", f"{k}={v}")]]
    first = main([*common, "--steps", "4", "--out", str(first_out), "--checkpoint-dir",
                  str(tmp_path / "c1")])
    second = main([*common, "--steps", "2", "--seed", "2", "--recall-share", "0.5",
                   "--init-from", str(first_out), "--out", str(second_out),
                   "--checkpoint-dir", str(tmp_path / "c2")])
    e = second["init_from"]
    assert e["folder"] == str(first_out) and e["steps"] == 4
    assert e["command"] == first["command"] and e["reproduce"] == first["reproduce"]
    assert f"--init-from {first_out}" in second["reproduce"]
    # the second run's first batch, scored by the first run's weights, is its first loss
    cfg = TrainConfig.from_dict(second["train"])
    trainer = Trainer(cfg, build_data(400, str(corpus_root)))
    x, y = trainer.batches(0)
    earlier = kvlib.load_model(first_out).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(earlier(x, check_ids=False).float().flatten(0, 1), y.flatten())
    assert second["history"]["loss"][0] == pytest.approx(loss.item(), abs=1e-4)
    card = (second_out.parent / "README.md").read_text()
    assert "It is a second phase" in card and first["command"] in card
    with pytest.raises(ValueError, match="another architecture"):
        main([*common, "--steps", "2", "--set", "n_layers=2", "--init-from", str(first_out),
              "--out", str(tmp_path / "three"), "--checkpoint-dir", str(tmp_path / "c3")])
