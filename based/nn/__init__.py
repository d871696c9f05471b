"""based.nn: the BASED language model in PyTorch (Arora et al., ICML 2024).

Modules: ``RMSNorm``, ``SwiGLU``, ``BaseConv`` (+ ``BaseConvState``), ``LinearAttention``,
``SlidingWindowAttention``, and ``BasedLM`` configured by a ``BasedConfig``;
``evaluate_loss`` measures held-out cross-entropy. Training runs the differentiable
pure-PyTorch paths in ``based.nn.functional`` (the exact math of SPEC 1.1 and 1.2);
inference (``BasedLM.prefill``/``step``, ``generate``) runs based's kernels with one
fixed-size state per layer (``BasedCache``). ``load_bundled()`` loads the small Shakespeare
model shipped with the package; ``BasedLM.from_pretrained`` also reads the paper's released
checkpoints (``hazyresearch/based-*``, see based/nn/CHECKPOINTS.md).

PyTorch is needed here and only here: ``import based`` works without it.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("based.nn needs PyTorch, which is not installed (the rest of based works without "
                      "it). Install a build for your machine, e.g. `pip install torch`.") from exc

from .attention import LinearAttention, SlidingWindowAttention
from .cache import BasedCache, DecodeBuffer
from .config import LAYER_KINDS, BasedConfig
from .generation import Generation, generate, sample_next
from .layers import BaseConv, BaseConvState, RMSNorm, SwiGLU
from .model import BasedBlock, BasedLM, evaluate_loss, load_bundled


__all__ = [
    "LAYER_KINDS",
    "BaseConv",
    "BaseConvState",
    "BasedBlock",
    "BasedCache",
    "BasedConfig",
    "BasedLM",
    "DecodeBuffer",
    "Generation",
    "LinearAttention",
    "RMSNorm",
    "SlidingWindowAttention",
    "SwiGLU",
    "evaluate_loss",
    "generate",
    "load_bundled",
    "sample_next",
]
