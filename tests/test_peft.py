"""LoRA (umg_jax/peft/lora.py) and PEFT training: deltas against hand computations on every kernel
layout, zero-init is the base model, optimizer state only for LoRA, the backbone bit-identical
after training, and merged loading / export."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from conftest import write_import_dir

import umg_jax
from umg_jax import checkpoint, config_lib, optim, train
from umg_jax import step as step_lib
from umg_jax.models import clip
from umg_jax.peft import lora

ROOT = pathlib.Path(__file__).parents[1]


def _cfg(**over):
    c = config_lib.load_config(str(ROOT / "configs/tiny_lora.py"))
    c.model.vision.update(image_size=32, patch_size=8, width=32, layers=2, heads=2)
    c.model.text.update(width=32, layers=1, heads=2, context_length=16)
    c.model.embed_dim = 32
    c.update(batch_size=8, total_steps=4)
    c.optim.warmup_steps = 1
    c.data.update(synthetic_num_train=16, synthetic_num_eval=8, max_tags=2, max_regions=3,
                  max_masks=3, synthetic_image_size=40)
    c.ckpt.every_steps = 4
    c.log.update(every_steps=2, tensorboard=False)
    for k, v in over.items():
        node = c
        *ps, leaf = k.split(".")
        for p in ps:
            node = node[p]
        node[leaf] = v
    return c


def _peft(rank=2, alpha=4.0, targets=(r"attn/(query|out)/kernel$", r"mlp/c_fc/kernel$")):
    return mlc.ConfigDict({"enabled": True, "rank": rank, "alpha": alpha, "targets": targets})


def _random_factors(factors, seed=0):
    rng = np.random.default_rng(seed)
    return {k: {n: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for n, v in f.items()}
            for k, f in factors.items()}


@pytest.mark.parametrize("scan", [False, True])
def test_deltas_match_hand_computation(scan):
    c = _cfg()
    c.model.scan = scan
    base = clip.init_params(c.model, jax.random.key(0))
    cfg = _peft()
    zero = lora.init(base, cfg, jax.random.key(1))
    same = lora.apply(base, zero, cfg)  # b = 0: exactly the base model
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    f = _random_factors(zero)
    eff = lora.apply(base, f, cfg)
    s = cfg.alpha / cfg.rank
    blk = "resblocks" if scan else "resblocks_0"
    root = base["text"]["transformer"][blk]
    got = eff["text"]["transformer"][blk]
    key = f"text.transformer.{blk}"
    take = (lambda x: np.asarray(x)[0]) if scan else np.asarray
    # query [D, H, Dh]: x @ W' = x @ W + s (x @ A) @ B with B reshaped to [r, H, Dh]
    a, b = take(f[f"{key}.attn.query.kernel"]["a"]), take(f[f"{key}.attn.query.kernel"]["b"])
    w = take(root["attn"]["query"]["kernel"])
    np.testing.assert_allclose(take(got["attn"]["query"]["kernel"]),
                               w + s * (a @ b).reshape(w.shape), rtol=1e-6, atol=1e-6)
    # out [H, Dh, D]: input dims (H, Dh) flattened
    a, b = take(f[f"{key}.attn.out.kernel"]["a"]), take(f[f"{key}.attn.out.kernel"]["b"])
    w = take(root["attn"]["out"]["kernel"])
    x = np.random.default_rng(1).normal(size=(5, *w.shape[:2]))
    np.testing.assert_allclose(np.einsum("nhd,hde->ne", x, take(got["attn"]["out"]["kernel"])),
                               np.einsum("nhd,hde->ne", x, w) + s * x.reshape(5, -1) @ a @ b,
                               rtol=1e-5, atol=1e-5)
    # untargeted kernels are untouched
    np.testing.assert_array_equal(np.asarray(got["mlp"]["c_proj"]["kernel"]),
                                  np.asarray(root["mlp"]["c_proj"]["kernel"]))


def test_bad_targets_and_report():
    base = clip.init_params(_cfg().model, jax.random.key(0))
    with pytest.raises(ValueError, match="match no kernel"):
        lora.init(base, _peft(targets=("nope",)), jax.random.key(0))
    f = lora.init(base, _peft(), jax.random.key(0))
    table = optim.trainable_report({"base": base, "lora": f}, ("base/.*",))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(f))
    assert table.splitlines()[-1].split()[2] == f"{n:,}"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    mp = pytest.MonkeyPatch()
    mp.setenv("UMG_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    c = _cfg()
    base = clip.init_params(c.model, jax.random.key(7))
    c.init.checkpoint = write_import_dir(tmp / "backbone", c.model, base)
    train.train(c, str(tmp / "wd"))
    mp.undo()
    return tmp / "wd", c, base


def test_training_changes_only_lora(lora_run):
    wd, c, base = lora_run
    abstract = jax.eval_shape(lambda: step_lib.init_params(c, jax.random.key(0)))
    got = checkpoint.restore_params_only(wd / "checkpoints" / "4", abstract)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(got["base"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # backbone bit-identical
    assert any(np.abs(np.asarray(f["b"])).max() > 0 for f in got["lora"].values())
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_optimizer_state_only_for_lora():
    from umg_jax import optim

    c = _cfg()
    params = step_lib.init_params(c, jax.random.key(0))
    tx, _ = optim.make_optimizer(c.optim, params, 10, freeze=step_lib.frozen_regexes(c))
    state = jax.eval_shape(tx.init, params)
    n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["lora"]))
    assert 2 * n_lora <= n_state <= 2 * n_lora + 16  # Adam mu + nu of the factors, + counters


def test_load_and_export_merge(lora_run, tmp_path, torch_mod):
    wd, c, _ = lora_run
    m = umg_jax.load(str(wd))
    abstract = jax.eval_shape(lambda: step_lib.init_params(c, jax.random.key(0)))
    raw = checkpoint.restore_params_only(wd / "checkpoints" / "4", abstract)
    merged = lora.apply(raw["base"], raw["lora"], c.peft)
    np.testing.assert_allclose(
        np.asarray(m.params["visual"]["transformer"]["resblocks_0"]["attn"]["query"]["kernel"]),
        np.asarray(merged["visual"]["transformer"]["resblocks_0"]["attn"]["query"]["kernel"]),
        rtol=1e-6)
    from safetensors.numpy import load_file

    from umg_jax.interop import export_torch

    export_torch.main([str(wd), "--format", "hf", "--out", str(tmp_path / "hf")])
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    q = sd["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    w = np.asarray(merged["visual"]["transformer"]["resblocks_0"]["attn"]["query"]["kernel"])
    np.testing.assert_allclose(q, w.reshape(w.shape[0], -1).T, rtol=1e-6)


# ----------------------------------------------------------------------- bottleneck adapters


def _adapter_cfg():
    c = _cfg()
    c.peft.method = "adapter"
    c.model.vision.adapter_dim = 8
    c.model.text.adapter_dim = 4
    return c


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapters_reproduce_the_base_model(scan):
    c = _adapter_cfg()
    c.model.scan = scan
    plain_cfg = mlc.ConfigDict(c.model.to_dict())
    plain_cfg.vision.adapter_dim = plain_cfg.text.adapter_dim = 0
    base = clip.init_params(plain_cfg, jax.random.key(3))
    params = step_lib.init_params(c, jax.random.key(0), base=base)
    assert "adapter" in params["visual"]["transformer"]["resblocks_0" if not scan
                                                        else "resblocks"]
    assert "adapter" in params["text"]["transformer"]["resblocks_0" if not scan else "resblocks"]
    img = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    tok = jnp.array([[49406, 320, 1929, 49407] + [0] * 12] * 2, jnp.int32)
    ours, ref = clip.build_model(c.model), clip.build_model(plain_cfg)
    for method, arg in ((clip.CLIP.encode_image, img), (clip.CLIP.encode_text, tok)):
        a = ours.apply({"params": params}, arg, method=method)
        b = ref.apply({"params": base}, arg, method=method)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # A non-zero adapter changes the output (the adapter is really in the forward pass).
    up = params["visual"]["transformer"]["resblocks_0" if not scan else "resblocks"]["adapter"][
        "up"]
    up["kernel"] = 0.1 * jax.random.normal(jax.random.key(5), up["kernel"].shape)
    a = ours.apply({"params": params}, img, method=clip.CLIP.encode_image)["img"]
    b = ref.apply({"params": base}, img, method=clip.CLIP.encode_image)["img"]
    assert float(jnp.abs(a - b).max()) > 1e-4


def test_adapter_optimizer_state_and_config_errors():
    from umg_jax import config_checks

    c = _adapter_cfg()
    params = jax.eval_shape(lambda: step_lib.init_params(c, jax.random.key(0)))
    tx, _ = optim.make_optimizer(c.optim, params, 10, freeze=step_lib.frozen_regexes(c))
    n_state = optim.count_float_elements(jax.eval_shape(tx.init, params))
    n_adapter = sum(int(np.prod(v.shape)) for p, v in jax.tree_util.tree_leaves_with_path(params)
                    if "adapter" in jax.tree_util.keystr(p))
    assert n_adapter > 0 and n_state == 2 * n_adapter  # Adam moments of the adapters only
    bad = _adapter_cfg()
    bad.model.vision.adapter_dim = bad.model.text.adapter_dim = 0
    with pytest.raises(config_checks.ConfigError, match="adapter_dim"):
        config_checks.validate(bad)
    bad = _adapter_cfg()
    bad.peft.method = "prefix"
    with pytest.raises(config_checks.ConfigError, match="peft.method"):
        config_checks.validate(bad)


def test_adapter_training_from_a_pretrained_backbone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UMG_JAX_CACHE", str(tmp_path / "cache"))
    c = _adapter_cfg()
    plain_cfg = mlc.ConfigDict(c.model.to_dict())
    plain_cfg.vision.adapter_dim = plain_cfg.text.adapter_dim = 0
    base = clip.init_params(plain_cfg, jax.random.key(7))
    c.init.checkpoint = write_import_dir(tmp_path / "backbone", plain_cfg, base)
    train.train(c, str(tmp_path / "wd"))
    assert "trainable" in capsys.readouterr().out  # the start-of-run report
    m = umg_jax.load(str(tmp_path / "wd"))
    flat_new = dict(jax.tree_util.tree_leaves_with_path(m.params))
    moved = 0
    for p, v in jax.tree_util.tree_leaves_with_path(base):
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_new[p]))  # frozen
    for p, v in flat_new.items():
        if "adapter" in jax.tree_util.keystr(p) and "up" in jax.tree_util.keystr(p):
            moved += float(np.abs(np.asarray(v)).max()) > 0
    assert moved > 0
    from umg_jax.interop import export_torch

    # HF export carries the adapters in a side file (read by interop/torch_model.py); the
    # open_clip state dict has no place for them and is refused, naming the format that works.
    export_torch.main([str(tmp_path / "wd"), "--format", "hf", "--out", str(tmp_path / "x")])
    assert (tmp_path / "x" / "umg_adapters.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        export_torch.main([str(tmp_path / "wd"), "--format", "open_clip", "--out",
                           str(tmp_path / "y")])
    assert e.value.code == 2
    assert "--format hf" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
