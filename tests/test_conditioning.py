"""Text conditioning against the references: diffusers' prompt encoding for short prompts (SD1, SD2, SDXL, clip skip),
and an A1111 reference written from its description for long prompts with emphasis.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd.conditioning import PromptEncoder, TextTower
from mlx_sd.prompts import parse_emphasis
from mlx_sd.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer
from mlx_sd_convert.diffusers import clip_config, convert_weights
from oracles import a1111_windows, assert_close, load_ours, randomize, state_dict_numpy

TOL = 1e-4


def tiny_tower(seed, act, projection, pad, layer="final"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, projection_dim=16,
        hidden_act=act, vocab_size=49408, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    ref = randomize((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), seed)
    ours_cfg = clip_config(cfg.to_dict(), projection)
    encoder = load_ours(ours_cfg, convert_weights("text_encoder", ours_cfg, state_dict_numpy(ref)))
    tokenizer = CLIPTokenizer.bundled(pad_token_id=pad, normalization="hf")
    return ref, TextTower(tokenizer, encoder, layer)


def final_layer_norm(ref):
    # transformers >= 5 flattens CLIPTextModel (no `.text_model`); diffusers reads `text_model.final_layer_norm`.
    return getattr(ref, "text_model", ref).final_layer_norm


def reference_ids(tokenizer, prompt, pad):
    """Token ids as diffusers' tokenizer call makes them (padding="max_length", truncation)."""
    ids = [BOS_ID, *tokenizer.encode(prompt)[:75], EOS_ID]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


@pytest.mark.parametrize("family,act,pad", [("sd1", "quick_gelu", EOS_ID), ("sd2", "gelu", 0)])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_single_tower_matches_diffusers(family, act, pad, clip_skip):
    ref, tower = tiny_tower(0, act, False, pad)
    prompts = ["a photo of an astronaut riding a horse on mars", ""]
    cond, _ = PromptEncoder([tower]).encode(prompts, clip_skip=clip_skip)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = ref(reference_ids(tower.tokenizer, prompt, pad), output_hidden_states=True)
            # diffusers StableDiffusionPipeline.encode_prompt: clip_skip=k reads hidden_states[-(k + 1)] + final LN;
            # our clip_skip counts as A1111 does (1 = last layer), i.e. diffusers' k + 1.
            expected = (
                out.last_hidden_state
                if clip_skip == 1
                else final_layer_norm(ref)(out.hidden_states[-(clip_skip - 1 + 1)])
            )
        assert_close(cond.context[i : i + 1], expected, TOL, f"{family} clip_skip={clip_skip} prompt {i}")
    assert cond.pooled is None


def test_sdxl_towers_match_diffusers():
    ref1, tower1 = tiny_tower(1, "quick_gelu", False, EOS_ID, "penultimate")
    ref2, tower2 = tiny_tower(2, "gelu", True, 0, "penultimate")
    encoder = PromptEncoder([tower1, tower2])
    prompt, negative = "a watercolor fox in the snow", "blurry"
    cond, uncond = encoder.encode([prompt], [negative])
    for got, text in ((cond, prompt), (uncond, negative)):
        with torch.no_grad():
            # diffusers StableDiffusionXLPipeline.encode_prompt (clip_skip=None): hidden_states[-2] of both, pooled
            # from text_encoder_2's projected output.
            o1 = ref1(reference_ids(tower1.tokenizer, text, EOS_ID), output_hidden_states=True)
            o2 = ref2(reference_ids(tower2.tokenizer, text, 0), output_hidden_states=True)
            expected = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        assert_close(got.context, expected, TOL, f"sdxl context {text!r}")
        assert_close(got.pooled, o2.text_embeds, TOL, f"sdxl pooled {text!r}")


def a1111_reference(ref, tokenizer, prompt, pad, windows_to=None, hidden=None, pooled=None):
    """AUTOMATIC1111's long-prompt and "Original" emphasis rules, from their description: split into 75-token
    windows (comma backtrack 20), encode each as bos+tokens+eos+padding, multiply each token's state by its weight,
    rescale the window to its original mean, concatenate; pad with empty-prompt windows to `windows_to`.
    `hidden`: read hidden_states[hidden] instead of the last (normed) state (SDXL's penultimate layer); `pooled`: a
    list that receives the first window's projected pooled output (A1111's SDXL pooled embedding)."""
    weighted, breaks = [], []
    for frag in parse_emphasis(prompt):
        if frag.is_break:
            breaks.append(len(weighted))
        else:
            weighted += [(t, frag.weight) for t in tokenizer.encode(frag.text)]
    windows = a1111_windows(weighted, breaks, tokenizer.encode(",")[0])
    windows += [[]] * ((windows_to or len(windows)) - len(windows))
    zs = []
    for window in windows:
        ids = [BOS_ID] + [t for t, _ in window] + [EOS_ID]
        ids += [pad] * (77 - len(ids))
        mults = torch.tensor([1.0] + [w for _, w in window] + [1.0] * (76 - len(window)))
        with torch.no_grad():
            out = ref(torch.tensor([ids]), output_hidden_states=hidden is not None)
            z = (out.last_hidden_state if hidden is None else out.hidden_states[hidden])[0]
            if pooled is not None and not pooled:
                pooled.append(out.text_embeds)
        original_mean = z.mean()
        z = z * mults[:, None]
        zs.append(z * (original_mean / z.mean()))
    return torch.cat(zs)[None]


def test_long_weighted_prompt_matches_a1111_rules():
    ref, tower = tiny_tower(3, "quick_gelu", False, EOS_ID)
    prompt = ", ".join(f"a (very:1.3) [detailed] painting number {i} of ((a castle))" for i in range(20))
    negative = "low quality, (blurry:1.4)"
    cond, uncond = PromptEncoder([tower]).encode([prompt], [negative])
    expected = a1111_reference(ref, tower.tokenizer, prompt, EOS_ID)
    windows = expected.shape[1] // 77
    assert windows >= 3 and cond.context.shape[1] == expected.shape[1]
    assert_close(cond.context, expected, TOL, "long weighted prompt")
    # The short negative prompt is padded with empty-prompt windows to the same length.
    assert_close(uncond.context, a1111_reference(ref, tower.tokenizer, negative, EOS_ID, windows), TOL, "negative")


def test_sdxl_long_weighted_prompt_matches_a1111_rules():
    """SDXL: A1111 applies windows and emphasis to each encoder on its own (its penultimate states), concatenates
    them, and takes the pooled embedding from tower 2's first window."""
    ref1, tower1 = tiny_tower(1, "quick_gelu", False, EOS_ID, "penultimate")
    ref2, tower2 = tiny_tower(2, "gelu", True, 0, "penultimate")
    prompt = ", ".join(f"a (misty:1.2) [dark] forest number {i}, ((lanterns))" for i in range(16))
    cond, _ = PromptEncoder([tower1, tower2]).encode([prompt])
    pooled = []
    expected = torch.cat(
        [
            a1111_reference(ref1, tower1.tokenizer, prompt, EOS_ID, hidden=-2),
            a1111_reference(ref2, tower2.tokenizer, prompt, 0, hidden=-2, pooled=pooled),
        ],
        dim=-1,
    )
    assert expected.shape[1] >= 3 * 77 and cond.context.shape[1] == expected.shape[1]
    assert_close(cond.context, expected, TOL, "sdxl long weighted prompt")
    assert_close(cond.pooled, pooled[0], TOL, "sdxl pooled of the first window")


def test_break_and_sd2_padding():
    ref, tower = tiny_tower(4, "gelu", False, 0)
    prompt = "a red house BREAK a (blue:0.7) sky"
    cond, _ = PromptEncoder([tower]).encode([prompt])
    assert cond.context.shape[1] == 2 * 77
    assert_close(cond.context, a1111_reference(ref, tower.tokenizer, prompt, 0), TOL, "BREAK")


def test_clip_skip_out_of_range():
    _, tower = tiny_tower(0, "quick_gelu", False, EOS_ID)
    with pytest.raises(ValueError, match="clip_skip=5"):
        PromptEncoder([tower]).encode(["x"], clip_skip=5)
    assert np.isfinite(np.array(PromptEncoder([tower]).encode(["x"], clip_skip=4)[0].context)).all()
    assert isinstance(tower.encoder.config.num_hidden_layers, int) and mx is not None
