"""Open a model for evaluation: a pmod folder or a plain Hugging Face LLaVA folder, optionally converted on the fly
with a method (``method=fastv``), in the dtype, attention backend and device asked for.

Model arguments come as text (lmms-eval's ``--model_args k=v,...``); method settings are named like the keys of a
YAML recipe, ``<method>_<field>`` (``fastv_keep=0.25``), lists written ``[a,b]`` or ``"a,b"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmod.core.config import MethodConfig, config_from_settings, method_names, setting_keys
from pmod.core.errors import UserError
from pmod.core.weight_files import MAX_WEIGHT, unusable_weights

if TYPE_CHECKING:
    import torch

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip


def method_from_args(method: str | None, settings: dict[str, Any]) -> MethodConfig | None:
    """The method config named by ``method`` with ``settings`` (``<method>_<field>`` keys); None for no method
    (the folder's own, or dense). Unknown keys and unreadable values raise :class:`UserError`."""
    if method in (None, "", "none"):
        if settings:
            raise UserError(f"unknown model args {', '.join(sorted(settings))}; the model takes pretrained, dtype, "
                            f"attn_implementation, device, batch_size, max_new_tokens, chat_template, cost_dir, budget "
                            f"and "
                            f"method=<{'|'.join(method_names())}> with its settings (<method>_<field>).")  # fmt: skip
        return None
    if method not in method_names():
        raise UserError(f"unknown method={method}; choose one of {', '.join(method_names())}.")
    keys = setting_keys(method)
    unknown = sorted(set(settings) - set(keys))
    if unknown:
        raise UserError(f"unknown model args {', '.join(unknown)}; method {method} takes {', '.join(keys)}.")
    # lmms-eval keeps the quotes and brackets that protect commas
    given = {keys[key]: value.strip().strip("'\"").strip("[]") if isinstance(value, str) else value
             for key, value in settings.items()}  # fmt: skip
    return config_from_settings(method, given, label=lambda key: f"model arg {key}")


def torch_dtype(name: str | None, device: str) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on a CPU (as ``pmod generate``); else the named dtype."""
    import torch

    if name in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if str(name) not in DTYPES:
        raise UserError(f"dtype={name} is not known; use auto, float32, bfloat16 or float16.")
    return getattr(torch, DTYPES[str(name)])


def load_for_eval(
    pretrained: str | Path,
    method_config: MethodConfig | None = None,
    dtype: str | None = "auto",
    attn_implementation: str | None = None,
    device: str = "cpu",
    chat_template: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """The model (in eval mode, on ``device``) and its processor. A folder that does not hold a model pmod can run,
    or whose weights do not load, raises :class:`UserError` naming the folder and the fix."""
    import transformers

    from pmod.core.config import stored_method_config
    from pmod.core.convert import convert, load
    from pmod.io.model_folder import check_model_folder

    folder = Path(pretrained)
    config = check_model_folder(folder, "pmod eval")
    stored = stored_method_config(config)
    if stored is not None and method_config is not None:
        raise UserError(f"{folder} is already a {stored.method} model; drop method= (or pass the dense base model "
                        f"to convert it to {method_config.method}).")  # fmt: skip
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device.startswith("cuda"):
        kwargs["device_map"] = device  # straight onto the GPU, not through CPU memory
    try:
        model = load(folder, **kwargs)  # routed or dense
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except Exception as err:  # safetensors, torch and transformers each raise their own kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{folder} does not load ({first}); pass a folder written by save_pretrained / pmod "
                        f"import-llava, with its weights and processor.") from err  # fmt: skip
    check_weights(model, folder)
    if method_config is not None:
        try:
            convert(model, method_config)
        except ValueError as err:
            raise UserError(f"cannot convert {folder} to {method_config.method}: {err}") from err
    if chat_template:
        path = Path(chat_template)
        processor.chat_template = path.read_text(encoding="utf-8") if path.is_file() else chat_template
    return model.to(device).eval(), processor


def check_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Refuse a model whose weights are non-finite or absurdly large (:data:`MAX_WEIGHT`) with one line naming
    the folder and the cause, instead of scoring what its overflowing forward happens to give."""
    found = unusable_weights(model)
    bad = [name for name, peak in found if not math.isfinite(peak)]
    huge = [name for name, peak in found if math.isfinite(peak)]
    largest = max((peak for _, peak in found if math.isfinite(peak)), default=0.0)
    if bad:
        raise UserError(f"{folder} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); it was saved from a "
                        f"diverged run (loss NaN or inf); evaluate an earlier checkpoint or train again with a lower "
                        f"learning rate.")  # fmt: skip
    if huge:
        raise UserError(f"{folder} has weights of magnitude {largest:.3g} ({len(huge)} tensors above "
                        f"{MAX_WEIGHT:.2g}, e.g. {huge[0]}), which overflow in the forward; it was saved from a "
                        f"diverged run; evaluate an earlier checkpoint or train again with a lower learning "
                        f"rate.")  # fmt: skip
