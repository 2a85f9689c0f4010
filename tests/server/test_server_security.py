"""Authentication, the browser guard, the body limit, request strings never used as paths, safe defaults."""

import base64
import io
import subprocess
import sys

import pytest
import requests
from PIL import Image
from serving import ROOT, require_serve_extra, running_server

from mlx_sd_apps.cli import build_parser

require_serve_extra()

KEY = "s3cret-key"
USERS = "alice:wonder,bob:builder"


@pytest.fixture(scope="module")
def guarded(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guarded")
    with running_server(models_dir, tmp, "--api-key", KEY, "--api-auth", USERS, "--max-body-mb", "0.25",
                        "--max-size", "64", "--max-steps", "2", "--max-prompt-length", "1000") as s:  # fmt: skip
        yield s


def test_authentication(guarded):
    url = guarded.url
    assert requests.get(url + "/health", timeout=10).status_code == 200  # open: health checks need no secret
    assert requests.get(url + "/", timeout=10).status_code == 200  # the page asks for the key itself
    for path in ("/v1/capabilities", "/sdapi/v1/sd-models", "/v1/models", "/v1/jobs"):
        r = requests.get(url + path, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic", path
    assert requests.get(url + "/sdapi/v1/sd-models", timeout=10).json()["detail"].startswith("authentication")
    assert requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).ok
    assert not requests.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).ok
    assert requests.get(url + "/v1/models", auth=("bob", "builder"), timeout=10).ok
    assert requests.get(url + "/v1/models", auth=("bob", "wonder"), timeout=10).status_code == 401
    assert requests.get(url + "/v1/models", headers={"Authorization": "Basic !!!"}, timeout=10).status_code == 401


def test_clients_authenticate(guarded):
    webuiapi = pytest.importorskip("webuiapi")
    openai = pytest.importorskip("openai")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=guarded.port, username="alice", password="wonder")
    assert api.txt2img(prompt="authorised", width=64, height=64, steps=2).image.size == (64, 64)
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0)
    assert len(client.images.generate(prompt="authorised", size="64x64", extra_body={"steps": 2}).data) == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_browser_guard(guarded):
    key = {"Authorization": f"Bearer {KEY}"}
    evil = requests.post(guarded.url + "/sdapi/v1/interrupt", headers={**key, "Origin": "http://evil.example"},
                         timeout=10)  # fmt: skip
    assert evil.status_code == 403 and "evil.example" in evil.json()["detail"]
    own = requests.post(guarded.url + "/sdapi/v1/interrupt", headers={**key, "Origin": guarded.url}, timeout=10)
    assert own.status_code == 200
    rebound = requests.get(guarded.url + "/health", headers={"Host": f"attacker.example:{guarded.port}"}, timeout=10)
    assert rebound.status_code == 403  # DNS rebinding: a foreign name resolving to 127.0.0.1
    assert requests.get(guarded.url.replace("127.0.0.1", "localhost") + "/health", timeout=10).ok


def test_body_limit(guarded):
    big = {"prompt": "x", "init_images": ["A" * 400_000]}
    r = requests.post(guarded.url + "/sdapi/v1/img2img", json=big, auth=("alice", "wonder"), timeout=10)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "x", "init_images": ["'
        for _ in range(40):
            yield b"A" * 10_000
        yield b'"]}'

    r = requests.post(guarded.url + "/sdapi/v1/img2img", data=chunks(), auth=("alice", "wonder"), timeout=10,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413
    assert requests.get(guarded.url + "/health", timeout=10).ok


def test_request_strings_are_never_paths(guarded, models_dir):
    session = requests.Session()
    session.auth = ("alice", "wonder")
    url = guarded.url
    for image in ("/etc/passwd", "file:///etc/passwd", "http://127.0.0.1/x.png", "../../../../etc/passwd"):
        r = session.post(url + "/sdapi/v1/img2img", json={"prompt": "x", "init_images": [image]}, timeout=10)
        assert r.status_code == 422 and r.json()["detail"].startswith("init_images[0]:"), (image, r.text)
    # Models are looked up by name only: a path, even to a real model folder, is not a name.
    for name in (str(models_dir / "tiny-b"), "../models/tiny-b", "tiny-b/../tiny-a", "/"):
        r = session.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=10)
        assert r.status_code == 404, name
        r = session.post(url + "/v1/jobs", json={"prompt": "x", "model": name}, timeout=10)
        assert r.status_code == 404, name


def test_prompt_length_limit(guarded):
    r = requests.post(guarded.url + "/sdapi/v1/txt2img", json={"prompt": "x" * 1001, "negative_prompt": "y"},
                      auth=("alice", "wonder"), timeout=10)  # fmt: skip
    assert r.status_code == 422 and r.json()["detail"].startswith("prompt:") and "1000" in r.json()["detail"]
    r = requests.post(guarded.url + "/v1/jobs", json={"prompt": "x", "negative_prompt": "y" * 1001},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=10)  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["param"] == "negative_prompt"


def test_decompression_bombs_are_refused_before_decoding(guarded):
    out = io.BytesIO()
    Image.new("L", (8192, 8192)).save(out, "PNG")  # 67 Mpixel, compresses to ~64 KB
    data = base64.b64encode(out.getvalue()).decode()
    r = requests.post(guarded.url + "/sdapi/v1/png-info", json={"image": data}, auth=("bob", "builder"), timeout=10)
    assert r.status_code == 422 and "larger than this server accepts" in r.json()["detail"]


def test_binds_loopback_by_default():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.api_key is None


def test_serve_without_its_dependencies_says_how_to_install_them():
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn', 'multipart'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mlx_sd_apps.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    run = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == "mlx-sd serve: the server needs its optional dependencies: pip install 'mlx-sd[serve]'"
