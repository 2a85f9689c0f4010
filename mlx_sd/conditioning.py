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
- SD3 (two CLIP towers and T5): the SDXL states zero-padded to T5's width, followed by T5's 256 rows (`T5Text`:
  the whole prompt, emphasis applied the same way; zeros without a T5); the pooled embedding is both towers'
  `text_embeds` concatenated (diffusers' `StableDiffusion3Pipeline.encode_prompt`).
`clip_skip` counts as A1111 does (1 = no skip); diffusers' `clip_skip=k` equals our `clip_skip=k + 1`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .models.clip import CLIPTextModel
from .models.t5 import T5EncoderModel
from .prompts import Fragment, parse_emphasis, split_windows, window_ids, window_weights
from .t5_tokenizer import T5Tokenizer
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


@dataclass
class T5Text:
    """SD3's T5 encoder: the prompt's text (BREAK ignored) as `max_length` rows of width `width`.

    The prompt is tokenized fragment by fragment so that emphasis weights reach their tokens (a prompt without
    emphasis is one fragment: diffusers' ids exactly), cut to max_length - 1 tokens, eos, padding. Without an encoder
    (an SD3 folder without text_encoder_3) the rows are zeros, as diffusers' pipeline gives.
    """

    tokenizer: T5Tokenizer | None
    encoder: T5EncoderModel | None
    width: int  # the MMDiT's joint_attention_dim
    max_length: int = 256  # diffusers' max_sequence_length default
    name: str = "text_encoder_3"

    def states(self, fragments: list[Fragment]) -> mx.array:
        if self.encoder is None:
            return mx.zeros((self.max_length, self.width))
        ids, weights = [], []
        for fragment in fragments:
            if not fragment.is_break:
                piece = self.tokenizer.tokenize(fragment.text)
                ids += piece
                weights += [fragment.weight] * len(piece)
        ids, weights = ids[: self.max_length - 1] + [1], weights[: self.max_length - 1] + [1.0]  # eos: id 1
        pad = self.max_length - len(ids)
        z = self.encoder(mx.array([ids + [0] * pad]))  # pad: id 0
        if any(w != 1.0 for w in weights):
            z = _emphasize(z, mx.array([weights + [1.0] * pad]))
        return z[0]


class PromptEncoder:
    """Encodes prompts for one model (one tower for SD1/SD2, two for SDXL, two and T5 for SD3)."""

    def __init__(self, towers: list[TextTower], t5: T5Text | None = None):
        self.towers = towers
        self.t5 = t5  # SD3: its rows follow the CLIP rows, and the pooled embedding takes every tower's

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

        t5 = {text: self.t5.states(parse_emphasis(text)) for text in encoded} if self.t5 is not None else None

        def batch(batch_texts: list[str]) -> Conditioning:
            contexts = []
            for text in batch_texts:
                context = encoded[text][0]
                missing = windows - context.shape[0] // WINDOW
                context = mx.concatenate([context, mx.tile(empty, (missing, 1))]) if missing else context
                if t5 is not None:  # CLIP's features zero-padded to T5's width, then T5's rows
                    context = mx.pad(context, [(0, 0), (0, self.t5.width - context.shape[1])])
                    context = mx.concatenate([context, t5[text].astype(context.dtype)])
                contexts.append(context)
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
            if text_embeds is not None:  # SDXL: tower 2's; SD3: both towers', concatenated
                both = pooled is not None and self.t5 is not None
                pooled = mx.concatenate([pooled, text_embeds[0]]) if both else text_embeds[0]
        return mx.concatenate(states, axis=-1), pooled


def _emphasize(z: mx.array, weights: mx.array) -> mx.array:
    """Scale each token's state by its weight, then restore each window's mean (A1111's "Original" emphasis)."""
    mean = z.mean(axis=(1, 2), keepdims=True)
    z = z * weights[..., None].astype(z.dtype)
    return z * (mean / z.mean(axis=(1, 2), keepdims=True))
