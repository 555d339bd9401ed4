"""A word-level tokenizer and a LLaVA processor built from code, for tiny offline models and tests.

Both save and load with the usual ``save_pretrained`` / ``from_pretrained`` on a local folder::

    tok = build_word_tokenizer(synth.vocabulary())
    processor = build_llava_processor(tok, image_size=64, patch_size=8)
    processor.save_pretrained("tiny")  # later: LlavaProcessor.from_pretrained("tiny")
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Words the built-in Vicuna v1 prompt adds around the conversation.
TEMPLATE_TEXT = f"{VICUNA_SYSTEM} USER: ASSISTANT:"

# USER/ASSISTANT turns over ``loop_messages``: images as ``<image>\n``, replies closed by ``</s>``.
_TURNS_TEMPLATE = (
    "{%- for message in loop_messages -%}"
    "{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ ' ' if message['role'] == 'user' else '</s>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# The Vicuna v1 conversation format as a chat template: renders the same token sequence as the built-in
# ``vicuna_v1`` prompt of :class:`pmod.data.dataset.LlavaDataset` for a word-level tokenizer (whitespace around
# ``<image>`` may differ, which a whitespace pre-tokenizer ignores).
VICUNA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ system + ' ' }}" + _TURNS_TEMPLATE
)

# The same turns without a system prompt: short prompts for small models, where a 30-word system prompt would cost
# more than the question.
SHORT_CHAT_TEMPLATE = "{%- set loop_messages = messages -%}" + _TURNS_TEMPLATE

_WORD_RE = re.compile(r"\w+|[^\w\s]+")  # the split of the Whitespace pre-tokenizer


def build_word_tokenizer(words: Iterable[str], *, include_template_words: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (words or whole sentences; they are split like the tokenizer splits).

    Ids: ``<pad>``=0, ``<unk>``=1, ``<s>``=2, ``</s>``=3, ``<image>``=4, then the sorted words. Text is split on
    whitespace and punctuation (``Whitespace`` pre-tokenizer); ``<s>`` is prepended when special tokens are added.
    ``include_template_words`` adds the words of the built-in Vicuna v1 prompt (system prompt, ``USER``,
    ``ASSISTANT``, ``:``).
    """
    texts = list(words) + ([TEMPLATE_TEXT] if include_template_words else [])
    vocab_words = sorted({w for t in texts for w in _WORD_RE.findall(t)} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocab_words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = vocab["<s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


def image_processor_class(name: str) -> type:
    """The transformers image processor class ``name`` (e.g. ``"CLIPImageProcessor"``), its PIL backend when
    torchvision is missing: transformers would fall back to it anyway, with a warning on every call. Before the PIL
    backends got their own ``...Pil`` names (transformers < 5.1) the plain class is the PIL one."""
    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil")
    return getattr(transformers, name)


def build_llava_processor(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int = 64,
    patch_size: int = 8,
    *,
    vision_feature_select_strategy: str = "default",
    num_additional_image_tokens: int = 1,
    chat_template: str | None = None,
) -> LlavaProcessor:
    """A :class:`~transformers.LlavaProcessor` over ``tokenizer`` with a CLIP image processor at ``image_size``.

    Each ``<image>`` expands into ``(image_size // patch_size) ** 2 + num_additional_image_tokens`` tokens, minus one
    for ``vision_feature_select_strategy="default"`` (which drops the CLS token). The defaults match a CLIP vision
    tower (one CLS token, dropped). ``chat_template`` (e.g. :data:`VICUNA_CHAT_TEMPLATE`) is optional: without one the
    dataset uses its built-in Vicuna v1 prompt.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    image_processor = image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=num_additional_image_tokens,
        chat_template=chat_template,
    )
