"""The backbone adapter: the one object that lets capture, probes and injection stay family-agnostic.

An adapter wraps a loaded vision-language model and its processor, and answers, for its family:

- where the decoder layers are (``layers_path``) and how many there are;
- which token id marks image positions, and the mask of those positions;
- where vision features are scattered into the sequence (the input of decoder layer 0 at the
  image-token mask, equal to the vision tower's output in image-token order);
- where an injection after decoder layer ``k`` goes (the output of ``layers[k - 1]``);
- how to build model inputs from images and ms-swift prompts (left padding, ``mm_token_type_ids``).

A new backbone family is one subclass, registered with :func:`probes.backbones.register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import BatchFeature, PreTrainedModel

from probes.errors import BadInputError, ConfigError
from probes.storage import hash_json, hash_state_dict

# Tensor shape aliases used in signatures and docstrings.
TokenIds = Tensor  # [batch, seq] int64
TokenMask = Tensor  # [batch, seq] bool
Hidden = Tensor  # [batch, seq, hidden]
ImageTokens = Tensor  # [n_image_tokens, hidden], image-token order

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FULL_HASH_LIMIT = 200_000_000  # parameters; above it the fingerprint samples each tensor


@dataclass(frozen=True)
class LoadSettings:
    """How a backbone is loaded. Recorded with every result made from it."""

    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str = "cpu"
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype}", f"unknown dtype; use one of {sorted(DTYPES)}")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ConfigError(f"attn_implementation={self.attn_implementation}", "use sdpa, eager or flash_attention_2")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class BackboneAdapter(ABC):
    """Family-specific facts about a loaded vision-language model. See the module docstring."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # ``config.model_type`` values this adapter reads
    model_class: ClassVar[type[PreTrainedModel]]
    layers_path: ClassVar[str] = "model.language_model.layers"
    vision_path: ClassVar[str] = "model.visual"
    final_norm_path: ClassVar[str] = "model.language_model.norm"
    lm_head_path: ClassVar[str] = "lm_head"

    def __init__(self, model: PreTrainedModel, processor: Any, *, source: str, settings: LoadSettings):
        self.model = model
        self.processor = processor
        self.source = source
        self.settings = settings
        self._fingerprint: tuple[tuple[int, ...], str] | None = None  # (parameter versions, hash)

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str, settings: LoadSettings, **processor_kwargs) -> BackboneAdapter:
        """Load model and processor from a local folder (or a hub id already in the local cache)."""

    @classmethod
    def from_config(cls, config, settings: LoadSettings, processor: Any = None) -> BackboneAdapter:
        """Build from a config alone: random weights, or none at all on the ``meta`` device."""
        with torch.device(settings.device):
            model = cls.model_class._from_config(
                config, dtype=settings.torch_dtype, attn_implementation=settings.attn_implementation
            )
        return cls(model.eval(), processor, source=f"config:{config.model_type}", settings=settings)

    def random_like(self, seed: int = 0) -> BackboneAdapter:
        """The same architecture and processor with seeded random weights: a probing baseline."""
        torch.manual_seed(seed)
        twin = type(self).from_config(self.model.config, self.settings, self.processor)
        twin.source = f"random-weights({self.source}),seed={seed}"
        return twin

    # --- structure -----------------------------------------------------------------------------
    def module(self, path: str) -> nn.Module:
        """The submodule at a dotted path, e.g. ``model.language_model.layers``."""
        return self.model.get_submodule(path)

    @property
    def layers(self) -> nn.ModuleList:
        return self.module(self.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def vision(self) -> nn.Module:
        """The vision tower with its merger: ``vision(pixel_values, grid_thw=...)`` gives image tokens."""
        return self.module(self.vision_path)

    def image_token_mask(self, input_ids: TokenIds) -> TokenMask:
        return input_ids == self.image_token_id

    def check_layer(self, k: int, *, name: str = "layer") -> int:
        """``k`` counts decoder layers (1-based). Raise a one-line error when it is out of range."""
        if not isinstance(k, int) or not 1 <= k <= self.num_layers:
            raise ConfigError(f"{name}={k}", f"out of range 1..{self.num_layers} for {self.family} ({self.num_layers} layers)")
        return k

    def injection_site(self, k: int) -> nn.Module:
        """The module whose output receives an injection *after* decoder layer ``k`` (1-based).

        ``k`` must leave at least one layer after it: 1 ≤ k ≤ num_layers − 1.
        """
        if not isinstance(k, int) or not 1 <= k <= self.num_layers - 1:
            raise ConfigError(
                f"injection_layer={k}", f"out of range 1..{self.num_layers - 1} for {self.family} ({self.num_layers} layers)"
            )
        return self.layers[k - 1]

    def sites(self) -> dict[str, str]:
        """Where each thing lives, as dotted paths (for docs, provenance and error messages)."""
        return {
            "layers": self.layers_path,
            "vision": self.vision_path,
            "scatter": f"{self.layers_path}.0 input at input_ids == {self.image_token_id}",
            "injection(k)": f"{self.layers_path}.[k-1] output at input_ids == {self.image_token_id}",
            "final_norm": self.final_norm_path,
            "lm_head": self.lm_head_path,
        }

    # --- inputs --------------------------------------------------------------------------------
    @abstractmethod
    def build_inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], answers: Sequence[str] | None = None
    ) -> BatchFeature:
        """One processor call for a batch: ``input_ids``, ``attention_mask`` (left padding),
        ``mm_token_type_ids``, pixel values and grid. With ``answers``, the answer and end-of-turn token
        are appended and ``labels`` keep only them (-100 elsewhere), for a loss on the answer tokens.
        """

    def with_mm_token_type_ids(self, inputs: dict) -> dict:
        """Derive ``mm_token_type_ids`` from ``input_ids`` when absent.

        transformers 5 computes the 3-D M-RoPE positions only when it is given; without it image tokens
        silently get 1-D positions and the logits change.
        """
        if inputs.get("mm_token_type_ids") is None and inputs.get("input_ids") is not None:
            inputs["mm_token_type_ids"] = self.image_token_mask(inputs["input_ids"]).long()
        return inputs

    def check_image_tokens(self, inputs: dict, n_features: int, item: str = "batch") -> None:
        """Raise a one-line error when the image-token count does not match the vision features."""
        n_tokens = int(self.image_token_mask(inputs["input_ids"]).sum())
        if n_tokens != n_features:
            raise BadInputError(item, f"{n_tokens} image tokens in input_ids but {n_features} image features")

    # --- provenance ----------------------------------------------------------------------------
    def weights_fingerprint(self) -> str:
        """A hash of the weights (names, shapes, dtypes, values); sampled per tensor for big models.

        Cached until a parameter changes in place (an optimiser step bumps its version counter).
        """
        versions = tuple(p._version for p in self.model.parameters())
        if self._fingerprint is None or self._fingerprint[0] != versions:
            state = self.model.state_dict()
            n = sum(t.numel() for t in state.values())
            if n > _FULL_HASH_LIMIT:
                state = {f"{k}|{tuple(v.shape)}": _sample(v) for k, v in state.items()}
            self._fingerprint = (versions, hash_state_dict(state))
        return self._fingerprint[1]

    @abstractmethod
    def processor_settings(self) -> dict[str, Any]:
        """Everything about preprocessing that changes the model's input (sizes, norms, template)."""

    def provenance(self) -> dict[str, Any]:
        """What a cached activation or a result must record about the model that made it."""
        processor = self.processor_settings()
        return {
            "family": self.family,
            "source": self.source,
            "weights": self.weights_fingerprint(),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "processor": processor,
            "processor_hash": hash_json(processor),
            **asdict(self.settings),
        }


def _sample(t: Tensor, k: int = 65_536) -> Tensor:
    flat = t.detach().reshape(-1)
    return flat if flat.numel() <= 2 * k else torch.cat([flat[:k], flat[-k:]])
