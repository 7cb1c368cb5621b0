"""Prompt adherence of a model on the synthetic world, measured by the pixel analyzer, and where it is lost.

Prompts come from a split (held-out: unseen attribute combinations and paraphrases; or training) with their
exact scenes; each generated video is scored against its scene, per attribute, separately for one- and
two-object prompts. The diagnosis stages take the model apart:

- "video": generated videos (`evaluate`), with persistence: the prompt's single object, right colour, in every
  frame in which the scene shows it;
- "vae": the VAE alone (`evaluate_vae`): the same scores on reconstructions of the rendered clips, and the
  per-frame error inside vs outside the objects;
- "dit": text conditioning (`conditioning_losses`): the denoiser's training loss on the clips' latents
  with the true caption, another clip's caption and the empty prompt, at the same noise. Losses that are close
  mean the text is not being used.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

# Attributes reported per prompt kind, in table order ("colors" = every object's colour right).
ONE_OBJECT = ("background", "camera", "count", "color", "shape", "size", "motion", "speed", "persistence")
TWO_OBJECTS = ("background", "count", "colors", "shapes", "relation")


@dataclass
class EvalResult:
    split: str
    n: int
    hits: dict = field(default_factory=lambda: defaultdict(list))  # (kind, attribute) -> [bool]
    rows: list = field(default_factory=list)  # (prompt, frames) for the contact sheet
    frame_hits: list = field(default_factory=list)  # one-object clips: per frame, object right (True/False/None)

    def adherence(self) -> float:
        """Every attribute check of every prompt, pooled: the share that matched."""
        values = [v for (_, attribute), hits in self.hits.items() if attribute != "persistence" for v in hits]
        return float(np.mean(values)) if values else 0.0

    def accuracy(self, kind: str, attribute: str) -> float | None:
        values = self.hits.get((kind, attribute))
        return float(np.mean(values)) if values else None

    def table(self) -> str:
        lines = [f"prompt adherence, {self.split} split, {self.n} prompts",
                 f"{'attribute':<12}{'1 object':>10}{'2 objects':>11}"]
        for attribute in dict.fromkeys(ONE_OBJECT + TWO_OBJECTS):
            cells = []
            for kind in ("one", "two"):
                acc = self.accuracy(kind, attribute)
                n = len(self.hits.get((kind, attribute), []))
                cells.append(f"{acc * 100:6.1f}% {n:>3}" if acc is not None else f"{'—':>10}")
            lines.append(f"{attribute:<12}{cells[0]:>10} {cells[1]:>10}")
        lines.append(f"all attributes pooled: {self.adherence() * 100:.1f}%")
        by_frame = self.per_frame()
        if by_frame:
            lines.append("one object right, by frame: " + " ".join(f"{v * 100:.0f}" for v in by_frame))
        return "\n".join(lines)

    def per_frame(self) -> list[float]:
        """Share of one-object clips whose object is right (one blob, its colour) at each frame index, over the
        clips whose scene shows the object in that frame."""
        if not self.frame_hits:
            return []
        cols = zip(*self.frame_hits)
        return [float(np.mean([v for v in col if v is not None])) for col in cols]


def eval_prompts(split: str, n: int, seed: int = 0, width: int = 128, height: int = 128, num_frames: int = 17,
                 background: str | None = None):
    """n (caption, scene) pairs of a split; background: every scene on it (e.g. a new word an adapter teaches)."""
    from ..world import caption, sample_scene

    rng = random.Random(f"eval/{split}/{seed}" + (f"/{background}" if background else ""))
    fixed = {"background": background} if background else {}
    out = []
    for _ in range(n):
        scene = sample_scene(rng, split, width=width, height=height, num_frames=num_frames, **fixed)
        out.append((caption(scene, rng, heldout=split == "heldout"), scene))
    return out


def persistence(frames: np.ndarray, scene) -> list[bool | None]:
    """Per frame of a one-object scene: does it show the object as one blob of its colour and nothing else?
    None for frames in which the scene itself does not (the object has left the view)."""
    from ..world import render
    from ..world.analyze import objects_per_frame

    want = {scene.objects[0].color: 1}
    truth = objects_per_frame(render(scene))
    return [got == want if shown == want else None for got, shown in zip(objects_per_frame(frames), truth)]


def _record(result: EvalResult, scene, scores: dict, frames: np.ndarray) -> None:
    if len(scene.objects) == 1:
        for attribute in ONE_OBJECT:
            if attribute in scores:
                result.hits[("one", attribute)].append(bool(scores[attribute]))
        per_frame = persistence(frames, scene)
        result.frame_hits.append(per_frame)
        result.hits[("one", "persistence")].append(all(v is not False for v in per_frame))
        return
    for attribute in ("background", "count", "relation"):
        if attribute in scores:
            result.hits[("two", attribute)].append(bool(scores[attribute]))
    for plural, key in (("colors", "color"), ("shapes", "shape")):
        per_object = [v for k, v in scores.items() if k.endswith("." + key)]
        if per_object:
            result.hits[("two", plural)].append(all(per_object))


def _score_clips(pipe, split: str, n: int, seed: int, make_frames, sheet_rows: int, progress,
                 background: str | None = None) -> EvalResult:
    """Score make_frames(i, prompt, scene) -> uint8 [T, H, W, 3] against each prompt's scene."""
    from ..world.score import score

    cfg = pipe.bundle.config
    result = EvalResult(split=split, n=n)
    prompts = eval_prompts(split, n, seed, cfg.width, cfg.height, cfg.num_frames, background)
    for i, (prompt, scene) in enumerate(prompts):
        frames = make_frames(i, prompt, scene)
        _record(result, scene, score(frames, scene), frames)
        if len(result.rows) < sheet_rows:
            result.rows.append((prompt, frames))
        if progress:
            progress(i + 1)
    return result


def evaluate(pipe, split: str = "heldout", n: int = 200, num_inference_steps: int | None = None, seed: int = 0,
             sheet_rows: int = 12, progress=None, background: str | None = None,
             optimize: bool = False) -> EvalResult:
    """Adherence of generated videos (stage "video"; steps: the model's default unless given); background: prompts
    on that background only; optimize: each prompt through the prompt optimizer first, as `t2v generate` and the
    API do by default."""
    from ..production.prompting import optimize_parts

    def generate(i, prompt, scene):
        negative = None
        if optimize:
            prompt, negative, _ = optimize_parts(pipe.bundle, prompt, None)
        return pipe(prompt, negative_prompt=negative or None, num_inference_steps=num_inference_steps,
                    seed=seed + i).frames[0]

    return _score_clips(pipe, split, n, seed, generate, sheet_rows, progress, background)


@dataclass
class FrameErrors:
    """Mean absolute error (0..1) per frame index, inside and outside the objects' masks, summed over clips."""

    inside: np.ndarray | None = None
    outside: np.ndarray | None = None
    inside_px: np.ndarray | None = None
    outside_px: np.ndarray | None = None

    def add(self, frames: np.ndarray, truth: np.ndarray, masks: np.ndarray) -> None:
        err = np.abs(frames.astype(np.float32) - truth.astype(np.float32)).mean(-1) / 255.0  # [T, H, W]
        parts = ((err * masks).sum((1, 2)), (err * ~masks).sum((1, 2)), masks.sum((1, 2)), (~masks).sum((1, 2)))
        if self.inside is None:
            self.inside, self.outside, self.inside_px, self.outside_px = (p.astype(np.float64) for p in parts)
        else:
            for name, p in zip(("inside", "outside", "inside_px", "outside_px"), parts):
                setattr(self, name, getattr(self, name) + p)

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        return self.inside / np.maximum(self.inside_px, 1), self.outside / np.maximum(self.outside_px, 1)

    def table(self) -> str:
        inside, outside = self.mean()
        return "\n".join([
            "reconstruction error (mean |x - x'|, 0..1) by frame",
            "  inside objects:  " + " ".join(f"{v:.3f}" for v in inside),
            "  outside objects: " + " ".join(f"{v:.3f}" for v in outside)])


def evaluate_vae(pipe, split: str = "heldout", n: int = 200, seed: int = 0, sheet_rows: int = 12,
                 progress=None) -> tuple[EvalResult, FrameErrors]:
    """The VAE alone (stage "vae"): each prompt's rendered clip encoded (posterior mode) and decoded, scored like a
    generated video, with its per-frame error inside vs outside the objects."""
    import torch

    from ..data.stream import video_tensor
    from ..world import render
    from ..world.render import object_masks

    bundle, errors = pipe.bundle, FrameErrors()

    def reconstruct(i, prompt, scene):
        clip = render(scene)
        with torch.no_grad():
            frames = pipe.decode_latents(bundle.family.encode(bundle, video_tensor({"video": clip[None]}, "cpu")))[0]
        errors.add(frames, clip, object_masks(scene, clip))
        return frames

    return _score_clips(pipe, split, n, seed, reconstruct, sheet_rows, progress), errors


SIGMAS = (0.3, 0.6, 0.8, 0.95)  # noise levels of the conditioning check: the text matters most at high noise


def conditioning_losses(pipe, split: str = "heldout", n: int = 64, seed: int = 0, batch_size: int = 8,
                        sigmas=SIGMAS, progress=None) -> dict[str, dict[float, float]]:
    """Stage "dit": {"true" | "shuffled" | "empty": {level: mean training loss}} on the latents of the
    split's clips, every caption at the same noise and levels ("shuffled": the next clip's caption)."""
    import torch

    from ..data.stream import video_tensor
    from ..sampling import frame_correlated_noise, predict_guided
    from ..world import render

    bundle = pipe.bundle
    fam = bundle.family
    cfg = bundle.config
    prompts = eval_prompts(split, n, seed, cfg.width, cfg.height, cfg.num_frames)
    generator = torch.Generator().manual_seed(seed)
    objective = fam.training_objective(bundle)
    sums = {name: {s: 0.0 for s in sigmas} for name in ("true", "shuffled", "empty")}
    for start in range(0, n, batch_size):
        chunk = prompts[start:start + batch_size]
        captions = [p for p, _ in chunk]
        video = video_tensor({"video": np.stack([render(scene) for _, scene in chunk])}, bundle.device)
        with torch.no_grad():
            x0 = fam.encode(bundle, video).float()
            texts = {"true": captions, "shuffled": captions[1:] + captions[:1], "empty": [""] * len(chunk)}
            embeds = {k: pipe.encode_prompt(v) for k, v in texts.items()}
            for s in sigmas:
                noise = frame_correlated_noise(torch.randn(x0.shape, generator=generator),
                                               bundle.config.frame_noise_correlation, generator).to(x0.device)
                sigma = torch.full((len(chunk),), s, device=x0.device)
                x_t, timestep, target = objective.pair(x0, noise, sigma)
                for name, e in embeds.items():
                    pred = predict_guided(bundle, x_t, timestep, e, 1.0).float()  # unguided: the prompt alone
                    sums[name][s] += float(((pred - target) ** 2).mean((1, 2, 3, 4)).sum())
        if progress:
            progress(min(start + batch_size, n))
    return {name: {s: v / n for s, v in per.items()} for name, per in sums.items()}


def conditioning_table(losses: dict[str, dict[float, float]]) -> str:
    sigmas = list(losses["true"])
    lines = ["training loss by noise level (flow: sigma; diffusion: t / 1000), the same noise for every caption",
             f"{'caption':<10}" + "".join(f"{s:>9.2f}" for s in sigmas)]
    for name, per in losses.items():
        lines.append(f"{name:<10}" + "".join(f"{per[s]:>9.4f}" for s in sigmas))
    gaps = [(losses["shuffled"][s] - losses["true"][s]) / losses["true"][s] for s in sigmas]
    lines.append(f"{'shuffled/true - 1':<10}" + "".join(f"{g * 100:>8.1f}%" for g in gaps))
    return "\n".join(lines)


def contact_sheet(rows, path: str, columns: int = 6) -> None:
    """A PNG grid for people to look at: per prompt, its text above `columns` evenly spaced frames."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[1:3]
    text_h = 16
    sheet = Image.new("RGB", (w * columns, (h + text_h) * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, frames) in enumerate(rows):
        y = r * (h + text_h)
        draw.text((3, y + 2), prompt[: w * columns // 6], fill=(0, 0, 0))
        for c, t in enumerate(np.linspace(0, len(frames) - 1, columns).round().astype(int)):
            sheet.paste(Image.fromarray(frames[t]), (c * w, y + text_h))
    sheet.save(path)
