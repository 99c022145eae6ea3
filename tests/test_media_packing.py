"""Packed rows with images and videos (hwft.vision's ``packs``; hwft_torch.media_packing): an
image row, a video row and a text row packed into one row train as the three unpacked in one
micro-batch (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V, dense and MoE; GLM-4V without the
video row: each example its own 3-D positions, the examples kept apart); the load-time proof
says so in the log; a family whose rows do not pack refuses ``data.packing: true`` in one line
and trains unpacked where packing is left unset."""

from __future__ import annotations

import json

import pytest

from tests.conftest import PEER_DATA, write_jsonl, write_recipe
from tests.test_train import metrics

DEMO = PEER_DATA / "llamafactory" / "mllm_demo_data"
ROWS = [
    {
        "messages": [
            {"role": "user", "content": "<image>Who are they?"},
            {"role": "assistant", "content": "They're Kane and Gretzka from Bayern Munich."},
        ],
        "images": [str(DEMO / "1.jpg")],
    },
    {
        "messages": [
            {"role": "user", "content": "<video>What is she doing?"},
            {"role": "assistant", "content": "She is cooking."},
        ],
        "videos": [str(DEMO / "2.avi")],
    },
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}]},
]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"])
def test_packed_rows_with_images_and_videos_train_as_the_unpacked_ones(family, tiny_vl, tmp_path, cli):
    """One step over the three rows: packed into one row (micro-batch 1) and unpacked (micro-batch
    3) give the same loss (1e-5) and gradient norm (1e-4): the same tokens, labels and features,
    and no example sees another."""
    from hwft.vision import FAMILIES

    runs = {}
    for packing in (True, False):
        folder = tmp_path / str(packing)
        folder.mkdir()
        recipe = write_recipe(
            folder,
            tiny_vl(family),
            data={"train": [{"path": "train.jsonl"}], "packing": packing},
            train={"max_steps": 1, "micro_batch_size": 1 if packing else 3, "max_length": 1024},
        )
        write_jsonl(folder / "train.jsonl", ROWS if FAMILIES[family].video else [ROWS[0], ROWS[2]])
        code, _, err = cli("train", recipe)
        assert code == 0, err[-3000:]
        runs[packing] = metrics(folder / "out")[0], err
    (packed, log), (plain, _) = runs[True], runs[False]
    assert "1 rows (" in log
    assert "packing: rows with images or videos pack" in log
    assert packed["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    assert packed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_a_family_whose_rows_do_not_pack_refuses_or_trains_unpacked(tiny_vl, tmp_path, cli):
    """Gemma 3's rows with images: data.packing: true is refused in one line naming the families
    that pack; left unset, the run trains unpacked."""
    folder = tmp_path
    recipe = write_recipe(
        folder, tiny_vl("gemma3"), data={"train": [{"path": "train.jsonl"}]}, train={"max_length": 512}
    )
    write_jsonl(folder / "train.jsonl", [ROWS[0], ROWS[2]])
    code, _, err = cli("train", recipe, "data.packing=true")
    assert code == 2 and "Traceback" not in err, err
    assert "Gemma 3's rows with images or videos do not pack here (Qwen2-VL, Qwen2.5-VL, Qwen3-VL" in err
    code, _, err = cli("train", recipe, "train.max_steps=1")
    assert code == 0, err[-2000:]
    assert "packing off" in err
    assert json.loads((folder / "out" / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0
