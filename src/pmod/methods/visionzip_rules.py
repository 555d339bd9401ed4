"""VisionZip's run-time rule: each image's vision tokens reduced before the decoder, and the sequence shortened to
match (the settings and the rule in words: :mod:`pmod.methods.visionzip`).

Three hooks, set up by :func:`attach_visionzip` when a model is converted:

* on the tower layer whose output feeds the projector: its input (for the [CLS] attention and the keys, computed
  again from the layer's own ``layer_norm1``, ``q_proj`` and ``k_proj``, so every attention backend works) and its
  output (the tokens, the [CLS] token included);
* on the projector: its input replaced by the ``dominant + contextual`` reduced tokens of each image;
* on the model: ``input_ids`` (and the attention mask and labels) keep the first ``dominant + contextual``
  placeholders of each image and drop the rest, rows re-padded; the logits are put back at the positions of the
  tokens given, so that callers index them as before (dropped placeholders get 0). ``model.generate`` shortens the
  prompt before generating and gives back the sequences with the prompt as given.
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pmod.core.backbone import BackboneAdapter, VisionTokenPath
from pmod.core.convert import SHORTENING_ATTRIBUTE
from pmod.core.errors import UserError

#: The label of tokens without a loss (transformers' ignore index).
IGNORE_INDEX = -100


def cls_attention_and_keys(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [CLS] token's attention over the patches, summed over heads [N, P], and the keys averaged over heads
    [N, 1 + P, head_dim], of a CLIP encoder layer whose input is ``hidden`` [N, 1 + P, D] ([CLS] first)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    n, t, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(n, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).float().softmax(-1)  # [N, heads, 1, 1 + P]
    return probs[:, :, 0, 1:].sum(1), k.mean(1)


def dominant_mask(cls_attention: torch.Tensor, dominant: int) -> torch.Tensor:
    """Bool [N, 1 + P]: the [CLS] token and the ``dominant - 1`` patches of highest ``cls_attention`` [N, P]."""
    n, patches = cls_attention.shape
    keep = torch.zeros(n, 1 + patches, dtype=torch.bool, device=cls_attention.device)
    keep[:, 0] = True
    return keep.scatter_(1, cls_attention.topk(dominant - 1, dim=1).indices + 1, True)


def reduce_tokens(
    tokens: torch.Tensor, keys: torch.Tensor, cls_attention: torch.Tensor, dominant: int, contextual: int
) -> torch.Tensor:
    """VisionZip on each image's ``tokens`` [N, 1 + P, D] ([CLS] first): [N, dominant + contextual, D], the
    [CLS] token and the ``dominant - 1`` patches of highest ``cls_attention`` [N, P] in position order, then the
    ``contextual`` merged tokens (targets at a uniform stride over the rest, each the target plus the mean of the
    tokens whose normalised ``keys`` [N, 1 + P, d] are most similar to its key)."""
    n, t, width = tokens.shape
    keep = dominant_mask(cls_attention, dominant)
    kept = tokens[keep].view(n, dominant, width)
    if contextual == 0:
        return kept
    left = t - dominant
    rest, rest_keys = tokens[~keep].view(n, left, width), keys[~keep].view(n, left, -1)
    rest_keys = rest_keys / rest_keys.norm(dim=-1, keepdim=True)
    targets = torch.arange(0, left, max(1, left // contextual), device=tokens.device)[:contextual]
    is_target = torch.zeros(left, dtype=torch.bool, device=tokens.device)
    is_target[targets] = True
    similarity = rest_keys[:, ~is_target] @ rest_keys[:, targets].transpose(1, 2)  # [N, others, contextual]
    assign = F.one_hot(similarity.argmax(-1), contextual).to(tokens.dtype)
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)
    merged = assign.transpose(1, 2) @ rest[:, ~is_target] / counts
    return torch.cat([kept, rest[:, targets] + merged], dim=1)


class TowerTap:
    """The hooks on the selected tower layer and the projector: the projector gets the reduced tokens."""

    def __init__(self, layer: nn.Module, dominant: int, contextual: int, path: VisionTokenPath) -> None:
        self.layer, self.dominant, self.contextual, self.path = layer, dominant, contextual, path
        self.seen: dict[str, torch.Tensor] = {}

    def layer_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.seen["input"] = args[0] if args else kwargs["hidden_states"]

    def layer_output(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self.seen["output"] = output[0] if isinstance(output, tuple) else output

    def projector_input(self, module: nn.Module, args: tuple) -> tuple:
        features = args[0]
        tokens, hidden = self.seen.pop("output", None), self.seen.pop("input", None)
        if tokens is None or hidden is None or tokens.shape[0] != features.shape[0]:
            raise RuntimeError("VisionZip: the projector ran without its tower's selected layer; the tower and the "
                               "projector must run in one get_image_features call")  # fmt: skip
        cls_attention, keys = cls_attention_and_keys(self.layer, hidden)
        # each view's dominant patches (0-based patch index, in order), for a packer that lays them out on the grid
        self.seen["patches"] = dominant_mask(cls_attention, self.dominant)[:, 1:].nonzero()[:, 1].view(
            tokens.shape[0], self.dominant - 1)  # fmt: skip
        return (reduce_tokens(tokens, keys, cls_attention, self.dominant, self.contextual).to(features.dtype),)

    def pack_image_features(self, features: Any, image_sizes: Any, *args: Any, **kwargs: Any) -> tuple[list, Any]:
        """LLaVA-NeXT's ``pack_image_features`` (set on the model by :func:`attach_visionzip`; a bound method, so
        that a deep copy of the model packs with its own tap): the images and their token counts."""
        images = self.pack(list(features), image_sizes, self.path)
        return images, torch.tensor([len(x) for x in images], device=images[0].device)

    def pack(self, features: list[torch.Tensor], image_sizes: Any, path: VisionTokenPath) -> list[torch.Tensor]:
        """The authors' LLaVA-NeXT layout of each image's reduced views ``features[i]`` [views, kept, D]: the base
        view's tokens; the tiles' dominant patches in row-major order of the whole tile grid (no unpadding, no
        newline); each tile's [CLS] token; each tile's contextual tokens."""
        patches, side = self.seen.pop("patches"), math.isqrt(path.tokens_per_image)
        out, start = [], 0
        for feature, (views, _, _rows, cols) in zip(features, path.views(image_sizes), strict=True):
            if views < 2:
                raise RuntimeError("VisionZip: a LLaVA-NeXT image without tiles; the processor always adds them")
            index = patches[start + 1 : start + views]  # [tiles, dominant - 1]
            start += views
            tile = torch.arange(views - 1, device=index.device)[:, None]
            y, x = (tile // cols) * side + index // side, (tile % cols) * side + index % side
            order = (y * cols * side + x).flatten().argsort()
            tiles = feature[1:]
            dominant = tiles[:, 1 : self.dominant].flatten(0, 1)[order]
            contextual = tiles[:, self.dominant :].flatten(0, 1)
            out.append(torch.cat([feature[0], dominant, tiles[:, 0], contextual]))
        return out


@dataclass
class Shortening:
    """Which tokens of a [B, T] input a forward keeps (``keep``), where each lands (``where`` [B, T]) and the
    shortened length."""

    keep: torch.Tensor
    where: torch.Tensor
    length: int

    def apply(self, x: torch.Tensor, fill: int) -> torch.Tensor:
        """``x`` [B, T] shortened to [B, length]; new slots (padding) get ``fill``."""
        out = x.new_full((x.shape[0], self.length + 1), fill)
        out.scatter_(1, torch.where(self.keep, self.where, self.length), x)
        return out[:, : self.length]

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """Per-token outputs [B, length, ...] put back at the positions of the input [B, T, ...] (0 elsewhere)."""
        out = y.new_zeros((*self.keep.shape, *y.shape[2:]))
        rows = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(self.where)
        out[self.keep] = y[rows[self.keep], self.where[self.keep]]
        return out


class SequenceHook:
    """The model's hooks: a forward's ``input_ids`` keep ``kept`` of the ``per_image`` placeholders of each image;
    ``model.generate`` shortens its prompt once, before generating."""

    def __init__(self, model: nn.Module, path: VisionTokenPath, kept: int) -> None:
        self.positional = list(inspect.signature(model.forward).parameters)
        self.path, self.kept = path, kept
        self.image_token_id, self.per_image = path.image_token_id, path.tokens_per_image
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0
        self.current: Shortening | None = None
        self.generating = False  # inside model.generate: the prompt is already shortened
        self.decoder_mask: torch.Tensor | None = None  # the last shortened call's padding mask

    def image_counts(self, counts: torch.Tensor, image_sizes: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Placeholders given and kept of each image of a call, in order ([images] each)."""
        if self.path.views is None:
            if bool((counts % self.per_image).any()):
                raise UserError(f"VisionZip: a row holds {counts.tolist()} image placeholders, not a whole number "
                                f"of images of {self.per_image}; encode the prompts with the model's own "
                                f"processor")  # fmt: skip
            images = int(counts.sum()) // self.per_image
            return torch.full((images,), self.per_image), torch.full((images,), self.kept)
        if image_sizes is None:
            raise UserError("VisionZip on LLaVA-NeXT counts each image's views from image_sizes: pass the "
                            "processor's image_sizes with input_ids")  # fmt: skip
        views = self.path.views(image_sizes)
        given = torch.tensor([v[1] for v in views])
        if int(given.sum()) != int(counts.sum()):
            raise UserError(f"VisionZip: the prompts hold {int(counts.sum())} image placeholders, the images' sizes "
                            f"give {int(given.sum())}; encode the prompts with the model's own processor")
        return given, torch.tensor([v[0] * self.kept for v in views])

    def plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, left: bool,
             image_sizes: Any = None) -> Shortening | None:  # fmt: skip
        """The shortening of ``input_ids`` (None: no image placeholder); rows re-padded on the left or right.
        Images take the placeholders in order, row after row; each keeps its first ``kept`` placeholders."""
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(1)
        if not bool(counts.any()):
            return None
        given, kept = (t.to(input_ids.device) for t in self.image_counts(counts, image_sizes))
        flat = is_image.flatten()
        index = flat.cumsum(0) - 1  # each placeholder's number over the whole batch
        image = torch.searchsorted(given.cumsum(0), index, right=True).clamp(max=len(given) - 1)
        rank = index - (given.cumsum(0) - given)[image]
        keep = ~(flat & (rank >= kept[image])).view_as(is_image)
        if attention_mask is not None and attention_mask.dim() == 2:
            keep &= attention_mask.bool()  # padding is dropped too, and the rows padded again to the longest
        lengths = keep.sum(1)
        length = int(lengths.max())
        where = keep.cumsum(1) - 1
        if left:
            where = where + (length - lengths)[:, None]
        return Shortening(keep, where, length)

    def shorten(self, kwargs: dict[str, Any], left: bool | None = None) -> Shortening | None:
        """Shorten ``input_ids``, ``attention_mask`` and ``labels`` in ``kwargs`` in place."""
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        self.decoder_mask = None
        if ids is None:
            if kwargs.get("inputs_embeds") is not None and kwargs.get("pixel_values") is not None:
                raise UserError("VisionZip shortens the prompt's image placeholders: pass input_ids, not "
                                "inputs_embeds")  # fmt: skip
            return None
        if left is None:  # keep the batch's own padding side (left when some row starts with padding)
            left = mask is not None and mask.dim() == 2 and bool((mask[:, 0] == 0).any())
        short = self.plan(ids, mask, left, kwargs.get("image_sizes"))
        if short is None:
            return None
        if kwargs.get("position_ids") is not None:
            raise UserError("VisionZip numbers the shortened sequence itself; call the model without position_ids")
        if mask is None and bool((short.keep.sum(1) != short.length).any()):
            mask = torch.ones_like(ids)  # rows of unequal length now: padding needs a mask
        kwargs["input_ids"] = short.apply(ids, self.pad_id)
        if mask is not None:
            kwargs["attention_mask"] = short.apply(mask, 0)
        self.decoder_mask = short.apply(torch.ones_like(ids) if mask is None else mask, 0)
        if kwargs.get("labels") is not None:
            kwargs["labels"] = short.apply(kwargs["labels"], IGNORE_INDEX)
        return short

    def before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        self.current = None
        if self.generating:
            return args, kwargs
        kwargs = {**dict(zip(self.positional, args)), **kwargs}
        self.current = self.shorten(kwargs)
        return (), kwargs

    def after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        short, self.current = self.current, None
        logits = getattr(output, "logits", None)
        if short is not None and logits is not None and logits.shape[1] == short.length:
            output.logits = short.restore(logits)
        return output


def with_prompt(sequences: torch.Tensor, prompt: torch.Tensor, length: int) -> torch.Tensor:
    """``sequences`` [rows, length + new] of a shortened prompt with the prompt as given [B, T] in its place (rows:
    B times the beams or returned sequences)."""
    prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0).to(sequences.device)
    return torch.cat([prompt, sequences[:, length:]], dim=1)


class PromptAsGiven:
    """A stopping criterion or logits processor of ``generate`` that sees the sequences with the prompt as given
    (e.g. one that decodes ``input_ids[:, prompt_length:]``), not the shortened one generate runs on."""

    def __init__(self, inner: Any, prompt: torch.Tensor, length: int) -> None:
        self.inner, self.prompt, self.length = inner, prompt, length

    # No **kwargs: transformers' LogitsProcessorList would then ask for each named keyword.
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> Any:
        return self.inner(with_prompt(input_ids, self.prompt, self.length), scores)


def generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate`` of a VisionZip model: the prompt shortened (left-padded) before generating; the sequences come
    back with the prompt as given, so ``out[:, input_ids.shape[1]:]`` are the new tokens as usual, and so do the
    sequences that stopping criteria and logits processors see."""
    hook: SequenceHook = getattr(model, SHORTENING_ATTRIBUTE)
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    ids = kwargs.get("input_ids")
    short = hook.shorten(kwargs, left=True) if ids is not None else None
    if short is not None:
        for key in ("stopping_criteria", "logits_processor"):
            if kwargs.get(key) is not None:
                kwargs[key] = type(kwargs[key])(PromptAsGiven(x, ids, short.length) for x in kwargs[key])
    hook.generating = short is not None
    try:
        out = type(model).generate(model, *args, **kwargs)
    finally:
        hook.generating = False
    if short is None:
        return out
    if isinstance(out, torch.Tensor):
        return with_prompt(out, ids, short.length)
    out.sequences = with_prompt(out.sequences, ids, short.length)
    return out


def selected_layer(path: VisionTokenPath) -> int:
    """The encoder layer whose output is the hidden state ``path.feature_layer`` (hidden state 0: embeddings)."""
    count = len(path.encoder_layers)
    index = path.feature_layer if path.feature_layer >= 0 else count + 1 + path.feature_layer
    if not 1 <= index <= count:
        raise UserError(f"VisionZip needs a tower layer's output as the image features; this model takes hidden "
                        f"state {path.feature_layer} of {count + 1} (set vision_feature_layer to a layer, e.g. -2)")
    return index - 1


def attach_visionzip(model: nn.Module, adapter: BackboneAdapter, dominant: int, contextual: int) -> None:
    """Set up VisionZip's hooks on ``model`` (see the module's docstring); a one-line :class:`UserError` where the
    family gives no CLIP tower with a [CLS] token or an image has fewer tokens than are kept."""
    path = adapter.vision_token_path(model) if adapter.vision_token_path is not None else None
    if path is None or not path.has_cls:
        raise UserError(f"VisionZip ranks an image's tokens by the [CLS] attention of its CLIP tower, which pmod "
                        f"finds in LLaVA-1.5 and LLaVA-NeXT models; {adapter.name} models have none (SigLIP and "
                        f"Qwen-VL towers have no [CLS] token): use fastv, pdrop or dart, which act in the "
                        f"decoder")  # fmt: skip
    if path.views is not None and math.isqrt(path.tokens_per_image) ** 2 != path.tokens_per_image:
        raise UserError("VisionZip on LLaVA-NeXT lays the tiles' patches out on their grid: it needs "
                        "vision_feature_select_strategy 'default' (the [CLS] token dropped)")  # fmt: skip
    if not isinstance(path.feature_layer, int):
        raise UserError(f"VisionZip reads one tower layer; this model concatenates layers {path.feature_layer}")
    if dominant + contextual > path.tokens_per_image:
        raise UserError(f"VisionZip keeps dominant + contextual = {dominant} + {contextual} tokens per image, more "
                        f"than the {path.tokens_per_image} of this model's images; lower them")  # fmt: skip
    layer = path.encoder_layers[selected_layer(path)]
    tap = TowerTap(layer, dominant, contextual, path)
    layer.register_forward_pre_hook(tap.layer_input, with_kwargs=True)
    layer.register_forward_hook(tap.layer_output, with_kwargs=True)
    path.projector.register_forward_pre_hook(tap.projector_input)
    if path.packer is not None:
        path.packer.pack_image_features = tap.pack_image_features
    hook = SequenceHook(model, path, dominant + contextual)
    model.register_forward_pre_hook(hook.before, with_kwargs=True, prepend=True)
    model.register_forward_hook(hook.after, with_kwargs=True)
    setattr(model, SHORTENING_ATTRIBUTE, hook)  # generate's hook, and the decoder's padding mask for the KV counts
    model.generate = types.MethodType(generate, model)
