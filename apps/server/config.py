"""What the server is allowed to do: limits on requests and the queue, authentication, where models live."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    """Bounds every request is checked against before it takes a place in the queue.

    max_width / max_height: pixels, per side (sizes are also multiples of 8, at least 64).
    max_steps: sampling steps. max_images: images per request (batch_size x n_iter). max_batch_size: images per
    UNet batch (memory). max_prompt_chars: each of prompt and negative prompt. max_body_bytes: request body, base64
    images included. max_input_pixels: decoded init images and masks. max_queue: requests waiting behind the running
    one; more are answered 503 with Retry-After.
    """

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 16
    max_batch_size: int = 8
    max_prompt_chars: int = 20_000
    max_body_bytes: int = 64 * MIB
    max_input_pixels: int = 4096 * 4096
    max_queue: int = 8

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class ServerConfig:
    """Everything `create_app` needs besides the engine.

    api_key: required as `Authorization: Bearer KEY` when set. api_auth: {user: password} for HTTP basic auth
    (A1111's --api-auth). Either credential is accepted when both are set; /health and the page itself stay open.
    allowed_origins: browser origins (besides the server's own) allowed to call the API (CORS); other origins are
    refused, so a web page elsewhere cannot drive a local server.
    output_dir: where `save_images: true` writes PNGs (names chosen by the server); None refuses such requests.
    keep_jobs: finished jobs (and their images) kept for GET /v1/jobs/{id}.
    styles: A1111's prompt styles by name, (prompt, negative prompt) each (`read_styles`).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    api_auth: dict[str, str] = field(default_factory=dict)
    allowed_origins: tuple[str, ...] = ()
    output_dir: Path | None = None
    keep_jobs: int = 32
    styles: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def auth_required(self) -> bool:
        return bool(self.api_key or self.api_auth)


def parse_api_auth(text: str | None) -> dict[str, str]:
    """A1111's --api-auth format: "user:password[,user2:password2]"."""
    if not text:
        return {}
    credentials = {}
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth: {pair!r} is not user:password")
        credentials[user] = password
    return credentials


def read_styles(path: Path) -> dict[str, tuple[str, str]]:
    """A1111's styles.csv (columns name, prompt, negative_prompt; its old "text" column is the prompt) -> {name:
    (prompt, negative prompt)}. Raises ValueError naming the problem."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"--styles {path}: cannot read it as A1111's styles.csv ({e})") from None
    if rows and "name" not in rows[0]:
        raise ValueError(f"--styles {path}: no 'name' column (A1111's header: name,prompt,negative_prompt)")
    return {r["name"]: (r.get("prompt") or r.get("text") or "", r.get("negative_prompt") or "")
            for r in rows if r.get("name")}  # fmt: skip
