"""The collectives of a compiled program and the bytes each moves, read from its HLO text.

`collectives(compiled.as_text())` lists every all-gather, collective-permute, all-reduce,
reduce-scatter and all-to-all instruction of an optimized XLA program (sync, or the `-start` half of
an async pair; the `-done` half moves nothing new) with the bytes of its operand (what one device
contributes) and of its result (what it holds afterwards), per device. An instruction inside a
loop body (the scan over layers) is listed once: it is what one iteration, i.e. one layer of the
scanned group, moves. Context parallelism is checked with it against plan's arithmetic
(deepseek_v4/plan_context.py): per layer, a collective-permute of the previous slice's tail and an
all-gather of the compressed entries and indexer keys.

The text format is XLA's: `%name = f32[64,16]{1,0} all-gather(%x), replica_groups={{0,1,...}},
dimensions={0}`; newer XLA prints operands without their shapes, so an operand's bytes come from
the result and the group size (an all-gather's operand is its result / group size, a
reduce-scatter's is result x group size, the others' equal their result).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

OPS = ("all-gather", "collective-permute", "all-reduce", "reduce-scatter", "all-to-all",
       "ragged-all-to-all")

_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e5m2fnuz": 8,
         "f8e4m3fnuz": 8, "f8e4m3b11fnuz": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4, "token": 0}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
                    r"(?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction.

  Attributes:
    op: the collective ("all-gather", "collective-permute", ...), without "-start".
    name: the instruction's name; computation: the computation holding it (a loop body for
      scanned layers, "main"-like for the entry).
    operand_bytes: bytes one device sends in (its piece); result_bytes: what it holds after.
    group: devices per replica group (1 when the text names none).
    shapes: the result's array type as printed ("bf16[262144,512]"); a combined instruction
      (several arrays in one, as XLA's combiners make them) is listed once per array.
    source: the JAX operation it came from (the `op_name` of its metadata), or "".
  """

  op: str
  name: str
  computation: str
  operand_bytes: int
  result_bytes: int
  group: int
  shapes: tuple[str, ...]
  source: str = ""


def _bytes(dtype: str, dims: str) -> int:
  if dtype not in _BITS:
    raise ValueError(f"HLO element type {dtype!r} is not known; expected one of {sorted(_BITS)}")
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n * _BITS[dtype] // 8


def _group_size(line: str, partitions: int) -> int:
  """Devices per replica group, in each of XLA's spellings: explicit `{{0,1,..},..}`, iota
  `[groups,size]<=[..]`, named `mesh['a'=8,'b'=1] {'a'}`, or `{}` (every partition)."""
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
  if m:
    return len([x for x in m[1].split(",") if x])
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if m:
    return int(m[2])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m[1]))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m[2]))
  if re.search(r"replica_groups=\{\}", line):
    return partitions
  return 2 if "source_target_pairs=" in line else 1


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an optimized HLO module's text (`compiled.as_text()`), in order."""
  out, computation = [], ""
  partitions = re.search(r"num_partitions=(\d+)", hlo_text)
  partitions = int(partitions[1]) if partitions else 1
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      computation = header["name"]
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    shapes = [(t, d) for t, d in _SHAPE.findall(m["type"])]
    op, group = m["op"], _group_size(line, partitions)
    if m["start"]:  # async: (operands..., results..., [u32[] contexts]) as one tuple
      while len(shapes) > 2 and shapes[-1][1] == "":
        shapes.pop()
      shapes = shapes[len(shapes) // 2:] if len(shapes) > 1 else shapes
    source = re.search(r'op_name="([^"]*)"', line)
    # A combined collective (XLA merges several into one instruction) moves each array apart.
    for t, d in shapes:
      result = _bytes(t, d)
      operand = {"all-gather": result // max(group, 1),
                 "reduce-scatter": result * group}.get(op, result)
      out.append(Collective(op, m["name"], computation, operand, result, group, (f"{t}[{d}]",),
                            source[1] if source else ""))
  return out


def totals(found: list[Collective]) -> dict[str, dict[str, int]]:
  """{op: {"count", "operand_bytes", "result_bytes"}} summed over `found`."""
  acc: dict[str, dict[str, int]] = collections.defaultdict(
    lambda: dict(count=0, operand_bytes=0, result_bytes=0))
  for c in found:
    acc[c.op]["count"] += 1
    acc[c.op]["operand_bytes"] += c.operand_bytes
    acc[c.op]["result_bytes"] += c.result_bytes
  return dict(acc)
