"""The TransformerLens backend (:mod:`probes.capture_tl`): equal to the nnsight capture, and guarded.

Reference rows come from :func:`probes.capture.capture` (nnsight) into an fp32 store, on the same image
files and prompts. Batches mix prompts (and, on the tiny model, image sizes), so rows are left-padded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("transformer_lens")

from probes import capture_tl as tl_module  # noqa: E402
from probes.backbones import load_backbone  # noqa: E402
from probes.backbones.mini_vl import build_mini_vl  # noqa: E402
from probes.cache import ActivationStore  # noqa: E402
from probes.capture import capture  # noqa: E402
from probes.capture_tl import bridge_for, capture_tl, check_environment, guard_transformer_lens  # noqa: E402
from probes.data.images import open_image, to_rgb  # noqa: E402
from probes.data.manifest import DEFAULT_PROMPT, OBJECT_PROMPT, SCENE_PROMPT, Record, swift_messages  # noqa: E402
from probes.errors import UnavailableError  # noqa: E402

TOL = 1e-5  # fp32, as the nnsight capture promises against HF
POSITIONS = ("image_mean", "last")
PROMPTS = [DEFAULT_PROMPT, OBJECT_PROMPT, SCENE_PROMPT]  # different lengths: left padding in every batch
DATA_IMAGES = Path(__file__).resolve().parents[1] / ".cache/data/forensic-mini-fbc2a8b7fdab202a/images"
TORCH_INSTALLED = importlib.metadata.version("torch")
TORCH_LOADED = torch.__version__


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-qwen2.5-vl")


def drawn(i: int, size: tuple[int, int] = (128, 128)) -> Image.Image:
    """A picture whose content varies with ``i``: background, disc colour and place."""
    im = Image.new("RGB", size, (40 + 70 * i % 200, 120, 200 - 50 * i % 150))
    x, y = 10 + 23 * i % 60, 15 + 31 * i % 50
    ImageDraw.Draw(im).ellipse((x, y, x + 50, y + 40), fill=(250 - 80 * i % 250, 60 * i % 250, 90))
    return im


def data_images(n: int) -> list[Image.Image]:
    """``n`` images of the built forensic-mini set, spread over it; drawn ones when it is not built."""
    paths = sorted(DATA_IMAGES.glob("*.png"))[:: 997][:n] if DATA_IMAGES.is_dir() else []
    return [Image.open(p).convert("RGB") for p in paths] if len(paths) == n else [drawn(i) for i in range(n)]


def nnsight_and_tl(backbone, images, folder: Path) -> tuple[dict, dict]:
    """Both backends on the same files and prompts: ``{position: [N, L + 1, hidden]}`` each."""
    records = []
    for i, image in enumerate(images):
        image.save(folder / f"im-{i}.png")
        records.append(Record(id=f"im-{i}", messages=swift_messages(PROMPTS[i % 3], None), images=[f"im-{i}.png"]))
    report = capture(backbone, records, folder, positions=POSITIONS, batch_size=len(records), store_dtype="float32",
                     progress=False, store=folder / "store")
    store = ActivationStore.open(report.store)
    ref = {}
    for p in POSITIONS:
        ids, ref[p] = store.load(p)
        assert ids == [r.id for r in records]
    same_pixels = [to_rgb(open_image(folder / r.images[0])[0]) for r in records]  # what capture() read
    return ref, capture_tl(backbone, same_pixels, [r.prompt for r in records], positions=POSITIONS)


def assert_same(backbone, ref: dict, got: dict) -> None:
    n = len(next(iter(ref.values())))
    for p in POSITIONS:
        assert got[p].shape == ref[p].shape == (n, backbone.num_layers + 1, backbone.hidden_size)
        assert got[p].dtype == np.float32
        diff = float(np.abs(got[p] - np.asarray(ref[p])).max())
        assert diff <= TOL, f"{p}: max |TL - nnsight| = {diff:.3g}"
    assert np.abs(np.asarray(ref["last"])).max() > 1e-2  # not trivially equal


# --- equality with nnsight ---------------------------------------------------------------------------


def test_tiny_qwen2_5_vl_equals_nnsight(tiny, tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(112, 112), (168, 112), (112, 224), (140, 140)]  # different image-token counts too
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    ref, got = nnsight_and_tl(tiny, images, tmp_path)
    assert_same(tiny, ref, got)


def test_mini_vl_architecture_equals_nnsight(tmp_path):
    """The embedded default's architecture (untrained weights), so the path is tested before the checkpoint exists."""
    backbone = build_mini_vl()
    ref, got = nnsight_and_tl(backbone, data_images(3), tmp_path)
    assert_same(backbone, ref, got)


@pytest.mark.slow
def test_trained_mini_vl_equals_nnsight(embedded_default, tmp_path):
    """The embedded default itself: the pretrained checkpoint (built by the session fixture if needed)."""
    backbone = load_backbone("mini-vl")
    ref, got = nnsight_and_tl(backbone, data_images(3), tmp_path)
    assert_same(backbone, ref, got)


def test_subset_of_layers_and_image_tokens(tiny):
    images = [drawn(i, (112, 112)) for i in range(3)]
    every = capture_tl(tiny, images, DEFAULT_PROMPT, positions=("image_tokens", "last"))
    for layers in ([0], [0, 3], [tiny.num_layers]):  # stops before block 1, before block 3, never
        some = capture_tl(tiny, images, DEFAULT_PROMPT, layers=layers, positions=("image_tokens", "last"))
        assert some["image_tokens"].shape == (3, len(layers), 16, tiny.hidden_size)
        for p in ("image_tokens", "last"):
            assert np.abs(some[p] - every[p][:, layers]).max() <= TOL  # stopping early changes nothing


def test_mini_vl_bridge_hooks_its_tower_and_leaves_the_backbone_alone():
    backbone = build_mini_vl()
    vocab = backbone.processor.tokenizer.get_vocab()
    bridge = bridge_for(backbone)
    assert type(backbone.layers[0]).__name__ == "Qwen2_5_VLDecoderLayer"  # not a BlockBridge
    assert backbone.model.config._attn_implementation == "sdpa"
    assert backbone.processor.tokenizer.get_vocab() == vocab
    assert bridge.original_model.model.visual.feature_mean is backbone.model.model.visual.feature_mean
    inputs = backbone.build_inputs([drawn(0), drawn(1)], [DEFAULT_PROMPT, DEFAULT_PROMPT])
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(inputs.pop("input_ids"), names_filter="vision_encoder.hook_out", **inputs)
    assert tuple(cache["vision_encoder.hook_out"].shape) == (2, 1280, 5, 5)  # 160 px / 32


# --- the guard -----------------------------------------------------------------------------------------


def test_booting_changes_neither_torch_nor_torchvision(tiny):
    bridge_for(tiny)
    assert torch.__version__ == TORCH_LOADED
    assert importlib.metadata.version("torch") == TORCH_INSTALLED
    assert importlib.util.find_spec("torchvision") is None
    check_environment()  # the module's own check agrees


def test_patched_install_paths_refuse_without_a_subprocess(monkeypatch):
    guard_transformer_lens()
    guard_transformer_lens()  # idempotent

    def no_subprocess(*args, **kwargs):
        pytest.fail(f"a subprocess was started: {args}")

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, no_subprocess)
    from transformer_lens.model_bridge.sources.transformers import helpers, source

    assert helpers._ensure_torchvision() is False
    bridge = SimpleNamespace(processor="untouched")
    cfg = SimpleNamespace(is_multimodal=True, is_audio_model=False, is_visual_model=False)
    source.load_modality_processor(bridge, cfg, "Qwen/Qwen2.5-VL-3B-Instruct", False, None)
    assert bridge.processor is None  # no Hub lookup, no install: nothing loaded
    assert importlib.util.find_spec("torchvision") is None


def test_the_guard_fails_closed_when_tl_moves_its_installer(monkeypatch):
    from transformer_lens.model_bridge.sources.transformers import helpers

    monkeypatch.delattr(helpers, "_ensure_torchvision")
    with pytest.raises(UnavailableError, match="install path moved"):
        guard_transformer_lens()


def test_the_boot_fence_refuses_any_installer(monkeypatch):
    def no_subprocess(*args, **kwargs):
        pytest.fail(f"an installer reached Popen: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)  # the fence must refuse before the real Popen
    with tl_module._no_installers():
        for cmd in ([sys.executable, "-m", "pip", "install", "torchvision", "-q"], ["uv", "pip", "install", "torchvision"],
                    "/usr/bin/pip3 install torchvision"):
            with pytest.raises(UnavailableError, match="installs are refused"):
                subprocess.check_call(cmd)
    assert subprocess.Popen is no_subprocess  # restored


def test_a_changed_torch_is_reported_in_one_line(monkeypatch):
    guard_transformer_lens()
    monkeypatch.setattr(tl_module.importlib.metadata, "version", lambda name: "9.9.9+cu999")
    with pytest.raises(UnavailableError, match=r"changed from .* to 9\.9\.9\+cu999") as err:
        check_environment()
    assert "\n" not in str(err.value)


def test_missing_transformer_lens_is_a_one_line_error(monkeypatch, tiny):
    real = tl_module.importlib.import_module

    def without_tl(name, *args):
        if name.split(".")[0] == "transformer_lens":
            raise ImportError("No module named 'transformer_lens'")
        return real(name, *args)

    monkeypatch.setattr(tl_module.importlib, "import_module", without_tl)
    with pytest.raises(UnavailableError, match="transformer-lens: not installed") as err:
        capture_tl(tiny, [drawn(0, (112, 112))], DEFAULT_PROMPT)
    assert "\n" not in str(err.value)
