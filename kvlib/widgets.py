"""Interactive versions of ``kvlib.plots``: the cache explorer, the latency monitor, the memory
calculator, the compression explorer.

Every widget calls a function of ``kvlib.measure``, hands what it returns to a plain function of
``kvlib.plots`` and shows that figure as a PNG ``Image`` widget, so the picture is part of the
widget state that a notebook saves. The measuring functions hand the reader's model back as they
found it (its own cache objects, position counter, training flags, dtype and device), so a
widget never changes the model behind the reader's back.

The cache explorer renders all its frames up front and links its slider to the visible frame in
the browser (``jslink`` to a ``Stack``), so it can be scrubbed in a static page without a kernel.
Works with ipywidgets 8; with ipywidgets 7 (no ``Stack``, e.g. older Colab) the explorer switches
frames from Python instead, which needs the kernel.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Sequence

try:
    import ipywidgets as widgets
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("kvlib.widgets needs ipywidgets: pip install ipywidgets "
                      "(or pip install 'kvlib[widgets]')") from err

from .measure import (
    CacheFrame,
    LatencyRun,
    Prompt,
    StrategySpec,
    Tradeoff,
    cache_frames_for,
    compression_tradeoff,
    measure_latency,
    spec_label,
)
from .memory import CATALOG, DTYPE_BYTES, ModelSpec, format_bytes
from .models import CausalLM
from .plots import cache_state_pngs, figure_png, plot_compression, plot_latency, plot_memory

HAS_STACK = hasattr(widgets, "Stack")  # ipywidgets >= 8: switch frames in the browser
KERNEL_NOTE = ("<small><i>Changing these settings recomputes in Python: it needs a running "
               "kernel (Jupyter, Colab, Binder), not the static book.</i></small>")
RUN_NOTE = ("<small><i>Run measures on your machine: it needs a running kernel (Jupyter, Colab, "
            "Binder). The static book shows the run made when the page was built.</i></small>")


def _image(png: bytes = b"") -> widgets.Image:
    return widgets.Image(value=png, format="png", layout=widgets.Layout(max_width="100%"))


def _scrub_controls(n: int, interval_ms: int, description: str
                    ) -> tuple[widgets.Play, widgets.IntSlider, list]:
    """A Play button and a slider over ``n`` frames, linked in the browser (the scrubbers'
    shared controls: each then links the slider to the frame it shows)."""
    play = widgets.Play(value=0, min=0, max=n - 1, step=1, interval=interval_ms)
    slider = widgets.IntSlider(value=0, min=0, max=n - 1, description=description,
                               continuous_update=True)
    return play, slider, [widgets.jslink((play, "value"), (slider, "value"))]


class FrameScrubber(widgets.VBox):
    """A Play button and a slider over pictures rendered beforehand (PNG bytes): with ipywidgets
    8 the slider picks the frame in the browser, so it scrubs in the static book too.
    ``values`` are what the slider shows for each frame (e.g. the token count)."""

    def __init__(self, pngs: Sequence[bytes], values: Sequence[int] | None = None,
                 description: str = "frame", interval_ms: int = 600) -> None:
        n = len(pngs)
        if n == 0:
            raise ValueError("FrameScrubber needs at least one frame")
        self.pngs, self.values = list(pngs), list(values or range(n))
        self.play, self.slider, self.links = _scrub_controls(n, interval_ms, description)
        if HAS_STACK:
            self.view = widgets.Stack([_image(p) for p in self.pngs], selected_index=0)
            self.links.append(widgets.jslink((self.slider, "value"), (self.view, "selected_index")))
        else:  # ipywidgets 7: Python swaps the picture (needs the kernel)
            self.view = _image(self.pngs[0])
            self.slider.observe(self._show, names="value")
        super().__init__([widgets.HBox([self.play, self.slider]), self.view])
        self.add_class("kvlib-explorer")

    def _show(self, change: dict) -> None:
        self.view.value = self.pngs[change["new"]]

    def __repr__(self) -> str:
        return f"FrameScrubber({len(self.pngs)} frames)"


class CacheExplorer(widgets.VBox):
    """Step through one layer's cache for several strategies: a strategy menu, a step slider with
    a Play button, and the picture of ``plot_cache_state`` for that step.

    All frames are rendered when the explorer is made (10-15 KB of PNG each; keep
    ``len(strategies) * max_new_tokens`` near 40 or below). With ipywidgets 8 the slider and menu
    are linked to the shown frame in the browser, so the explorer works in the static book.
    """

    def __init__(self, model: CausalLM, prompt: Prompt = "The cache keeps",
                 max_new_tokens: int = 16,
                 strategies: Sequence[StrategySpec] = ("concat", "prealloc", ("sliding", 8)),
                 layer: int = 0, interval_ms: int = 700, client_side: bool | None = None,
                 dpi: int = 75) -> None:
        self.runs: dict[str, list[CacheFrame]] = cache_frames_for(
            model, prompt, max_new_tokens, strategies, layer)
        self.labels = list(self.runs)
        n = len(next(iter(self.runs.values())))
        self.pngs: dict[str, list[bytes]] = {
            label: cache_state_pngs(self.runs, label, dpi=dpi) for label in self.labels}
        self.client_side = HAS_STACK if client_side is None else client_side
        if self.client_side and not HAS_STACK:
            raise RuntimeError("client_side=True needs ipywidgets >= 8 (widgets.Stack); "
                               "pip install -U ipywidgets or pass client_side=False")
        self.strategy = widgets.Dropdown(options=self.labels, value=self.labels[0],
                                         description="cache")
        self.play, self.slider, self.links = _scrub_controls(n, interval_ms, "step")
        if self.client_side:
            self._link_frames_in_the_browser()
        else:
            self._switch_frames_in_python()
        super().__init__([widgets.HBox([self.strategy, self.play, self.slider]), self.view])
        self.add_class("kvlib-explorer")

    def _link_frames_in_the_browser(self) -> None:
        """Every frame is an Image in a Stack per strategy; the slider and the menu pick one."""
        self.stacks = [widgets.Stack([_image(p) for p in self.pngs[label]], selected_index=0)
                       for label in self.labels]
        self.view = widgets.Stack(self.stacks, selected_index=0)
        self.links.append(widgets.jslink((self.strategy, "index"),
                                         (self.view, "selected_index")))
        self.links += [widgets.jslink((self.slider, "value"), (s, "selected_index"))
                       for s in self.stacks]

    def _switch_frames_in_python(self) -> None:
        """ipywidgets 7: one Image whose picture Python swaps when the slider or menu moves."""
        self.view = _image(self.pngs[self.labels[0]][0])
        self.slider.observe(self._show, names="value")
        self.strategy.observe(self._show, names="value")

    def __repr__(self) -> str:  # the text a notebook shows where widgets cannot render
        steps = len(self.runs[self.labels[0]])
        return f"CacheExplorer({', '.join(self.labels)}; {steps} steps)"

    @property
    def image(self) -> widgets.Image:
        """The Image widget that shows the current frame."""
        if self.client_side:
            label = self.labels[self.view.selected_index]
            return self.stacks[self.labels.index(label)].children[self.slider.value]
        return self.view

    def _show(self, change=None) -> None:
        """Python side of the ipywidgets 7 fallback: show the frame for the menu and slider."""
        if self.client_side:  # keep the Python model in step (the browser does it by itself)
            self.view.selected_index = self.labels.index(self.strategy.value)
            for s in self.stacks:
                s.selected_index = self.slider.value
        else:
            self.view.value = self.pngs[self.strategy.value][self.slider.value]


class LatencyMonitor(widgets.VBox):
    """Run generation with the chosen strategies and plot milliseconds per step as it runs.

    The Run button measures in a background thread (so Stop can interrupt it) and redraws the plot
    every ``update_every`` steps; ``run()`` measures in the calling thread, which is what a
    notebook cell uses to leave the finished picture in the saved page.
    """

    def __init__(self, model: CausalLM, prompt: Prompt = "The cache keeps",
                 max_new_tokens: int = 100,
                 strategies: Sequence[StrategySpec] = (None, "concat", "prealloc"),
                 selected: Sequence[StrategySpec] | None = None, update_every: int = 10,
                 dpi: int = 72) -> None:
        self.model, self.prompt, self.update_every, self.dpi = model, prompt, update_every, dpi
        self.specs = {spec_label(s): s for s in strategies}
        chosen = set(self.specs) if selected is None else {spec_label(s) for s in selected}
        self.checks = {label: widgets.Checkbox(value=label in chosen, description=label,
                                               indent=False,
                                               layout=widgets.Layout(width="auto"))
                       for label in self.specs}
        self.tokens = widgets.IntSlider(value=max_new_tokens, min=10, max=max(max_new_tokens,
                                        500), step=10, description="tokens")
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress")
        self.image = _image()
        self.summary = widgets.HTML("<i>Press Run to measure.</i>")
        self.runs: dict[str, LatencyRun] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.run_button.on_click(self._on_run)
        self.stop_button.on_click(self._on_stop)
        super().__init__([
            widgets.HBox(list(self.checks.values())),
            widgets.HBox([self.tokens, self.run_button, self.stop_button, self.progress]),
            self.image, self.summary, widgets.HTML(RUN_NOTE),
        ])
        self.add_class("kvlib-latency")

    def __repr__(self) -> str:
        chosen = [label for label, box in self.checks.items() if box.value]
        return f"LatencyMonitor({', '.join(chosen)}; {self.tokens.value} tokens)"

    def run(self) -> dict[str, LatencyRun]:
        """Measure now, in this thread, updating the widgets; return the runs."""
        self._stop.clear()
        return self._measure()

    def _measure(self) -> dict[str, LatencyRun]:
        labels = [label for label, box in self.checks.items() if box.value]
        if not labels:
            self.summary.value = "<b>Tick at least one strategy.</b>"
            return {}
        n = self.tokens.value
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.progress.max, self.progress.value = n * len(labels), 0
        self.summary.value = "<i>running...</i>"
        self.runs = {}

        def on_step(run: LatencyRun, i: int) -> None:
            self.progress.value += 1
            self.runs[run.label] = run
            if (i + 1) % self.update_every == 0:
                self._draw(f"{run.label}: step {i + 1} of {n}")

        try:
            self.runs = measure_latency(self.model, self.prompt, n,
                                        [self.specs[label] for label in labels],
                                        on_step=on_step, should_stop=self._stop.is_set)
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True
        stopped = self._stop.is_set()
        self._draw("stopped" if stopped else None)
        self.summary.value = self._summary_html(stopped)
        return self.runs

    def _draw(self, title: str | None = None) -> None:
        self.image.value = figure_png(plot_latency(self.runs, title=title), dpi=self.dpi)

    def _summary_html(self, stopped: bool) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{len(r.seconds)}</td>"
            f"<td>{1000 * r.seconds[0]:.1f}</td>"
            f"<td>{1000 * sum(r.seconds[1:]) / max(1, len(r.seconds) - 1):.1f}</td>"
            f"<td><b>{r.decode_tokens_per_s:.1f}</b></td></tr>"
            for label, r in self.runs.items())
        note = "<p><b>Stopped early.</b></p>" if stopped else ""
        return (f"{note}<table><tr><th>strategy</th><th>tokens</th><th>prefill ms</th>"
                f"<th>mean ms / step</th><th>tokens / s</th></tr>{rows}</table>")

    def _on_run(self, _button=None) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._measure, daemon=True)
        self._thread.start()

    def _on_stop(self, _button=None) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a run started by the Run button to finish."""
        if self._thread is not None:
            self._thread.join(timeout)


class MemoryCalculator(widgets.VBox):
    """Model (``CATALOG`` or "custom"), context, batch and dtype in; bytes and a picture out."""

    CONTEXTS = [2**k for k in range(9, 21)]  # 512 ... 1M tokens

    def __init__(self, model: str = "llama-3-8b", context: int = 8192, batch: int = 1,
                 dtype: str = "bfloat16", dpi: int = 72) -> None:
        self.dpi = dpi
        self._quiet = False  # True while a preset fills the fields: update once, at the end
        spec = CATALOG[model]
        style = {"description_width": "80px"}
        self.model = widgets.Dropdown(options=[*CATALOG, "custom"], value=model,
                                      description="model", style=style)
        self.layers = widgets.BoundedIntText(value=spec.n_layers, min=1, max=1000,
                                             description="layers", style=style)
        self.kv_heads = widgets.BoundedIntText(value=spec.n_kv_heads, min=1, max=1024,
                                               description="kv heads", style=style)
        self.head_dim = widgets.BoundedIntText(value=spec.head_dim, min=1, max=4096,
                                               description="head dim", style=style)
        self.params_b = widgets.BoundedFloatText(value=round(spec.n_params / 1e9, 3), min=0.001,
                                                 max=10000, step=0.1, description="params (B)",
                                                 style=style)
        contexts = sorted(set(self.CONTEXTS) | {context})
        self.context = widgets.SelectionSlider(options=[(f"{c:,}", c) for c in contexts],
                                               value=context, description="context",
                                               style=style)
        self.batch = widgets.BoundedIntText(value=batch, min=1, max=4096, description="batch",
                                            style=style)
        self.dtype = widgets.Dropdown(options=list(DTYPE_BYTES), value=dtype,
                                      description="dtype", style=style)
        self.image = _image()
        self.numbers = widgets.HTML()
        for w in (self.layers, self.kv_heads, self.head_dim, self.params_b, self.context,
                  self.batch, self.dtype):
            w.observe(self.update, names="value")
        self.model.observe(self._on_model, names="value")
        self._on_model()
        super().__init__([
            widgets.HBox([widgets.VBox([self.model, self.context, self.batch, self.dtype]),
                          widgets.VBox([self.layers, self.kv_heads, self.head_dim,
                                        self.params_b])]),
            self.image, self.numbers, widgets.HTML(KERNEL_NOTE),
        ])
        self.add_class("kvlib-memory")

    def __repr__(self) -> str:
        return (f"MemoryCalculator({self.spec().name}, {self.context.value:,} tokens x batch "
                f"{self.batch.value}, {self.dtype.value}: {format_bytes(self.cache_bytes)})")

    def spec(self) -> ModelSpec:
        """The model the controls describe now."""
        if self.model.value != "custom":
            return CATALOG[self.model.value]
        n = self.kv_heads.value
        return ModelSpec("custom", self.layers.value, n, n, self.head_dim.value,
                         int(self.params_b.value * 1e9), max(self.context.value, 1024))

    def _on_model(self, change=None) -> None:
        custom = self.model.value == "custom"
        for w in (self.layers, self.kv_heads, self.head_dim, self.params_b):
            w.disabled = not custom
        if not custom:  # show the preset's numbers; update once at the end
            s = CATALOG[self.model.value]
            self._quiet = True
            self.layers.value, self.kv_heads.value = s.n_layers, s.n_kv_heads
            self.head_dim.value, self.params_b.value = s.head_dim, round(s.n_params / 1e9, 3)
            self._quiet = False
        self.update()

    def update(self, change=None) -> None:
        """Recompute the numbers and the picture from the controls."""
        if self._quiet:
            return
        s, t, b, d = self.spec(), self.context.value, self.batch.value, self.dtype.value
        self.cache_bytes = s.cache_bytes(t, b, d)
        self.image.value = figure_png(plot_memory(s, t, b, d), dpi=self.dpi)
        what = (f"{s.n_layers} layers x {s.latent_dim} latent numbers" if s.latent_dim else
                f"2 x {s.n_layers} layers x {s.n_kv_heads} kv heads x {s.head_dim} dims")
        local = "" if s.window is None else f" ({s.n_layers - s.global_layers} local layers " \
            f"hold at most {s.window:,} tokens)"
        self.numbers.value = (
            f"<b>{html.escape(s.name)}</b>: {what} x {DTYPE_BYTES[d]} bytes = "
            f"<b>{format_bytes(s.cache_bytes_per_token(d))} per token</b>; "
            f"at {t:,} tokens x batch {b}{local}: <b>{format_bytes(self.cache_bytes)}</b> "
            f"({self.cache_bytes:,} bytes) beside {format_bytes(s.weight_bytes(d))} of weights.")


class CompressionExplorer(widgets.VBox):
    """Bits, group size and an eviction budget in; bytes held, the keys' and values' quantization
    error and the perplexity of both caches out (``compression_tradeoff`` on ``rows``, the
    picture of ``plot_compression``). Each change measures again (a few seconds)."""

    def __init__(self, model: CausalLM, rows, bits: int = 4, group_size: int = 32,
                 budget: int = 64, dpi: int = 72) -> None:
        self.model, self.rows, self.dpi = model, rows, dpi
        D, T = model.cfg.head_dim, rows.shape[1]
        groups = [g for g in (4, 8, 16, 32, 64, 128) if D % g == 0 and g <= T]
        self.bits = widgets.Dropdown(options=[8, 4], value=bits, description="bits")
        self.group_size = widgets.Dropdown(options=groups, value=group_size,
                                           description="group size")
        self.budget = widgets.IntSlider(value=budget, min=16, max=T, step=16,
                                        description="budget", continuous_update=False)
        self.image = _image()
        self.numbers = widgets.HTML()
        for w in (self.bits, self.group_size, self.budget):
            w.observe(self.update, names="value")
        self.update()
        super().__init__([widgets.HBox([self.bits, self.group_size, self.budget]), self.image,
                          self.numbers, widgets.HTML(KERNEL_NOTE)])
        self.add_class("kvlib-compression")

    def __repr__(self) -> str:
        t = self.result
        return (f"CompressionExplorer(int{t.bits}, group {t.group_size}, budget {t.budget}: "
                f"{t.quantized_nbytes:,} and {t.evict_nbytes:,} bytes of {t.full_nbytes:,})")

    def update(self, change=None) -> None:
        """Measure the chosen settings and show them."""
        t: Tradeoff = compression_tradeoff(self.model, self.rows, self.bits.value,
                                           self.group_size.value, self.budget.value)
        self.result = t
        self.image.value = figure_png(plot_compression(t), dpi=self.dpi)
        e = t.errors
        self.numbers.value = (
            f"int{t.bits}, group {t.group_size}: mean error of the keys "
            f"<b>{e['keys per channel']:.1%}</b> of their mean size grouped per channel "
            f"(kvlib), {e['keys per token']:.1%} per token; values {e['values per token']:.1%} "
            f"per token (kvlib), {e['values per channel']:.1%} per channel. Perplexity: full "
            f"{t.full_perplexity:.3f}, int{t.bits} <b>{t.quantized_perplexity:.3f}</b>, evict "
            f"(budget {t.budget}) <b>{t.evict_perplexity:.3f}</b>.")
