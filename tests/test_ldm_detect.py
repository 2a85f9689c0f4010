"""Detection of what an original single file is, and the errors for files that do not fit.

Fixtures: tests/ldm_fixtures.py (tiny checkpoints made by the original `ldm` code).
"""

from __future__ import annotations

import numpy as np
import pytest
from ldm_fixtures import check_text, check_unet, convert_all, original

from mlx_sd_convert.keymap import ConversionError
from mlx_sd_convert.ldm import plan_single_file
from mlx_sd_convert.ldm_detect import CERTAIN, EPSILON, HIGH, LOW, MEDIUM, OVERRIDE, V_PREDICTION, detect

# --- detection ----------------------------------------------------------------------------------------------


def _detect(state, **options):
    shapes = {k: v.shape for k, v in state.items()}
    dtypes = {k: str(v.dtype) for k, v in state.items()}
    return detect(state, shapes, dtypes, **options)


def test_detection_of_the_fixtures():
    sd1 = _detect(original("sd1").state)
    assert (sd1.family.value, sd1.family.confidence) == ("sd1", HIGH)
    assert sd1.text_encoder.value == "clip"
    assert (sd1.in_channels.value, sd1.in_channels.confidence) == (4, CERTAIN) and not sd1.inpainting
    assert (sd1.ema.value, sd1.dtype.value) == (False, "float32")
    assert (sd1.prediction_type.value, sd1.prediction_type.confidence) == (EPSILON, HIGH)

    inpaint = _detect(original("inpaint").state)
    assert inpaint.inpainting and inpaint.family.value == "sd1"

    sd2 = _detect(original("sd2", ema=True).state)
    assert (sd2.family.value, sd2.text_encoder.value, sd2.ema.value) == ("sd2", "openclip", True)
    # Nothing in a tiny SD2 file tells 512-base from 768-v: diffusers' default, reported as a guess.
    assert (sd2.prediction_type.value, sd2.prediction_type.confidence) == (V_PREDICTION, LOW)
    print(sd2.summary())


def test_detection_of_dtype_and_unet_only_files():
    state = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in original("sd2").state.items()}
    unet_only = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    found = _detect(unet_only)
    assert found.dtype.value == "float16"
    assert found.text_encoder.value is None
    assert (found.family.value, found.family.confidence) == ("sd2", MEDIUM)  # the linear projections alone
    plan, converted = convert_all(unet_only)
    assert set(plan.components) == {"unet"}
    assert converted["unet"][1]["conv_in.weight"].dtype == np.float16


def test_prediction_type_evidence():
    state = dict(original("sd2").state)
    assert _detect({**state, "v_pred": np.zeros(0)}).prediction_type.confidence == HIGH
    marked = _detect({**state, "v_pred": np.zeros(0)}, family=None)
    assert marked.prediction_type.value == V_PREDICTION
    spec = _detect(state, metadata={"modelspec.prediction_type": "epsilon"}).prediction_type
    assert (spec.value, spec.confidence) == (EPSILON, HIGH)
    step = _detect(state, global_step=875000).prediction_type
    assert (step.value, step.confidence) == (EPSILON, MEDIUM)
    forced = _detect(state, prediction_type="eps").prediction_type
    assert (forced.value, forced.confidence) == (EPSILON, OVERRIDE)
    with pytest.raises(ValueError, match="prediction type"):
        _detect(state, prediction_type="x0")

    # SD2 inpainting models predict epsilon; 9 input channels say so.
    inpaint_sd2 = {k: v for k, v in state.items()}
    key = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint_sd2[key] = np.zeros((64, 9, 3, 3), np.float32)
    assert _detect(inpaint_sd2).prediction_type.value == EPSILON

    # ComfyUI's statistic on the real key (the tiny fixture has no output_blocks.11): std > 0.09 means v.
    stat = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    rng = np.random.default_rng(0)
    for std, expected in ((0.2, V_PREDICTION), (0.02, EPSILON)):
        found = _detect({**state, stat: (std * rng.standard_normal(320)).astype(np.float32)}).prediction_type
        assert (found.value, found.confidence) == (expected, LOW), found


def test_marker_tensors_are_dropped():
    orig = original("sd2")
    plan, converted = convert_all({**orig.state, "v_pred": np.zeros(0), "ztsnr": np.zeros(0)})
    assert plan.detection.prediction_type.value == V_PREDICTION
    assert "zero-terminal" in plan.detection.prediction_type.evidence
    check_unet(orig, *converted["unet"])


def test_sd2_saved_by_sgm_code():
    """Stability's newer `sgm` code (e.g. SD-Turbo, an SD2.1 model) stores OpenCLIP under conditioner.embedders.0."""
    orig = original("sd2")
    state = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v for k, v in orig.state.items()}
    plan, converted = convert_all(state)
    assert (plan.detection.family.value, plan.detection.text_encoder.value) == ("sd2", "openclip-sgm")
    check_text(orig, *converted["text_encoder"])


def test_scale_factor_buffer_sets_the_vae_scaling():
    """Checkpoints trained with scale_by_std store the latent scale as a `scale_factor` buffer."""
    plan = plan_single_file({**original("sd1").state, "scale_factor": np.array(0.25, np.float32)})
    assert plan.components["vae"].config.scaling_factor == 0.25
    assert plan_single_file(original("sd1").state).components["vae"].config.scaling_factor == 0.18215


def test_family_override():
    plan = plan_single_file(original("sd1").state, family="sd1", prediction_type="v")
    assert plan.detection.family.confidence == OVERRIDE
    assert plan.detection.prediction_type.value == V_PREDICTION


# --- errors: one message naming the keys and the likely cause -----------------------------------------------


def test_corrupted_key_is_named():
    state = dict(original("sd1").state)
    bad = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    state[bad.replace("proj_in", "proj_inn")] = state.pop(bad)
    plan = plan_single_file(state)
    with pytest.raises(ConversionError) as e:
        plan.components["unet"].convert()
    message = str(e.value)
    assert "unet (model.diffusion_model.*)" in message
    assert "input_blocks.1.1.proj_inn.weight" in message  # the stray tensor
    assert "down_blocks.0.attentions.0.proj_in.weight" in message  # the parameter it left empty
    print(message)


def test_missing_tensor_is_named():
    state = {k: v for k, v in original("sd1").state.items() if k != "first_stage_model.decoder.up.0.block.1.conv2.bias"}
    with pytest.raises(ConversionError, match=r"missing.*decoder\.up_blocks\.2\.resnets\.1\.conv2\.bias"):
        plan_single_file(state).components["vae"].convert()


def test_wrong_family_override_is_explained():
    with pytest.raises(ConversionError, match=r"family sd1 expects cond_stage_model\.transformer.*drop the family"):
        plan_single_file(original("sd2").state, family="sd1")


def test_family_that_contradicts_the_unet_is_refused():
    """Head counts are invisible in shapes: SD1's 8 heads on an SD2 UNet would convert into wrong attention."""
    unet_only = {k: v for k, v in original("sd2").state.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(ConversionError, match=r"linear projections \(SD2 layout\) but the family is sd1"):
        plan_single_file(unet_only, family="sd1")


def test_foreign_tensors_are_named_with_a_cause():
    state = {**original("sd1").state, "control_model.input_hint_block.0.weight": np.zeros((16, 3, 3, 3))}
    with pytest.raises(ConversionError, match=r"control_model\.input_hint_block\.0\.weight.*ControlNet"):
        plan_single_file(state)
    diffusers_like = {"down_blocks.0.resnets.0.conv1.weight": np.zeros((32, 32, 3, 3))}
    with pytest.raises(ConversionError, match="not an original-layout SD checkpoint.*diffusers"):
        plan_single_file(diffusers_like)


def test_sdxl_marker_without_the_sdxl_towers_is_refused():
    """A file with SDXL's second conditioner tower but no CLIP-L: detected as SDXL, refused as incomplete."""
    state = {
        **original("sd2").state,
        "conditioner.embedders.1.model.positional_embedding": np.zeros((77, 128), np.float32),
    }
    found = _detect(state)
    assert found.family.value == "sdxl"
    with pytest.raises(ConversionError, match="SDXL base file is incomplete"):
        plan_single_file(state)


def test_incomplete_ema_copy_is_refused():
    state = dict(original("sd1", ema=True).state)
    state.pop(next(k for k in state if k.startswith("model_ema.diffusion_model")))
    with pytest.raises(ConversionError, match="EMA copy does not match.*--no-ema"):
        plan_single_file(state)
    plan_single_file(state, use_ema=False)  # the raw weights are still there
