"""Tokenised LLaVA-format samples with label masking (batching: :mod:`pmod.data.batching`).

A sample's prompt is built from its conversation with the processor's chat template, or with the built-in Vicuna v1
format LLaVA-1.5 was trained with::

    <s>SYSTEM USER: <image>\\nQuestion ASSISTANT: Answer</s>USER: Question 2 ASSISTANT: Answer 2</s>

The processor tokenises the prompt and expands each ``<image>`` into its image tokens, exactly as at inference.
Labels are the token ids of the assistant replies and their end-of-turn token; everything else is ``-100``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from pmod.core.errors import UserError
from pmod.data.images import ImageError, open_image
from pmod.data.llava_format import IMAGE_TOKEN, Record, Turn, load_records, parse_record, resolve_image
from pmod.data.tokenizer import VICUNA_SYSTEM

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ConvTemplate = Literal["auto", "vicuna_v1", "chat_template"]
Truncation = Literal["truncate", "drop"]
OnBadSample = Literal["skip", "error"]
# Processor outputs that belong to images (LLaVA: pixel_values, image_sizes; Qwen-VL: flattened patches and their
# grids; LLaVA-OneVision: batch_num_images, the images of each prompt) and are batched by the collator.
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
              "batch_num_images")  # fmt: skip
# Per-token processor outputs, padded like the attention mask (Qwen-VL marks its image / video tokens).
TOKEN_KEYS = ("mm_token_type_ids",)


class BadSampleError(UserError, ValueError):
    """A record that cannot be turned into a training sample (raised with ``on_bad_sample="error"``)."""


@dataclass(frozen=True)
class BadSample:
    """A record left out of training: ``kind`` is ``"bad"`` (broken record) or ``"too_long"`` (over max_length)."""

    index: int
    id: str | None
    reason: str
    kind: Literal["bad", "too_long"] = "bad"

    def __str__(self) -> str:
        return f"record {self.index}" + (f" (id {self.id})" if self.id is not None else "") + f": {self.reason}"


class _Unusable(Exception):
    def __init__(self, reason: str, kind: Literal["bad", "too_long"] = "bad") -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass(frozen=True)
class Prompt:
    """Prompt text, the character spans trained on (replies with their end-of-turn token), and whether the
    tokenizer should add its special tokens (False when the text already starts with BOS)."""

    text: str
    targets: tuple[tuple[int, int], ...]
    add_special_tokens: bool = True


def _trim(turns: Sequence[Turn]) -> list[Turn]:
    # A final human turn has no reply to learn; leave it out rather than spend tokens on it.
    turns = list(turns)
    return turns[:-1] if turns and turns[-1].role == "user" else turns


def build_vicuna_prompt(turns: Sequence[Turn], *, system: str = VICUNA_SYSTEM, eos: str = "</s>") -> Prompt:
    """The Vicuna v1 prompt of LLaVA-1.5 (``conv_vicuna_v1``); targets are ``" reply</s>"`` after each
    ``ASSISTANT:``. ``turns`` alternate user/assistant, without a system turn."""
    text, targets = system + " ", []
    for turn in _trim(turns):
        if turn.role == "user":
            text += f"USER: {turn.text} "
        else:
            text += "ASSISTANT:"
            start = len(text)
            text += f" {turn.text}{eos}"
            targets.append((start, len(text)))
    return Prompt(text, tuple(targets))


def _hf_messages(turns: Sequence[Turn], system: str | None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for turn in turns:
        content: list[dict[str, str]] = []
        pieces = turn.text.split(IMAGE_TOKEN) if turn.role == "user" else [turn.text]
        for k, piece in enumerate(pieces):
            if k:
                content.append({"type": "image"})
            if piece.strip() or turn.role == "assistant":
                content.append({"type": "text", "text": piece.strip() if turn.role == "user" else piece})
        messages.append({"role": turn.role, "content": content})
    return messages


def build_chat_template_prompt(processor: Any, turns: Sequence[Turn], *, system: str | None = None) -> Prompt:
    """A prompt rendered with ``processor.apply_chat_template``; ``<image>`` markers become image content items
    in place. A reply's target span is what rendering the conversation up to and including that reply adds after
    the generation prompt, so it covers the template's end-of-turn text."""
    messages = _hf_messages(_trim(turns), system)

    def render(msgs: list[dict[str, Any]], gen: bool = False) -> str:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = render(messages)
    targets = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = render(messages[:k], gen=True), render(messages[: k + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole, so reply "
                "spans cannot be found; use conv_template='vicuna_v1'"
            )
        targets.append((len(before), len(upto)))
    bos = getattr(processor.tokenizer, "bos_token", None)
    return Prompt(text, tuple(targets), add_special_tokens=not (bos and text.startswith(bos)))


class LlavaDataset(Dataset):
    """LLaVA-format records as training samples for a LLaVA / LLaVA-NeXT processor.

    Each item is a dict of tensors: ``input_ids``, ``labels``, ``attention_mask`` (length L <= ``max_length``), and
    for samples with images ``pixel_values`` (and ``image_sizes`` when the processor returns them, as LLaVA-NeXT's
    does), one entry per image.

    Args:
        records: a JSON/JSONL file (malformed JSONL lines are left out with a warning) or a list of raw records.
        processor: a ``LlavaProcessor``-like processor: ``tokenizer``, ``image_token`` and ``__call__(text, images)``.
        image_folder: where image paths are relative to; default: the data file's folder (or the working directory).
        max_length: the most tokens a sample may have, image tokens included.
        conv_template: ``"chat_template"`` (the processor's), ``"vicuna_v1"`` (built-in), or ``"auto"`` (the chat
            template when the processor has one).
        system_prompt: replaces the default system prompt (a record's own ``system`` turn wins over both).
        truncation: over-long samples are cut in their text (``"truncate"``; a sample whose image tokens would be
            cut, or with no reply token left, is dropped) or dropped (``"drop"``).
        on_bad_sample: a broken record (bad structure or conversation, missing or unreadable image) is skipped
            (``"skip"``) or raises :class:`BadSampleError` naming the record (``"error"``).

    A skipped or dropped item is replaced by the next usable record of the same modality (image vs text-only), so
    batch sizes and the sampler's modality grouping hold (or, when that modality has no usable record left, of the
    other one); :attr:`bad_samples`, :attr:`stats` and :meth:`summary`
    report them. These counters live in the process that builds the items (with DataLoader workers, each worker
    keeps its own); :meth:`scan` builds every item once in this process.
    """

    def __init__(
        self,
        records: str | Path | Sequence[dict[str, Any]],
        processor: Any,
        *,
        image_folder: str | Path | None = None,
        max_length: int = 2048,
        conv_template: ConvTemplate = "auto",
        system_prompt: str | None = None,
        truncation: Truncation = "truncate",
        on_bad_sample: OnBadSample = "skip",
    ) -> None:
        if isinstance(records, (str, Path)):
            path = Path(records)
            self.records: list[Any] = load_records(path, skip_malformed=True)
            image_folder = path.parent if image_folder is None else image_folder
        else:
            self.records = list(records)
        if conv_template not in ("auto", "vicuna_v1", "chat_template"):
            raise ValueError(f"conv_template must be 'auto', 'vicuna_v1' or 'chat_template', got {conv_template!r}")
        has_template = bool(getattr(processor, "chat_template", None))
        if conv_template == "chat_template" and not has_template:
            raise ValueError("conv_template='chat_template' but the processor has no chat template")
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_folder = None if image_folder is None else Path(image_folder)
        self.max_length = max_length
        self.use_chat_template = conv_template == "chat_template" or (conv_template == "auto" and has_template)
        self.system_prompt = system_prompt
        self.truncation = truncation
        self.on_bad_sample = on_bad_sample
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = self.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_TOKEN))
        self.image_token_id = int(image_token_id)
        self._has_image = [isinstance(r, dict) and bool(r.get("image")) for r in self.records]
        self._unusable: dict[int, BadSample] = {}
        self._truncated: set[int] = set()
        self._warned_no_eos = False

    def __len__(self) -> int:
        return len(self.records)

    @cached_property
    def modality_lengths(self) -> list[int]:
        """Per record, a cheap length estimate (words in the conversation, at least 1): positive for records with
        images, negative for text-only ones, as LLaVA's ``modality_lengths`` (input of the sampler)."""
        out = []
        for rec, has_image in zip(self.records, self._has_image):
            convs = rec.get("conversations") if isinstance(rec, dict) else None
            words = sum(len(str(t.get("value", "")).split()) for t in convs if isinstance(t, dict)) if convs else 0
            out.append(max(1, words) * (1 if has_image else -1))
        return out

    @property
    def bad_samples(self) -> list[BadSample]:
        """Broken records met so far (those skipped), by index."""
        return [b for _, b in sorted(self._unusable.items()) if b.kind == "bad"]

    @property
    def stats(self) -> dict[str, int]:
        """Distinct records met so far that were skipped as bad, dropped as too long, or truncated."""
        kinds = [b.kind for b in self._unusable.values()]
        return {
            "bad": kinds.count("bad"),
            "dropped_too_long": kinds.count("too_long"),
            "truncated": len(self._truncated),
        }

    def summary(self) -> str:
        """One line of :attr:`stats`, then one line per skipped or dropped record."""
        s = self.stats
        lines = [
            f"{len(self)} records: {s['bad']} bad (skipped), {s['dropped_too_long']} too long (dropped), "
            f"{s['truncated']} truncated to {self.max_length} tokens"
        ]
        lines += [f"  {b}" for _, b in sorted(self._unusable.items())]
        return "\n".join(lines)

    def scan(self) -> dict[str, int]:
        """Build every item once (here, not in DataLoader workers) so :attr:`stats` covers the whole data set."""
        for i in range(len(self)):
            if i not in self._unusable:
                try:
                    self.encode(i)
                except _Unusable as err:
                    self._mark(i, err)
        return self.stats

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # The next usable record of the same modality stands in, so modality-grouped batches stay unmixed; when
        # that modality has none left (a lone `null` or text-only record among image records), one of the other
        # modality does: a skipped record must never stop a run while any usable record is left.
        n = len(self)
        for same in (True, False):
            for step in range(n):
                j = (index + step) % n
                if j in self._unusable or (self._has_image[j] == self._has_image[index]) != same:
                    continue
                try:
                    return self.encode(j)
                except _Unusable as err:
                    self._mark(j, err)
        raise BadSampleError(
            f"no usable record left to stand in for record {index} ({self.summary().splitlines()[0]}); "
            f"check the images' folder and `pmod data check` the file"
        )

    def _mark(self, index: int, err: _Unusable) -> None:
        bad = BadSample(index, self._record_id(index), err.reason, err.kind)
        if err.kind == "bad" and self.on_bad_sample == "error":
            raise BadSampleError(
                f"bad sample: {bad}; fix or remove the record (`pmod data check` lists them), or pass "
                f"--on-bad-sample skip to count and skip such records"
            )
        self._unusable[index] = bad
        logger.warning("%s %s", "skipping" if err.kind == "bad" else "dropping", bad)

    def _record_id(self, index: int) -> str | None:
        rec = self.records[index]
        return None if not isinstance(rec, dict) or rec.get("id") is None else str(rec["id"])

    def build_prompt(self, record: Record) -> Prompt:
        """The prompt of a parsed record, with the configured conversation format."""
        system = record.system if record.system is not None else self.system_prompt
        if self.use_chat_template:
            prompt = build_chat_template_prompt(self.processor, record.dialogue, system=system)
            eos = getattr(self.tokenizer, "eos_token", None)
            if not self._warned_no_eos and eos and any(eos not in prompt.text[s:e] for s, e in prompt.targets):
                self._warned_no_eos = True
                logger.warning(
                    "the chat template puts no %s after replies, so the model will not learn to stop; "
                    "consider conv_template='vicuna_v1'",
                    eos,
                )
            return prompt
        eos = getattr(self.tokenizer, "eos_token", None) or "</s>"
        return build_vicuna_prompt(record.dialogue, system=VICUNA_SYSTEM if system is None else system, eos=eos)

    def encode(self, index: int) -> dict[str, torch.Tensor]:
        """Build the item of record ``index`` (no skipping: raises for an unusable record)."""
        record, problems = parse_record(self.records[index], index)
        if problems or record is None:
            raise _Unusable(f"{problems[0].kind}: {problems[0].message}")
        images = []
        for rel in record.images:
            path = resolve_image(rel, self.image_folder)
            if not path.is_file():
                raise _Unusable(f"missing_image: {path} not found")
            try:
                images.append(open_image(path))
            except (ImageError, OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
                raise _Unusable(f"unreadable_image: {path}: {err}") from err
        prompt = self.build_prompt(record)
        out = self.processor(
            text=[prompt.text],
            images=[images] if images else None,  # one prompt's images (OneVision: base views when several)
            return_tensors="pt",
            add_special_tokens=prompt.add_special_tokens,
        )
        input_ids = out["input_ids"][0]
        labels = self._labels(prompt, input_ids)
        attention_mask = out["attention_mask"][0] if "attention_mask" in out else torch.ones_like(input_ids)

        if len(input_ids) > self.max_length:
            too_long = f"{len(input_ids)} tokens > max_length {self.max_length}"
            if self.truncation == "drop":
                raise _Unusable(too_long, "too_long")
            image_pos = (input_ids == self.image_token_id).nonzero()
            if len(image_pos) and int(image_pos[-1]) >= self.max_length:
                raise _Unusable(f"{too_long} and its image tokens end at {int(image_pos[-1]) + 1}", "too_long")
            input_ids, labels, attention_mask = (t[: self.max_length] for t in (input_ids, labels, attention_mask))
            if not (labels != IGNORE_INDEX).any():
                raise _Unusable(f"{too_long} and no reply token is left after truncation", "too_long")
            if index not in self._truncated:
                self._truncated.add(index)
                logger.info("truncated record %d (id %s): %s", index, record.id, too_long)

        item = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if images:
            item.update({k: out[k] for k in IMAGE_KEYS if k in out})
        item.update({k: out[k][0][: len(input_ids)] for k in TOKEN_KEYS if k in out})
        return item

    def _labels(self, prompt: Prompt, input_ids: torch.Tensor) -> torch.Tensor:
        # Tokenise the unexpanded prompt with character offsets to find reply tokens, then walk it alongside the
        # processor's ids, where each run of <image> placeholders became a longer run of image tokens. Text between
        # placeholders is tokenised the same way in both, because the image token is a special token.
        enc = self.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens, return_offsets_mapping=True)
        text_ids, offsets = enc["input_ids"], enc["offset_mapping"]
        text_labels = [
            tid if end > start and any(s <= start < e for s, e in prompt.targets) else IGNORE_INDEX
            for tid, (start, end) in zip(text_ids, offsets)
        ]
        ids = input_ids.tolist()
        img = self.image_token_id
        labels: list[int] = []
        i = j = 0
        while i < len(ids):
            if j >= len(text_ids) or ids[i] != text_ids[j]:
                raise RuntimeError(
                    f"the processor's tokens differ from the tokenizer's at position {i}; the processor must only "
                    f"expand {IMAGE_TOKEN} placeholders"
                )
            if ids[i] == img:
                while j < len(text_ids) and text_ids[j] == img:
                    j += 1
                while i < len(ids) and ids[i] == img:
                    labels.append(IGNORE_INDEX)
                    i += 1
            else:
                labels.append(text_labels[j])
                i += 1
                j += 1
        if j != len(text_ids):
            raise RuntimeError("the processor's tokens end before the tokenizer's")
        return torch.tensor(labels, dtype=torch.long)
