"""benchmarks/likelihood.py: the image folder it cuts from scikit-learn's photographs, and one run of its smoke profile
(two tiny models, seconds of work) whose JSON and RESULTS.md section carry every estimator for both models."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from benchmarks import report
from benchmarks.likelihood import image_folder

ROOT = Path(__file__).resolve().parents[1]


def test_the_image_folder_is_every_non_overlapping_tile_of_the_two_photographs(tmp_path):
    folder = Path(image_folder(str(tmp_path / "tiles"), 64))
    files = sorted(folder.iterdir())
    assert len(files) == 2 * (427 // 64) * (640 // 64)  # 6 x 10 tiles of each 427x640 photograph, none cut off
    china = load_sample_images().images[0]
    first = np.asarray(Image.open(folder / "tile-00000.png"))
    assert first.shape == (64, 64, 3) and np.array_equal(first, china[:64, :64])
    assert np.array_equal(np.asarray(Image.open(folder / "tile-00011.png")), china[64:128, 64:128])  # row 1, column 1
    assert len(list(Path(image_folder(str(tmp_path / "some"), 64, limit=7)).iterdir())) == 7


def test_the_smoke_profile_measures_every_estimator_on_both_models_and_renders_them(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--only", "likelihood", "--results_dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "likelihood.json").read_text())
    assert result["machine"]["load_average_after"] is not None and result["clock"] in ("wall", "cpu")
    digits, tiles = result["models"]["digits"], result["models"]["tiles"]
    assert tiles["image_shape"] == [3, 8, 8] and tiles["held_out_split"] == 6  # 10% of the 60 tiles, rounded up
    for model in (digits, tiles):
        e = model["estimators"]
        assert set(e) == {"eq5_exact", "eq5_stratified_mc", "eq3_trajectory", "iw_1", "iw_2", "iw_4", "ode"}
        assert all(np.isfinite(v["bits_per_dim"]) and v["bits_per_dim"] > 0 for v in e.values())
        assert e["eq5_exact"]["images"] == 2 and e["eq5_exact"]["stderr"] > 0 and e["eq5_exact"]["minus_eq5"] == 0
        np.testing.assert_allclose(e["iw_1"]["per_image"], e["eq3_trajectory"]["per_image"], rtol=1e-12)  # K = 1: eq. 3
        # on the same trajectories the IW bound cannot loosen as K grows (Jensen, group by group)
        iw = np.array([e[f"iw_{k}"]["per_image"] for k in (1, 2, 4)])
        assert np.all(np.diff(iw, axis=0) <= 1e-12)
        assert min(e["ode"]["nfe"]) > 0 and e["ode"]["seconds_per_image"]["cpu"] > 0
        assert len(model["rate_distortion"]["rate_bits_per_dim"]) == model["T"] + 1
        assert model["trajectory_image_repeats"] == 3  # the profile's 2 passes on every image and one more there
        assert all(v > 0 for v in model["variance_one_estimate"].values())
    report.write(str(out))
    section = (out / "RESULTS.md").read_text().split("## Likelihood", 1)[1]
    assert "tiles: bits/dim ± SE (images)" in section and "importance-weighted, K = 4" in section
    if importlib.util.find_spec("matplotlib") is not None:  # the `bench` extra draws the figure; `dev` has no plots
        assert (out / "likelihood_rate_distortion.png").stat().st_size > 0
