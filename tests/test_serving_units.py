"""Fast tests of the serving building blocks: image decoding/preprocessing, the protocol checks, the batcher."""
from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from distill2deploy.data import preprocess, resize_images
from distill2deploy.deploy.images import decode_image, fit_images, preprocess_images, top_k
from distill2deploy.errors import UserError
from distill2deploy.serving.batcher import MicroBatcher
from distill2deploy.serving.protocol import InferenceRequest, ProtocolError, TensorSpec, request_tensor

META = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "input_size": 16}


def _encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)


def test_decode_png_is_lossless_and_modes_become_rgb(rgb: np.ndarray) -> None:
    assert np.array_equal(decode_image(_encode(rgb)), rgb)
    grey = decode_image(_encode(rgb, mode="L"))
    assert grey.shape == (20, 28, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    for mode, fmt in (("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("1", "PNG"), ("RGB", "WEBP")):
        out = decode_image(_encode(rgb, fmt, mode))
        assert out.shape == (20, 28, 3) and out.dtype == np.uint8, mode
    sixteen = (np.arange(20 * 28, dtype=np.uint16).reshape(20, 28) * 100)
    buf = io.BytesIO()
    Image.fromarray(sixteen).save(buf, format="PNG")
    out = decode_image(buf.getvalue())  # scaled to 8 bits, not clipped at 255
    assert abs(int(out.max()) - round(sixteen.max() / 257)) <= 1 and out.min() == 0


@pytest.mark.parametrize("data, message", [
    (b"", "empty image"), (b"this is text, not a picture", "not an image"), (None, "truncated"),
])
def test_decode_rejects_bad_bytes_with_user_error(rgb: np.ndarray, data: bytes | None, message: str) -> None:
    if data is None:
        full = _encode(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
        data = full[: len(full) // 2]
    with pytest.raises(UserError, match=message):
        decode_image(data, where="upload")


def test_fit_then_preprocess_equals_preprocess_of_each_image(rgb: np.ndarray) -> None:
    other = np.random.default_rng(2).integers(0, 256, (40, 12, 3), dtype=np.uint8)
    images = [rgb, other, rgb[::-1]]
    got = preprocess_images(images, META)
    for i, im in enumerate(images):
        want = preprocess(im[None], mean=META["mean"], std=META["std"], input_size=16)
        np.testing.assert_array_equal(got[i:i + 1], want)
    fitted = fit_images(images, 16)
    assert fitted.dtype == np.uint8 and fitted.shape == (3, 16, 16, 3)
    assert np.array_equal(resize_images(fitted, input_size=16), fitted)  # already the right size: no-op


def test_top_k_is_sorted_softmax_with_labels() -> None:
    logits = np.array([[0.0, 2.0, 1.0, 2.0]])
    (row,) = top_k(logits, ["a", "b", "c", "d"], 3)
    assert [r["index"] for r in row] == [1, 3, 2]  # tie between 1 and 3: lower index first
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert [r["label"] for r in row] == ["b", "d", "c"]
    np.testing.assert_allclose([r["probability"] for r in row], p[[1, 3, 2]])
    assert len(top_k(logits, list("abcd"), 10)[0]) == 4
    with pytest.raises(UserError):
        top_k(logits, list("abcd"), 0)


SPEC = TensorSpec(name="input", datatype="FP32", shape=[-1, 3, 2, 2])


def _req(**over: object) -> InferenceRequest:
    inp = {"name": "input", "shape": [2, 3, 2, 2], "datatype": "FP32", "data": list(range(24))}
    inp.update(over)
    return InferenceRequest(inputs=[inp])


def test_request_tensor_accepts_flat_and_nested_data() -> None:
    x = request_tensor(_req(), SPEC, "logits")
    assert x.dtype == np.float32 and x.shape == (2, 3, 2, 2) and x[1, 2, 1, 1] == 23
    nested = np.arange(24).reshape(2, 3, 2, 2).tolist()
    np.testing.assert_array_equal(request_tensor(_req(data=nested), SPEC, "logits"), x)


@pytest.mark.parametrize("over, message", [
    ({"name": "x"}, "model's input is 'input'"),
    ({"datatype": "INT64"}, "expects 'FP32'"),
    ({"shape": [2, 3, 4, 1]}, "expects \\[-1, 3, 2, 2\\]"),
    ({"shape": [0, 3, 2, 2], "data": []}, "expects"),
    ({"data": list(range(23))}, "needs 24 values, data has 23"),
    ({"data": ["a"] * 24}, "must be FP32 numbers"),
    ({"data": [[1, 2], [3]]}, "must be FP32 numbers"),
    ({"data": [float("nan")] * 24}, "NaN"),
])
def test_request_tensor_rejects_mismatches(over: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as e:
        request_tensor(_req(**over), SPEC, "logits")
    assert e.value.status == 400


def test_batcher_gathers_concurrent_requests_into_one_call() -> None:
    calls: list[list[int]] = []

    def run(parts: list[np.ndarray]) -> np.ndarray:
        calls.append([len(p) for p in parts])
        return np.concatenate(parts) * 10

    async def main() -> list[np.ndarray]:
        b = MicroBatcher("m", run, max_batch=8, max_delay_s=0.2)
        await b.start()
        sizes = [1, 2, 3, 1, 4]  # 1+2+3+1 = 7 fit one batch; 4 more would exceed 8 and waits
        outs = await asyncio.gather(*(b.submit(np.full((n, 1), i, dtype=np.float32))
                                      for i, n in enumerate(sizes)))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert calls == [[1, 2, 3, 1], [4]]
    for i, out in enumerate(outs):  # every request gets exactly its own rows back
        assert out.shape[0] == [1, 2, 3, 1, 4][i] and (out == 10 * i).all()


def test_batcher_runs_an_oversized_request_alone_and_reports_errors_to_its_waiters() -> None:
    def run(parts: list[np.ndarray]) -> np.ndarray:
        x = np.concatenate(parts)
        if (x < 0).any():
            raise ValueError("negative input")
        return x

    async def main() -> tuple[np.ndarray, BaseException, np.ndarray]:
        seen: list[int] = []
        b = MicroBatcher("m", run, max_batch=4, max_delay_s=0.0, on_batch=lambda n, s: seen.append(n))
        await b.start()
        big = await b.submit(np.ones((10, 1), dtype=np.float32))
        bad = await asyncio.gather(b.submit(-np.ones((1, 1), dtype=np.float32)), return_exceptions=True)
        ok = await b.submit(np.ones((1, 1), dtype=np.float32))  # the loop survived the error
        await b.close()
        assert seen == [10, 1]
        return big, bad[0], ok

    big, err, ok = asyncio.run(main())
    assert big.shape == (10, 1) and isinstance(err, ValueError) and ok.shape == (1, 1)


def test_model_inputs_normalises_images_once_per_batch_and_keeps_tensors(rgb: np.ndarray) -> None:
    from distill2deploy.serving.app import model_inputs

    images = fit_images([rgb, rgb[::-1]], 16)
    tensor = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    x = model_inputs([images[:1], tensor, images[1:]], META)  # a classify, an infer, a classify
    want = preprocess(images, mean=META["mean"], std=META["std"], input_size=16)
    np.testing.assert_array_equal(x[0], want[0])
    np.testing.assert_array_equal(x[1], tensor[0])
    np.testing.assert_array_equal(x[2], want[1])
