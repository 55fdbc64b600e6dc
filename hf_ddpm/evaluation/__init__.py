"""Held-out evaluation, the one home: bits/dim over a split, and FID, precision/recall and KID of samples.

    python -m hf_ddpm evaluate MODEL [--num_samples 50000 --protocol paper] ...   (also under `accelerate launch`)

- `schema`: the result of every metric (value, standard error, count, protocol) and the JSON a card reads;
  no torch, so that the model card can import it.
- `processes`: work items divided among the processes of an `accelerate launch`, results gathered in order.
- `bits_per_dim`: the bound (DDPM eq. 5) over a split, exact or Monte Carlo, in seeded blocks that resume.
- `likelihood`: every likelihood estimator behind one call (eq. 5, eq. 3 trajectories, importance-weighted, the
  probability-flow ODE, rate-distortion) and over a split; `likelihood_options`: its command-line flags (no torch).
- `features`: the feature extractor (Inception-v3 pool3, TF FID weights) and its one name.
- `feature_metrics`: FID, precision/recall (Kynkäänniemi et al. 2019) and KID from features.
- `sample_shards`: samples in resumable shards, sample i from seed base + i.
- `reference`: reference statistics computed once and reused, or read from a mu/sigma .npz made elsewhere.
- `run` (the command line, its flags) and `sample_quality` (FID, precision/recall and KID of one evaluation's
  samples: shards, features, reference).
"""
