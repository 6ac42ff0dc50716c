"""A second, independent capture backend: TransformerLens's ``TransformerBridge`` (optional dependency).

The same rows as :mod:`probes.capture` (nnsight), through the bridge's hook points instead:

- row 0: ``blocks.0.hook_resid_pre``, the input of decoder layer 1 (token embeddings with the vision
  features scattered in at the image-token positions);
- row i (1..L): ``blocks.{i-1}.hook_resid_post``, the raw output of decoder layer i (no final norm).

Positions ``image_mean`` (fp32 mean over ``input_ids == image_token_id``), ``last`` (the last position,
each row's last real token under left padding) and ``image_tokens`` mean what they mean in
:data:`probes.capture.POSITION_MEANING`. The pooling is written again here, not imported, so that the
two backends share nothing but the processor call (``backbone.build_inputs``).

TransformerLens is optional: it is imported inside the functions, and a missing package raises
:class:`~probes.errors.UnavailableError`. It is also dangerous to this environment: when booting a
multimodal model, TL 4.3 may ``pip install torchvision`` in a subprocess, which replaces torch with
another build. :func:`guard_transformer_lens` closes that path before every boot, and :func:`bridge_for`
checks afterwards that neither torch nor torchvision changed on disk. Run with ``HF_HUB_OFFLINE=1``.

>>> from probes.backbones import load_backbone
>>> from probes.capture_tl import bridge_for, capture_tl
>>> bb = load_backbone("mini-vl")
>>> acts = capture_tl(bb, images, "Is this image real or fake? <image>")   # {position: [N, L + 1, hidden]}
>>> bridge = bridge_for(bb)          # reuse it: capture_tl(bb, images, prompts, bridge=bridge)
>>> logits, cache = bridge.run_with_cache(inputs["input_ids"], **rest)   # every TL hook point
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import BatchFeature, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from probes.backbones.base import BackboneAdapter
from probes.capture import DEFAULT_POSITIONS, _layers, _positions, forward_kwargs
from probes.errors import BadInputError, ConfigError, UnavailableError

QWEN_VL_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"  # the TL adapter every bridge here uses
_INSTALLER = re.compile(r"(^|[\s/\\])(pip[0-9.]*|uv|conda|mamba|micromamba|easy_install)(\s|$)|ensurepip")
_baseline: dict[str, Any] = {}  # what was installed before the first guard; compared after each boot


# --- the guard -------------------------------------------------------------------------------------


def guard_transformer_lens() -> None:
    """Make TransformerLens unable to install anything; idempotent, call it before any bridge boot.

    TL 4.3 has one auto-install path (``helpers._ensure_torchvision``, reached from
    ``load_modality_processor`` when a multimodal processor fails to load). Both are replaced: the
    installer by a refusal, the processor loader by a no-op (the backbone brings its own processor, and
    the stock loader would also try the Hub). The first call records the installed torch and whether
    torchvision exists, for :func:`check_environment`.
    """
    if not _baseline:
        _baseline.update(_installed())  # before this module boots anything
    _import_tl()
    from transformer_lens.model_bridge.sources.transformers import helpers, source

    # Fail closed: if a TL release renames what is patched here, setattr would add a new name and
    # leave the real installer in place.
    if not all(hasattr(m, n) for m, n in ((helpers, "_ensure_torchvision"), (helpers, "load_modality_processor"),
                                           (source, "load_modality_processor"))):
        raise UnavailableError(f"transformer-lens {importlib.metadata.version('transformer-lens')}",
                               "its install path moved; the guard is written for 4.3, so no bridge is booted")
    helpers._ensure_torchvision = _refuse_install
    helpers.load_modality_processor = source.load_modality_processor = _no_processor


def check_environment() -> None:
    """Raise a one-line error if torch or torchvision changed on disk since the first guard.

    The in-memory ``torch.__version__`` cannot show a pip replacement (the old module stays loaded),
    so the installed distribution's version is compared too.
    """
    if not _baseline:
        raise ConfigError("check_environment", "call guard_transformer_lens() first")
    now = _installed()
    for key in ("torch", "torch_loaded"):
        if now[key] != _baseline[key]:
            raise UnavailableError(
                "torch", f"changed from {_baseline[key]} to {now[key]} while TransformerLens ran; reinstall torch=={_baseline[key]}"
            )
    if now["torchvision"] and not _baseline["torchvision"]:
        raise UnavailableError("torchvision", "appeared while TransformerLens ran; uninstall it (it breaks transformers with this torch)")


def _installed() -> dict[str, Any]:
    importlib.invalidate_caches()  # see packages written since the last import
    return {
        "torch": importlib.metadata.version("torch"),
        "torch_loaded": torch.__version__,
        "torchvision": importlib.util.find_spec("torchvision") is not None,
    }


def _refuse_install() -> bool:
    """Replaces TL's ``_ensure_torchvision``: whether torchvision is importable already; never installs."""
    return importlib.util.find_spec("torchvision") is not None


def _no_processor(bridge: Any, *args: Any, **kwargs: Any) -> None:
    """Replaces TL's ``load_modality_processor``: no Hub lookup, no install; ``bridge.processor`` is None."""
    bridge.processor = None


@contextlib.contextmanager
def _no_installers() -> Iterator[None]:
    """While booting, refuse any subprocess that runs an installer (pip, uv, conda…), whatever the path.

    A second fence behind the patched helpers, for install paths a later TL release may add. It covers
    ``subprocess`` (``run``, ``call``, ``check_call``, ``Popen``), not ``os.system``.
    """
    real = subprocess.Popen

    def popen(args: Any, *rest: Any, **kwargs: Any) -> subprocess.Popen:
        cmd = args if isinstance(args, str) else " ".join(map(str, args))
        if _INSTALLER.search(cmd) or "install" in cmd.split():
            raise UnavailableError("transformer-lens", f"tried to run {cmd!r}; installs are refused")
        return real(args, *rest, **kwargs)

    subprocess.Popen = popen  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        subprocess.Popen = real  # type: ignore[misc]


def _import_tl() -> Any:
    try:
        return importlib.import_module("transformer_lens")
    except ImportError as err:
        raise UnavailableError("transformer-lens", f"not installed ({err}); it is an optional backend") from None


# --- the bridge ------------------------------------------------------------------------------------


def bridge_for(backbone: BackboneAdapter) -> Any:
    """A ``TransformerBridge`` over the backbone's loaded model, offline (no Hub, no install).

    - The bridge replaces submodules of the model it wraps (and switches it to eager attention). It
      wraps a structural copy that shares every parameter and buffer with ``backbone.model``: no extra
      weight memory, and the backbone (and nnsight captures of it) are left as they were.
    - The architecture adapter is TL's Qwen2.5-VL one, subclassed to drop its ``torchvision``
      requirement (only HF's processor needs it). mini-VL, a ``Qwen2_5_VLForConditionalGeneration``
      subclass, gets the same text stack (``blocks``, ``ln_final``, ``unembed``); its vision module is
      not Qwen's ViT, so ``vision_encoder`` hooks its EfficientNet tower (``hook_in`` pixels,
      ``hook_out`` feature map ``[B, 1280, g', g']``) and the projector is left unbridged (mini-VL indexes
      ``merger[0]``, which a bridge wrapper does not support). Any other vision module: text stack only.
    - The tokenizer is a copy: TL normalises it in place (padding side, special tokens).
    """
    if not isinstance(backbone.model, Qwen2_5_VLForConditionalGeneration):
        raise ConfigError(f"backbone={backbone.family}", "the TransformerLens backend takes Qwen2.5-VL-class models only")
    guard_transformer_lens()
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge import TransformerBridge

    model = _shared_copy(backbone.model)
    adapter_class = _bridge_adapter(_vision_kind(backbone.model.model.visual))
    with _registered(ArchitectureAdapterFactory, adapter_class), _no_installers():
        bridge = TransformerBridge.boot_transformers(
            f"deepvrm-lens/{backbone.family}",
            hf_model=model,
            tokenizer=copy.deepcopy(backbone.processor.tokenizer),
            device=str(backbone.model.device),
            dtype=backbone.model.dtype,
            hf_config_overrides={"original_architecture": QWEN_VL_ARCHITECTURE},
        )
    check_environment()
    return bridge


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the module tree whose parameters and buffers are the original tensors."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _vision_kind(visual: torch.nn.Module) -> str:
    from probes.backbones.mini_vl import MiniVLVision

    if isinstance(visual, Qwen2_5_VisionTransformerPretrainedModel):
        return "qwen"
    return "mini_vl" if isinstance(visual, MiniVLVision) else "none"


@functools.cache
def _bridge_adapter(vision: str) -> type:
    """TL's Qwen2.5-VL architecture adapter without the torchvision requirement, for one vision kind."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter

    class OfflineQwen2_5_VLAdapter(Qwen2_5_VLArchitectureAdapter):
        required_libraries: list[str] = []  # torchvision: only for HF's processor, never loaded here

        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            if vision != "qwen":
                del self.component_mapping["vision_encoder"], self.component_mapping["vision_projector"]
            if vision == "mini_vl":
                self.component_mapping["vision_encoder"] = GeneralizedComponent(name="model.visual.tower")

    OfflineQwen2_5_VLAdapter.__name__ = f"OfflineQwen2_5_VLAdapter[{vision}]"
    return OfflineQwen2_5_VLAdapter


@contextlib.contextmanager
def _registered(factory: Any, adapter_class: type) -> Iterator[None]:
    """Serve ``adapter_class`` for Qwen2.5-VL during one boot, then restore TL's registry.

    TL accepts only architecture names it knows, so the subclass borrows Qwen2.5-VL's entry.
    """
    factory.discover_entry_points()  # now, so that a plugin cannot overwrite the entry mid-boot
    previous = factory._adapters.get(QWEN_VL_ARCHITECTURE)
    factory._adapters[QWEN_VL_ARCHITECTURE] = adapter_class
    try:
        yield
    finally:
        if previous is None:
            factory._adapters.pop(QWEN_VL_ARCHITECTURE, None)
        else:
            factory._adapters[QWEN_VL_ARCHITECTURE] = previous


# --- capture ---------------------------------------------------------------------------------------


def capture_tl(
    backbone: BackboneAdapter,
    images: Sequence[Image.Image],
    prompts: str | Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[str] = DEFAULT_POSITIONS,
    *,
    batch_size: int = 8,
    bridge: Any = None,
) -> dict[str, np.ndarray]:
    """Capture through a ``TransformerBridge``: ``{position: fp32 [n_images, len(layers), hidden]}``
    (``image_tokens``: ``[n_images, len(layers), n_image_tokens, hidden]``).

    Args:
        prompts: one prompt for every image, or one per image; each with its ``<image>`` tag.
        layers: row indices 0..L (default all; 0 = input of decoder layer 1, see the module docstring).
        bridge: a bridge from :func:`bridge_for` to reuse (default: one is booted for this call).
    """
    positions = _positions(positions, False)
    layers = _layers(backbone, layers)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise BadInputError("prompts", f"{len(prompts)} prompts for {len(images)} images")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}", "must be at least 1")
    bridge = bridge if bridge is not None else bridge_for(backbone)
    batches = []
    for start in range(0, len(images), batch_size):
        inputs = backbone.build_inputs(images[start : start + batch_size], prompts[start : start + batch_size])
        batches.append(_forward(bridge, backbone, inputs, layers, positions))
    return {p: np.concatenate([b[p] for b in batches]) for p in positions}


def hook_name(k: int) -> str:
    """The bridge hook point of capture row ``k`` (0 = input of the first decoder layer)."""
    return "blocks.0.hook_resid_pre" if k == 0 else f"blocks.{k - 1}.hook_resid_post"


def _forward(
    bridge: Any, backbone: BackboneAdapter, inputs: BatchFeature, layers: list[int], positions: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """One bridge forward with a pooling hook per stored row; stops before the first unneeded block."""
    inputs = inputs.to(backbone.model.device)
    if not bool(inputs["attention_mask"][:, -1].all()):
        raise ConfigError("padding_side=right", "capture needs left padding: the last position must be real")
    pool = _Pool(backbone.image_token_mask(inputs["input_ids"]), positions)
    hooks = [(hook_name(k), functools.partial(pool, k)) for k in layers]
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}  # attention mask, pixels, grid, mm types
    # Stop before the first block no row needs. Not before block 0: TL drops hooks on blocks at or past
    # the stop, ``blocks.0.hook_resid_pre`` (row 0) included.
    stop = max(layers[-1], 1)
    stop = stop if stop < backbone.num_layers else None
    with torch.inference_mode():
        bridge.run_with_hooks(
            inputs["input_ids"], fwd_hooks=hooks, return_type=None, stop_at_layer=stop,
            **rest, **forward_kwargs(backbone.model),
        )
    missing = [hook_name(k) for k in layers if k not in pool.rows]
    if missing:
        raise UnavailableError("transformer-lens", f"hook points never fired: {missing}")
    return {p: torch.stack([pool.rows[k][p] for k in layers], 1).cpu().numpy() for p in positions}


class _Pool:
    """A forward hook ``(k, h [B, T, D], hook)`` that keeps only the stored positions of row ``k``, fp32.

    Returns None, so the bridge's activations are read, never changed.
    """

    def __init__(self, mask: Tensor, positions: tuple[str, ...]):
        self.mask = mask  # [B, T] bool
        self.positions = positions
        self.rows: dict[int, dict[str, Tensor]] = {}  # row -> position -> [B, D] (or [B, n, D])
        counts = mask.sum(1)
        if "image_tokens" in positions and bool((counts != counts[0]).any()):
            raise BadInputError("batch", f"image-token counts {counts.tolist()} differ; image_tokens needs one count")

    def __call__(self, k: int, h: Tensor, hook: Any = None) -> None:
        h = h.float()
        out = {}
        if "image_mean" in self.positions:
            m = self.mask.unsqueeze(-1).float()  # [B, T, 1]
            out["image_mean"] = (h * m).sum(1) / m.sum(1).clamp(min=1)
        if "last" in self.positions:
            out["last"] = h[:, -1].clone()
        if "image_tokens" in self.positions:
            out["image_tokens"] = h[self.mask].view(h.shape[0], -1, h.shape[-1]).clone()
        self.rows[k] = out


__all__ = ["QWEN_VL_ARCHITECTURE", "bridge_for", "capture_tl", "check_environment", "guard_transformer_lens", "hook_name"]
