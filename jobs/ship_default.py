"""The recipe's model as the embedded default: its scheduler swapped for the sampler chosen by `t2v eval` at equal
steps (the denoiser is unchanged), and that sampler's step count as the default. `jobs/train_default.py` does the
same as its "ship" stage; this script re-ships a trained model with other sampling.

    python jobs/ship_default.py out/default-run/model t2v/models/default --sampler unipc --spacing trailing --steps 10

Trailing spacing starts sampling at the last training timestep: with the DDPM schedule's non-zero terminal SNR,
the default "leading" spacing starts at t = 900 from pure noise, and dark or bright backgrounds come out grey.
"""

from __future__ import annotations

import argparse

from t2v.bundle import load
from t2v.sampling import with_sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--sampler", default=None, help="a sampler name of the model's family (default: its own)")
    ap.add_argument("--spacing", default=None, help="timestep_spacing: leading, trailing or linspace")
    ap.add_argument("--steps", type=int, required=True)
    args = ap.parse_args()
    bundle = with_sampler(load(args.model, device="cpu"), args.sampler, args.spacing, args.steps)
    bundle.save(args.out)
    print(f"{args.out}: {type(bundle.scheduler).__name__} ({bundle.scheduler.config.timestep_spacing}), "
          f"{args.steps} steps")


if __name__ == "__main__":
    main()
