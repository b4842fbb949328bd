"""FP8 / FP4 formats of docs/architecture.md#fp8-fp4 against an independent NumPy decoder: every
dequantized value bit for bit (edge blocks included), the quantizers' round trip, FP4 -> FP8
without loss, and the raw-bytes safetensors path for F8_E4M3 / F8_E8M0."""

from __future__ import annotations

import json
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_v4 import quant_codecs as quant
from deepseek_v4.checkpoint.safetensors_io import read_array, read_header, write_file

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)


# ----- the independent NumPy decoder and quantizer (bit formulas of docs/architecture.md#fp8-fp4) -
def np_e4m3(u8: np.ndarray) -> np.ndarray:
  u = u8.astype(np.int64)
  sign = np.where(u & 0x80, -1.0, 1.0)
  e, m = (u >> 3) & 0xF, u & 0x7
  val = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
  return np.where((e == 15) & (m == 7), np.nan, sign * val)


def np_e8m0(u8: np.ndarray) -> np.ndarray:
  u = u8.astype(np.int64)
  return np.where(u == 255, np.nan, 2.0 ** (u - 127))


def np_decode_fp8(w_u8: np.ndarray, s_u8: np.ndarray) -> np.ndarray:
  a, b = np.indices(w_u8.shape)
  return np_e4m3(w_u8) * np_e8m0(s_u8)[a // 128, b // 128]


def np_decode_fp4(packed: np.ndarray, s_u8: np.ndarray) -> np.ndarray:
  u = packed.view(np.uint8).astype(np.int64)
  codes = np.empty((u.shape[0], 2 * u.shape[1]), np.int64)
  codes[:, 0::2], codes[:, 1::2] = u & 0xF, u >> 4  # low nibble = element 2k
  a, b = np.indices(codes.shape)
  return E2M1[codes] * np_e8m0(s_u8)[a, b // 32]


def ref_quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """DeepSeek's rule (amax clamped to 1e-4, s = 2^ceil(log2(amax / 448))); E4M3 rounding by
  torch, so it shares nothing with the code under test."""
  torch = pytest.importorskip("torch")
  m, n = w.shape
  gm, gn = -(-m // 128), -(-n // 128)
  exp = np.zeros((gm, gn), np.int64)
  for i in range(gm):
    for j in range(gn):
      amax = max(float(np.abs(w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max()), 1e-4)
      exp[i, j] = int(np.ceil(np.log2(amax / 448.0)))
  s = 2.0 ** exp
  a, b = np.indices(w.shape)
  q = torch.from_numpy((w / s[a // 128, b // 128]).astype(np.float32)).to(torch.float8_e4m3fn)
  return q.view(torch.uint8).numpy(), (exp + 127).astype(np.uint8)


def ref_quantize_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """1x32 power-of-two scales (amax / 6) and nearest E2M1 codes by table search."""
  m, n = w.shape
  amax = np.maximum(np.abs(w).reshape(m, n // 32, 32).max(-1), 1e-4)
  exp = np.ceil(np.log2(amax / 6.0)).astype(np.int64)
  x = w / np.repeat(2.0 ** exp, 32, 1)
  codes = np.abs(x[..., None] - E2M1[:8]).argmin(-1) + 8 * (x < 0)
  packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
  return packed.view(np.int8), (exp + 127).astype(np.uint8)


def _weights(shape, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape) * rng.uniform(1e-3, 10, (shape[0], 1))
  return w.astype(np.float32)


# ----- decoding -----------------------------------------------------------------------------------
def test_every_e4m3_and_e8m0_byte_decodes_by_the_spec_formula():
  u = np.arange(256, dtype=np.uint8)
  ours = np.asarray(jnp.asarray(u.view(ml_dtypes.float8_e4m3fn)).astype(jnp.float32))
  np.testing.assert_array_equal(ours, np_e4m3(u).astype(np.float32))
  ours = np.asarray(jnp.asarray(u.view(ml_dtypes.float8_e8m0fnu)).astype(jnp.float32))
  np.testing.assert_array_equal(ours[:255], np_e8m0(u[:255]).astype(np.float32))
  assert np.isnan(ours[255])


@pytest.mark.parametrize("shape", [(96, 320), (480, 256), (300, 200), (128, 128), (5, 7)])
def test_fp8_dequantize_bit_for_bit_with_edge_blocks(shape):
  wq, s = ref_quantize_fp8(_weights(shape))
  assert s.shape == tuple(-(-n // 128) for n in shape)  # ceil grid: [96, 320] -> [1, 3]
  ref = np_decode_fp8(wq, s)
  for dtype in (jnp.float32, jnp.bfloat16):
    ours = quant.dequantize_fp8(jnp.asarray(wq.view(ml_dtypes.float8_e4m3fn)),
                                jnp.asarray(s.view(ml_dtypes.float8_e8m0fnu)), dtype=dtype)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours).astype(np.float64),
                                  ref.astype(np.float32).astype(dtype).astype(np.float64))


@pytest.mark.parametrize("shape", [(64, 96), (3, 64), (16, 80)])
def test_fp4_dequantize_bit_for_bit_low_nibble_first(shape):
  w = _weights(shape)
  if shape[1] % 32:
    w = np.concatenate([w, np.zeros((shape[0], 32 - shape[1] % 32), np.float32)], 1)
  packed, s = ref_quantize_fp4(w)
  packed, s = packed[:, :shape[1] // 2], s[:, :-(-shape[1] // 32)]
  ref = np_decode_fp4(packed, s)
  for dtype in (jnp.float32, jnp.bfloat16):
    ours = quant.dequantize_fp4(jnp.asarray(packed), jnp.asarray(s.view(ml_dtypes.float8_e8m0fnu)),
                                dtype=dtype)
    np.testing.assert_array_equal(np.asarray(ours).astype(np.float64),
                                  ref.astype(np.float32).astype(dtype).astype(np.float64))
  # One byte by hand: 0x2F holds element 0 = code 15 (-6) and element 1 = code 2 (1.0).
  one = quant.dequantize_fp4(jnp.asarray([[0x2F]], jnp.uint8),
                             jnp.asarray([[127]], jnp.uint8).view(jnp.float8_e8m0fnu))
  np.testing.assert_array_equal(np.asarray(one), [[-6.0, 1.0]])


def test_dequantize_a_window_equals_the_window_of_the_whole():
  wq, s = quant.quantize_fp8(_weights((300, 260)))
  whole = np.asarray(quant.dequantize_fp8(jnp.asarray(wq), jnp.asarray(s)))
  part = quant.dequantize_fp8(jnp.asarray(wq[150:290]), jnp.asarray(s[1:3]), offset=(150 - 128, 0))
  np.testing.assert_array_equal(np.asarray(part), whole[150:290])


# ----- quantizing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,shape", [("fp8", (300, 200)), ("fp8", (96, 320)), ("fp4", (40, 96))])
def test_quantize_is_decodable_close_and_idempotent(fmt, shape):
  w = _weights(shape, 1)
  w[:5, :40] = 0.0  # an all-zero block
  q, s = quant.quantize(fmt, w)
  s_u8 = s.view(np.uint8)
  ref = (np_decode_fp8(q.view(np.uint8), s_u8) if fmt == "fp8" else np_decode_fp4(q, s_u8))
  ours = np.asarray(quant.dequantize(quant.QuantSpec(fmt, shape), q, s))
  np.testing.assert_array_equal(ours, ref.astype(np.float32))
  # Relative to each block's max: E4M3 keeps 3 mantissa bits, E2M1 one.
  block = quant.FP8_BLOCK if fmt == "fp8" else quant.FP4_BLOCK
  amax = np.repeat(np.repeat(quant._block_amax(w, block), block[0], 0), block[1], 1)
  amax = amax[:shape[0], :shape[1]]
  err = np.abs(ours - w) / np.maximum(amax, 1e-30)
  assert err.max() <= (1 / 16 if fmt == "fp8" else 1 / 4)
  q2, s2 = quant.quantize(fmt, ours)  # quantizing the dequantized tensor gives the same bytes
  np.testing.assert_array_equal(q2.view(np.uint8), q.view(np.uint8))
  np.testing.assert_array_equal(s2.view(np.uint8), s_u8)


def test_fp4_experts_to_fp8_is_exact_or_refused():
  # sub-scales within a 128x128 block span <= 2^6 (docs/architecture.md#fp8-fp4)
  rng = np.random.default_rng(2)
  w = (rng.standard_normal((256, 320)) * rng.uniform(0.5, 4, (256, 1))).astype(np.float32)
  packed, s = quant.quantize_fp4(w)
  f8, s8 = quant.fp4_to_fp8(packed, s)
  assert s8.shape == (2, 3)
  np.testing.assert_array_equal(
    np.asarray(quant.dequantize_fp8(jnp.asarray(f8), jnp.asarray(s8))),
    np.asarray(quant.dequantize_fp4(jnp.asarray(packed), jnp.asarray(s))))
  w[3, :32] *= 2.0 ** 10  # one 1x32 group far above the rest of its 128x128 block
  packed, s = quant.quantize_fp4(w)
  with pytest.raises(ValueError, match=r"block \(0, 0\).*2\^(7|8|9|1\d)"):
    quant.fp4_to_fp8(packed, s)


# ----- raw bytes ----------------------------------------------------------------------------------
def test_f8_tensors_are_read_from_raw_bytes(tmp_path):
  """safetensors' own numpy backend cannot return F8_E8M0 on this stack; our reader views the
  raw bytes through ml_dtypes."""
  wq, s = quant.quantize_fp8(_weights((130, 140)))
  file = str(tmp_path / "q.safetensors")
  write_file(file, {"a.weight": wq, "a.scale": s, "b": np.arange(6, dtype=np.int64)})
  with open(file, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
  assert header["a.weight"]["dtype"] == "F8_E4M3" and header["a.scale"]["dtype"] == "F8_E8M0"
  infos, _ = read_header(file)
  got_w, got_s = read_array(infos["a.weight"]), read_array(infos["a.scale"])
  assert got_w.dtype == ml_dtypes.float8_e4m3fn and got_s.dtype == ml_dtypes.float8_e8m0fnu
  np.testing.assert_array_equal(got_w.view(np.uint8), wq.view(np.uint8))
  np.testing.assert_array_equal(read_array(infos["a.weight"], (slice(3, 9),)).view(np.uint8),
                                wq[3:9].view(np.uint8))
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file  # an independent reader agrees on every byte

  theirs = load_file(file)
  np.testing.assert_array_equal(theirs["a.weight"].view(torch.uint8).numpy(), wq.view(np.uint8))
  np.testing.assert_array_equal(theirs["a.scale"].view(torch.uint8).numpy(), s.view(np.uint8))
