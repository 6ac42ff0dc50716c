"""The data layer: the embedded forensic-mini set, users' data, image normalisation and grouped splits.

Typical use::

    from probes.data import ForensicMiniConfig, build_forensic_mini, read_manifest, group_folds
    report = build_forensic_mini(ForensicMiniConfig())          # or ForensicMiniConfig.preset("small")
    records = read_manifest(report.manifest_path)
    folds = group_folds(records, splits=("train", "val"))

    ds = load_genimage("GenImage/", on_error="skip")          # or load_deepvrm_json("eval_data.json")
    print(ds.summary())                                         # JSON-able, skipped items included
"""

from probes.data.answers import parse_answer
from probes.data.forensic_mini import BuildReport, ForensicMiniConfig, build_forensic_mini
from probes.data.images import encode_png, load_normalised, open_image, to_rgb
from probes.data.manifest import Record, manifest_hash, read_manifest, summarize, write_manifest
from probes.data.splits import Fold, GroupLeakError, assign_folds, check_grouping, group_folds, logo_folds
from probes.data.user import UserDataset, load_deepvrm_json, load_genimage

__all__ = [
    "BuildReport",
    "Fold",
    "ForensicMiniConfig",
    "GroupLeakError",
    "Record",
    "UserDataset",
    "assign_folds",
    "build_forensic_mini",
    "check_grouping",
    "encode_png",
    "group_folds",
    "load_deepvrm_json",
    "load_genimage",
    "load_normalised",
    "logo_folds",
    "manifest_hash",
    "open_image",
    "parse_answer",
    "read_manifest",
    "summarize",
    "to_rgb",
    "write_manifest",
]
