"""Training the small models kvlib ships (``mini-gpt2``, ``mini-llama``) on the Python standard
library, offline, on a CPU.

    python -m kvlib.train --model mini-gpt2 --steps 1200      # writes kvlib/trained/mini-gpt2/
    python -m kvlib.train --model mini-llama --minutes 30     # a time budget instead
    python -m kvlib.train --model mini-gpt2 --steps 1200 --resume   # continue after a stop
    python -m kvlib.train --card                               # rewrite kvlib/trained/README.md
    python -m kvlib.train --model mini-llama --steps 1500 --bos --recall-share 0.1
    python -m kvlib.train --ablate --model mini-llama --steps 250     # cut against bos windows

| module | what it holds |
|---|---|
| ``config`` | ``TrainConfig``: every setting of a run (the architectures are kvlib's presets) |
| ``data`` | the corpus in its trimmed vocabulary, ``Batches`` (step -> batch), slices |
| ``loop`` | ``Trainer``: AdamW, warm-up and cosine, bfloat16 autocast, checkpoints, resume |
| ``results`` | the end of a run: weights as shipped, held-out perplexity, ``metrics.json`` |
| ``card`` | ``kvlib/trained/README.md`` from the metrics files |
| ``ablate`` | ``ablate()``: short runs of a few variants, measured for sinks and recall |
| ``cli`` | ``train()`` and the command line |
"""

from ..evaluate import load_test_slice
from .ablate import ablate, measure
from .card import card_text, write_card
from .cli import main, train
from .config import TrainConfig
from .data import Batches, TokenData, build_data, consecutive_windows, fixed_windows
from .loop import Trainer, lr_at
from .results import finish

__all__ = ["Batches", "TokenData", "TrainConfig", "Trainer", "ablate", "build_data", "card_text",
           "consecutive_windows", "finish", "fixed_windows", "load_test_slice", "lr_at", "main",
           "measure", "train", "write_card"]
