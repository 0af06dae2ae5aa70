"""scripts/scaling.py: its measurement on one process, and the report it writes from measurements."""

from __future__ import annotations

import argparse
import sys

import pytest
from conftest import REPO

from distsgd import data, distributed

sys.path.insert(0, str(REPO / "scripts"))
import scaling  # noqa: E402

TINY = ["data.dim=8", "data.num_samples=256", "data.global_batch_size=16", "model.width=8", "model.depth=1",
        "trainer.device=cpu"]


def test_one_process_measures_every_variant_it_names(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "WARMUP_STEPS", scaling.WINDOW)
    args = argparse.Namespace(job="mlp", rounds=1, bucket_mb=[0.25, 25.0], overrides=TINY)
    config = scaling.compose_config("mlp", None, TINY, tmp_path)
    dataset = data.load(config.data)
    dist = distributed.init("cpu")
    try:
        results = scaling.measure(config, dataset.place(dist.device, True, 0), dist, args)
    finally:
        distributed.shutdown()
    assert [(r["bucket_mb"], r["comm_hook"]) for r in results] == \
        [(0.25, "none"), (25.0, "none"), (25.0, "fp16"), (25.0, "powersgd"), (25.0, "local_sgd")]
    for r in results:
        assert r["world_size"] == 1 and r["t_sync_ms"] > 0 and r["t_nosync_ms"] > 0
        assert r["samples_per_s"] == pytest.approx(16 / (r["t_sync_ms"] / 1e3))
        assert r["exposed"] == pytest.approx(1 - r["t_nosync_ms"] / r["t_sync_ms"])
        assert r["t_sync_range_ms"][0] <= r["t_sync_ms"] <= r["t_sync_range_ms"][1]


def test_the_report_holds_a_well_formed_table_the_efficiencies_and_a_figure(tmp_path):
    def row(k, hook, ms):
        return {"world_size": k, "bucket_mb": 25.0, "comm_hook": hook, "t_sync_ms": ms, "t_nosync_ms": ms / 2,
                "t_sync_range_ms": [ms, ms], "samples_per_s": 256 / (ms / 1e3), "exposed": 0.5}
    results = scaling.with_efficiency([row(1, "none", 10.0), row(1, "fp16", 12.0),
                                       row(2, "none", 8.0), row(2, "fp16", 4.0)])
    # throughput at 2 / (2 x throughput at 1), for the same variant
    assert [r["efficiency"] for r in results] == pytest.approx([1, 1, 10 / 8 / 2, 12 / 4 / 2])
    runs = {k: {"device": "cpu", "torch": "2.x", "threads": 1} for k in (1, 2)}
    args = argparse.Namespace(job="mlp", rounds=2, overrides=[])
    png = tmp_path / "scaling.png"
    scaling.figure(results, png)
    assert png.read_bytes().startswith(b"\x89PNG")
    table = [line for line in scaling.markdown(results, runs, args, png).splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(results)
    assert len({line.count("|") for line in table}) == 1, "every row of the table has the header's columns"
    assert table[-1].split("|")[1:-1] == [" 2 ", " fp16 ", " 25 ", " 4.00 ", " 4.0-4.0 ", " 2.00 ", " 64,000 ",
                                          " 50% ", " 1.50 "]
