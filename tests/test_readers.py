"""The torch-free checkpoint reader: byte-for-byte equal to torch.load, refuses crafted pickles, reads lazily.

Reference: `torch.load(path, weights_only=True)` (torch's own restricted loader) for PyTorch files and
`safetensors.torch.load_file` for safetensors. Malicious files are written by hand, opcode by opcode, and
each test proves the payload is live (torch.load with weights_only=False runs it: the marker file appears)
and that our reader refuses it by name without running it (the marker file does not appear).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import tracemalloc
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from mlx_sd_convert.keymap import ConversionError
from mlx_sd_convert.readers import open_checkpoint
from mlx_sd_convert.torch_pickle import UnsafeCheckpointError

# --- reference comparison ---------------------------------------------------------------------------------


def assert_matches(checkpoint, reference: dict[str, torch.Tensor]):
    """Same keys in the same order; every tensor the same dtype, shape, strides and bytes."""
    assert list(checkpoint) == list(reference)
    for key, tensor in reference.items():
        info = checkpoint.info(key)
        assert info.dtype == str(tensor.dtype).removeprefix("torch.") and info.shape == tuple(tensor.shape), key
        raw = checkpoint.raw(key)
        expected = (
            tensor.view(torch.int16).numpy().view(np.uint16)
            if tensor.dtype == torch.bfloat16
            else tensor.view(torch.uint8).numpy()
            if tensor.dtype in FLOAT8
            else tensor.numpy()
        )
        assert raw.dtype == expected.dtype and raw.shape == expected.shape, key
        if expected.size > 1:
            assert raw.strides == expected.strides, key
        assert raw.tobytes() == expected.tobytes(), key
        value = checkpoint[key]
        assert not value.flags.writeable
        if tensor.dtype == torch.bfloat16:
            assert value.dtype == np.float32 and value.tobytes() == tensor.float().numpy().tobytes(), key
        if tensor.dtype in FLOAT8:  # NaN payloads may differ: equal values, signs (of zeros too) and NaN places
            assert value.dtype == np.float32, key
            np.testing.assert_array_equal(value, tensor.float().numpy(), err_msg=key)
            np.testing.assert_array_equal(np.signbit(value), np.signbit(tensor.float().numpy()), err_msg=key)


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def every_float8(dtype: torch.dtype) -> torch.Tensor:
    """All 256 bit patterns of a float8 type (NaNs included), as a 16x16 tensor."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)


def variety() -> dict[str, torch.Tensor]:
    """Every dtype and layout a state dict can hold: views, offsets, shared and tied storages, 0-d, empty."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 6, generator=g)
    tensors = {
        "fp32": torch.randn(3, 5, generator=g),
        "fp16": torch.randn(4, 4, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "fp64": torch.randn(2, generator=g).double(),
        "int64_buffer": torch.arange(77).unsqueeze(0),  # like CLIP's position_ids
        "int32": torch.tensor(12345, dtype=torch.int32),  # 0-d, like LitEma's num_updates
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.arange(5, dtype=torch.uint8),
        "transposed": base.t(),  # non-contiguous
        "offset_view": base[4:7, 1:5],  # offset and non-contiguous, same storage as `transposed`
        "strided": base[::3, ::2],
        "shared_rows": base[8:],
        "conv": torch.randn(8, 4, 3, 3, generator=g),
        "empty": torch.zeros(0, 3),
        "uint16": torch.arange(5).to(torch.uint16),  # torch >= 2.3 writes this with _rebuild_tensor_v3
        "fp8_e4m3fn": every_float8(torch.float8_e4m3fn),  # also v3: fp8 files (t5xxl_fp8_e4m3fn.safetensors)
        "fp8_e5m2": every_float8(torch.float8_e5m2)[2:, ::3],  # a strided view
    }
    tensors["tied"] = tensors["fp32"]  # the same tensor under two names
    return tensors


def legacy_variety():
    # The legacy format predates _rebuild_tensor_v3 (torch refuses to save uint16 that way).
    return {k: v for k, v in variety().items() if k != "uint16" and v.dtype not in FLOAT8}


@pytest.mark.parametrize("nesting", [(), ("state_dict",), ("model",), ("module",), ("state_dict", "model")])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_files_match_torch_load(tmp_path, nesting, legacy):
    tensors = legacy_variety() if legacy else variety()
    obj = tensors
    for key in reversed(nesting):
        obj = {key: obj, "epoch": 3}
    path = tmp_path / "model.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    reference = torch.load(path, weights_only=True)
    for key in nesting:
        reference = reference[key]

    checkpoint = open_checkpoint(path)
    assert checkpoint.format == ("torch-legacy" if legacy else "torch-zip")
    assert checkpoint.nesting == nesting
    assert_matches(checkpoint, reference)
    assert set(checkpoint.extras) == {"/".join(nesting[:i] + ("epoch",)) for i in range(len(nesting))}


def test_safetensors_match_safetensors_library(tmp_path):
    tensors = {k: v.contiguous().clone() for k, v in variety().items() if k != "tied"}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    checkpoint = open_checkpoint(path)
    reference = safetensors.torch.load_file(path)
    assert checkpoint.format == "safetensors" and checkpoint.metadata == {"format": "pt"}
    assert_matches(checkpoint, {k: reference[k] for k in checkpoint})
    assert set(checkpoint) == set(reference)


def test_scaled_fp8_weights_are_rescaled(tmp_path):
    """ComfyUI's scaled fp8 (`scale_weight` per tensor, marked by `scaled_fp8`) and its later layout (`weight_scale`,
    here per row): each weight is its float8 values times its scale, as ComfyUI dequantizes; scales, input scales and
    markers are not weights."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    a_scale, b_scale = a.abs().max() / 448, b.abs().amax(dim=(1, 2, 3)) / 448
    tensors = {
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        "x.a.weight": (a / a_scale).to(torch.float8_e4m3fn),
        "x.a.scale_weight": a_scale,
        "x.a.scale_input": torch.tensor(1.0),
        "x.a.bias": torch.randn(4, generator=g).half(),
        "x.b.weight": (b / b_scale[:, None, None, None]).to(torch.float8_e4m3fn),
        "x.b.weight_scale": b_scale.bfloat16(),
        "x.b.comfy_quant": torch.tensor([1, 2], dtype=torch.uint8),
        "x.c.weight": torch.randn(2, 2, generator=g).to(torch.float8_e5m2),  # float8 without a scale
    }
    path = tmp_path / "scaled.safetensors"
    safetensors.torch.save_file(tensors, path)
    checkpoint = open_checkpoint(path)
    assert sorted(checkpoint) == ["x.a.bias", "x.a.weight", "x.b.weight", "x.c.weight"] and checkpoint.scaled == 2
    assert checkpoint.info("x.a.weight").dtype == "float8_e4m3fn"
    expected = {
        "x.a.weight": tensors["x.a.weight"].float() * a_scale,
        "x.b.weight": tensors["x.b.weight"].float() * b_scale.bfloat16().float()[:, None, None, None],
        "x.c.weight": tensors["x.c.weight"].float(),
    }
    for key, value in expected.items():
        np.testing.assert_array_equal(checkpoint[key], value.numpy(), err_msg=key)
    assert checkpoint.raw("x.a.weight").tobytes() == tensors["x.a.weight"].view(torch.uint8).numpy().tobytes()

    plain = {"x.weight_scale": torch.ones(3), "x.weight": torch.ones(3)}  # no float8: names mean nothing
    safetensors.torch.save_file(plain, tmp_path / "plain.safetensors")
    assert sorted(open_checkpoint(tmp_path / "plain.safetensors")) == sorted(plain)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"a.weight": torch.ones(4, 4).half(), "a.scale_weight": torch.tensor(1.0),
          "b": torch.ones(1).to(torch.float8_e4m3fn)},
         r"a\.scale_weight scales a\.weight, which is float16, not float8"),
        ({"a.weight": torch.ones(4, 4).to(torch.float8_e4m3fn), "a.weight_scale": torch.ones(4, 2)},
         r"a\.weight_scale is an fp8 scale of shape \(4, 2\), neither per tensor nor per row .*block-scaled"),
    ],
)  # fmt: skip
def test_unreadable_scaled_fp8_is_refused(tmp_path, tensors, message):
    safetensors.torch.save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError, match=message):
        open_checkpoint(tmp_path / "bad.safetensors")


def test_big_endian_recompressed_and_zip64_archives(tmp_path):
    """torch honours a `byteorder` record of "big", reads deflated members and zip64 headers; so must we."""
    # uint16 is left out: torch stores it as untyped bytes and so never byte-swaps it (we do).
    skip = ("tied", "empty", "uint16", "fp8_e4m3fn", "fp8_e5m2")
    tensors = {k: v.contiguous().clone() for k, v in variety().items() if k not in skip}
    source = tmp_path / "little.pt"
    torch.save(tensors, source)
    dtypes = [v.numpy().dtype if v.dtype != torch.bfloat16 else np.dtype("<u2") for v in tensors.values()]

    def swap(name, data):  # storages are numbered in the order the pickle meets them: dict order here
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, dtypes[int(name.rsplit("/", 1)[1])]).byteswap().tobytes()
        return data

    same = lambda name, data: data  # noqa: E731
    for target, compression, edit, zip64 in [
        (tmp_path / "big.pt", zipfile.ZIP_STORED, swap, False),
        (tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED, same, False),
        (tmp_path / "zip64.pt", zipfile.ZIP_STORED, same, True),
    ]:
        rewrite_zip(source, target, edit, compression, zip64=zip64)
        assert_matches(open_checkpoint(target), torch.load(target, weights_only=True))


@pytest.fixture(scope="module")
def lightning_module():
    """A stand-in for pytorch_lightning's ModelCheckpoint, so torch.save pickles the class as Lightning does."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = model_checkpoint
    yield model_checkpoint
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def lightning_checkpoint(state_dict, model_checkpoint) -> dict:
    """The top level of an SD 1.x training checkpoint as PyTorch Lightning writes it."""
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        "callbacks": {
            model_checkpoint: {
                "monitor": None,
                "best_model_score": None,
                "best_model_path": "/ckpt/last.ckpt",
                "current_score": torch.tensor(0.125),
                "dirpath": "/ckpt",
            }
        },
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 470000, "lr_lambdas": [None]}],
        "loss": np.float64(0.0925),
        "best_step": np.int64(465000),
    }


@pytest.fixture(scope="module")
def ldm_state_dict():
    """A tiny original-layout SD UNet (the genuine ldm code) under model.diffusion_model., with LitEma buffers."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[2],
        num_res_blocks=1,
        channel_mult=[1, 2],
        num_heads=2,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=32,
        legacy=False,
    )
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    state["betas"] = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64).float()
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_original_layout_lightning_checkpoint(tmp_path, ldm_state_dict, lightning_module, dtype, legacy):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ldm_state_dict.items()}
    path = tmp_path / "sd.ckpt"
    torch.save(lightning_checkpoint(state, lightning_module), path, _use_new_zipfile_serialization=not legacy)
    inert = [lightning_module, np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Int64DType]
    with torch.serialization.safe_globals(inert):
        reference = torch.load(path, weights_only=True)

    checkpoint = open_checkpoint(path)
    assert checkpoint.nesting == ("state_dict",) and checkpoint.skipped == {}
    assert checkpoint.global_step == 470000
    assert checkpoint.extras["loss"] == "numpy float64 0.0925"
    assert checkpoint.extras["best_step"] == "numpy int64 465000"
    assert checkpoint.extras["callbacks"] == "dict of 1 entries holding 1 tensors"
    assert_matches(checkpoint, reference["state_dict"])


@pytest.fixture(scope="module")
def diffusers_unet_folder(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    folder = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(folder / "bin", safe_serialization=False)
    unet.save_pretrained(folder / "safetensors", safe_serialization=True)
    return folder


def test_diffusers_bin_and_safetensors(diffusers_unet_folder):
    bin_file = diffusers_unet_folder / "bin" / "diffusion_pytorch_model.bin"
    from_bin = open_checkpoint(bin_file)
    assert_matches(from_bin, torch.load(bin_file, weights_only=True))
    from_safetensors = open_checkpoint(diffusers_unet_folder / "safetensors" / "diffusion_pytorch_model.safetensors")
    assert set(from_safetensors) == set(from_bin)
    for key in from_bin:
        assert from_safetensors[key].tobytes() == from_bin[key].tobytes(), key


def test_non_tensor_entries_are_listed_not_mapped(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(2), "step": 3, "nested": {"b": torch.zeros(1)}, "note": "hi"}, path)
    checkpoint = open_checkpoint(path)
    assert list(checkpoint) == ["w"]
    assert checkpoint.skipped == {"step": "int 3", "nested": "dict of 1 entries holding 1 tensors", "note": "str 'hi'"}


def test_negative_views_are_refused_not_misread(tmp_path):
    """torch saves a neg-bit view as its positive storage plus a flag; reading the bytes alone gives -x."""
    path = tmp_path / "neg.pt"
    torch.save({"w": torch._neg_view(torch.arange(1.0, 4.0))}, path)
    with pytest.raises(ConversionError, match="conj/neg view"):
        open_checkpoint(path)


# --- hand-written pickles ---------------------------------------------------------------------------------


def op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def op_global(module: str, name: str) -> bytes:  # GLOBAL, as protocol 2 (torch.save) writes it
    return b"c" + f"{module}\n{name}\n".encode()


def op_stack_global(module: str, name: str) -> bytes:  # STACK_GLOBAL, protocol 4
    return op_str(module) + op_str(name) + b"\x93"


def op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_call(func: bytes, *args: bytes) -> bytes:  # REDUCE
    return func + op_tuple(*args) + b"R"


def op_dict(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def op_list(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def pickled(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def shell(marker: Path) -> bytes:
    return op_str(f"touch {marker}")


def python(marker: Path) -> bytes:
    return op_str(f"open({str(marker)!r}, 'w').close()")


def tensor_record(hooks: bytes | None = None, storage_type: bytes | None = None, persistent: bytes | None = None):
    """torch's record of a 6-float tensor on storage "0", hand-written, with any part replaceable."""
    storage_type = storage_type or op_global("torch", "FloatStorage")
    persistent = persistent or op_tuple(op_str("storage"), storage_type, op_str("0"), op_str("cpu"), op_int(6)) + b"Q"
    hooks = hooks or op_call(op_global("collections", "OrderedDict"))
    return op_call(
        op_global("torch._utils", "_rebuild_tensor_v2"),
        persistent,
        op_int(0),
        op_tuple(op_int(2), op_int(3)),
        op_tuple(op_int(3), op_int(1)),
        b"\x89",  # requires_grad=False
        hooks,
    )


def rewrite_zip(
    source: Path, target: Path, edit=lambda name, data: data, compression=zipfile.ZIP_STORED, drop=(), zip64=False
):
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for info in old.infolist():
            if not any(info.filename.endswith(d) for d in drop):
                with new.open(info.filename, "w", force_zip64=zip64) as member:  # zip64: as torch writes > 4 GB
                    member.write(edit(info.filename, old.read(info.filename)))


@pytest.fixture
def archive(tmp_path):
    """Write a torch zip whose data.pkl is the given pickle and whose storage "0" holds 6 floats."""
    template = tmp_path / "template.pt"
    torch.save({"w": torch.arange(6.0), "b": torch.zeros(2)}, template)  # two entries: pickled with SETITEMS

    def write(pickle_bytes: bytes, name="crafted.ckpt") -> Path:
        path = tmp_path / name
        rewrite_zip(template, path, lambda n, data: pickle_bytes if n.endswith("/data.pkl") else data)
        return path

    write.template = template
    return write


def real_state_dict_body(template: Path) -> bytes:
    """The opcodes of a genuine torch.save'd state dict, to embed in a crafted pickle."""
    with zipfile.ZipFile(template) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert data.startswith(b"\x80\x02") and data.endswith(b"u.")  # ... MARK key value key value SETITEMS STOP
    return data[2:-1]


def test_hand_written_tensor_record_is_valid(archive):
    """The baseline the malicious variants below alter: torch and we read it to the same tensor."""
    path = archive(pickled(op_dict((op_str("w"), tensor_record()))))
    assert_matches(open_checkpoint(path), torch.load(path, weights_only=True))


def payloads(marker: Path, template: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (data.pkl bytes, the global the refusal must name)."""
    body = real_state_dict_body(template)
    system = op_call(op_global("os", "system"), shell(marker))
    return {
        "os.system": (pickled(system), "os.system"),
        "eval (python 2 spelling)": (
            pickled(op_call(op_global("__builtin__", "eval"), python(marker))),
            "builtins.eval",
        ),
        "exec": (pickled(op_call(op_global("builtins", "exec"), python(marker))), "builtins.exec"),
        "subprocess.Popen via STACK_GLOBAL": (
            b"\x80\x04"
            + op_call(op_stack_global("subprocess", "Popen"), op_list(op_str("touch"), op_str(str(marker))))
            + b".",
            "subprocess.Popen",
        ),
        "INST opcode": (b"(" + shell(marker) + b"ios\nsystem\n.", "os.system"),
        "getattr chain": (
            pickled(
                op_call(
                    op_call(
                        op_global("builtins", "getattr"),
                        op_call(op_global("builtins", "__import__"), op_str("os")),
                        op_str("system"),
                    ),
                    shell(marker),
                )
            ),
            "builtins.getattr",
        ),
        "reduce deep inside the state dict": (
            pickled(body[:-1] + op_str("deep") + op_list(op_list(op_dict((op_str("x"), op_list(system))))) + b"u"),
            "os.system",
        ),
        "global outside the state dict": (
            pickled(
                op_dict(
                    (op_str("state_dict"), body),
                    (op_str("global_step"), op_int(1)),
                    (op_str("callbacks"), op_dict((op_str("x"), op_call(op_global("posix", "system"), shell(marker))))),
                )
            ),
            "posix.system",
        ),
        "tensor record with an exec hook": (
            pickled(
                op_dict((op_str("w"), tensor_record(hooks=op_call(op_global("builtins", "exec"), python(marker)))))
            ),
            "builtins.exec",
        ),
        "persistent id computed by os.system": (
            pickled(op_dict((op_str("w"), tensor_record(persistent=system + b"Q")))),
            "os.system",
        ),
        "storage type computed by os.system": (
            pickled(op_dict((op_str("w"), tensor_record(storage_type=system)))),
            "os.system",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "os.system",
        "eval (python 2 spelling)",
        "exec",
        "subprocess.Popen via STACK_GLOBAL",
        "INST opcode",
        "getattr chain",
        "reduce deep inside the state dict",
        "global outside the state dict",
        "tensor record with an exec hook",
        "persistent id computed by os.system",
        "storage type computed by os.system",
    ],
)
def test_malicious_pickles_are_refused_by_name_and_nothing_runs(archive, tmp_path, case):
    marker = tmp_path / "pwned"
    data, global_name = payloads(marker, archive.template)[case]
    path = archive(data)

    with pytest.raises(UnsafeCheckpointError) as refused:
        open_checkpoint(path)
    assert refused.value.global_name == global_name
    assert f"`{global_name}`" in str(refused.value) and str(path) in str(refused.value)
    time.sleep(0.05)  # a process the pickle might have spawned would have touched the marker by now
    assert not marker.exists()

    # Control: the file is genuinely malicious; unrestricted unpickling runs the payload.
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass  # the payload runs before torch notices the result is no checkpoint
    deadline = time.time() + 5
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists()


def test_files_torch_itself_wrote_with_a_code_running_object(tmp_path):
    """A __reduce__ payload saved by torch.save, in both formats (what a trojaned checkpoint looks like)."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    for legacy in (False, True):
        path = tmp_path / f"trojan-{legacy}.ckpt"
        torch.save(
            {"state_dict": {"w": torch.ones(2)}, "extra": Payload()}, path, _use_new_zipfile_serialization=not legacy
        )
        with pytest.raises(UnsafeCheckpointError, match="`posix.system`"):
            open_checkpoint(path)
        assert not marker.exists()


def test_legacy_header_pickle_is_restricted_too(tmp_path):
    """The first pickle of a legacy file (the magic number) runs before any check in torch.load."""
    marker = tmp_path / "pwned"
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.ones(2)}, clean, _use_new_zipfile_serialization=False)
    data = clean.read_bytes()
    assert data[14:15] == b"."  # PROTO 2, LONG1 of 10 bytes, STOP: the magic number pickle
    path = tmp_path / "header.pt"
    path.write_bytes(pickled(op_call(op_global("os", "system"), shell(marker))) + data[15:])
    with pytest.raises(UnsafeCheckpointError, match="`os.system`"):
        open_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("storage class not allow-listed", "`torch.QInt8Storage`"),
        ("Lightning class called", "tries to create a `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`"),
        ("numpy object dtype", "numpy dtype 'O'"),
        ("rewrite a tensor's shape with BUILD", "tried to modify a tensor"),
        ("tensor reaching past its storage", "does not fit its storage"),
        ("storage key escaping the archive", "malformed storage record"),
        ("unknown persistent id", "unexpected persistent id"),
    ],
)
def test_abuse_of_allowed_names_is_refused(archive, case, message):
    lightning = op_global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    record = {
        "storage class not allow-listed": tensor_record(storage_type=op_global("torch", "QInt8Storage")),
        "Lightning class called": op_call(lightning),
        "numpy object dtype": op_call(op_global("numpy", "dtype"), op_str("O"), b"\x89", b"\x88"),
        "rewrite a tensor's shape with BUILD": tensor_record()
        + op_dict((op_str("shape"), op_tuple(op_int(10**6))))
        + b"b",
        "tensor reaching past its storage": tensor_record().replace(
            op_tuple(op_int(2), op_int(3)), op_tuple(op_int(20), op_int(3))
        ),
        "storage key escaping the archive": tensor_record(
            persistent=op_tuple(
                op_str("storage"), op_global("torch", "FloatStorage"), op_str("../../x"), op_str("cpu"), op_int(6)
            )
            + b"Q"
        ),
        "unknown persistent id": tensor_record(persistent=op_tuple(op_str("module"), op_str("x")) + b"Q"),
    }[case]
    with pytest.raises(ConversionError, match=message):
        open_checkpoint(archive(pickled(op_dict((op_str("w"), record)))))


# --- broken files -----------------------------------------------------------------------------------------


@pytest.fixture
def clean_files(tmp_path):
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    files = {
        "zip": tmp_path / "clean.ckpt",
        "legacy": tmp_path / "legacy.pt",
        "safetensors": tmp_path / "clean.safetensors",
    }
    torch.save(tensors, files["zip"])
    torch.save(tensors, files["legacy"], _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(tensors, files["safetensors"])
    return files


def broken(tmp_path, clean_files, case) -> Path:
    path = tmp_path / f"broken-{case.replace(' ', '-')}.ckpt"
    zip_bytes = clean_files["zip"].read_bytes()
    st_bytes = clean_files["safetensors"].read_bytes()
    header_length = struct.unpack("<Q", st_bytes[:8])[0]
    contents = {
        "empty": b"",
        "text": b"hello, this is not a model\n" * 4,
        "html": b"<!DOCTYPE html><html><body>Sign in</body></html>",
        "git lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265380512\n",
        "truncated zip": zip_bytes[: len(zip_bytes) // 2],
        "truncated legacy": clean_files["legacy"].read_bytes()[:-100],
        "truncated safetensors": st_bytes[:-100],
        "safetensors bad header": st_bytes[:8] + b"{" + b"x" * (header_length - 1) + st_bytes[8 + header_length :],
        "safetensors huge header length": struct.pack("<Q", 2**40) + st_bytes[8:],
        "plain pickle": pickled(op_dict((op_str("w"), op_int(1)))),
        "pre-0.4 tar": b"\0" * 257 + b"ustar" + b"\0" * 250,
    }
    if case in contents:
        path.write_bytes(contents[case])
    elif case == "zip missing a storage":
        rewrite_zip(clean_files["zip"], path, drop=["/data/1"])
    elif case == "zip storage of the wrong size":
        rewrite_zip(clean_files["zip"], path, lambda n, d: d[:-4] if n.endswith("/data/1") else d)
    elif case == "no tensors":
        torch.save({"epoch": 1, "note": "x"}, path)
    elif case == "a list":
        torch.save([torch.ones(1)], path)
    elif case == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    elif case == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "the file is empty"),
        ("text", "not a checkpoint"),
        ("html", "an HTML page"),
        ("git lfs pointer", "Git LFS pointer"),
        ("truncated zip", "probably truncated"),
        ("truncated legacy", "truncated"),
        ("truncated safetensors", "not a valid safetensors file"),
        ("safetensors bad header", "not a valid safetensors file"),
        ("safetensors huge header length", "header too large"),
        ("plain pickle", "not a PyTorch checkpoint"),
        ("pre-0.4 tar", "before version 0.4"),
        ("zip missing a storage", "data/1 is missing from the archive"),
        ("zip storage of the wrong size", "holds 16380 bytes but the pickle expects 16384"),
        ("no tensors", "no tensors found"),
        ("a list", "holds a list"),
        ("torchscript", "TorchScript"),
        ("folder", "is a folder"),
        ("missing", "cannot open"),
    ],
)
def test_broken_files_give_one_clear_error(tmp_path, clean_files, case, message):
    path = tmp_path / "does-not-exist.ckpt" if case == "missing" else broken(tmp_path, clean_files, case)
    with pytest.raises(ConversionError, match=message) as error:
        open_checkpoint(path)
    assert str(path) in str(error.value)
    assert not isinstance(error.value, UnsafeCheckpointError)


# --- laziness ---------------------------------------------------------------------------------------------


@pytest.fixture
def big_files(tmp_path):
    """Eight 4 MB tensors (32 MB) in each format; one bfloat16."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(1024, 1024, generator=g) for i in range(8)}
    tensors["half"] = torch.randn(1024, 1024, generator=g).bfloat16()
    files = {"zip": tmp_path / "big.ckpt", "legacy": tmp_path / "big.pt", "safetensors": tmp_path / "big.safetensors"}
    torch.save(tensors, files["zip"])
    torch.save(tensors, files["legacy"], _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(tensors, files["safetensors"])
    return tensors, files


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_opening_and_reading_allocate_about_one_tensor(big_files, kind):
    tensors, files = big_files
    tracemalloc.start()
    try:
        checkpoint = open_checkpoint(files[kind])
        _, opening_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for key in [k for k in checkpoint if k != "half"]:
            assert np.array_equal(checkpoint[key][:2], tensors[key][:2].numpy())
        _, float32_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert np.array_equal(checkpoint["half"][:2], tensors["half"][:2].float().numpy())
        _, bfloat16_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert opening_peak < 256 * 1024  # the index only; the file holds 34 MB
    assert float32_peak < 256 * 1024  # memory-mapped views: nothing copied
    assert bfloat16_peak < 256 * 1024 + 4 * 2**20  # the one float32 upcast


def test_data_is_read_on_access_and_one_read_touches_one_storage(tmp_path, big_files):
    """Change one storage's bytes on disk after opening: only that tensor notices, at its first read."""
    tensors, files = big_files
    checkpoint = open_checkpoint(files["zip"])
    storage = checkpoint._tensors["t3"].storage
    with open(files["zip"], "r+b") as f:
        f.seek(storage.offset + 1000)
        f.write(b"\xff" * 8)
    assert checkpoint["t2"].tobytes() == tensors["t2"].numpy().tobytes()
    with pytest.raises(ConversionError, match=r"data/3 fail their CRC-32 check.*\(reading tensor t3\)"):
        checkpoint["t3"]
    # Without verification the changed bytes come through: they were read now, not when the file was opened.
    changed = open_checkpoint(files["zip"], verify=False)["t3"]
    assert (changed.view(np.uint8).reshape(-1)[1000:1008] == 0xFF).all()

    checkpoint = open_checkpoint(files["safetensors"])
    with open(files["safetensors"], "r+b") as f:
        f.seek(checkpoint._tensors["t5"].storage.offset)
        f.write(np.float32(1234.5).tobytes())
    assert checkpoint["t5"][0, 0] == 1234.5
    assert checkpoint["t4"].tobytes() == tensors["t4"].numpy().tobytes()


def test_reader_does_not_import_torch(big_files):
    _, files = big_files
    script = (
        "import sys; from mlx_sd_convert.readers import open_checkpoint\n"
        f"for p in {[str(p) for p in files.values()]!r}:\n"
        "    c = open_checkpoint(p); [c[k] for k in c]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
