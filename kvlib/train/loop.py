"""The training loop: AdamW with warm-up and cosine decay, bfloat16 autocast, checkpoints that a
resumed run continues bit for bit.

A checkpoint holds the weights, the optimizer's moments, the step, the schedule's length, the
torch random state and the history; the data position is the step (``data.Batches``). So a run
stopped at a checkpoint and resumed gives the weights of a run that never stopped, on the same
machine with the same number of threads (float sums in another order round differently).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..evaluate import first_token_attention, perplexity
from ..loading import load_model
from ..models import CausalLM, build_model
from ..passkey import passkeys_for, recall
from ..timing import Stopwatch
from .config import TrainConfig
from .data import Batches, TokenData, fixed_windows

CHECKPOINT_FORMAT = "kvlib train checkpoint 1"
PROBE_STEPS = 10  # a run given only --minutes times this many steps to fix its length
PROBE_WINDOWS = 4  # validation windows whose attention on position 0 every evaluation logs
PROBE_EPISODES = 16  # held-out passkey episodes every evaluation scores (runs that mix them in)


def lr_at(cfg: TrainConfig, step: int, total: int | None) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up to ``cfg.lr``, then a cosine
    down to ``cfg.lr * cfg.min_lr_ratio`` at step ``total``."""
    if step < cfg.warmup_steps or total is None:
        return cfg.lr * (step + 1) / max(cfg.warmup_steps, 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: CausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices and embeddings, none on norms and biases."""
    params = list(model.parameters())  # a tied head is listed once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8)


def initial_weights(cfg: TrainConfig, data: TokenData) -> dict[str, Tensor]:
    """The weights in ``cfg.init_from`` (an earlier run's output folder), checked to be of this
    run's architecture and vocabulary."""
    folder = Path(cfg.init_from)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {folder}: no trained model there (the --out folder "
                                "of an earlier python -m kvlib.train run)")
    earlier = load_model(folder)
    if earlier.cfg != cfg.arch:
        raise ValueError(f"--init-from {folder} holds another architecture than --model "
                         f"{cfg.model}: {earlier.cfg} against {cfg.arch}")
    if list(earlier.tokenizer.gpt2_ids) != list(data.tokenizer.gpt2_ids):
        raise ValueError(f"--init-from {folder} was trained with another vocabulary than this "
                         "corpus gives")
    return earlier.state_dict()


class Trainer:
    """One run: ``Trainer(cfg, data).run()``; ``Trainer.resume(cfg, data)`` continues one."""

    def __init__(self, cfg: TrainConfig, data: TokenData) -> None:
        self.cfg, self.data = cfg, data
        arch = cfg.arch
        if arch.vocab_size != data.tokenizer.vocab_size:
            raise ValueError(f"the model has {arch.vocab_size} token ids but the vocabulary "
                             f"{data.tokenizer.vocab_size}")
        torch.manual_seed(cfg.seed)
        self.model = build_model(arch).train()
        self.model.tokenizer = data.tokenizer
        if cfg.init_from is not None:
            self.model.load_state_dict(initial_weights(cfg, data))
        self.optimizer = make_optimizer(self.model, cfg)
        self.bos_id = data.tokenizer.eot_id if cfg.bos else None
        passkeys = passkeys_for(data.tokenizer) if cfg.recall_share else None
        self.batches = Batches(data.ids["train"], cfg.batch_size, arch.context_length, cfg.seed,
                               self.bos_id, passkeys, cfg.recall_share)
        self.valid = fixed_windows(data.ids["valid"], cfg.valid_windows, arch.context_length,
                                   self.bos_id)
        self.step, self.total_steps = 0, cfg.steps
        self.seconds = 0.0  # wall time of the run so far: steps, evaluations, checkpoints
        self.step_seconds = 0.0  # of the optimizer steps alone
        self.history: dict[str, list] = {"step": [], "loss": [], "lr": [], "valid_step": [],
                                         "valid_loss": [], "valid_sink": [], "valid_recall": []}
        self.stopped_by: str | None = None

    # --- one step ----------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step on batch ``self.step``; the loss before it."""
        x, y = self.batches(self.step)
        lr = lr_at(self.cfg, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.autocast):
            logits = self.model(x, check_ids=False)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.history["step"].append(self.step)
        self.history["loss"].append(loss.item())
        self.history["lr"].append(lr)
        self.step += 1
        return loss.item()

    def validate(self) -> float:
        """Mean loss on the fixed validation windows (float32, full attention); the history also
        logs, per layer, the attention that queries put on position 0 (does a sink form?) and,
        in a run with passkey episodes, recall at half the context on held-out episodes."""
        with Stopwatch() as sw:
            loss = perplexity(self.model, self.valid).mean_nll
            if not self.history["valid_step"] or self.history["valid_step"][-1] != self.step:
                sink = first_token_attention(self.model, self.valid[:PROBE_WINDOWS]).mean(dim=1)
                found = None
                if self.cfg.recall_share:
                    found = recall(self.model, distance=self.cfg.arch.context_length // 2,
                                   n=PROBE_EPISODES, bos=self.cfg.bos, baseline=False,
                                   filler=self.data.ids["test"]).accuracy
                for key, value in (("valid_step", self.step), ("valid_loss", loss),
                                   ("valid_sink", [round(m, 4) for m in sink.tolist()]),
                                   ("valid_recall", found)):
                    self.history.setdefault(key, []).append(value)
        self.seconds += sw.seconds
        return loss

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop_at: int | None = None) -> Trainer:
        """Train until the schedule ends, the time is up, or step ``stop_at`` (an interruption
        on purpose: ``--resume`` continues it); checkpoint every ``checkpoint_every`` steps and
        at the end."""
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not cfg.progress,
                   desc=cfg.model, unit="step", dynamic_ncols=True)
        while not self._done(stop_at):
            with Stopwatch() as sw:
                loss = self.train_step()
            self.seconds += sw.seconds
            self.step_seconds += sw.seconds
            self._fix_length_from_time()
            if self.step % cfg.eval_every == 0:
                bar.set_postfix_str(f"valid {self.validate():.3f}", refresh=False)
                if not cfg.progress:
                    print(self.progress_line(), flush=True)
            if self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            bar.total = self.total_steps
            bar.set_description(f"{cfg.model} loss {loss:.3f}", refresh=False)
            bar.update(1)
        bar.close()
        self.validate()
        self.save_checkpoint()
        return self

    def progress_line(self) -> str:
        """The last evaluation in a line: step, losses, attention on position 0 per layer,
        recall."""
        h = self.history
        line = (f"{self.cfg.model} step {self.step}/{self.total_steps} loss "
                f"{np.mean(h['loss'][-self.cfg.eval_every:]):.3f} valid {h['valid_loss'][-1]:.3f} "
                "position 0 " + " ".join(f"{m:.2f}" for m in h["valid_sink"][-1]))
        if h["valid_recall"][-1] is not None:
            line += f" recall {h['valid_recall'][-1]:.0%}"
        return line

    def _done(self, stop_at: int | None) -> bool:
        if self.total_steps is not None and self.step >= self.total_steps:
            self.stopped_by = "steps"
            return True
        if self.cfg.minutes is not None and self.seconds >= 60 * self.cfg.minutes:
            self.stopped_by = "time"
            return True
        if stop_at is not None and self.step >= stop_at:
            self.stopped_by = "stop_at"
            return True
        return False

    def _fix_length_from_time(self) -> None:
        """A run given only ``--minutes`` fixes its length once it has timed a few steps (all
        still in the warm-up, whose learning rates do not depend on the length)."""
        probe = min(PROBE_STEPS, self.cfg.warmup_steps)
        if self.total_steps is not None or self.cfg.minutes is None or self.step < probe:
            return
        per_step = self.step_seconds / self.step * 1.03  # evaluations and checkpoints
        left = 60 * self.cfg.minutes - self.seconds
        self.total_steps = max(self.step, self.step + int(left / per_step))

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.arch.context_length

    # --- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "step": self.step,
                "total_steps": self.total_steps, "seconds": self.seconds,
                "step_seconds": self.step_seconds, "history": self.history,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "vocab": list(self.data.tokenizer.gpt2_ids)}

    def save_checkpoint(self) -> Path:
        """Write the checkpoint (to a temporary file first: a run killed while writing keeps
        the previous one)."""
        with Stopwatch() as sw:
            path = self.cfg.checkpoint_path
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.state(), path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        self.seconds += sw.seconds
        return path

    @classmethod
    def resume(cls, cfg: TrainConfig, data: TokenData) -> Trainer:
        """The run that ``cfg.checkpoint_path`` holds, ready to continue."""
        path = cfg.checkpoint_path
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume at {path} (pass the same "
                                    "--checkpoint-dir as the run that wrote it)")
        state = torch.load(path, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a kvlib training checkpoint")
        saved = TrainConfig.from_dict(state["config"])
        if diff := cfg.differences(saved):
            raise ValueError(f"{path} is a checkpoint of another run: {diff} (now, then); "
                             "resume with the same settings (only --minutes may change)")
        if state["vocab"] != list(data.tokenizer.gpt2_ids):
            raise ValueError(f"{path}: the corpus gives another vocabulary than the run had")
        trainer = cls(cfg, data)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        trainer.step, trainer.total_steps = state["step"], state["total_steps"]
        trainer.seconds, trainer.step_seconds = state["seconds"], state["step_seconds"]
        trainer.history = state["history"]
        return trainer
