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
# XLA:GPU, deviceless (the CUDA plugin of requirements-gpu.txt; the local backend stays the CPU)
needs_cuda = pytest.mark.skipif(not accelerators.gpu_compiler_available(),
                                reason="the CUDA plugin (requirements-gpu.txt) not installed")
PLATFORMS = ["cpu", pytest.param("tpu", marks=needs_libtpu), pytest.param("gpu", marks=needs_cuda)]


@pytest.fixture(scope="module")
def tpu_mesh():
    return Mesh(np.array(accelerators.topology_devices("v5e:2x2")), ("d",))


@pytest.fixture(scope="module")
def gpu_mesh():
    return Mesh(np.array(accelerators.topology_devices("h100:1x1x4")), ("d",))


@pytest.fixture(scope="module")
def cpu_mesh():
    return Mesh(np.array(jax.devices()[:4]), ("d",))


def _compile(fn, mesh, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec))
            for s, spec in shapes]
    return jax.jit(fn).lower(*args).compile(
        compiler_options=accelerators.compile_options(mesh.devices.flat) or None)


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


@pytest.mark.parametrize("platform", PLATFORMS)
def test_matmul_flops_equal_xla_cost_analysis(platform, request):
    mesh = request.getfixturevalue(f"{platform}_mesh")
    c = _compile(_chain, mesh, ((64, 256), P("d")), ((256, 512), P()), ((512, 128), P()))
    ours = hlo_stats.program_costs(c.as_text())
    hand = 2 * 16 * 256 * 512 + 2 * 16 * 512 * 128  # per device: 16 of the 64 rows
    assert ours["flops"] == hand
    if platform == "gpu":  # cuBLAS calls; XLA:GPU gives no cost analysis deviceless
        assert ours["custom_calls"] == {"__cublas$lt$matmul": 2}
        return
    # XLA adds the elementwise work around the dots (XLA:CPU upcasts bf16 dots: converts)
    assert ours["flops"] == pytest.approx(c.cost_analysis()["flops"], rel=0.05)
    assert ours["unknown_trip_counts"] == 0


@pytest.mark.parametrize("platform", PLATFORMS)
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
    if platform != "gpu":  # (XLA:GPU gives no cost analysis deviceless)
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


@pytest.mark.parametrize("platform", PLATFORMS)
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


# --- GPU library calls: cuBLAS and cuDNN custom calls (hand-written HLO in XLA:GPU's form) ---

_GEMM = """HloModule m

ENTRY %main (a: bf16[4,32,64], b: bf16[4,64,16]) -> bf16[4,32,16] {
  %a = bf16[4,32,64]{2,1,0} parameter(0)
  %b = bf16[4,64,16]{2,1,0} parameter(1)
  %g = (bf16[4,32,16]{2,1,0}, s8[1048576]{0}) custom-call(%a, %b), \
custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0",\
"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{\
"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],\
"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]},"epilogue":"DEFAULT"}}
  ROOT %o = bf16[4,32,16]{2,1,0} get-tuple-element(%g), index=0
}
"""  # (a backslash at a line's end continues the line: one HLO instruction per line)


def test_cublas_gemm_by_hand():
    r = hlo_stats.program_costs(_GEMM)
    assert r["custom_calls"] == {"__cublas$lt$matmul": 1}
    assert r["flops"] == 2 * 4 * 32 * 16 * 64  # batch x M x N x K
    # operands + result; the 1 MiB s8 workspace is scratch, not model traffic
    assert r["bytes_accessed"] == 2 * (4 * 32 * 64 + 4 * 64 * 16 + 4 * 32 * 16)
    # contracting lhs dim 1 of a [K, M] operand (a transposed gemm): 2 x M x N x K all the same
    t = (_GEMM.replace('"lhs_contracting_dimensions":["2"]', '"lhs_contracting_dimensions":["1"]')
         .replace("bf16[4,32,64]", "bf16[4,64,32]"))
    assert hlo_stats.program_costs(t)["flops"] == 2 * 4 * 32 * 16 * 64


def _fmha(target: str, flash: bool = True) -> str:
    q = "bf16[2,256,4,64]{3,2,1,0}"
    cfg = (f'{{"cudnn_fmha_backend_config": {{"fmha_scale": 0.125, "intermediate_tensor_shape": '
           f'{{"element_type": "BF16", "dimensions": ["2", "4", "256", "256"], "tuple_shapes": []'
           f'}}, "is_flash_attention": {str(flash).lower()}, "mask_type": "NO_MASK"}}}}')
    if "Backward" in target:
        out = f"({q}, {q}, {q}, u8[0]{{0}})"
        args = "%q, %q, %q, %stats, %o, %do"
    else:
        out = f"({q}, f32[2,4,256]{{2,1,0}}, u8[0]{{0}})"
        args = "%q, %q, %q"
    return f"""HloModule m

ENTRY %main (q: {q}, stats: f32[2,4,256], o: {q}, do: {q}) -> {q} {{
  %q = {q} parameter(0)
  %stats = f32[2,4,256]{{2,1,0}} parameter(1)
  %o = {q} parameter(2)
  %do = {q} parameter(3)
  %f = {out} custom-call({args}), custom_call_target="{target}", backend_config={cfg}
  ROOT %r = {q} get-tuple-element(%f), index=0
}}
"""


def test_cudnn_fused_attention_by_hand():
    """Forward: Q K^T and P V, 2 B H Nq Nk Dh each. Backward: dQ, dK, dP, dV and (flash) the
    recomputed Q K^T. Bytes: the operands and results, not the [B, H, N, N] scores."""
    bhqk, dh, arr = 2 * 4 * 256 * 256, 64, 2 * 256 * 4 * 64 * 2
    fwd = hlo_stats.program_costs(_fmha("__cudnn$fmhaSoftmax"))
    assert fwd["flops"] == 2 * 2 * bhqk * dh
    assert fwd["bytes_accessed"] == 3 * arr + arr + 2 * 4 * 256 * 4  # q k v in; o, stats out
    bwd = hlo_stats.program_costs(_fmha("__cudnn$fmhaSoftmaxBackward"))
    assert bwd["flops"] == 5 * 2 * bhqk * dh
    assert bwd["bytes_accessed"] == 5 * arr + 2 * 4 * 256 * 4 + 3 * arr
    old = hlo_stats.program_costs(_fmha("__cudnn$fmhaSoftmaxBackward", flash=False))
    assert old["flops"] == 4 * 2 * bhqk * dh  # non-flash keeps P: no recompute
    assert hlo_stats.fused_attention_calls(bwd["custom_calls"]) == {
        "__cudnn$fmhaSoftmaxBackward": 1}
    assert hlo_stats.attention_kernel(fwd["custom_calls"]) == "cudnn"
    assert hlo_stats.attention_kernel({"tpu_custom_call": 3.0}) == "pallas_flash"
    assert hlo_stats.attention_kernel({"__cublas$lt$matmul": 9.0}) == "xla"


@needs_cuda
def test_cudnn_attention_gradient_compiled_for_a_gpu(gpu_mesh):
    """A real XLA:GPU compile: the cuDNN forward and backward calls, and nothing else that
    multiplies: FLOPs exactly the hand count (2 local sequences of 256, 4 heads of 64)."""
    def f(q, k, v):
        o = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        return jnp.sum(o.astype(jnp.float32))

    c = _compile(jax.grad(f, argnums=(0, 1, 2)), gpu_mesh, *[((8, 256, 4, 64), P("d"))] * 3)
    r = hlo_stats.program_costs(c.as_text())
    assert hlo_stats.fused_attention_calls(r["custom_calls"]) == {
        "__cudnn$fmhaSoftmax": 1, "__cudnn$fmhaSoftmaxBackward": 1}
    bhqk = 2 * 4 * 256 * 256
    assert r["flops"] == (2 + 5) * 2 * bhqk * 64


@needs_cuda
def test_cudnn_convolutions_equal_the_cpu_count(gpu_mesh, cpu_mesh):
    """A convolution's gradient on XLA:GPU runs as three cuDNN calls (forward, backward input,
    backward filter): the same FLOPs as XLA:CPU's three convolution instructions, and each
    2 x output x kernel window x input features by hand."""
    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y.astype(jnp.float32) ** 2)

    shapes = (((8, 18, 18, 16), P("d")), ((3, 3, 16, 32), P()))
    g, cpu = (hlo_stats.program_costs(_compile(jax.grad(f, argnums=(0, 1)), m, *shapes)
                                      .as_text()) for m in (gpu_mesh, cpu_mesh))
    assert {k: v for k, v in g["custom_calls"].items() if "conv" in k} == {
        "__cudnn$convForward": 1, "__cudnn$convBackwardInput": 1,
        "__cudnn$convBackwardFilter": 1}
    fwd = 2 * (2 * 16 * 16 * 32) * (3 * 3 * 16)  # 2 local images, 16x16 outputs
    assert g["flops"] == cpu["flops"] == 3 * fwd


def test_breakdown_by_named_scope_adds_up_and_weights_loops(cpu_mesh):
    """Each op goes to the first named scope in its metadata; the parts add up to the program's
    totals; a scanned part counts every iteration (hand count: 2 * 64^3 per matmul)."""
    def f(x, w, ws):
        with jax.named_scope("image_tower"):
            x = x @ w
        with jax.named_scope("element_text"):
            x = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, ws)[0]
        return x

    c = _compile(f, cpu_mesh, ((64, 64), P()), ((64, 64), P()), ((3, 64, 64), P()))
    text = c.as_text()
    b = hlo_stats.breakdown(text, ("image_tower", "element_text", "loss"))
    totals = hlo_stats.program_costs(text)
    parts = b["parts"]
    assert parts["image_tower"]["flops"] == 2 * 64 ** 3
    assert parts["element_text"]["flops"] == 3 * 2 * 64 ** 3
    assert parts["loss"]["flops"] == parts["loss"]["bytes"] == 0
    assert sum(p["flops"] for p in parts.values()) == totals["flops"]
    assert sum(p["bytes"] for p in parts.values()) == pytest.approx(totals["bytes_accessed"])
    assert b["top_flops"][0]["part"] == "element_text"
    assert sorted(r["flops"] for r in b["top_flops"])[::-1] == [r["flops"] for r in b["top_flops"]]
