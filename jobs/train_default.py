"""Train the embedded default model on this machine, every stage, with one command that resumes where it stopped.

    python jobs/train_default.py [--out out/default-run]

Run it again after a Ctrl-C, a kill or a lost machine: each stage's output and checkpoints are in --out, so the
same command continues from the last checkpoint of the stage it was in (a finished stage is not run again).

1. render: `--clips` training clips of the synthetic world at the model's size, with the objects' masks, by a
   background process into <out>/world (kept: a resumed run renders only what is missing);
2. vae: the per-frame AutoencoderKL (jobs/configs/default-vae.yaml), trained from scratch on the clips rendered
   so far, object pixels weighted; -> <out>/vae;
3. gate: its reconstructions of `--gate-n` held-out clips scored by the world analyzer (as `t2v eval --stage vae`)
   -> <out>/vae-gate.txt; the targets below are logged as passed or not (with --require-gate a failed gate stops
   the run before the denoiser);
4. latents: every rendered clip encoded once -> <out>/latents.pt;
5. denoiser: the UNet3D (jobs/configs/default-denoiser.yaml) on those latents, each draw freshly captioned;
   -> <out>/model;
6. eval: `--eval-n` held-out prompts generated and scored (as `t2v eval`) -> <out>/eval.txt and eval.png.

Each step count is fixed in its config (a resumed stage keeps its learning-rate schedule); the log gives each
stage's pace and the whole recipe's ETA. `--vae key=value` / `--denoiser key=value` override either config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from t2v import storage
from t2v.data.rendered import RenderedWorld, RenderSpec, encode_rendered, latent_batches
from t2v.train.config import TrainConfig
from t2v.train.loop import EMA, FolderCheckpoints, train

log = logging.getLogger("t2v.train_default")

# The VAE gate (issue: reconstructions good enough that a denoiser on its latents can reach the targets).
VAE_GATE = {"background": 0.98, "color": 0.98, "count": 0.98, "size": 0.98, "shape": 0.95, "motion": 0.95}
# Seconds per step measured on 2 CPU cores, for the ETA of stages not started yet.
PACE = {"vae": 0.48, "denoiser": 2.4, "gate_clip": 0.3, "encode_clip": 0.035, "eval_clip": 4.5}


class Eta:
    """Logs a stage's pace and the recipe's time left (this stage at its recent pace, later ones at PACE)."""

    def __init__(self, stage: str, steps: int, later_s: float, every: int):
        self.stage, self.steps, self.later_s, self.every = stage, steps, later_s, every
        self.last, self.pace = None, None

    def __call__(self, step: int, metrics: dict) -> None:
        now = time.perf_counter()
        if self.last is None:  # the first step after a (re)start: data and kernels warm up, not counted
            self.last = (step, now)
            return
        if step % self.every and step != self.steps:
            return
        recent = (now - self.last[1]) / (step - self.last[0])
        self.pace = recent if self.pace is None else 0.5 * self.pace + 0.5 * recent  # smoothed, yet follows changes
        self.last = (step, now)
        left = (self.steps - step) * self.pace
        log.info("%s: step %d/%d, loss %.4f, %.2f s/step; stage ETA %s, recipe ETA %s", self.stage, step,
                 self.steps, metrics["loss_avg"], self.pace, minutes(left), minutes(left + self.later_s))


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def trained_to(cfg: TrainConfig) -> int | None:
    """The step a stage's saved model was trained to, or None while the stage is unfinished: its bundle is saved
    whole (model_index.json with t2v's block, written last) and its last checkpoint reached cfg.steps (a larger
    `steps` than the model was trained to continues it)."""
    index = os.path.join(cfg.out, "model_index.json")
    if not os.path.exists(index) or "_t2v" not in json.loads(Path(index).read_text()):
        return None
    steps = FolderCheckpoints(cfg.checkpoint_dir).steps()
    return steps[-1] if steps and steps[-1] >= cfg.steps else None


def vae_gate(vae_dir: str, n: int, path: str) -> bool:
    """Score the VAE's reconstructions of n held-out clips once (kept in `path`); True when it passes VAE_GATE."""
    from t2v.bundle import load
    from t2v.pipeline import TextToVideoPipeline
    from t2v.quality.evaluate import contact_sheet, evaluate_vae

    if not os.path.exists(path):
        torch.manual_seed(0)
        result, errors = evaluate_vae(TextToVideoPipeline(load(vae_dir)), "heldout", n)
        verdict = [f"{a}: {result.accuracy('one', a) * 100:.1f}% (gate {g * 100:.0f}%)"
                   + ("" if result.accuracy("one", a) >= g else " FAILED") for a, g in VAE_GATE.items()]
        contact_sheet(result.rows, path.replace(".txt", ".png"))
        storage.write_bytes(path, "\n".join([result.table(), errors.table(), *verdict, ""]).encode())
    text = Path(path).read_text()
    log.info("VAE gate (%s):\n%s", path, text)
    return "FAILED" not in text


def encode_world(vae_dir: str, world, path: str) -> tuple[torch.Tensor, list]:
    """Latents of every clip world() renders and their scenes, computed once (kept in `path`)."""
    from t2v.bundle import load
    from t2v.world import Scene

    if not os.path.exists(path):
        t0 = time.perf_counter()
        latents, scenes = encode_rendered(load(vae_dir), world())
        log.info("encoded %d clips in %.0f s", len(scenes), time.perf_counter() - t0)
        tmp = path + ".tmp"
        torch.save({"latents": latents, "scenes": [s.to_json() for s in scenes]}, tmp)
        os.replace(tmp, path)  # a stop while saving leaves no half file
    data = torch.load(path)
    return data["latents"], [Scene.from_json(s) for s in data["scenes"]]


def evaluate_model(model_dir: str, n: int, path: str) -> None:
    """Held-out adherence of the finished model, once (kept in `path`, its contact sheet beside it)."""
    from t2v.bundle import load
    from t2v.pipeline import TextToVideoPipeline
    from t2v.quality.evaluate import contact_sheet, evaluate

    if not os.path.exists(path):
        torch.manual_seed(0)
        result = evaluate(TextToVideoPipeline(load(model_dir)), "heldout", n)
        contact_sheet(result.rows, path.replace(".txt", ".png"))
        storage.write_bytes(path, (result.table() + "\n").encode())
    log.info("held-out adherence (%s):\n%s", path, Path(path).read_text())


def evaluate_checkpoint(den_cfg: TrainConfig, n: int, out: str) -> None:
    """Held-out adherence of the denoiser's latest checkpoint (its EMA weights), while or after the stage runs."""
    from t2v.pipeline import TextToVideoPipeline
    from t2v.quality.evaluate import contact_sheet, evaluate
    from t2v.train.loop import build_bundle

    state = FolderCheckpoints(den_cfg.checkpoint_dir).latest()
    if state is None:
        raise SystemExit(f"no denoiser checkpoint in {den_cfg.checkpoint_dir} yet")
    bundle = build_bundle(den_cfg)
    ema = EMA(bundle.denoiser, decay=0.0)
    ema.shadow = state["ema"]
    ema.copy_to(bundle.denoiser)
    torch.manual_seed(0)
    result = evaluate(TextToVideoPipeline(bundle), "heldout", n)
    sheet = os.path.join(out, f"eval-step-{state['step']}.png")
    contact_sheet(result.rows, sheet)
    print(f"denoiser step {state['step']} (EMA weights), {sheet}:\n{result.table()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/default-run")
    ap.add_argument("--clips", type=int, default=8000, help="training clips rendered")
    ap.add_argument("--gate-n", type=int, default=200, help="held-out clips of the VAE gate")
    ap.add_argument("--eval-n", type=int, default=200, help="held-out prompts of the final evaluation")
    ap.add_argument("--require-gate", action="store_true", help="stop before the denoiser if the VAE fails its gate")
    ap.add_argument("--from", dest="start", default=None, metavar="DIR",
                    help="a saved run to continue (e.g. jobs/default-run): copied into --out when --out is new")
    ap.add_argument("--eval-now", action="store_true",
                    help="only score the denoiser's latest checkpoint on --eval-n held-out prompts (a run in progress)")
    ap.add_argument("--vae", nargs="*", default=[], help="key=value overrides of default-vae.yaml")
    ap.add_argument("--denoiser", nargs="*", default=[], help="key=value overrides of default-denoiser.yaml")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    out = args.out
    vae_cfg = TrainConfig.from_yaml("jobs/configs/default-vae.yaml", [
        f"out={out}/vae", f"checkpoint_dir={out}/checkpoints-vae", *args.vae])
    den_cfg = TrainConfig.from_yaml("jobs/configs/default-denoiser.yaml", [
        f"init={out}/vae", f"out={out}/model", f"checkpoint_dir={out}/checkpoints-denoiser", *args.denoiser])
    if args.start and not os.path.exists(out):
        shutil.rmtree(out + ".partial", ignore_errors=True)
        shutil.copytree(args.start, out + ".partial")
        os.rename(out + ".partial", out)  # whole or absent: a stop while copying leaves no half run
        log.info("continuing the run saved in %s, in %s", args.start, out)
    elif args.start:
        log.info("%s exists: continuing it (--from %s not copied)", out, args.start)
    if args.eval_now:
        if trained_to(vae_cfg) is None:
            raise SystemExit(f"the VAE of {out} is not trained yet: no denoiser checkpoint to score")
        return evaluate_checkpoint(on_vae(den_cfg, trained_to(vae_cfg)), args.eval_n, out)
    later_den = den_cfg.steps * PACE["denoiser"] + args.eval_n * PACE["eval_clip"]
    t_start = time.perf_counter()
    # 1. Render in the background (only while a stage still needs clips), into a folder a resumed run reuses.
    spec = RenderSpec(num_frames=vae_cfg.num_frames, size=vae_cfg.size, masks=True)
    world = Lazy(lambda: RenderedWorld(args.clips, spec, workers=1, folder=f"{out}/world").start())
    try:
        # 2. The VAE.
        if trained_to(vae_cfg) is None:
            later = args.gate_n * PACE["gate_clip"] + args.clips * PACE["encode_clip"] + later_den
            train(vae_cfg, lambda start: world().batches(vae_cfg.batch_size, seed=start, min_ready=64),
                  FolderCheckpoints(vae_cfg.checkpoint_dir),
                  on_step=Eta("vae", vae_cfg.steps, later, vae_cfg.log_every))
        vae_step = trained_to(vae_cfg)
        # 3. Its gate. What follows is kept per VAE step: a VAE trained further gets its own gate and latents, and
        #    its own denoiser (checkpoints-denoiser-vae<step>).
        gate = f"{out}/vae-gate-step{vae_step}.txt"
        if not vae_gate(vae_cfg.out, args.gate_n, gate) and args.require_gate:
            raise SystemExit(f"the VAE failed its gate ({gate}): train it longer (--vae steps=...) before the "
                             "denoiser")
        # 4. Latents of every clip, once.
        latents_path = f"{out}/latents-vae{vae_step}-clips{args.clips}.pt"
        if not os.path.exists(latents_path):
            world().wait()
        latents, scenes = encode_world(vae_cfg.out, world, latents_path)
    finally:
        if world.made:
            world().close()

    # 5. The denoiser.
    den_cfg = on_vae(den_cfg, vae_step)
    if trained_to(den_cfg) is None:
        train(den_cfg, lambda start: latent_batches(latents, scenes, den_cfg.batch_size, seed=start),
              FolderCheckpoints(den_cfg.checkpoint_dir),
              on_step=Eta("denoiser", den_cfg.steps, args.eval_n * PACE["eval_clip"], den_cfg.log_every))

    # 6. Held-out adherence of the finished model.
    evaluate_model(den_cfg.out, args.eval_n, f"{out}/eval-vae{vae_step}-step{trained_to(den_cfg)}.txt")
    log.info("done: %s (%s this run); copy it to t2v/models/default to ship it", den_cfg.out,
             minutes(time.perf_counter() - t_start))


def on_vae(den_cfg: TrainConfig, vae_step: int) -> TrainConfig:
    """The denoiser stage trained on the latents of the VAE at `vae_step` keeps its checkpoints apart."""
    return dataclasses.replace(den_cfg, checkpoint_dir=f"{den_cfg.checkpoint_dir}-vae{vae_step}")


class Lazy:
    """A value made on first call (the rendered world: started only when a stage needs clips)."""

    def __init__(self, make):
        self.make, self.made = make, None

    def __call__(self):
        if self.made is None:
            self.made = self.make()
        return self.made


if __name__ == "__main__":
    main()
