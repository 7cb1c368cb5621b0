"""Per-step batching: several requests' denoising steps (each with its own timestep, prompt and guidance) in
one forward give each request the prediction it would get alone; a pipeline whose steps go through a batching
predictor makes the same video."""

import numpy as np
import pytest
import torch

from t2v.sampling import predict_batch, predict_guided


@pytest.mark.parametrize("pipe_name", ["wan_pipe", "unet3d_pipe", "latte_pipe"])
def test_batched_requests_match_their_own_forwards(pipe_name, request):
    pipe = request.getfixturevalue(pipe_name)
    b = pipe.bundle
    g = torch.Generator().manual_seed(0)
    shape = b.family.latent_shape(b, 1, b.config.num_frames, b.config.height, b.config.width)
    embeds = pipe.encode_prompt(["", "a red ball", "a blue star", ""])
    sched = b.scheduler
    sched.set_timesteps(10)
    ts = sched.timesteps
    requests = [
        (torch.randn(shape, generator=g), ts[0], embeds[0:2], 5.0),  # guided: negative first
        (torch.randn(shape, generator=g), ts[6], embeds[2:3], 1.0),  # unguided, another step
        (torch.randn(shape, generator=g), ts[3], torch.cat([embeds[3:4], embeds[2:3]]), 2.5),
        # another shape (half the width) forms its own group
        (torch.randn(*shape[:-1], shape[-1] // 2, generator=g), ts[1], embeds[1:2], 1.0),
    ]
    with torch.no_grad():
        batched = predict_batch(b, requests)
        alone = [predict_guided(b, x, t, e, s) for x, t, e, s in requests]
    for got, want in zip(batched, alone):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the requests differ: a mixed-up split would pair a request with another's prediction
    assert not torch.allclose(batched[0], batched[2], atol=1e-3)


def test_pipeline_through_a_batching_predictor_makes_the_same_video(wan_pipe):
    b = wan_pipe.bundle
    seen = []

    def batching(xs, t, embeds, guidance):
        seen.append(len(xs))
        return predict_batch(b, [(x, t, e, guidance) for x, e in zip(xs, embeds)])

    def one_by_one(xs, t, embeds, guidance):
        return [predict_guided(b, x, t, e, guidance) for x, e in zip(xs, embeds)]

    kw = dict(num_inference_steps=4, seed=3, guidance_scale=4.0)
    plain = wan_pipe("a red ball bouncing", **kw).frames
    through = wan_pipe("a red ball bouncing", predictor=batching, **kw).frames
    alone = wan_pipe("a red ball bouncing", predictor=one_by_one, **kw).frames
    assert seen == [1] * 4
    np.testing.assert_array_equal(plain, alone)  # on a CPU the default predictor runs one forward each
    assert np.abs(plain.astype(int) - through.astype(int)).max() <= 2


def wan22_requests(build, path, size: int):
    """A tiny Wan2.2 layout's bundle, a latent shape of 9 frames at `size`, and guided requests' context for
    prompts 1 and 2 (the negative first): (bundle, shape, {k: embeds})."""
    import t2v

    b = t2v.load(build(path))
    embeds = t2v.TextToVideoPipeline(b).encode_prompt(["", "a red ball", "a blue square"])
    context = {k: torch.cat([embeds[:1], embeds[k:k + 1]]) for k in (1, 2)}
    return b, b.family.latent_shape(b, 1, 9, size, size), context


def test_steps_of_a_mixtures_two_experts_batch_only_with_steps_of_the_same_expert(tmp_path):
    """Wan2.2 A14B: jobs at steps on either side of the boundary go to their own expert's forward."""
    from layouts import build_wan22_a14b

    b, shape, context = wan22_requests(build_wan22_a14b, tmp_path / "a14b", 32)
    g = torch.Generator().manual_seed(0)
    high, low = torch.tensor(990.0), torch.tensor(400.0)  # the boundary: 0.875 x 1000
    x = torch.randn(shape, generator=g)
    requests = [(x, t, context[k], 4.0) for t, k in ((high, 1), (low, 1), (high, 2), (low, 2))]
    calls = [0, 0]
    for k, model in enumerate(b.experts):
        model.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    with torch.no_grad():
        batched = predict_batch(b, requests)
        assert calls == [1, 1]  # one forward per expert, each with both of its jobs' steps
        alone = [predict_guided(b, *r) for r in requests]
    for x, y in zip(batched, alone):
        assert torch.allclose(x, y, atol=1e-5)
    assert (alone[0] - alone[1]).abs().max() > 1e-3  # the same job state, another expert: another prediction


def test_per_token_timesteps_batch_with_their_own_kind_and_keep_their_predictions(tmp_path):
    """Wan2.2 TI2V: an image job's step (first frame's tokens at t = 0) and a text job's step (one t)."""
    from layouts import build_wan22_ti2v

    b, shape, context = wan22_requests(build_wan22_ti2v, tmp_path / "ti2v", 64)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(700.0)
    per_token = torch.cat([torch.zeros(4), torch.full((8,), 700.0)]).unsqueeze(0)  # 3 latent frames x 2 x 2 tokens
    requests = [(torch.randn(shape, generator=g), tt, context[k], 4.0)
                for tt, k in ((t, 1), (per_token, 1), (per_token, 2), (t, 2))]
    with torch.no_grad():
        batched = predict_batch(b, requests)
        alone = [predict_guided(b, *r) for r in requests]
        x, e = requests[0][0], requests[0][2]  # the first frame's tokens at t = 0 change the prediction
        assert (predict_guided(b, x, per_token, e, 4.0) - predict_guided(b, x, t, e, 4.0)).abs().max() > 1e-4
    for x, y in zip(batched, alone):
        assert torch.allclose(x, y, atol=1e-5)
