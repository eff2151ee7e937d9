"""hlo_stats: FLOPs, bytes and collectives read from compiled HLO, loops weighted by their trip
counts, against XLA's own cost analysis (loop-free programs) and hand counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from umg_jax import accelerators, hlo_stats

needs_libtpu = pytest.mark.skipif(not accelerators.tpu_compiler_available(),
                                  reason="libtpu (requirements-tpu.txt) not installed")


@pytest.fixture(scope="module")
def tpu_mesh():
    return Mesh(np.array(accelerators.topology_devices("v5e:2x2")), ("d",))


@pytest.fixture(scope="module")
def cpu_mesh():
    return Mesh(np.array(jax.devices()[:4]), ("d",))


def _compile(fn, mesh, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec))
            for s, spec in shapes]
    return jax.jit(fn).lower(*args).compile()


def _chain(x, w1, w2):
    return (x @ w1) @ w2  # matmuls only: XLA's flop count has no elementwise part


def _scanned(x, w):
    def body(h, wi):
        return h @ wi, None
    return jax.lax.scan(body, x, w)[0]


def _unrolled(x, w):
    for i in range(w.shape[0]):
        x = x @ w[i]
    return x


@pytest.mark.parametrize("platform", ["cpu", pytest.param("tpu", marks=needs_libtpu)])
def test_matmul_flops_equal_xla_cost_analysis(platform, request):
    mesh = request.getfixturevalue(f"{platform}_mesh")
    c = _compile(_chain, mesh, ((64, 256), P("d")), ((256, 512), P()), ((512, 128), P()))
    ours = hlo_stats.program_costs(c.as_text())
    hand = 2 * 16 * 256 * 512 + 2 * 16 * 512 * 128  # per device: 16 of the 64 rows
    assert ours["flops"] == hand
    # XLA adds the elementwise work around the dots (XLA:CPU upcasts bf16 dots: converts)
    assert ours["flops"] == pytest.approx(c.cost_analysis()["flops"], rel=0.05)
    assert ours["unknown_trip_counts"] == 0


@pytest.mark.parametrize("platform", ["cpu", pytest.param("tpu", marks=needs_libtpu)])
def test_scanned_layers_count_every_iteration(platform, request):
    """XLA's cost analysis counts a while body once; ours multiplies it by the trip count (on
    TPU read from the loop condition: the TPU compiler writes no known_trip_count)."""
    mesh = request.getfixturevalue(f"{platform}_mesh")
    shapes = (((64, 128), P("d")), ((6, 128, 128), P()))
    scanned = _compile(_scanned, mesh, *shapes)
    unrolled = _compile(_unrolled, mesh, *shapes)
    s, u = (hlo_stats.program_costs(c.as_text()) for c in (scanned, unrolled))
    hand = 6 * 2 * 16 * 128 * 128
    assert s["while_loops"] >= 1 and s["unknown_trip_counts"] == 0
    assert s["flops"] == u["flops"] == hand
    assert scanned.cost_analysis()["flops"] < hand / 2  # the undercount this module fixes


def test_collectives_inside_a_loop_are_multiplied(cpu_mesh):
    def f(x):
        def body(h, _):
            return h + jax.lax.psum(h, "d"), None
        return jax.shard_map(lambda x: jax.lax.scan(body, x, None, length=5)[0], mesh=cpu_mesh,
                             in_specs=P("d"), out_specs=P("d"))(x)

    c = jax.jit(f).lower(jax.ShapeDtypeStruct(
        (8, 1024), jnp.float32, sharding=NamedSharding(cpu_mesh, P("d")))).compile()
    r = hlo_stats.program_costs(c.as_text())
    assert r["collective_bytes"]["all-reduce"] == 5 * 2 * 1024 * 4  # 2 local rows, 5 trips
    assert r["ici_traffic_bytes"] == 2 * r["collective_bytes"]["all-reduce"]


def test_trip_count_from_the_loop_condition():
    text = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4] get-tuple-element(%p), index=1
  %ag = f32[16]{0} all-gather(%x), dimensions={0}
  %s = f32[4] slice(%ag), slice={[0:4]}
  ROOT %t = (s32[], f32[4]) tuple(%i, %s)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4] parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[4]) tuple(%z, %a)
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
  ROOT %o = f32[4] get-tuple-element(%w), index=1
}
"""
    r = hlo_stats.program_costs(text)
    assert r["while_loops"] == 1 and r["unknown_trip_counts"] == 0
    assert r["collective_bytes"] == {"all-gather": 12 * 16 * 4}
    unknown = text.replace("direction=LT", "direction=NE")
    assert hlo_stats.program_costs(unknown)["unknown_trip_counts"] == 1


def test_shape_bytes_skips_on_chip_memory_for_hbm():
    t = "(f32[8,128]{1,0:T(8,128)}, bf16[4,4]{1,0:T(4,128)(2,1)S(1)}, u32[]{:S(2)})"
    assert hlo_stats.shape_bytes(t) == 8 * 128 * 4 + 16 * 2 + 4
    assert hlo_stats.shape_bytes(t, hbm_only=True) == 8 * 128 * 4


@pytest.mark.parametrize("platform", ["cpu", pytest.param("tpu", marks=needs_libtpu)])
def test_scan_reads_one_layer_per_iteration(platform, request):
    """A scan over stacked weights slices one layer per step: traffic near the unrolled
    program's, not the whole stack per step (16x here)."""
    mesh = request.getfixturevalue(f"{platform}_mesh")
    shapes = (((64, 256), P("d")), ((16, 256, 256), P()))
    s, u = (hlo_stats.program_costs(_compile(f, mesh, *shapes).as_text())
            for f in (_scanned, _unrolled))
    stack = 16 * 256 * 256 * 2
    assert u["bytes_accessed"] >= stack  # every layer read once
    assert s["bytes_accessed"] < 3 * u["bytes_accessed"]
    assert s["bytes_accessed"] < 16 * stack, s  # the whole stack per step would be >= 16x


@needs_libtpu
def test_pallas_kernels_count_their_cost_estimate(tpu_mesh):
    """The flash-attention kernel is a tpu_custom_call: its FLOPs come from the cost estimate
    it carries (forward: q k^T and p v, 4 B H N^2 Dh at the padded length)."""
    from umg_jax.ops.attention import attention

    def f(q, k, v):
        return attention(q, k, v, implementation="pallas_flash")

    spec = P("d")
    with jax.sharding.use_abstract_mesh(tpu_mesh.abstract_mesh):
        c = _compile(f, tpu_mesh, *[((8, 256, 4, 64), spec)] * 3)
    r = hlo_stats.program_costs(c.as_text())
    assert r["custom_calls"].get("tpu_custom_call") == 1
    assert r["flops"] >= 4 * 2 * 4 * 256 * 256 * 64  # 2 local sequences, 4 heads
