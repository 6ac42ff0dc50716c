"""Processors that work offline and without torchvision.

transformers 5 builds Qwen's image processor on torchvision by default; torchvision does not import
beside the CPU torch used here, so every Qwen processor is assembled from ``Qwen2VLImageProcessorPil``
(numerically the same, to 2.4e-7). Small models use a word-level tokenizer whose vocabulary covers
the toolkit's prompts and answers, with the Qwen special tokens at fixed ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLProcessor

from probes.data.manifest import IMAGE_TAG, OBJECT_PROMPT, SCENE_PROMPT
from probes.data.sources import OBJECT_CLASSES, SCENE_CLASSES

# Qwen's special tokens, in the order that fixes their ids in the small vocabularies (0..7).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)
PAD_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID, UNK_ID = range(8)

# Every prompt and answer the toolkit asks or scores. The word-level vocabulary is built from these.
FORENSIC_PROMPTS = (
    "Is this image real or fake? Please just answer 'real' or 'fake'. <image>",
    "Is this image real or fake? Please answer with only a single word: 'real' or 'fake'. <image>",
    "Please determine if the following image is real or fake. You can detailed check the image and find "
    "the evidence. Please just answer 'real' or 'fake'. <image>",
    "Is this a real image? Answer only 'yes' or 'no'. <image>",
    "Is this a AI-generated image? Answer only 'yes' or 'no'. <image>",
    "Determine if this image is AI-generated. Your response must be either 'natural' or 'AI-generated'. <image>",
    "Please classify this image from the following options: 'natural image', 'ai-generated'. Your answer "
    "must be one of these options. <image>",
    "After analyzing this image, are there clear signs of AI generation? Answer 'yes' or 'no'. <image>",
)
SEMANTIC_PROMPTS = (OBJECT_PROMPT, SCENE_PROMPT)
ANSWER_WORDS = ("real", "fake", "yes", "no", "natural", "ai-generated", "user", "assistant", "system")

# Chat template of the small models: Qwen's turn structure, words separated by spaces.
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} \n"
    "{% if m['content'] is string %} {{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %} {{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %} <|im_end|> \n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant \n{% endif %}"
)

_WORD = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


def words_of(texts: Sequence[str]) -> list[str]:
    """The lower-cased words and punctuation marks of ``texts``, in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for w in _WORD.findall(text.replace(IMAGE_TAG, " ").lower()):
            seen.setdefault(w, None)
    return list(seen)


def default_vocabulary() -> list[str]:
    texts = [*FORENSIC_PROMPTS, *SEMANTIC_PROMPTS, *OBJECT_CLASSES, *SCENE_CLASSES, *ANSWER_WORDS]
    return [*SPECIAL_TOKENS, *words_of(texts)]


def word_tokenizer(vocabulary: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocabulary`` (default: every prompt and answer of the toolkit).

    Lower-cases, splits on spaces and punctuation; unknown words map to ``<unk>``. Left padding, so the
    last position of every row is its last real token.
    """
    vocab = list(vocabulary or default_vocabulary())
    if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError("the vocabulary must start with the Qwen special tokens in SPECIAL_TOKENS order")
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:7]),
        padding_side="left",
    )
    tok.chat_template = WORD_CHAT_TEMPLATE
    return tok


class _NoVideoMixin:
    """Skips the video-processor type check: ``VideoProcessorMixin`` needs torchvision."""

    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return super().check_argument_for_proper_class(name, arg)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the parts that exist (ProcessorMixin's own save expects a video processor)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(save_directory)
        self.tokenizer.save_pretrained(save_directory)
        if self.chat_template:
            (Path(save_directory) / "chat_template.jinja").write_text(self.chat_template)
        return [str(save_directory)]


class OfflineQwen2_5_VLProcessor(_NoVideoMixin, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for still images, without torchvision."""


class OfflineQwen2VLProcessor(_NoVideoMixin, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for still images, without torchvision."""


def swift_to_chat(prompt: str, answer: str | None = None) -> list[dict]:
    """An ms-swift user prompt (``<image>`` tags inline) as chat-template messages, in the same order."""
    content: list[dict] = []
    for i, part in enumerate(prompt.split(IMAGE_TAG)):
        if i:
            content.append({"type": "image"})
        if part.strip():
            content.append({"type": "text", "text": part.strip()})
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages
