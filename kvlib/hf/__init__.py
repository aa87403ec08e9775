"""Checkpoints in the Hugging Face layout, per model family: ``gpt2.py``, ``llama.py`` (Llama 3 and
Qwen3), ``deepseek.py`` (DeepSeek-V3, dense layers), ``gemma.py`` (Gemma 3's text model),
``gpt_oss.py``; shared file handling in ``files.py``. Imported lazily by ``kvlib.load_model``.
``to_transformers(model)`` builds transformers' model of the same weights, to compare with."""

from __future__ import annotations

from ..models import CausalLM, DeepseekModel, GemmaModel, GPTModel, GptOssModel, LlamaModel


def to_transformers(model: CausalLM):
    """transformers' model of ``model``'s family holding exactly its weights (same dtype and
    device, SDPA attention as kvlib, eval mode): ``GPT2LMHeadModel``, ``LlamaForCausalLM`` (or
    ``Qwen3ForCausalLM``), ``DeepseekV3ForCausalLM``, ``Gemma3ForCausalLM`` or
    ``GptOssForCausalLM``. The chapters' "the same thing in transformers" cells and the
    benchmarks' comparisons run it."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError('comparing with transformers needs it: pip install "kvlib[compare]"'
                          ) from e
    if isinstance(model, GPTModel):
        return _gpt2(model)
    for cls, family in ((LlamaModel, "llama"), (DeepseekModel, "deepseek"),
                        (GemmaModel, "gemma"), (GptOssModel, "gpt_oss")):
        if isinstance(model, cls):
            from importlib import import_module

            hf = import_module(f"{__name__}.{family}").to_hf_model(
                model, attn_implementation="sdpa")
            return hf.eval()
    raise TypeError(f"no transformers twin for a {type(model).__name__}")


def _gpt2(model: GPTModel):
    from transformers import GPT2LMHeadModel

    from .gpt2 import hf_config, to_hf_state_dict

    p = next(model.parameters())
    config = hf_config(model.cfg)
    config._attn_implementation = "sdpa"  # the same attention kernel as kvlib
    hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    if unexpected or any(not k.endswith(("attn.bias", "attn.masked_bias")) for k in missing):
        raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    return hf.to(device=p.device, dtype=p.dtype).eval()
