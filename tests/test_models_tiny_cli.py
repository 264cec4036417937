"""``python -m ril_fast.models.tiny --kind {sd15,sdxl} --out DIR`` writes a diffusers folder the trainer loads."""

import json

import pytest

from ril_fast.models import check_model_available, load_models
from ril_fast.models.tiny import main


@pytest.mark.parametrize("kind,want,encoders", [("sd15", "sd", 1), ("sdxl", "sdxl", 2)])
def test_writes_a_loadable_folder(tmp_path, capsys, kind, want, encoders):
    out = tmp_path / kind
    assert main(["--kind", kind, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    parts = ["unet", "vae", "scheduler", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"]
                                                                        if encoders == 2 else [])
    assert all(index.get(p) and (out / p).is_dir() for p in parts)
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    assert check_model_available(str(out)) is None
    models = load_models(str(out))  # conftest sets HF_HUB_OFFLINE=1
    assert models.kind == want and len(models.text_encoders) == encoders and models.sample_size == 32
    # the tiny local vocabulary: each prompt word is one token
    assert models.tokenizers[0]("a red circle").input_ids[1:-1] == [models.tokenizers[0].get_vocab()[w + "</w>"]
                                                                   for w in ("a", "red", "circle")]


def test_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--kind", "sd3", "--out", str(tmp_path / "x")])
    assert err.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["--kind", "sd15", "--out", str(tmp_path / "x"), "--image-size", "30"])
    assert err.value.code == 2 and not (tmp_path / "x").exists()
