"""The loader benchmark runs end to end at a tiny size and reports positive rates."""

from imagen.bench.loader import main


def test_loader_benchmark_reports_rates(tmp_path):
    out = main(["--images", "4", "--size", "32", "--source", "64", "48", "--cache-samples", "300", "--batch", "32",
                "--workers", "0", "--seconds", "0.05", "--json", str(tmp_path / "bench.json")])  # fmt: skip
    assert out["jpeg_32px_images_per_s_workers_0"] > 0 and out["cache_samples_per_s_workers_0"] > 0
    assert (tmp_path / "bench.json").is_file()
