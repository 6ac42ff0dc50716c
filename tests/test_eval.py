"""Detection evaluation: result rows and files, metrics, the logit margin, eval JSON input, the CLI and
its one-line errors. Tiny random models: code paths only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import analysis
from injection.evaluate import answer, detection_metrics, evaluate, first_token, group_metrics, read_eval_set
from injection.train import load_model
from probes.data import ForensicMiniConfig, build_forensic_mini
from probes.errors import BadInputError

TINY = "tiny-qwen2.5-vl"
OFFICIAL_PROMPT = "Is this image real or fake? Please just answer 'real' or 'fake'. <image>"
# The architecture fields of Qwen2.5-VL-7B-Instruct's config.json (/work/shared/configs).
QWEN2_5_VL_7B = {
    "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
        "patch_size": 14, "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "temporal_patch_size": 2, "out_hidden_size": 3584, "hidden_act": "silu", "tokens_per_second": 2,
    },
}


@pytest.fixture(scope="module")
def data_dir():
    return build_forensic_mini(ForensicMiniConfig.preset("small")).path


@pytest.fixture(scope="module")
def result(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate(TINY, [str(data_dir)], out=out, batch_size=16, max_new_tokens=3, progress=False), out


def _png(path, seed: int) -> str:
    Image.fromarray((np.random.RandomState(seed).rand(112, 112, 3) * 255).astype("uint8")).save(path)
    return path.name


def test_results_file_has_one_row_per_test_image(result, data_dir):
    summary, out = result
    name = data_dir.name
    rows = [json.loads(line) for line in (out / f"{name}_test_result.jsonl").read_text().splitlines()]
    tests = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [t["id"] for t in tests if t["split"] == "test"]
    for key in ("id", "prompt", "response", "parsed", "label", "margin", "generator", "cue"):
        assert key in rows[0]
    metrics = summary["datasets"][name]
    assert metrics["rows"] == len(rows) and metrics["n"] == len(rows)
    assert metrics["unparsed"] == sum(r["parsed"] is None for r in rows)
    assert set(metrics["by_cue"]) == {"semantic", "trace", "real"}
    assert "cyclegan" in metrics["by_generator"] and 0.0 <= metrics["auc"] <= 1.0
    assert metrics["semantic"]["n"] > 0 and {"object", "scene"} <= set(metrics["semantic"])
    assert (out / f"{name}_semantic_result.jsonl").is_file() and (out / "eval.json").is_file()
    assert summary["settings"]["dtype"] == "float32" and summary["versions"]["torch"]


def test_margin_is_the_fake_minus_real_logit_at_the_answer_position(data_dir):
    adapter = load_model(TINY)
    image = str(data_dir / "images" / sorted(p.name for p in (data_dir / "images").iterdir())[0])
    texts, logits = answer(adapter, [image], [OFFICIAL_PROMPT], max_new_tokens=2)
    inputs = adapter.build_inputs([Image.open(image).convert("RGB")], [OFFICIAL_PROMPT])
    with torch.no_grad():
        last = adapter.model(**inputs).logits[0, -1]
    torch.testing.assert_close(logits[0], last, atol=1e-4, rtol=1e-4)
    tok = adapter.processor.tokenizer
    assert first_token(tok, "fake") != first_token(tok, "real")


def test_metrics_on_hand_made_rows():
    rows = [
        {"label": "fake", "parsed": "fake", "correct": True, "margin": 2.0, "generator": "a", "cue": "trace"},
        {"label": "fake", "parsed": None, "correct": False, "margin": 0.5, "generator": "b", "cue": "trace"},
        {"label": "real", "parsed": "real", "correct": True, "margin": -1.0, "generator": "none", "cue": "none"},
        {"label": "real", "parsed": "fake", "correct": False, "margin": 1.0, "generator": "none", "cue": "none"},
    ]
    m = detection_metrics(rows)
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1 and m["accuracy_parsed"] == pytest.approx(2 / 3)
    assert m["real_accuracy"] == 0.5 and m["fake_accuracy"] == 0.5
    assert m["auc"] == 0.75  # fake margins 2.0, 0.5 against real -1.0, 1.0
    groups = group_metrics(rows, "generator")
    assert groups["a"]["auc"] == 1.0 and groups["b"]["auc"] == 0.5 and groups["a"]["n"] == 3
    assert groups["real"]["n"] == 2 and groups["real"]["auc"] is None


def test_deep_vrm_eval_json_is_read_and_named_after_its_file(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": OFFICIAL_PROMPT}, {"role": "assistant", "content": label}],
         "images": [_png(tmp_path / f"{i}.png", i)]}
        for i, label in enumerate(["real", "fake"])
    ]
    (tmp_path / "eval_data.json").write_text(json.dumps(rows))
    summary = evaluate(TINY, [str(tmp_path / "eval_data.json")], out=tmp_path / "out", max_new_tokens=2, progress=False)
    metrics = summary["datasets"]["eval_data"]
    assert metrics["n_fake"] == 1 and metrics["n_real"] == 1 and "semantic" not in metrics
    assert (tmp_path / "out" / "eval_data_test_result.jsonl").is_file()


def test_eval_row_without_an_image_is_a_one_line_error(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": OFFICIAL_PROMPT}], "images": []}]
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(BadInputError, match="no image"):
        read_eval_set(tmp_path / "bad.json")
    code = analysis.main(["eval", "--model", TINY, "--data", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "no image" in err[0]


def test_missing_image_file_is_a_one_line_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": OFFICIAL_PROMPT}], "images": ["gone.png"]}]
    (tmp_path / "eval.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(BadInputError, match="gone.png"):
        read_eval_set(tmp_path / "eval.jsonl")


def test_params_cli_gives_the_papers_115m(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(QWEN2_5_VL_7B))
    code = analysis.main(["params", "--config", str(config), "--stage", "2", "--injection-layer", "16", "--json"])
    assert code == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["trainable"] == 115_023_872 and counts["injection_layer"] == 16


def test_cli_refuses_an_unknown_stage(capsys):
    with pytest.raises(SystemExit):
        analysis.main(["train", "--stage", "3"])
    assert "invalid choice: '3'" in capsys.readouterr().err
