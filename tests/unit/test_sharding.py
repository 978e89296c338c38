"""Mesh construction, the logical rules table, param/batch/optimizer-state shardings and their errors."""
from __future__ import annotations

import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from clover_jax import partitioning, run_setup
from clover_jax.models import layers

GOLDEN_SPECS = pathlib.Path(__file__).with_name("golden_partition_specs_toy.json")


class ToyEncoder(nn.Module):
    """Every logical axis of the vocabulary once, plus an unannotated parameter."""

    embed: int = 8
    vocab: int = 32

    @nn.compact
    def __call__(self, ids):
        words = layers.param_with_axes(self, "word_embeddings", layers.NORMAL_02, (self.vocab, self.embed),
                                       ("vocab", "embed"), jnp.float32)
        pos = layers.param_with_axes(self, "position_embeddings", layers.NORMAL_02, (ids.shape[1], self.embed),
                                     (None, "embed"), jnp.float32)
        table = layers.param_with_axes(self, "relative_position_bias_table", layers.NORMAL_02, (5, 2), (None, None),
                                       jnp.float32)
        x = words[ids] + pos[None] + table.sum()
        x = layers.layer_norm(name="norm")(x)
        x = layers.dense(16, ("embed", "heads"), name="qkv")(x)
        x = layers.dense(self.embed, ("heads", "embed"), name="attn_out")(x)
        x = layers.dense(32, ("embed", "mlp"), name="fc1")(x)
        x = layers.dense(self.embed, ("mlp", "embed"), name="fc2")(x)
        temperature = self.param("plain_scalar", nn.initializers.ones_init(), ())
        return layers.dense(4, ("embed", "classes"), name="classifier")(x.mean(1)) * temperature


def toy_init(rng, embed: int = 8):
    return ToyEncoder(embed=embed).init(rng, jnp.zeros((2, 6), jnp.int32))["params"]


def abstract_toy(embed: int = 8):
    return jax.eval_shape(lambda: toy_init(jax.random.key(0), embed))


@pytest.fixture(scope="module")
def mesh222():
    return partitioning.make_mesh({"data": 2, "fsdp": 2, "model": 2})


def test_make_mesh_fills_and_orders_axes():
    mesh = partitioning.make_mesh({"data": -1, "fsdp": 2, "model": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert mesh.devices.size == len(jax.devices()) == 8
    assert dict(partitioning.make_mesh({"data": -1}).shape) == {"data": 8}
    assert partitioning.make_mesh({"data": 1, "model": 1}, jax.devices()[:1]).devices.size == 1


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"data": 3, "model": 2}, "multiply to 6, but there are 8 devices"),
        ({"data": -1, "model": 3}, "multiply to 3, which does not divide 8"),
        ({"data": -1, "model": -1}, "at most one axis may be -1"),
        ({"data": 0, "model": 8}, "positive or -1"),
    ],
)
def test_make_mesh_errors(axes, message):
    with pytest.raises(ValueError, match=message):
        partitioning.make_mesh(axes)


def test_batch_sharding_and_replicas(mesh222):
    assert partitioning.batch_sharding(mesh222).spec == P(("data", "fsdp"))
    assert partitioning.num_data_replicas(mesh222) == 4
    data_only = partitioning.make_mesh({"data": 4, "model": 2})
    assert partitioning.batch_sharding(data_only).spec == P("data")
    assert partitioning.num_data_replicas(data_only) == 4
    assert dict(partitioning.rules_for_mesh(partitioning.LOGICAL_RULES, data_only))["embed"] is None
    assert partitioning.replicated(mesh222).is_fully_replicated


def test_global_batch_must_divide(mesh222):
    partitioning.check_global_batch(8, mesh222)
    with pytest.raises(ValueError, match=r"global batch size 6 is not divisible by 4"):
        partitioning.check_global_batch(6, mesh222)
    with pytest.raises(ValueError, match=r"global batch size 6 is not divisible by 4"):
        partitioning.shard_batch({"x": np.zeros((6, 3))}, mesh222)
    batch = partitioning.shard_batch({"x": np.arange(24.0).reshape(8, 3)}, mesh222)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 3)}


def test_param_shardings_follow_rules(mesh222):
    specs = {k: v for k, v in partitioning.partition_spec_table(abstract_toy(), mesh222).items()}
    assert specs["word_embeddings"] == str(P("model", "fsdp"))
    assert specs["position_embeddings"] == str(P(None, "fsdp"))
    assert specs["relative_position_bias_table"] == str(P(None, None))
    assert specs["qkv/kernel"] == str(P("fsdp", "model"))
    assert specs["fc2/kernel"] == str(P("model", "fsdp"))
    assert specs["classifier/kernel"] == str(P("fsdp", "model"))
    assert specs["norm/scale"] == str(P("fsdp"))
    assert specs["plain_scalar"] == str(P())


def test_partition_specs_match_golden_json(mesh222):
    table = partitioning.partition_spec_table(abstract_toy(), mesh222)
    if os.environ.get("REGENERATE_GOLDEN_SPECS"):
        golden = {"mesh": dict(mesh222.shape), "specs": table}
        GOLDEN_SPECS.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN_SPECS.read_text())
    assert golden["mesh"] == dict(mesh222.shape)
    assert table == golden["specs"], "partition specs changed; rerun with REGENERATE_GOLDEN_SPECS=1 if intended"


def test_indivisible_parameter_names_path_dim_axis_and_size():
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 4, "model": 2})
    with pytest.raises(ValueError, match=r"parameter attn_out/bias: dimension 0 has size 6, "
                                         r"not divisible by mesh axis fsdp of size 4"):
        partitioning.param_shardings(abstract_toy(embed=6), mesh)


def test_unknown_logical_name_fails(mesh222):
    abstract = {"w": nn.Partitioned(jax.ShapeDtypeStruct((4, 4), jnp.float32), names=("embed", "hidden"))}
    with pytest.raises(ValueError, match=r"parameter w uses logical axis 'hidden'"):
        partitioning.param_shardings(abstract, mesh222)


def test_create_sharded_params_are_born_sharded(mesh222):
    params, shardings = partitioning.create_sharded(toy_init, mesh222, partitioning.LOGICAL_RULES, jax.random.key(0))
    reference = nn.unbox(toy_init(jax.random.key(0)))
    for (path, got), ref, sharding in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(reference), jax.tree.leaves(shardings)
    ):
        assert got.sharding.is_equivalent_to(sharding, got.ndim), jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-9)  # same init, jit vs eager
    words = params["word_embeddings"]  # (32, 8) on (model=2, fsdp=2): each device holds (16, 4)
    assert {s.data.shape for s in words.addressable_shards} == {(16, 4)}


def test_opt_state_follows_params(mesh222):
    abstract = abstract_toy()
    shardings = partitioning.param_shardings(abstract, mesh222)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda _: True, p)))
    opt_sh = partitioning.opt_state_shardings(tx, nn.unbox(abstract), shardings, mesh222)
    adam_state = opt_sh[1][0]
    assert adam_state.mu["qkv"]["kernel"].spec == P("fsdp", "model")
    assert adam_state.nu["word_embeddings"].spec == P("model", "fsdp")
    assert adam_state.count.is_fully_replicated
    # Structure matches the real state, so it can be used as jit out_shardings.
    real = jax.eval_shape(tx.init, nn.unbox(abstract))
    is_sharding = lambda x: isinstance(x, jax.sharding.NamedSharding)  # noqa: E731
    assert jax.tree.structure(real) == jax.tree.structure(opt_sh, is_leaf=is_sharding)


def test_config_sharding_rules_replace_the_default_table(mesh222):
    """`config.sharding_rules` () is the default table; a table read back from config.json (lists) works."""
    assert run_setup.logical_rules(ml_collections.ConfigDict({"sharding_rules": ()})) == partitioning.LOGICAL_RULES
    no_fsdp = [[name, None if axes == "fsdp" else list(axes) if isinstance(axes, tuple) else axes]
               for name, axes in partitioning.LOGICAL_RULES]
    rules = run_setup.logical_rules(ml_collections.ConfigDict({"sharding_rules": no_fsdp}))
    assert dict(rules)["batch"] == ("data", "fsdp") and dict(rules)["embed"] is None
    default = partitioning.partition_spec_table(abstract_toy(), mesh222)
    table = partitioning.partition_spec_table(abstract_toy(), mesh222, rules)
    assert any("fsdp" in spec for spec in default.values())
    assert table.keys() == default.keys() and not any("fsdp" in spec for spec in table.values())
