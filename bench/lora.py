"""A LoRA that teaches the embedded model a new world word: adherence to it without vs with the adapter, and the
base vocabulary's adherence with the adapter loaded (it must not drop by more than 5 points).

    python bench/lora.py [--adapter desert|FOLDER] [--word desert] [--n-new 40] [--n-base 100] [--steps 25]

Every prompt is generated twice with the same seed, without and with the adapter, and scored by the world's
pixel analyzer against its scene (t2v.quality.evaluate):
- new word: one- and two-object scenes on the new background, captioned with the training phrasings (new
  scenes, not the adapter's training clips); reported: the background match, and every attribute pooled;
- base vocabulary: the held-out split of the base world (what `t2v eval` and the model card report), whose
  scenes never show the new word; reported: the background match and every attribute pooled, with the change
  in points.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    import t2v
    from t2v.lora import from_spec
    from t2v.quality.evaluate import contact_sheet, evaluate

    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="desert", help="a LoRA folder, s3:// URI or the embedded model's "
                    "adapter's name")
    ap.add_argument("--word", default="desert", help="the new background the adapter teaches")
    ap.add_argument("--n-new", type=int, default=40)
    ap.add_argument("--n-base", type=int, default=100)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--sheet", default="lora.png", help="contact sheet: new-word prompts without, then with")
    args = ap.parse_args()

    pipe = t2v.TextToVideoPipeline.from_pretrained()
    pipe.load_lora_weights(from_spec(args.adapter)[0], "bench")
    results, t0 = {}, time.perf_counter()
    for label, adapter in (("without", None), ("with", "bench")):
        pipe.set_adapters(adapter, args.strength)
        results[("new", label)] = evaluate(pipe, "train", args.n_new, args.steps, sheet_rows=6,
                                           background=args.word)
        results[("base", label)] = evaluate(pipe, "heldout", args.n_base, args.steps, sheet_rows=0)
    took = time.perf_counter() - t0

    def background(result) -> float:
        hits = [v for (_, attribute), vs in result.hits.items() if attribute == "background" for v in vs]
        return float(np.mean(hits))

    print(f"adapter {args.adapter} at strength {args.strength:g}, {args.steps} steps, {took / 60:.1f} min")
    print(f"{'prompts':<36}{'without':>10}{'with':>10}{'change':>10}")
    for split, n, name in (("new", args.n_new, f"'{args.word}' ({args.n_new}): background"),
                           ("base", args.n_base, f"base held-out ({args.n_base}): background")):
        for metric, label in ((background, name), (lambda r: r.adherence(), name.split(":")[0] + ": all pooled")):
            a, b = metric(results[(split, "without")]), metric(results[(split, "with")])
            print(f"{label:<36}{a * 100:>9.1f}%{b * 100:>9.1f}%{(b - a) * 100:>+9.1f}")
    for key in (("new", "with"), ("base", "with")):
        print(f"[{key[0]} prompts, with the adapter] " + results[key].table())
    rows = [(f"without: {p}", f) for p, f in results[("new", "without")].rows]
    rows += [(f"with: {p}", f) for p, f in results[("new", "with")].rows]
    contact_sheet(rows, args.sheet)
    print(f"contact sheet: {args.sheet}")


if __name__ == "__main__":
    main()
