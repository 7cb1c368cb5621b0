"""One video over several ranks: guidance-parallel (cfg: 2) and diffusers' sequence parallelism (Ulysses over
gloo, 2 processes on this CPU), each checked against the one-rank result for the same seed -- in the library,
and through a real `serve run` whose Denoiser replica starts its ranks as Ray actors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import t2v
from t2v.errors import InputError
from t2v.long_video import LongVideoPipeline
from t2v.parallel import (ParallelLayout, Rank, attach, free_address, join_sequence_parallel, layout_of,
                          split_guidance, thread_peer)
from t2v.sampling import local_requests, predict_batch
from t2v.serve import stages
from t2v.video import read_video
from test_image_to_video import picture, png
from test_serve_graph import serve_app

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red ball bouncing on a black background"
CLIP = dict(num_frames=9, height=32, width=32, num_inference_steps=4, seed=3, guidance_scale=4.0)


def test_layouts_parse_and_refuse_with_the_field_named():
    assert ParallelLayout.parse().name == "single" and ParallelLayout.parse().ranks == 1
    assert ParallelLayout.parse(cfg=2).describe() == {"parallel": "cfg2", "ranks": 2}
    assert ParallelLayout.parse(ulysses=2, ring=2).name == "ulysses2+ring2"
    assert ParallelLayout.parse(ulysses=2, ring=2).ranks == 4
    assert ParallelLayout.parse(ring=2, attention_backend="flash").attention_backend == "flash"
    for bad, field in (({"cfg": 3}, "parallel.cfg"), ({"ulysses": 0}, "parallel.ulysses"),
                       ({"ring": "2"}, "parallel.ring"), ({"cfg": 2, "ulysses": 2}, "parallel"),
                       ({"tp": 2}, "parallel"), ({"ring": 2, "attention_backend": "flashy"},
                                                  "parallel.attention_backend")):
        with pytest.raises(InputError) as e:
            ParallelLayout.parse(**bad)
        assert e.value.field == field


def test_split_guidance_sends_only_negative_halves_and_equals_one_batched_forward(wan_pipe):
    bundle = wan_pipe.bundle
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 4, generator=g)
    e = torch.randn(4, 32, 384, generator=g)  # two negative prompts, then two prompts
    t = torch.tensor([700.0])
    requests = [(x, t, e, 5.0), (x[:1], t, e[2:3], 1.0)]  # a guided pair and an unguided clip
    sent = []

    def start_there(reqs):
        sent.extend(reqs)
        return lambda: local_requests(bundle)(reqs)

    with torch.no_grad():
        split = split_guidance(requests, local_requests(bundle), start_there)
        whole = predict_batch(bundle, requests)
    assert len(sent) == 1 and torch.equal(sent[0][2], e[:2]) and sent[0][3] == 1.0
    for a, b in zip(split, whole):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5


def _frames(pipe, **kw):
    return pipe(PROMPT, output_type="pt", **{**CLIP, **kw}).frames


def test_cfg_parallel_pipeline_and_long_video_equal_one_rank(wan_dir):
    pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)
    alone = _frames(pipe)
    long_alone = LongVideoPipeline(pipe)(PROMPT, output_type="pt", **{**CLIP, "num_frames": 25}).frames
    attach(pipe.bundle, ParallelLayout(cfg=2), thread_peer(Rank(t2v.load(wan_dir))))
    assert layout_of(pipe.bundle).name == "cfg2"
    split = _frames(pipe)
    assert (split - alone).abs().max() <= 1e-5 and alone.std() > 0.01
    long_split = LongVideoPipeline(pipe)(PROMPT, output_type="pt", **{**CLIP, "num_frames": 25}).frames
    assert long_split.shape[1] == 25 and (long_split - long_alone).abs().max() <= 1e-5


def _sequence_rank(rank: int, world: int, address: str, bundle_dir: str, queue) -> None:
    torch.set_num_threads(1)
    pipe = t2v.TextToVideoPipeline.from_pretrained(bundle_dir)
    join_sequence_parallel(pipe.bundle, rank, world, address, ParallelLayout(ulysses=world))
    frames = _frames(pipe)
    unguided = _frames(pipe, guidance_scale=1.0, seed=4)
    if rank == 0:
        queue.put((frames.numpy(), unguided.numpy()))
    torch.distributed.destroy_process_group()


def test_ulysses_over_two_processes_equals_one_process(wan_dir):
    pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)
    alone, unguided = _frames(pipe), _frames(pipe, guidance_scale=1.0, seed=4)
    ctx = mp.get_context("spawn")
    queue, address = ctx.Queue(), free_address()
    ranks = [ctx.Process(target=_sequence_rank, args=(r, 2, address, str(wan_dir), queue)) for r in range(2)]
    for p in ranks:
        p.start()
    split, split_unguided = queue.get(timeout=300)
    for p in ranks:
        p.join(60)
        assert p.exitcode == 0
    assert abs(torch.from_numpy(split) - alone).max() <= 1e-5
    assert abs(torch.from_numpy(split_unguided) - unguided).max() <= 1e-5


def test_sequence_splits_the_model_or_device_cannot_run_are_refused_first(wan_pipe, unet3d_dir):
    from t2v.parallel import check_sequence_parallel

    unet = t2v.load(unet3d_dir).denoiser
    cases = ((unet, ParallelLayout(ulysses=2), "parallel.ulysses", "no context-parallel plan"),
             (wan_pipe.bundle.denoiser, ParallelLayout(ulysses=4), "parallel.ulysses", "does not divide"),
             (wan_pipe.bundle.denoiser, ParallelLayout(ring=2), "parallel.ring", "log-sum-exp"))
    for model, layout, field, words in cases:
        with pytest.raises(InputError, match=words) as e:
            check_sequence_parallel(model, layout, "cpu")
        assert e.value.field == field


def test_the_serve_denoiser_refuses_a_cache_with_a_parallel_layout(wan_dir):
    from t2v.serve.deployments import Denoiser, build_app

    with pytest.raises(ValueError, match="no parallel layout"):
        Denoiser.func_or_class(str(wan_dir), fan_out=False, runtime={"cache": "first_block"},
                               parallel={"cfg": 2})
    with pytest.raises(InputError) as e:
        build_app({"model": str(wan_dir), "parallel": {"cfg": 4}})
    assert e.value.field == "parallel.cfg"


# --- through `serve run` ------------------------------------------------------------------------------------

def _gcs_address(ray_tmp: Path) -> str:
    """The address of the cluster `serve run` started (a local instance writes its GCS port in its session)."""
    import ray

    deadline = time.time() + 60
    while time.time() < deadline:
        for path in (ray_tmp / "ray" / "session_latest").glob("gcs_server_port_*"):
            if port := path.read_text().strip():
                return f"{ray.util.get_node_ip_address()}:{port}"
        time.sleep(0.5)
    raise TimeoutError(f"no GCS port under {ray_tmp}")


def _pids(title: str, ray_tmp: Path) -> list[int]:
    """Processes of this test's Ray (its temp folder in their environ) whose title names `title`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and f"ray::{title}".encode() in (proc / "cmdline").read_bytes()
                    and str(ray_tmp).encode() in (proc / "environ").read_bytes()):
                found.append(int(proc.name))
        except OSError:  # ended meanwhile
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"cfg": 2}, {"ulysses": 2}], ids=["cfg2", "ulysses2"])
def test_serve_run_layouts_sample_what_one_rank_samples(tmp_path, wan_dir, parallel):
    # One replica and its rank: the layout is the only way this video splits.
    with serve_app(tmp_path, wan_dir, denoiser_replicas=1, threads=1,
                   step_batching={"max_batch_size": 4, "wait_s": 0.01},
                   parallel={**parallel, "rank_actor_options": {"num_cpus": 0.3}},
                   settings={"concurrency": 3}) as (serve, ray_tmp):
        # 1. The same clip, sampled by the replica and its rank, and alone in this process.
        fields = {"prompt": PROMPT, "size": "32x32", "seed": 7, "num_inference_steps": 5, "guidance_scale": 4.0}
        out = tmp_path / "sampled.pt"
        subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_client.py"), _gcs_address(ray_tmp),
                        json.dumps(fields), str(out)], check=True, timeout=300, cwd=ROOT)
        got = torch.load(out, weights_only=False)
        layout = ParallelLayout.parse(**parallel)
        name = layout.name
        node = got["served_by"].pop("node")  # the Ray node id of the replica that sampled it
        assert got["served_by"] == {"parallel": name, "ranks": 2} and len(node) == 56 and int(node, 16) >= 0
        pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)
        alone = stages.denoise(pipe, got["params"], got["embeds"], got["negative"])
        assert (got["latents"] - alone).abs().max() <= 1e-5 and alone.std() > 0.1
        frames = pipe.decode_latents(got["latents"], "pt")
        assert (frames - pipe.decode_latents(alone, "pt")).abs().max() <= 1e-5
        # 2. Through the job API: two batched jobs and a long video whose windows fan out, all on the layout.
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="none", max_retries=2)
        jobs = [c.videos.create(prompt=p, size="32x32", extra_body={"seed": 5, "num_inference_steps": 40})
                for p in (PROMPT, "a blue star spinning")]
        jobs.append(c.videos.create(prompt="a red ball, then a blue star", size="32x32", seconds="3",
                                    extra_body={"seed": 2, "num_inference_steps": 3}))
        for job in jobs:
            v = c.videos.poll(job.id, poll_interval_ms=200)
            assert v.status == "completed", v.error
            assert v.model_extra["t2v"]["served_by"] == {"parallel": name, "ranks": 2, "node": node}
        assert max(c.videos.retrieve(j.id).model_extra["t2v"]["timings"].get("step_batch_max", 1)
                   for j in jobs[:2]) >= 2  # the two clips shared forwards, split across the ranks
        assert httpx.get(serve.url + "/healthz").status_code == 200
        # A first frame (input_reference, a multipart file) travels through the graph to the Denoiser too.
        first = c.videos.create_and_poll(prompt=PROMPT, size="32x32", poll_interval_ms=200,
                                         input_reference=("first.png", png(Image.fromarray(picture())), "image/png"),
                                         extra_body={"seed": 3, "num_inference_steps": 4})
        assert first.status == "completed", first.error
        assert len(first.model_extra["t2v"]["params"]["image_sha256"]) == 64
        ceiling = pipe.decode_latents(pipe.encode_image(picture(), 32, 32))[0, 0].astype(float)
        assert abs(read_video(c.videos.download_content(first.id).read())[0] - ceiling).mean() < 4.0
        if layout.cfg > 1:
            # 3. A rank killed while its job samples: the gang is gone, so its replica ends; Serve replaces both
            #    and the job runs again there, to completion.
            job = c.videos.create(prompt=PROMPT, size="32x32", extra_body={"seed": 9, "num_inference_steps": 400})
            deadline = time.time() + 120
            while c.videos.retrieve(job.id).progress == 0:
                assert time.time() < deadline
                time.sleep(0.1)
            (rank,) = _pids("DenoiserRank", ray_tmp)
            os.kill(rank, signal.SIGKILL)
            v = c.videos.poll(job.id, poll_interval_ms=200)
            assert v.status == "completed", v.error
            assert v.model_extra["t2v"]["attempts"] == 2 and v.model_extra["t2v"]["served_by"]["parallel"] == "cfg2"
            assert len(_pids("DenoiserRank", ray_tmp)) == 1 and rank not in _pids("DenoiserRank", ray_tmp)


def test_a_job_records_the_layout_that_served_it(wan_dir):
    import asyncio

    generator = stages.LocalGenerator(t2v.load(wan_dir))
    params = asyncio.run(generator.validate({"prompt": PROMPT, "size": "32x32", "num_inference_steps": 2}))
    alone = asyncio.run(generator.generate(params, None))
    alone.quality_later.close()  # its scores are not needed here
    assert alone.served_by == {"parallel": "single", "ranks": 1}
    attach(generator.bundle, ParallelLayout(cfg=2), thread_peer(Rank(t2v.load(wan_dir))))
    made = asyncio.run(generator.generate(params, None))
    made.quality_later.close()
    assert made.served_by == {"parallel": "cfg2", "ranks": 2} and made.video[4:8] == b"ftyp"
