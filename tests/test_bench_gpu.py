"""``make bench-gpu`` (benchmarks/bench_gpu.py): its table on a tiny CPU run, its FLOP
count against the papers, its GPU peak table. The speeds themselves are measured by the
benchmark on a GPU, never asserted here."""

import argparse
import sys

import pandas as pd
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu  # noqa: E402


def test_a_tiny_cpu_run_writes_the_table_with_every_pipeline(tmp_path):
    table = bench_gpu.main(["--device", "cpu", "--models", "resnet20", "--images", "256", "--repeats", "1",
                            "--workers", "0", "--out", str(tmp_path)])
    assert list(table["pipeline"]) == ["calibrun", "usual", "bare"]
    assert (table["images"] == 256).all() and table["pct_bf16_peak"].isna().all()
    # The ratio column is the usual pipeline's epoch time over each pipeline's.
    usual = table.set_index("pipeline").loc["usual", "epoch_s"]
    assert table["speedup_vs_usual"].tolist() == pytest.approx((usual / table["epoch_s"]).tolist(), abs=0.01)
    assert table["images_per_s"].tolist() == pytest.approx((256 / table["epoch_s"]).tolist(), rel=0.01)
    written = pd.read_csv(tmp_path / "bench_gpu.csv")
    pd.testing.assert_frame_equal(written, table.astype({"pct_bf16_peak": float}), check_dtype=False)
    assert "Machine: CPU" in (tmp_path / "bench_gpu.md").read_text()


@pytest.mark.parametrize("setup, gmacs", [("resnet110", 0.253), ("resnet20", 0.041)])
def test_flops_per_image_match_the_published_counts(setup, gmacs):
    """He et al.'s CIFAR ResNets: about 253 M (ResNet-110) and 41 M (ResNet-20)
    multiply-adds per 32-px image; a FLOP is half a multiply-add."""
    options = argparse.Namespace(device="cpu", images=256, pacs_images=128, pacs_image_size=222)
    cfg = bench_gpu.benchmark_config(setup, options)
    assert bench_gpu.forward_flops_per_image(cfg, 32) / 2e9 == pytest.approx(gmacs, rel=0.03)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce GTX 1080", None)])
def test_bf16_peaks_by_device_name(name, peak):
    assert bench_gpu.peak_tflops(name) == peak


def test_variants_name_their_rows_and_refuse_a_missing_override():
    assert bench_gpu.parse_variant("graphs:trainer.compile=true trainer.compile_mode=reduce-overhead") == (
        "calibrun graphs", ["trainer.compile=true", "trainer.compile_mode=reduce-overhead"])
    with pytest.raises(ValueError, match="NAME:key=value"):
        bench_gpu.parse_variant("graphs")
