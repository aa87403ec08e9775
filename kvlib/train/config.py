"""Every setting of a training run, in one frozen dataclass; the architectures are the presets
``mini-gpt2`` and ``mini-llama`` in ``kvlib.models`` (the one place model shapes live)."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..loading import TRAINED, TRAINED_DIR
from ..models import PRESETS, GPTConfig, LlamaConfig

# What must match for a resumed run to continue the same run (a different --minutes is fine).
# The settings the command line takes as --name (the others: see TrainConfig's fields).
CLI_SETTINGS = ("seed", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                "grad_clip", "eval_every", "checkpoint_every", "valid_windows", "test_windows",
                "recall_share")
SAME_RUN = ("model", "model_overrides", "seed", "steps", "batch_size", "lr", "min_lr_ratio",
            "warmup_steps", "weight_decay", "betas", "grad_clip", "autocast", "corpus_root",
            "bos", "recall_share", "init_from")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``steps`` fixes the schedule and, with ``seed``, the weights: the same
    config on the same machine and thread count gives the same weights, also across a resume.
    ``minutes`` is a wall-clock budget: alone, the run measures its speed during warm-up and fixes
    ``steps`` from it (the metrics record the number, to rerun with ``--steps``); with ``steps``
    it stops the run early, and ``--resume`` continues it."""

    model: str = "mini-gpt2"  # a preset: the architecture and vocabulary size
    steps: int | None = None  # optimizer steps; the cosine schedule ends there
    minutes: float | None = None  # wall-clock budget (training, evaluation and checkpoints)
    batch_size: int = 16  # sequences per step, each context_length tokens
    lr: float = 2e-3  # peak learning rate, after warm-up
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.1  # AdamW, on matrices and embeddings only (not norms, biases)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 1337  # the initial weights and the data order
    autocast: bool = True  # bfloat16 autocast on the CPU; the weights stay float32
    eval_every: int = 100  # validation loss every this many steps (and at the end)
    checkpoint_every: int = 200  # write the checkpoint every this many steps (and at the end)
    valid_windows: int = 16  # windows of the validation split, scored at every evaluation
    test_windows: int = 64  # the fixed held-out slice of the test split the card reports
    bos: bool = False  # every window opens with <|endoftext|> (else: cut at random places)
    recall_share: float = 0.0  # share of training rows that are passkey episodes (kvlib.passkey)
    # a second phase: the weights of an earlier run's output folder start this run (a fresh
    # optimizer and schedule), as pretraining's later phases continue from the first
    init_from: str | None = None
    model_overrides: dict = field(default_factory=dict)  # e.g. {"n_layers": 2}, for tests
    corpus_root: str | None = None  # the stdlib to read (default: this Python's)
    out: str | None = None  # default kvlib/trained/<model>/
    checkpoint_dir: str | None = None  # default checkpoints/<model>/ (in the current directory)
    progress: bool = True  # a tqdm bar with the loss

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise ValueError(f"unknown model {self.model!r}; train one of {list(TRAINED)} (or "
                             f"another preset of kvlib.PRESETS)")
        if self.steps is None and self.minutes is None:
            raise ValueError("say how long to train: --steps N (reproducible), --minutes M, "
                             "or both (the steps' schedule, stopped when time runs out)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if self.steps is None and self.warmup_steps < 1:
            raise ValueError("a run given only --minutes times its warm-up steps to choose its "
                             "length: give it --warmup-steps 1 or more")
        if not 0 <= self.recall_share < 1:
            raise ValueError(f"recall_share is a share of the training rows, in [0, 1), got "
                             f"{self.recall_share}")
        object.__setattr__(self, "betas", tuple(self.betas))

    @property
    def arch(self) -> GPTConfig | LlamaConfig:
        """The model's configuration: the preset with ``model_overrides``."""
        return replace(PRESETS[self.model], **self.model_overrides)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else TRAINED_DIR / self.model

    @property
    def checkpoint_path(self) -> Path:
        folder = self.checkpoint_dir or Path("checkpoints") / self.model
        return Path(folder) / "last.pt"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def differences(self, other: TrainConfig) -> dict:
        """The settings in ``SAME_RUN`` where ``other`` differs: ``{name: (mine, other's)}``."""
        return {k: (getattr(self, k), getattr(other, k)) for k in SAME_RUN
                if getattr(self, k) != getattr(other, k)}

    def command(self, steps: int | None = None, stop_at: int | None = None) -> str:
        """The command line of this run, with ``steps`` (default ``self.steps``) and
        ``stop_at``: the seed and every setting that differs from its default, so that it
        trains the same weights."""
        args = ["python", "-m", "kvlib.train", "--model", self.model]
        steps = self.steps if steps is None else steps
        args += ["--steps", str(steps)] if steps is not None else ["--minutes", str(self.minutes)]
        if stop_at is not None:
            args += ["--stop-at", str(stop_at)]
        for name in CLI_SETTINGS:
            value = getattr(self, name)
            if name == "seed" or value != TrainConfig.__dataclass_fields__[name].default:
                args += ["--" + name.replace("_", "-"), str(value)]
        for key, value in self.model_overrides.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        if self.bos:
            args.append("--bos")
        if self.init_from is not None:
            args += ["--init-from", self.init_from]
        if not self.autocast:
            args.append("--no-autocast")
        if self.corpus_root is not None:
            args += ["--corpus-root", self.corpus_root]
        extra = f"  # with betas={self.betas}" if self.betas != (0.9, 0.95) else ""
        return shlex.join(args) + extra
