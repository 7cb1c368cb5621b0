"""LoRA adapters: trained with peft by the plain loop, saved in diffusers' format and loaded both ways, chosen
per generation, and served by name through the job API (the in-process generator; the Serve graph's run is in
test_serve_graph.py)."""

from __future__ import annotations

import shutil

import diffusers
import httpx
import numpy as np
import openai
import pytest
import torch
from test_agreement import CALL_WAN, reference
from test_serve_api import Server

import t2v
from t2v import lora
from t2v.data.shards import WorldSpec, write_world
from t2v.errors import InputError
from t2v.serve.api import Settings, create_app
from t2v.serve.stages import LocalGenerator
from t2v.train import FolderCheckpoints, TrainConfig, shard_batches, train
from t2v.train.loop import data_columns

TOL = 1e-3
PROMPT = "a red ball bouncing in a sandy desert"


@pytest.fixture(scope="module")
def desert32(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "desert32")
    write_world(path, WorldSpec(clips=16, shards=1, width=32, height=32, num_frames=9, background="desert",
                                background_share=0.75), parallel=False)
    return path


def lora_config(tmp_path, base, data, **kw) -> TrainConfig:
    values = dict(family="wan", init=str(base), data=data, out=str(tmp_path / "adapter"),
                  checkpoint_dir=str(tmp_path / "ckpt"), steps=12, batch_size=4, lr=5e-3, warmup_steps=2,
                  num_frames=9, size=32, checkpoint_every=6, log_every=6, lora_rank=4, lora_words=["desert"])
    return TrainConfig(**{**values, **kw})


def run(cfg, losses=None):
    return train(cfg, lambda start: shard_batches(cfg.data, cfg.batch_size, start, columns=data_columns(cfg),
                                                  num_frames=cfg.num_frames, width=cfg.size, height=cfg.size),
                 FolderCheckpoints(cfg.checkpoint_dir),
                 on_step=(lambda step, m: losses.append(m["loss"])) if losses is not None else None)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, wan_dir, desert32):
    """An adapter of the tiny wan bundle, trained 12 steps by the plain loop."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = lora_config(tmp, wan_dir, desert32)
    run(cfg)
    return cfg.out


def test_training_changes_only_the_adapter_and_saves_a_diffusers_lora(tmp_path, wan_dir, desert32):
    cfg = lora_config(tmp_path, wan_dir, desert32, steps=6, checkpoint_every=3)
    losses = []
    bundle = run(cfg, losses)
    base = t2v.load(wan_dir).denoiser.state_dict()
    for name, value in bundle.denoiser.state_dict().items():
        if "lora_" not in name:  # the frozen base: peft wraps a layer as base_layer
            assert torch.equal(value, base[name.replace("base_layer.", "")]), name
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == [lora.CARD_NAME, lora.WEIGHT_NAME]
    state, metadata = diffusers.WanPipeline.lora_state_dict(cfg.out, return_lora_metadata=True)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in state)
    assert metadata["transformer.r"] == 4
    assert lora.card(cfg.out)["words"] == ["desert"] and lora.card(cfg.out)["rank"] == 4
    # Its checkpoints hold the adapter, not the frozen base: resuming continues from them.
    ckpt = FolderCheckpoints(cfg.checkpoint_dir).latest()
    assert ckpt["step"] == 6 and all("lora_" in k for k in ckpt["model"])
    more = []
    run(lora_config(tmp_path, wan_dir, desert32, steps=9, checkpoint_every=3), more)
    assert len(more) == 3


def test_lora_needs_the_denoiser_stage(tmp_path, wan_dir, desert32):
    with pytest.raises(ValueError, match="lora_rank"):
        run(lora_config(tmp_path, wan_dir, desert32, stage="vae"))


def test_t2v_adapter_in_diffusers_wanpipeline_gives_the_same_frames(wan_dir, adapter):
    pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)
    call = dict(CALL_WAN, prompt=PROMPT)
    seed = call.pop("seed")
    base = pipe(output_type="pt", seed=seed, **call).frames
    pipe.load_lora_weights(adapter, "desert")
    ours = pipe(output_type="pt", seed=seed, **call).frames
    ref = reference(wan_dir, pipe.bundle)
    ref.load_lora_weights(adapter, adapter_name="desert")
    theirs = ref(generator=torch.Generator().manual_seed(seed), output_type="pt",
                 max_sequence_length=pipe.bundle.config.max_sequence_length, **call).frames
    assert (ours - base).abs().max() > 0.01  # the adapter changes the video
    assert (ours - theirs).abs().max().item() <= TOL
    # Strength scales the update as diffusers' set_adapters does; none gives the base model back.
    pipe.set_adapters("desert", 0.5)
    ref.set_adapters(["desert"], [0.5])
    half = pipe(output_type="pt", seed=seed, **call).frames
    theirs = ref(generator=torch.Generator().manual_seed(seed), output_type="pt",
                 max_sequence_length=pipe.bundle.config.max_sequence_length, **call).frames
    assert (half - theirs).abs().max().item() <= TOL
    pipe.set_adapters(None)
    assert torch.equal(pipe(output_type="pt", seed=seed, **call).frames, base)


def test_a_high_low_pair_loads_each_file_into_its_expert_as_diffusers_load_into_transformer_2(tmp_path):
    """Wan2.2 A14B's LoRAs come as a pair (high_noise_model / low_noise_model.safetensors): t2v loads each into its
    expert, as diffusers' load_lora_weights(..., load_into_transformer_2=True) does, and chooses them as one."""
    from layouts import build_wan22_a14b
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = build_wan22_a14b(tmp_path / "a14b")
    folder = tmp_path / "lightning"
    for k, (key, file) in enumerate(zip(("transformer", "transformer_2"), lora.EXPERT_WEIGHTS)):
        torch.manual_seed(10 + k)
        expert = diffusers.WanTransformer3DModel.from_pretrained(path, subfolder=key)
        expert.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "ffn.net.2"],
                                      init_lora_weights=False))  # random A and B: a non-zero update
        diffusers.WanPipeline.save_lora_weights(folder, weight_name=file,
                                                transformer_lora_layers=get_peft_model_state_dict(expert))
    pipe = t2v.TextToVideoPipeline.from_pretrained(path)
    call = dict(CALL_WAN, prompt=PROMPT, num_inference_steps=6)
    seed = call.pop("seed")
    base = pipe(output_type="pt", seed=seed, **call).frames
    pipe.load_lora_weights(folder, "lightning")
    assert all("lightning" in expert.peft_config for expert in pipe.bundle.experts)
    ours = pipe(output_type="pt", seed=seed, **call).frames
    ref = diffusers.WanPipeline.from_pretrained(path)
    ref.load_lora_weights(folder, weight_name=lora.EXPERT_WEIGHTS[0], adapter_name="high")
    ref.load_lora_weights(folder, weight_name=lora.EXPERT_WEIGHTS[1], adapter_name="low",
                          load_into_transformer_2=True)
    theirs = ref(generator=torch.Generator().manual_seed(seed), output_type="pt",
                 max_sequence_length=pipe.bundle.config.max_sequence_length, **call).frames
    assert (ours - base).abs().max() > 0.01  # the pair changes the video
    assert (ours - theirs).abs().max().item() <= TOL
    # The high file alone patches the high-noise expert only, the low-noise one keeps its base weights.
    (tmp_path / "high-only").mkdir()
    (tmp_path / "high-only" / lora.EXPERT_WEIGHTS[0]).write_bytes((folder / lora.EXPERT_WEIGHTS[0]).read_bytes())
    pipe.load_lora_weights(tmp_path / "high-only", "high")
    assert "high" in pipe.bundle.denoiser.peft_config and "high" not in pipe.bundle.denoiser_2.peft_config
    high_only = pipe(output_type="pt", seed=seed, **call).frames
    ref.set_adapters(["high"], [1.0])
    ref.transformer_2.disable_lora()
    theirs = ref(generator=torch.Generator().manual_seed(seed), output_type="pt",
                 max_sequence_length=pipe.bundle.config.max_sequence_length, **call).frames
    assert (high_only - theirs).abs().max().item() <= TOL
    pipe.set_adapters(None)
    assert torch.equal(pipe(output_type="pt", seed=seed, **call).frames, base)
    # Served: the job API lists the pair as one adapter and a job with it makes the pipeline's video.
    root = tmp_path / "adapters"
    shutil.copytree(folder, root / "lightning")
    srv = Server(create_app(LocalGenerator(t2v.load(path), adapter_root=str(root)),
                            Settings(store=str(tmp_path / "store"), poll_after_ms=50, adapter_root=str(root))))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["t2v-default", "t2v-default+lightning"]
        job = client.videos.create_and_poll(prompt=PROMPT, size="32x32", seconds="1", model="t2v-default+lightning",
                                            extra_body={"seed": 3, "num_inference_steps": 4, "optimize_prompt": False})
        assert job.status == "completed", job.error
        pipe.set_adapters("lightning", 1.0)
        want = pipe(PROMPT, num_frames=17, height=32, width=32, num_inference_steps=4, seed=3).frames[0]
        from t2v.video import encode_video, read_video

        served = read_video(client.videos.download_content(job.id).read()).astype(float)
        pipe.set_adapters(None)
        plain = pipe(PROMPT, num_frames=17, height=32, width=32, num_inference_steps=4, seed=3).frames[0]
        def error(frames):  # through the same encoder (x264's threads may round a few pixels differently)
            return np.abs(served - read_video(encode_video(frames, 16))).mean()

        assert error(want) < 0.5 and error(plain) > 1.5
    finally:
        srv.stop()


def test_a_diffusers_lora_loads_in_t2v(tmp_path, wan_dir):
    """A LoRA made on diffusers' side (peft on their WanTransformer3DModel, their save_lora_weights) predicts the
    same in t2v as in diffusers."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = diffusers.WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer")
    theirs.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "ffn.net.2"],
                                  init_lora_weights=False))  # random A and B: a non-zero update
    folder = tmp_path / "theirs"
    diffusers.WanPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(theirs),
                                            transformer_lora_adapter_metadata=theirs.peft_config["default"].to_dict())
    bundle = t2v.load(wan_dir)
    torch.manual_seed(0)
    x, t = torch.randn(1, 16, 3, 4, 4), torch.tensor([500.0])
    text = torch.randn(1, bundle.config.max_sequence_length, bundle.denoiser.config.text_dim)
    base = bundle.family.predict(bundle, x, t, text)
    lora.load(bundle, str(folder), "theirs")
    lora.activate(bundle, lora.Choice("theirs"))
    ours = bundle.family.predict(bundle, x, t, text)
    with torch.no_grad():
        expected = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert (ours - base).abs().max() > 1e-3
    assert (ours - expected).abs().max().item() <= 1e-5


def test_a_unet3d_adapter_is_saved_as_texttovideosd_lora_and_loads_back_as_trained(tmp_path, unet3d_dir, desert32):
    # diffusers' UNet3DConditionModel has no PeftAdapterMixin (TextToVideoSDPipeline cannot load a LoRA into it):
    # t2v gives it the mixin, and writes and reads the pipeline's own LoRA format.
    cfg = lora_config(tmp_path, unet3d_dir, desert32, family="unet3d", steps=4, checkpoint_every=2, lr=2e-2)
    trained = run(cfg)
    state, _, metadata = diffusers.TextToVideoSDPipeline.lora_state_dict(cfg.out, return_lora_metadata=True)
    assert state and all(k.startswith("unet.") and ".lora_" in k for k in state)
    assert metadata["unet.r"] == 4
    pipe, base, call = assert_loads_back_as_trained(unet3d_dir, cfg.out, trained)
    pipe.set_adapters(None)
    assert torch.equal(pipe(PROMPT, **call).frames, base)


def assert_loads_back_as_trained(base_dir, adapter_dir, trained):
    """The adapter loaded into a fresh pipeline of base_dir holds the trained weights, and the video with it is the
    trained model's and differs from the base's; returns (pipe, the base video, the call)."""
    pipe = t2v.TextToVideoPipeline.from_pretrained(base_dir)
    call = dict(num_inference_steps=2, seed=3, output_type="pt")
    base = pipe(PROMPT, **call).frames
    pipe.load_lora_weights(adapter_dir, "desert")
    ours, want = lora.adapter_state(pipe.bundle, "desert"), lora.adapter_state(trained)
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k].float()) for k in want)
    pipe.set_adapters("desert", 1.0)
    adapted = pipe(PROMPT, **call).frames
    lora.activate(trained, lora.Choice("default", 1.0))
    assert torch.equal(adapted, t2v.TextToVideoPipeline(trained)(PROMPT, **call).frames)
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the video
    return pipe, base, call


def test_adapters_by_name_and_their_lru(tmp_path, wan_dir, adapter):
    root = tmp_path / "adapters"
    for name in ("desert", "desert-2"):
        shutil.copytree(adapter, root / name)
    (root / "not-an-adapter").mkdir()
    assert lora.list_adapters(str(root)) == ["desert", "desert-2"]
    for bad in ("../desert", "a/b", ".hidden", "", "x" * 65, "de..sert"):
        with pytest.raises(InputError, match="lora"):
            lora.adapter_uri(str(root), bad)
    bundle = t2v.load(wan_dir)
    cache = lora.LRU(bundle, str(root), capacity=1)
    first = cache.get("desert")
    with first.in_use():  # evicted while a generation uses it: it stays loaded until that generation ends
        cache.get("desert-2")
        assert lora.loaded(bundle) == ["desert", "desert-2"]
    assert lora.loaded(bundle) == ["desert-2"]


def test_batches_never_mix_adapters():
    a, b = lora.Choice("a"), lora.Choice("b", 0.5)
    seen = []

    def predict(choice, group):
        seen.append((choice, group))
        return [f"{choice.name if choice else 'base'}:{r}" for r in group]

    out = lora.by_adapter([1, 2, 3, 4, 5], [a, None, a, b, None], predict)
    assert out == ["a:1", "base:2", "a:3", "b:4", "base:5"]
    assert sorted((c.name if c else "", g) for c, g in seen) == [("", [2, 5]), ("a", [1, 3]), ("b", [4])]


# --- the job API ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strong_adapter(tmp_path_factory, wan_dir):
    """An adapter of random weights (peft's init_lora_weights=False): its videos differ from the base model's
    far beyond the mp4 codec's error, which a 12-step adapter's do not."""
    from peft import LoraConfig

    bundle = t2v.load(wan_dir)
    torch.manual_seed(0)
    lora.add_trainable(bundle, LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.DEFAULT_TARGETS),
                                          init_lora_weights=False))
    path = str(tmp_path_factory.mktemp("strong") / "adapter")
    lora.save(bundle, path)
    return path


@pytest.fixture
def adapter_server(tmp_path, wan_dir, strong_adapter):
    root = tmp_path / "adapters"
    shutil.copytree(strong_adapter, root / "desert")
    settings = Settings(store=str(tmp_path / "store"), poll_after_ms=50, adapter_root=str(root))
    srv = Server(create_app(LocalGenerator(t2v.load(wan_dir), adapter_root=str(root)), settings))
    yield srv
    srv.stop()


def test_models_lists_the_base_and_its_adapters(adapter_server):
    client = openai.OpenAI(base_url=adapter_server.url + "/v1", api_key="unused", max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert ids == ["t2v-default", "t2v-default+desert"]
    assert client.models.retrieve("t2v-default+desert").model_extra["parent"] == "t2v-default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("t2v-default+nothing")


def test_a_video_with_an_adapter_is_the_adapters_video(adapter_server, wan_dir, strong_adapter):
    client = openai.OpenAI(base_url=adapter_server.url + "/v1", api_key="unused", max_retries=0)
    body = {"seed": 5, "num_inference_steps": 3, "optimize_prompt": False}
    by_model = client.videos.create_and_poll(prompt=PROMPT, size="32x32", seconds="1", model="t2v-default+desert",
                                             extra_body=body)
    by_field = client.videos.create_and_poll(prompt=PROMPT, size="32x32", seconds="1",
                                             extra_body={**body, "lora": {"name": "desert", "strength": 0.5}})
    plain = client.videos.create_and_poll(prompt=PROMPT, size="32x32", seconds="1", extra_body=body)
    assert by_model.status == by_field.status == plain.status == "completed"
    assert by_model.model == "t2v-default+desert" and plain.model == "t2v-default"
    assert by_field.model_extra["t2v"]["params"]["lora"]["strength"] == 0.5
    pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)

    def frames():
        return pipe(PROMPT, num_frames=9, height=32, width=32, num_inference_steps=3, seed=5).frames[0]

    want_plain = frames()
    pipe.load_lora_weights(strong_adapter, "desert")
    want = frames()
    pipe.set_adapters("desert", 0.5)
    want_half = frames()
    from io import BytesIO

    from PIL import Image

    from t2v.video import probe

    # Each job's thumbnail is its middle frame as a PNG, lossless: it is the in-process frame of its own strength
    # exactly, and not that of another. (Not the mp4s' frames: in one process PyAV's H.264 path does not always
    # give the same file for the same frames, once an rgb24 decode has run there; re-encoded copies differed by up
    # to a level on average and 20 at a pixel, too near what half an adapter changes to tell the two apart.)
    for job, mine, others in ((by_model, want, (want_plain, want_half)), (by_field, want_half, (want_plain, want)),
                              (plain, want_plain, (want, want_half))):
        middle = np.asarray(Image.open(BytesIO(client.videos.download_content(job.id, variant="thumbnail").read())))
        assert np.array_equal(middle, mine[4]), job.id
        assert all(np.abs(middle.astype(int) - other[4]).max() > 5 for other in others), job.id
        info = probe(client.videos.download_content(job.id).read())
        assert (info.num_frames, info.width, info.height) == (9, 32, 32)


def test_an_unknown_adapter_is_a_404_and_nothing_is_queued(adapter_server):
    url = adapter_server.url
    for body in ({"model": "t2v-default+nothing"}, {"lora": "nothing"}, {"lora": {"name": "nothing"}}):
        r = httpx.post(f"{url}/v1/videos", json={"prompt": PROMPT, **body})
        assert r.status_code == 404, body
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
        assert "nothing" in error["message"] and error["param"] in ("model", "lora")
    for body, param in (({"lora": "../desert"}, "lora"), ({"model": "t2v-default+../x"}, "model"),
                        ({"lora": {"name": "desert", "strength": 9}}, "lora.strength"),
                        ({"model": "t2v-default+desert", "lora": "other"}, "lora")):
        r = httpx.post(f"{url}/v1/videos", json={"prompt": PROMPT, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.json())
    assert httpx.get(f"{url}/v1/videos").json()["data"] == []


# --- the Serve graph --------------------------------------------------------------------------------------

def random_adapter(bundle_dir, path, seed: int) -> str:
    from peft import LoraConfig

    bundle = t2v.load(bundle_dir)
    torch.manual_seed(seed)
    lora.add_trainable(bundle, LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.DEFAULT_TARGETS),
                                          init_lora_weights=False))
    lora.save(bundle, str(path))
    return str(path)


def original_wan_layout(state: dict, alpha: float) -> dict:
    """A diffusers-format Wan LoRA's weights under the original Wan names, as few-step distillation LoRAs
    (lightx2v, CausVid) are published: diffusion_model.blocks.0.self_attn.q.lora_down.weight, with alphas."""
    names = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
             "lora_A": "lora_down", "lora_B": "lora_up"}
    out = {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        out["diffusion_model." + key] = value
        if key.endswith(".lora_down.weight"):
            out["diffusion_model." + key.replace(".lora_down.weight", ".alpha")] = torch.tensor(alpha)
    return out


def test_an_adapter_as_published_in_the_original_wan_layout_loads_as_its_diffusers_twin(wan_dir, tmp_path,
                                                                                        s3_bucket):
    from safetensors.torch import load_file, save_file

    from t2v import storage

    twin = random_adapter(wan_dir, tmp_path / "twin", seed=3)  # rank 4, alpha 8
    root = tmp_path / "adapters"
    (root / "distill").mkdir(parents=True)
    published = root / "distill" / "wan_t2v_distill_lora_rank4.safetensors"  # no metadata, its own name
    save_file(original_wan_layout(load_file(f"{twin}/{lora.WEIGHT_NAME}"), alpha=8.0), published)
    assert lora.list_adapters(str(root)) == ["distill"] and lora.exists(str(root), "distill")
    pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)
    kw = dict(num_frames=5, height=32, width=32, num_inference_steps=2, seed=1, output_type="latent")
    base = pipe(PROMPT, **kw).frames
    videos = {}
    for name, uri in (("twin", twin), ("folder", root / "distill"), ("file", published)):
        pipe.load_lora_weights(str(uri), adapter_name=name)
        videos[name] = pipe(PROMPT, **kw).frames
    assert (videos["twin"] - base).abs().max() > 1e-2
    assert (videos["folder"] - videos["twin"]).abs().max() < 1e-4 and torch.equal(videos["file"], videos["folder"])
    # The same root on S3 (a local S3 server): listed, versioned by its ETag, loaded by name.
    s3_root = f"s3://{s3_bucket}/adapters"
    storage.upload_dir(root, s3_root)
    assert lora.list_adapters(s3_root) == ["distill"] and lora.version(s3_root, "distill")
    pipe.delete_adapters("folder")
    with lora.Loaded(pipe.bundle, s3_root, "distill").in_use():
        pipe.set_adapters("distill")
        assert torch.equal(pipe(PROMPT, **kw).frames, videos["folder"])
    (root / "distill" / "second.safetensors").write_bytes(published.read_bytes())
    assert lora.list_adapters(str(root)) == [] and not lora.exists(str(root), "distill")  # which one: ambiguous


@pytest.mark.slow
def test_serve_graph_serves_adapters_per_request(tmp_path, wan_dir):
    """`serve run` with an adapters root and per-step batching: GET /v1/models lists the adapters; two jobs with
    different adapters, at once, make the videos each makes alone (a batch never mixes adapters), and two with
    the same adapter share forwards; an image-to-video job with an adapter; an unknown adapter is a 404 and
    queues nothing."""
    import secrets

    from test_serve_graph import serve_app

    root = tmp_path / "adapters"
    for i, name in enumerate(("sand", "snow")):
        random_adapter(wan_dir, root / name, seed=i)
    # One Denoiser replica: both jobs of a pair in its batch queue.
    with serve_app(tmp_path, wan_dir, denoiser_replicas=1, step_batching={"max_batch_size": 4, "wait_s": 0.05},
                   adapters={"root": str(root), "max_per_replica": 2},
                   settings={"concurrency": 2, "cache_ttl_s": 0}) as (serve, _):
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=2)
        assert [m.id for m in c.models.list()] == ["t2v-default", "t2v-default+sand", "t2v-default+snow"]
        with pytest.raises(openai.NotFoundError) as missing:
            c.videos.create(prompt=PROMPT, size="32x32", model="t2v-default+rain")
        assert missing.value.body["code"] == "model_not_found"
        assert c.videos.list().data == []

        def create(model=None, seed=3, **extra):
            return c.videos.create(prompt=PROMPT, size="32x32", seconds="1", **({"model": model} if model else {}),
                                   extra_body={"seed": seed, "num_inference_steps": 6, "optimize_prompt": False,
                                               **extra},
                                   extra_headers={"Idempotency-Key": secrets.token_hex(8)})

        def finish(job):
            done = c.videos.poll(job.id, poll_interval_ms=100)
            assert done.status == "completed", done.error
            return done, c.videos.download_content(job.id).read()

        kinds = [("t2v-default+sand", {}), (None, {"lora": {"name": "snow", "strength": 0.8}})]
        alone = [finish(create(m, **e)) for m, e in kinds]
        together = [finish(j) for j in [create(m, **e) for m, e in kinds]]
        for (one, video), (other, video_together) in zip(alone, together):
            assert video_together == video  # the same frames, so the same mp4
            assert other.model_extra["t2v"]["timings"]["step_batch_max"] == 1  # never batched with the other
        assert alone[0][1] != alone[1][1]
        same = [finish(j) for j in [create("t2v-default+sand", seed=s) for s in (4, 5)]]
        assert max(v.model_extra["t2v"]["timings"]["step_batch_max"] for v, _ in same) == 2
        # Image to video with an adapter, the image sent as the openai client sends a file.
        import io

        from PIL import Image

        png = io.BytesIO()
        Image.new("RGB", (32, 32), (214, 190, 140)).save(png, format="PNG")
        i2v = c.videos.create(prompt=PROMPT, size="32x32", seconds="1", model="t2v-default+sand",
                              input_reference=("sand.png", png.getvalue(), "image/png"),
                              extra_body={"num_inference_steps": 4})
        done, _ = finish(i2v)
        assert done.model == "t2v-default+sand" and done.model_extra["t2v"]["params"]["image_sha256"]


def test_a_latte_adapter_is_a_transformer_lora_in_diffusers_format_and_loads_back_as_trained(tmp_path, latte_dir):
    # LattePipeline has no LoRA loader: t2v gives LatteTransformer3DModel peft's mixin and writes diffusers'
    # transformer-only LoRA format ("transformer." keys, peft metadata), which diffusers' loaders read.
    data = str(tmp_path / "desert")
    write_world(data, WorldSpec(clips=8, shards=1, width=32, height=32, num_frames=5, background="desert",
                                background_share=0.75), parallel=False)
    cfg = lora_config(tmp_path, latte_dir, data, family="latte", steps=4, checkpoint_every=2, lr=2e-2, num_frames=5)
    trained = run(cfg)
    state, metadata = diffusers.loaders.CogVideoXLoraLoaderMixin.lora_state_dict(cfg.out, return_lora_metadata=True)
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    assert metadata["transformer.r"] == 4
    assert_loads_back_as_trained(latte_dir, cfg.out, trained)
