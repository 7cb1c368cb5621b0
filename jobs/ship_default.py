"""The recipe's model as the embedded default: its scheduler swapped for the sampler chosen by `t2v eval` at equal
steps (the denoiser is unchanged), and that sampler's step count as the default.

    python jobs/ship_default.py out/default-run/model t2v/models/default --sampler unipc --spacing trailing --steps 10

Trailing spacing starts sampling at the last training timestep: with the DDPM schedule's non-zero terminal SNR,
the default "leading" spacing starts at t = 900 from pure noise, and dark or bright backgrounds come out grey.
"""

from __future__ import annotations

import argparse
import dataclasses

from t2v.bundle import load
from t2v.sampling import make_scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--sampler", default=None, help="a sampler name of the model's family (default: its own)")
    ap.add_argument("--spacing", default=None, help="timestep_spacing: leading, trailing or linspace")
    ap.add_argument("--steps", type=int, required=True)
    args = ap.parse_args()
    bundle = load(args.model, device="cpu")
    fam = bundle.family
    config = {**bundle.scheduler.config, "_class_name": type(bundle.scheduler).__name__}
    scheduler = make_scheduler(config, fam.samplers, args.sampler, fam.flow)
    if args.spacing:
        scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing=args.spacing)
    bundle.scheduler = scheduler
    bundle.config = dataclasses.replace(bundle.config, num_inference_steps=args.steps)
    bundle.save(args.out)
    print(f"{args.out}: {type(scheduler).__name__} ({scheduler.config.timestep_spacing}), {args.steps} steps")


if __name__ == "__main__":
    main()
