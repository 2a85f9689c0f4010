"""LoRAs and textual-inversion embeddings through the server: listings, `<lora:name:w>` in A1111 prompts."""

import json

import numpy as np
import pytest
from lora_fixtures import kohya_state, random_lora_tensors, save_kohya
from serving import TINY_MODELS, require_serve_extra, running_server, wait_for
from tiny_pipelines import tiny_components

require_serve_extra()


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extra-networks")
    parts = tiny_components(tmp / "parts", "sd1", seed=TINY_MODELS["tiny-a"][0])  # the same weights as tiny-a
    loras = tmp / "loras"
    loras.mkdir()
    save_kohya(loras / "ink.safetensors", kohya_state(random_lora_tensors(parts["unet"], ["to_q", "to_v"], 4, 1),
                                                      "lora_unet"))  # fmt: skip
    embeddings = tmp / "embeddings"
    embeddings.mkdir()
    save_kohya(embeddings / "mystyle.safetensors", {"emb_params": np.ones((2, 32), np.float32)})
    with running_server(models_dir, tmp, "--model", "tiny-a", "--lora-dir", str(loras), "--embeddings-dir",
                        str(embeddings)) as server:  # fmt: skip
        yield server


def test_listings(served):
    loras = served.get("/sdapi/v1/loras").json()
    assert [entry["name"] for entry in loras] == ["ink"] and loras[0]["path"].endswith("ink.safetensors")
    listing = wait_for(lambda: served.get("/sdapi/v1/embeddings").json()["loaded"], what="embeddings to load")
    assert listing["mystyle"]["vectors"] == 2
    assert served.post("/sdapi/v1/refresh-loras").status_code == 200


def test_lora_in_the_prompt(served):
    body = {"prompt": "a boat in mystyle <lora:ink:0.7>", "steps": 2, "width": 64, "height": 64, "seed": 3}
    with_lora = served.post("/sdapi/v1/txt2img", json=body)
    assert with_lora.status_code == 200, with_lora.text
    infotext = json.loads(with_lora.json()["info"])["infotexts"][0]
    assert "<lora:ink:0.7>" in infotext and "Lora hashes: " in infotext and "TI hashes: " in infotext
    plain = served.post("/sdapi/v1/txt2img", json={**body, "prompt": "a boat in mystyle"}).json()
    assert plain["images"][0] != with_lora.json()["images"][0]  # the LoRA changed the image
    missing = served.post("/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:nope:1>"})
    assert missing.status_code == 422 and "nope" in missing.text
