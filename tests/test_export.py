"""Exported task adapters load into stock diffusers and reproduce the grouped UNet's output."""

import json

import pytest
import torch
from safetensors import safe_open

from ril_fast import lora
from ril_fast.lora.export import WEIGHT_NAME, adapter_dir, export_task_adapter, load_pipeline
from tests.tiny_models import tiny_sd_pipeline, tiny_unet, unet_inputs

# Mixed ranks and scales that are not powers of two, so a dropped or doubled scale shows.
TASKS = [(2, 3.0), (4, 5.0)]


def _grouped_unet(unet, preset="attn"):
    layers = lora.inject_adapter_group(unet, preset)
    g = torch.Generator().manual_seed(7)
    for t, (r, alpha) in enumerate(TASKS):
        lora.add_task(layers, r, alpha, seed=10 + t)
        with torch.no_grad():  # B = 0 after add_task would make every check pass trivially
            for layer in layers:
                layer.lora_b[t].copy_(torch.randn(layer.lora_b[t].shape, generator=g) * 0.1)
    return layers


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake finished run: base pipeline folder, config.json, and both tasks' adapters."""
    root = tmp_path_factory.mktemp("run")
    pipe = tiny_sd_pipeline(root / "tok")
    pipe.save_pretrained(root / "base")
    unet = tiny_unet(0)
    layers = _grouped_unet(unet)
    for task in range(1, len(TASKS) + 1):
        export_task_adapter(unet, layers, task, adapter_dir(root, task))
    (root / "config.json").write_text(json.dumps({"model": {"kind": "sd15", "path": str(root / "base")}}))
    return root, unet, layers


def test_file_layout_and_folded_scale(run_dir):
    root, _, layers = run_dir
    folder = adapter_dir(root, 2)
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHT_NAME]  # no temp file left behind
    with safe_open(str(folder / WEIGHT_NAME), "pt") as f:
        keys = set(f.keys())
        assert keys == {f"unet.{layer.name}.lora_{ab}.weight" for layer in layers for ab in "AB"}
        layer = layers[3]
        torch.testing.assert_close(f.get_tensor(f"unet.{layer.name}.lora_A.weight"), layer.lora_a[1].detach())
        torch.testing.assert_close(f.get_tensor(f"unet.{layer.name}.lora_B.weight"),
                                   layer.lora_b[1].detach() * (5.0 / 4))


def test_stock_load_lora_weights_matches_group(run_dir):
    from diffusers import StableDiffusionPipeline

    root, unet, layers = run_dir
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "base"), local_files_only=True)
    inputs = unet_inputs()
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
        pipe.load_lora_weights(str(adapter_dir(root, 1)), adapter_name="task_1")
        pipe.load_lora_weights(str(adapter_dir(root, 2)), adapter_name="task_2")
        for n in (1, 2):
            pipe.set_adapters([f"task_{i}" for i in range(1, n + 1)], adapter_weights=[1.0] * n)
            lora.set_active_tasks(layers, n)
            ours = unet(**inputs).sample
            assert (ours - base).abs().max() > 1e-3
            torch.testing.assert_close(pipe.unet(**inputs).sample, ours, atol=1e-5, rtol=1e-5)
    lora.set_active_tasks(layers, None)


def test_load_pipeline_end_to_end(run_dir):
    root, unet, layers = run_dir
    pipe = load_pipeline(root, task=2)
    assert sorted(pipe.get_active_adapters()) == ["task_1", "task_2"]
    # The same stock pipeline running our grouped UNet is the reference for the whole sampling loop.
    ours = load_pipeline(root, task=0)
    ours.unet = unet
    kw = dict(prompt="a photo of cat", num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
              output_type="latent")
    with torch.no_grad():
        got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        want = ours(generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_load_pipeline_single_lora_methods(run_dir):
    """baseline/distill keep one LoRA: task_{t:02d} holds all of it, so only that folder is loaded."""
    root, unet, layers = run_dir
    run = root / "baseline_run"
    # task_02 holds our task-1 adapter and task_01 something else: only task_02 may be used.
    export_task_adapter(unet, layers, 1, adapter_dir(run, 2))
    export_task_adapter(unet, layers, 2, adapter_dir(run, 1))
    cfg = {"model": {"path": "../base"}, "method": {"name": "baseline"}}  # relative to the run folder
    (run / "config.json").write_text(json.dumps(cfg))
    pipe = load_pipeline(run, task=2)
    assert pipe.get_active_adapters() == ["task_2"]
    inputs = unet_inputs()
    with torch.no_grad():
        lora.set_active_tasks(layers, 1)
        want = unet(**inputs).sample
        lora.set_active_tasks(layers, None)
        torch.testing.assert_close(pipe.unet(**inputs).sample, want, atol=1e-5, rtol=1e-5)


def test_load_pipeline_errors(run_dir, tmp_path):
    root, _, _ = run_dir
    with pytest.raises(ValueError, match="task_03"):
        load_pipeline(root, task=3)
    with pytest.raises(ValueError, match="config.json"):
        load_pipeline(tmp_path, task=1)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"kind": "tiny"}}))
    with pytest.raises(ValueError, match="model.path"):
        load_pipeline(tmp_path, task=0)


def test_sdxl_unet_ff_layers_load(tmp_path):
    """SDXL-shaped UNet, attention + feed-forward targets: the UNet-level diffusers loader agrees."""
    unet = tiny_unet(0, sdxl=True)
    layers = _grouped_unet(unet, preset="attn_ff")
    assert any(layer.name.endswith(".ff.net.2") for layer in layers)
    ref = tiny_unet(0, sdxl=True)
    for task in (1, 2):
        export_task_adapter(unet, layers, task, tmp_path / f"t{task}")
        ref.load_lora_adapter(str(tmp_path / f"t{task}" / WEIGHT_NAME), prefix="unet", adapter_name=f"t{task}")
    ref.set_adapters(["t1", "t2"])
    inputs = unet_inputs(sdxl=True)
    with torch.no_grad():
        ours = unet(**inputs).sample
        assert (ours - tiny_unet(0, sdxl=True)(**inputs).sample).abs().max() > 1e-3
        torch.testing.assert_close(ref(**inputs).sample, ours, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="task=3"):
        export_task_adapter(unet, layers, 3, tmp_path / "t3")
    with pytest.raises(ValueError, match="not modules of the model"):
        export_task_adapter(ref, layers, 1, tmp_path / "t1b")


def test_metadata_order_is_canonical(tmp_path):
    """safetensors writes metadata in HashMap order (it changes between calls): sorted afterwards,
    equal tensors and metadata give equal bytes, and the file still loads with its metadata."""
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ril_fast.lora.export import sort_metadata_keys

    tensors = {"b": torch.zeros(2), "a": torch.arange(3, dtype=torch.float16)}
    meta = {"format": "pt", "ril_fast": _json.dumps({"task": 1, "note": "x"}), "zz": "1", "aa": "é"}
    files = []
    for i in range(6):  # enough calls to see more than one order
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, path, metadata=meta)
        files.append(path)
    assert len({f.read_bytes() for f in files}) > 1, "the writer's order did not vary this time"
    assert all(sort_metadata_keys(f) for f in files)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as fh:
        assert fh.metadata() == meta
    loaded = load_file(files[0])
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
