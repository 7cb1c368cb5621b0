"""Does the prompt optimizer help? Adherence of raw vs optimized held-out world prompts with the same model,
seeds and steps (the analyzer's per-attribute accuracy, one- and two-object prompts pooled).

    python bench/prompt_optimizer.py [--model PATH] [--n 60] [--steps 25]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np


def main() -> None:
    import torch

    import t2v
    from t2v.quality.evaluate import eval_prompts
    from t2v.production.prompting import optimize_prompt
    from t2v.world.score import score

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = t2v.TextToVideoPipeline.from_pretrained(args.model)
    world = pipe.bundle.config.vocabulary == "world"
    hits = {"raw": defaultdict(list), "optimized": defaultdict(list)}
    changed = 0
    for i, (prompt, scene) in enumerate(eval_prompts("heldout", args.n)):
        opt = optimize_prompt(prompt, world_model=world)
        changed += opt.prompt != prompt
        for kind, text in (("raw", prompt), ("optimized", opt.prompt)):
            frames = pipe(text, negative_prompt=opt.negative_prompt if kind == "optimized" else None,
                          num_inference_steps=args.steps, seed=i).frames[0]
            for attribute, ok in score(frames, scene).items():
                hits[kind][attribute.split(".")[-1]].append(bool(ok))
    print(f"held-out prompts: {args.n} ({changed} rewritten by the optimizer), {args.steps} steps, same seeds")
    print(f"{'attribute':<12}{'raw':>8}{'optimized':>11}")
    for attribute in sorted(hits["raw"]):
        r, o = np.mean(hits["raw"][attribute]), np.mean(hits["optimized"][attribute])
        print(f"{attribute:<12}{r * 100:7.1f}%{o * 100:10.1f}%")
    mean = {k: np.mean([np.mean(v) for v in hits[k].values()]) for k in hits}
    print(f"{'mean':<12}{mean['raw'] * 100:7.1f}%{mean['optimized'] * 100:10.1f}%  "
          f"(optimized - raw: {100 * (mean['optimized'] - mean['raw']):+.1f} points)")


if __name__ == "__main__":
    main()
