"""Device mesh, logical-axis rule tables, activation layouts and sharded placement (STYLE §5).

One concern per module: `rules` (tables, logical names -> PartitionSpec), `mesh` (mesh and the
multi-process runtime), `placement` (arrays into their shards), `context` (activation layouts
while tracing). Model-level entry points that build or run a sharded model (`init_model`,
`jit_forward`, `jit_train_step`, the expert-parallel MoE choice) live in `deepseek_v4.parallel`,
so nothing here imports the model.

Usage:
  mesh = sharding.make_mesh(fsdp=4, expert=2)
  model = parallel.init_model(cfg, mesh, "fsdp_ep")          # parameters born sharded
  forward = parallel.jit_forward(model, mesh, "fsdp_ep")     # explicit in/out shardings
  logits = forward(model, sharding.shard_batch(ids, mesh, "fsdp_ep"))
"""

from deepseek_v4.sharding.context import constrain, constrain_cache, place_batch, use
from deepseek_v4.sharding.mesh import initialize_distributed, make_mesh, mesh_shape, parse_mesh
from deepseek_v4.sharding.placement import (
  activation_sharding,
  batch_sharding,
  cache_shardings,
  put_host_array,
  replicated,
  shard_batch,
  token_sharding,
  with_shardings,
)
from deepseek_v4.sharding.rules import (
  MESH_AXES,
  RULES,
  RULES_fsdp,
  RULES_fsdp_ep,
  RULES_fsdp_tp,
  AxisRule,
  Rules,
  flat_shardings,
  get_rules,
  logical_to_spec,
  state_shardings,
  state_specs,
  variable_names,
)
