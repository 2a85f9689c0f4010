"""Prompts -> the UNet's text conditioning: windows, emphasis, clip skip, one or two text towers.

Each prompt is split into 75-token windows (`prompts.py`); every window is encoded on its own as bos + tokens + eos +
padding and the windows are concatenated along the token axis (AUTOMATIC1111's long-prompt behaviour). Emphasis
weights scale each token's hidden state, after which the window's mean is restored (A1111's "Original" emphasis).
A prompt of at most 75 tokens without emphasis is encoded exactly as diffusers encodes it.

Which hidden state conditions the UNet:
- SD1/SD2 (one tower): `final_layer_norm(hidden_states[-clip_skip])`; clip_skip 1 is the last layer.
- SDXL (two towers): `hidden_states[-(clip_skip + 1)]` of both, concatenated on features, no final LayerNorm;
  clip_skip 1 is the penultimate layer the model was trained on. The pooled embedding is tower 2's projected
  `text_embeds` of the first window.
`clip_skip` counts as A1111 does (1 = no skip); diffusers' `clip_skip=k` equals our `clip_skip=k + 1`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .models.clip import CLIPTextModel
from .prompts import parse_emphasis, split_windows, window_ids, window_weights
from .tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, CLIPTokenizer

WINDOW = MAX_LENGTH  # context rows per window: bos + 75 tokens + eos


@dataclass
class Conditioning:
    """context: (B, 77 * windows, D) for cross-attention; pooled: (B, P) for SDXL's added embedding, else None."""

    context: mx.array
    pooled: mx.array | None = None


@dataclass
class TextTower:
    """One text encoder with its tokenizer, and which of its states the UNet reads."""

    tokenizer: CLIPTokenizer
    encoder: CLIPTextModel
    # "final": final_layer_norm(hidden_states[-clip_skip]) (SD1/SD2); "penultimate": raw hidden_states[-clip_skip-1]
    layer: str = "final"
    # The model folder's name for it ("text_encoder", "text_encoder_2"): what LoRA files and SDXL embeddings address.
    name: str = "text_encoder"

    def window_states(self, ids: mx.array, clip_skip: int):
        """Encode (W, 77) window ids -> (W, 77, D) states and the (W, P) projected pooled embeddings (or None)."""
        depth = self.encoder.config.num_hidden_layers
        skip = clip_skip if self.layer == "final" else clip_skip + 1
        if not 1 <= skip <= depth:
            raise ValueError(f"clip_skip={clip_skip} is out of range for a {depth}-layer text encoder")
        # Layers after the one we read are never needed, except for the pooled output (SDXL's tower 2).
        wants_pooled = "text_projection" in self.encoder
        out = self.encoder(ids, num_layers=None if wants_pooled else depth - skip + 1)
        states = out.hidden_states[-skip] if wants_pooled else out.hidden_states[-1]
        if self.layer == "final":
            states = self.encoder.final_layer_norm(states)
        return states, out.text_embeds


class PromptEncoder:
    """Encodes prompts for one model (one tower for SD1/SD2, two for SDXL)."""

    def __init__(self, towers: list[TextTower]):
        self.towers = towers

    def encode(
        self, prompts: list[str], negative_prompts: list[str] | None = None, clip_skip: int = 1
    ) -> tuple[Conditioning, Conditioning | None]:
        """Encode prompts (and negative prompts), all padded to one number of windows.

        A prompt with fewer windows than the longest in the batch, or than its negative prompt, is padded with
        encodings of the empty prompt (A1111's "pad prompt/negative prompt to be same length"), so classifier-free
        guidance runs as one batch.
        """
        texts = prompts + (negative_prompts or [])
        encoded = {text: self._encode_one(text, clip_skip) for text in dict.fromkeys(texts)}
        windows = max(context.shape[0] // WINDOW for context, _ in encoded.values())
        empty = None
        if any(context.shape[0] < windows * WINDOW for context, _ in encoded.values()):
            empty = encoded[""][0] if "" in encoded else self._encode_one("", clip_skip)[0]

        def batch(batch_texts: list[str]) -> Conditioning:
            contexts = []
            for text in batch_texts:
                context = encoded[text][0]
                missing = windows - context.shape[0] // WINDOW
                contexts.append(mx.concatenate([context, mx.tile(empty, (missing, 1))]) if missing else context)
            pooled = [encoded[text][1] for text in batch_texts]
            return Conditioning(mx.stack(contexts), None if pooled[0] is None else mx.stack(pooled))

        return batch(prompts), (batch(negative_prompts) if negative_prompts is not None else None)

    def _encode_one(self, prompt: str, clip_skip: int) -> tuple[mx.array, mx.array | None]:
        """One prompt -> (77 * windows, D) context and its (P,) pooled embedding (SDXL) or None."""
        fragments = parse_emphasis(prompt)
        states, pooled = [], None
        for tower in self.towers:
            tok = tower.tokenizer
            comma = tok.encode(",")
            windows = split_windows(fragments, tok.encode, comma[0] if len(comma) == 1 else None)
            ids = mx.array([window_ids(w, BOS_ID, EOS_ID, tok.pad_token_id) for w in windows])
            z, text_embeds = tower.window_states(ids, clip_skip)  # (W, 77, D)
            weights = mx.array([window_weights(w) for w in windows])  # (W, 77)
            if any(wt != 1.0 for w in windows for wt in w.weights):
                z = _emphasize(z, weights)
            states.append(z.reshape(-1, z.shape[-1]))
            if text_embeds is not None:
                pooled = text_embeds[0]
        return mx.concatenate(states, axis=-1), pooled


def _emphasize(z: mx.array, weights: mx.array) -> mx.array:
    """Scale each token's state by its weight, then restore each window's mean (A1111's "Original" emphasis)."""
    mean = z.mean(axis=(1, 2), keepdims=True)
    z = z * weights[..., None].astype(z.dtype)
    return z * (mean / z.mean(axis=(1, 2), keepdims=True))
