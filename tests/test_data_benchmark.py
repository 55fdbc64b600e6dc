"""The data path benchmark's report (benchmarks/report.py): ratios against diffusers' example at the same worker count, and every measured row
shown (the benchmark itself runs in tests/test_benchmarks.py's smoke run)."""

from benchmarks.report import data_section


def test_the_data_section_divides_by_diffusers_at_the_same_worker_count():
    def s(median):
        return {"median": median}

    result = {
        "batch": 64,
        "throughput": {
            "32": {
                "in memory (0 workers)": s(3000.0),
                "streaming (2 workers)": s(900.0),
                "diffusers example (0 workers)": s(1000.0),
                "diffusers example (2 workers)": s(600.0),
            },
            "256": {"memory-mapped cache (0 workers)": s(50.0)},
        },  # fmt: skip
        "step_consumption": {"ddpm-cifar10-32 (32², batch 8)": 1.97},
        "startup": {"1000": {"cached, memory-mapped": {"seconds": 5.31, "peak_rss_mb": 485.0, "rss_anon_mb": 334.0}}},
    }
    lines = data_section(result).splitlines()
    assert "| 32² | in memory (0 workers) | 3000 | 3.0x |" in lines
    assert "| 32² | streaming (2 workers) | 900 | 1.5x |" in lines  # 900 / 600, not / 1000
    assert "| 32² | diffusers example (0 workers) | 1000 |  |" in lines
    assert "| 256² | memory-mapped cache (0 workers) | 50 |  |" in lines  # diffusers measured at 32² only
    assert any("ddpm-cifar10-32 (32², batch 8): 1.97" in line for line in lines)
    assert "| 1000 | cached, memory-mapped | 5.3 | 485 | 334 |" in lines
