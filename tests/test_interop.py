"""Tests of umg_jax/interop: numeric parity with transformers' CLIPModel and open_clip's CLIP on
the same random weights (import and export), bit-exact round trips, and bad inputs.

References are independent: the torch models are built by their own libraries from hand-written
configs; only the weights pass through our converters.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umg_jax.configs import common
from umg_jax.interop import export_torch, import_torch, infer, mapping
from umg_jax.models import clip

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5  # max abs diff, float32

TINY = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
            text_width=64, text_layers=2, text_heads=2, embed_dim=32, context_length=16,
            act="quick_gelu")  # head dim 32: heads must come from the config, not width / 64
B16 = dict(image_size=224, patch_size=16, vision_width=768, vision_layers=2, vision_heads=12,
           text_width=512, text_layers=2, text_heads=8, embed_dim=512, context_length=77,
           act="gelu")  # ViT-B/16 widths, 2 layers per tower


def _cfg(arch, **over):
    m = common.model_config(**arch)
    for k, v in over.items():
        m[k] = v
    return m


def _inputs(m, seed=0, size=None):
    """Images ``[2, S, S, 3]`` and CLIP-like tokens ``[3, L]`` (<start> ... <end>, 0 padding)."""
    rng = np.random.default_rng(seed)
    s = size or m.vision.image_size
    images = rng.normal(size=(2, s, s, 3)).astype(np.float32)
    L = m.text.context_length
    tokens = np.zeros((3, L), np.int64)
    for i, n in enumerate([3, L // 2, L - 1]):
        tokens[i, 0] = 49406
        tokens[i, 1:n] = rng.integers(1, 49405, n - 1)
        tokens[i, n] = 49407
    return images, tokens


def _logits(img, txt, log_scale):
    img = img / np.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    return np.exp(log_scale) * img @ txt.T


def _jax_forward(m, params, images, tokens):
    model = clip.build_model(m)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(images),
                               jnp.asarray(tokens, jnp.int32))
    img, txt = np.asarray(out["img"]), np.asarray(out["txt"])
    return img, txt, _logits(img, txt, float(np.asarray(params["logit_scale"])))


def _hf_forward(torch, model, images, tokens, **kw):
    with torch.no_grad():
        px = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
        ids = torch.from_numpy(tokens)
        out = model(input_ids=ids, pixel_values=px, **kw)
        img = model.get_image_features(pixel_values=px, **kw).pooler_output.numpy()
        txt = model.get_text_features(input_ids=ids).pooler_output.numpy()
    return img, txt, out.logits_per_image.numpy()


def _oc_forward(torch, model, images, tokens):
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        txt = model.encode_text(torch.from_numpy(tokens)).numpy()
    return img, txt, _logits(img, txt, float(model.logit_scale))


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b,
                                                                                strict=True))


def _randomize_torch(torch, model, seed):
    """Non-trivial weights: LayerNorm params and biases are not 1 / 0 (so a swapped or dropped
    one shows), matrices O(1) gain; embeddings keep the library's CLIP-like init (small, which
    makes LayerNorm eps matter as it does in real CLIP)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 0 or "embedding" in name:
                continue
            if any(s in name for s in ("ln_", "norm", "layrnorm")) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 2 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)


def _random_params(m, seed):
    """Random params of config ``m`` without running the (slow, op-by-op) Flax init: matrices
    with O(1) gain, LayerNorm scales / biases / temperatures off their constant init (so a
    swapped or dropped one shows), CLIP-like small embeddings."""
    rng = np.random.default_rng(seed)
    abstract = mapping.flatten(clip.abstract_params(m))
    canon = {}
    for k, shape in mapping.abstract_canonical_shapes(abstract).items():
        z = rng.normal(size=shape).astype(np.float32)
        leaf = k.rsplit("/", 1)[-1]
        if leaf == "scale":
            v = 1 + 0.1 * z
        elif leaf == "bias" and "/" in k:
            v = 0.1 * z
        elif k.startswith("logit_scale"):
            v = m.logit_scale_init + 0.1 * z
        elif k.startswith("logit_bias"):
            v = -10 + z
        elif leaf == "embedding" or k.endswith("positional_embedding"):
            v = 0.02 * z
        elif leaf == "class_embedding":
            v = z * shape[0] ** -0.5
        else:  # kernels: query/key/value [D, H, Dh] read D; the rest read all but the last axis
            fan_in = shape[0] if re.search(r"/(query|key|value)/", k) else np.prod(shape[:-1])
            v = z * float(fan_in) ** -0.5
        canon[k] = np.asarray(v, np.float32)
    return mapping.unflatten(mapping.to_model_layout(canon, abstract))


def _hf_reference(torch, arch):
    """A transformers CLIPModel built from a hand-written CLIPConfig for ``arch``."""
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_act=arch["act"], layer_norm_eps=1e-5)
    cfg = CLIPConfig(
        projection_dim=arch["embed_dim"],
        text_config=dict(vocab_size=49408, hidden_size=arch["text_width"],
                         intermediate_size=4 * arch["text_width"],
                         num_attention_heads=arch["text_heads"],
                         num_hidden_layers=arch["text_layers"],
                         max_position_embeddings=arch["context_length"],
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0, **common),
        vision_config=dict(hidden_size=arch["vision_width"],
                           intermediate_size=4 * arch["vision_width"],
                           num_attention_heads=arch["vision_heads"],
                           num_hidden_layers=arch["vision_layers"],
                           image_size=arch["image_size"], patch_size=arch["patch_size"],
                           **common))
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    _randomize_torch(torch, model, 1)
    return model


def _assert_error_exit(capsys, fn, out, match):
    """``fn()`` must exit with status 2, print one ``error:`` line on stderr, write nothing."""
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0], err[0]
    out = pathlib.Path(out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return err[0]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hf_tiny(torch_mod, tmp_path_factory):
    model = _hf_reference(torch_mod, TINY)
    d = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def hf_b16(torch_mod, tmp_path_factory):
    model = _hf_reference(torch_mod, B16)
    d = tmp_path_factory.mktemp("hf_b16")
    model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def open_clip_mod(torch_mod):
    import open_clip

    return open_clip


@pytest.fixture(scope="module")
def oc_tiny(torch_mod, open_clip_mod, tmp_path_factory):
    """open_clip CLIP with TINY shapes (head width 32) and QuickGELU, saved as a pickled .pt."""
    model = open_clip_mod.model.CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2)).eval()
    _randomize_torch(torch_mod, model, 2)
    path = tmp_path_factory.mktemp("oc_tiny") / "tiny.pt"
    torch_mod.save(model.state_dict(), path)
    return model, path


# ------------------------------------------------------------------------------ HF parity
@pytest.mark.parametrize("which", ["tiny", "b16"])
def test_import_hf_matches_transformers(which, request, torch_mod):
    model, d = request.getfixturevalue(f"hf_{which}")
    arch = TINY if which == "tiny" else B16
    params, m, report = import_torch.import_source(import_torch.load_source(str(d)))
    # Architecture inferred from the weights + config.json: same as the reference's.
    assert infer.arch_of_config(m) == {**{k: v for k, v in arch.items() if k != "act"},
                                       "vocab_size": 49408, "vision_mlp_ratio": 4.0,
                                       "text_mlp_ratio": 4.0}
    assert (m.act, m.ln_eps, report["format"]) == (arch["act"], 1e-5, "hf")
    images, tokens = _inputs(m)
    diff = _max_diff(_jax_forward(m, params, images, tokens),
                     _hf_forward(torch_mod, model, images, tokens))
    assert diff <= TOL, diff


@pytest.mark.parametrize("which,scan", [("tiny", False), ("b16", True)])
def test_export_hf_matches_transformers(which, scan, torch_mod, tmp_path):
    from transformers import CLIPModel

    m = _cfg(TINY if which == "tiny" else B16, scan=scan)
    params = _random_params(m, 3)
    export_torch.export_params(params, m, "hf", str(tmp_path / "hf"))
    model, info = CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["text_config"]["eos_token_id"] == 49407
    assert cfg["text_config"]["bos_token_id"] == 49406
    assert model.config.text_config.hidden_act == m.act
    images, tokens = _inputs(m, seed=1)
    diff = _max_diff(_jax_forward(m, params, images, tokens),
                     _hf_forward(torch_mod, model.eval(), images, tokens))
    assert diff <= TOL, diff


def test_export_hf_loads_with_clip_processor(torch_mod, tmp_path):
    """The HF export is a complete ``CLIPProcessor`` directory: its tokenizer gives umg_jax's
    ids (up to the first <|endoftext|>, after which HF pads with it and umg_jax with 0) and its
    image processor umg_jax's normalised pixels at the model's size."""
    from transformers import CLIPModel, CLIPProcessor

    from umg_jax.data.tokenizer import tokenizer_for
    from umg_jax.inference import MEAN, STD

    m = _cfg(TINY)
    export_torch.export_params(_random_params(m, 5), m, "hf", str(tmp_path / "hf"))
    proc = CLIPProcessor.from_pretrained(tmp_path / "hf", local_files_only=True)
    texts = ["a photo of a cat.", "Two DOGS, on the grass!", "traffic-light"]
    hf = proc.tokenizer(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
    ours = tokenizer_for("clip", 16)(texts)
    for h, o in zip(hf, ours, strict=True):
        n = list(o).index(49407) + 1
        assert list(h[:n]) == list(o[:n]) and all(t == 49407 for t in h[n:])
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    px = proc(images=img, return_tensors="pt")["pixel_values"][0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(px, (img / 255.0 - MEAN) / STD, atol=1e-5)
    model = CLIPModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    with torch_mod.no_grad():
        out = model(**proc(text=texts, images=[img], return_tensors="pt", padding=True))
    want = _hf_forward(torch_mod, model, px[None].astype(np.float32),
                       np.asarray(ours, np.int64))[1]
    np.testing.assert_allclose(out.text_embeds.numpy(), want / np.linalg.norm(
        want, axis=-1, keepdims=True), atol=1e-5)


# ------------------------------------------------------------------------------ open_clip parity
def test_import_open_clip_matches_open_clip(oc_tiny, torch_mod, capsys, tmp_path):
    model, path = oc_tiny
    m = _cfg(TINY)
    params, m2, report = import_torch.import_source(import_torch.load_source(str(path)), m)
    assert report["format"] == "classic"
    images, tokens = _inputs(m, seed=2)
    diff = _max_diff(_jax_forward(m, params, images, tokens),
                     _oc_forward(torch_mod, model, images, tokens))
    assert diff <= TOL, diff
    # A pickled open_clip state dict does not say its activation: --act or --config is needed.
    _assert_error_exit(capsys, lambda: import_torch.main([str(path), "--out",
                                                          str(tmp_path / "o")]),
                       tmp_path / "o", "--act")


@pytest.mark.parametrize("scan", [True])
def test_export_open_clip_loads_strictly_and_matches(scan, torch_mod, open_clip_mod, tmp_path):
    from safetensors.torch import load_file

    m = _cfg(B16, scan=scan, granularity_scales=True)
    params = _random_params(m, 4)
    out = tmp_path / "oc"
    info = export_torch.export_params(params, m, "open_clip", str(out))
    assert info["extras"] == ["logit_scale_mask", "logit_scale_pixel", "logit_scale_region",
                              "logit_scale_tags"]
    open_clip_mod.add_model_config(out / "umg-clip.json")
    model = open_clip_mod.create_model("umg-clip").eval()
    model.load_state_dict(load_file(out / "open_clip_model.safetensors"), strict=True)
    images, tokens = _inputs(m, seed=3)
    diff = _max_diff(_jax_forward(m, params, images, tokens),
                     _oc_forward(torch_mod, model, images, tokens))
    assert diff <= TOL, diff


def test_export_open_clip_pt_and_local_dir(oc_tiny, torch_mod, open_clip_mod, tmp_path):
    """The ``.pt`` form loads strictly into open_clip's own model, and ``local-dir:`` works."""
    model, path = oc_tiny
    m = _cfg(TINY)
    params, _, _ = import_torch.import_source(import_torch.load_source(str(path)), m)
    export_torch.export_params(params, m, "open_clip", str(tmp_path / "x.pt"))
    sd = torch_mod.load(tmp_path / "x.pt", weights_only=True)
    ref = model.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch_mod.equal(sd[k], ref[k]) for k in ref)  # bit-exact torch -> jax -> torch
    assert json.loads((tmp_path / "x.json").read_text())["quick_gelu"] is True
    export_torch.export_params(params, m, "open_clip", str(tmp_path / "dir"))
    loaded = open_clip_mod.create_model(f"local-dir:{tmp_path / 'dir'}").eval()
    images, tokens = _inputs(m, seed=4)
    assert _max_diff(_oc_forward(torch_mod, loaded, images, tokens),
                     _oc_forward(torch_mod, model, images, tokens)) == 0.0


# ------------------------------------------------------------------------------ OpenAI TorchScript
# OpenAI-shaped (head dim 64, as every OpenAI ViT: the importer infers heads from it), 2 heads.
OPENAI_TINY = dict(image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2,
                   text_width=128, text_layers=2, text_heads=2, embed_dim=32, context_length=16,
                   act="quick_gelu")
OPENAI_META = ("input_resolution", "context_length", "vocab_size")  # int buffers, no weights


def _open_clip_openai(open_clip, arch):
    """open_clip's classic CLIP (OpenAI's own architecture and parameter names)."""
    return open_clip.model.CLIP(
        embed_dim=arch["embed_dim"], quick_gelu=True,
        vision_cfg=dict(image_size=arch["image_size"], layers=arch["vision_layers"],
                        width=arch["vision_width"], patch_size=arch["patch_size"],
                        head_width=arch["vision_width"] // arch["vision_heads"]),
        text_cfg=dict(context_length=arch["context_length"], vocab_size=49408,
                      width=arch["text_width"], heads=arch["text_heads"],
                      layers=arch["text_layers"])).eval()


def _openai_jit_archive(torch, model, path):
    """Writes ``model`` as OpenAI's ``ViT-*.pt`` are: a traced TorchScript module (forward: image
    and text features) whose state dict has OpenAI's names, fp16 weights, the three int buffers
    ``input_resolution`` / ``context_length`` / ``vocab_size``, and no ``attn_mask`` (OpenAI's
    causal mask is a traced constant; open_clip's non-persistent buffer would be saved by
    TorchScript, so the text mask is kept off the traced module). ``model`` is left as it was."""
    import copy

    model = copy.deepcopy(model)  # the fp16 cast below is in place

    class OpenAIArchive(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("visual", "transformer", "token_embedding", "ln_final",
                         "positional_embedding", "text_projection", "logit_scale"):
                setattr(self, name, getattr(model, name))
            v = model.visual
            for name, value in zip(OPENAI_META, (v.image_size[0], model.context_length,
                                                 model.vocab_size), strict=True):
                self.register_buffer(name, torch.tensor(value))
            object.__setattr__(self, "clip", model)  # not a submodule: its params are ours

        def forward(self, image, text):
            return self.clip.encode_image(image), self.clip.encode_text(text)

    wrapper = OpenAIArchive().eval()
    s = model.visual.image_size[0]
    example = (torch.zeros(1, 3, s, s), torch.zeros(1, model.context_length, dtype=torch.long))
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    torch.jit.save(traced.half(), str(path))


def test_openai_torchscript_fp16_archive_imports_and_matches_open_clip(
        torch_mod, open_clip_mod, tmp_path):
    """The flagship route, ``import_torch ViT-L-14.pt`` with no flags, on a small archive made
    the way OpenAI's are. Reference: open_clip's CLIP strictly loaded with the archive's weights
    (fp16 -> fp32). That cast is exact, so both sides compute with the same float32 numbers and
    the float32 parity bound (TOL) holds; the fp16 rounding itself is checked to be present, by
    the distance to the fp32 model the archive was cut from (> 100 x TOL)."""
    import umg_jax

    torch = torch_mod
    arch = OPENAI_TINY
    model = _open_clip_openai(open_clip_mod, arch)
    _randomize_torch(torch, model, 6)
    path = tmp_path / "ViT-T-8.pt"
    _openai_jit_archive(torch, model, path)

    archive = torch.jit.load(str(path)).state_dict()
    assert set(archive) == set(model.state_dict()) | set(OPENAI_META)  # OpenAI's key set
    assert {"visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj", "logit_scale",
            "positional_embedding", "token_embedding.weight"} <= set(archive)
    assert {v.dtype for k, v in archive.items() if k not in OPENAI_META} == {torch.float16}

    import_torch.main([str(path), "--out", str(tmp_path / "imp")])
    report = json.loads((tmp_path / "imp" / "import_report.json").read_text())
    assert (report["format"], report["act"], report["ln_eps"]) == ("classic", "quick_gelu", 1e-5)
    assert sorted(report["ignored"]) == sorted(OPENAI_META)
    ours = umg_jax.load(str(tmp_path / "imp"))
    assert infer.arch_of_config(ours.config) == {**{k: v for k, v in arch.items() if k != "act"},
                                                 "vocab_size": 49408, "vision_mlp_ratio": 4.0,
                                                 "text_mlp_ratio": 4.0}

    ref = _open_clip_openai(open_clip_mod, arch)
    ref.load_state_dict({k: v.float() for k, v in archive.items() if k not in OPENAI_META},
                        strict=True)
    images, tokens = _inputs(ours.config, seed=7)
    got = (ours.encode_image(images)[0], ours.encode_text(tokens))
    got += (_logits(*got, float(np.asarray(ours.params["logit_scale"]))),)
    want = _oc_forward(torch, ref, images, tokens)
    diff = _max_diff(got, want)
    assert diff <= TOL, diff
    with torch.no_grad():  # the archive is a working TorchScript model of those weights
        traced = torch.jit.load(str(path)).float()(
            torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(tokens))
    assert _max_diff([t.numpy() for t in traced], want[:2]) <= TOL
    fp16_effect = _max_diff(got, _oc_forward(torch, model, images, tokens))
    assert fp16_effect > 100 * TOL, fp16_effect


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_import_export_round_trip_bit_exact(fmt, tmp_path):
    m = _cfg(TINY, scan=True, granularity_scales=True, logit_bias_init=-10.0)
    params = _random_params(m, 5)
    export_torch.export_params(params, m, fmt, str(tmp_path / "x"))
    back, _, report = import_torch.import_source(
        import_torch.load_source(str(tmp_path / "x")), m)
    assert report["initialised"] == []  # extras came back from the side file
    a, b = mapping.flatten(params), mapping.flatten(back)
    assert a.keys() == b.keys()
    assert "visual/transformer/resblocks/ln_1/scale" in a  # really scanned
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # Without a config the architecture (incl. the extras) is inferred, unscanned.
    flat, m2, _ = import_torch.import_source(import_torch.load_source(str(tmp_path / "x")))
    assert m2.granularity_scales and m2.logit_bias_init == float(params["logit_bias"])
    c = mapping.to_canonical(mapping.flatten(flat))
    assert c.keys() == mapping.to_canonical(a).keys()


def test_cli_import_then_export_reproduces_hf_weights(hf_tiny, tmp_path):
    """HF dir -> import CLI -> orbax -> export CLI -> HF dir: identical tensors; also from a
    training-workdir layout (params + opt_state + step under checkpoints/<step>/state)."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file

    _, d = hf_tiny
    import_torch.main([str(d), "--out", str(tmp_path / "imp")])
    assert (tmp_path / "imp" / "model_config.json").is_file()
    export_torch.main([str(tmp_path / "imp"), "--format", "hf", "--out", str(tmp_path / "exp")])
    ref = load_file(d / "model.safetensors")
    got = load_file(tmp_path / "exp" / "model.safetensors")
    assert ref.keys() == got.keys()
    assert all(np.array_equal(ref[k], got[k]) for k in ref)

    m = import_torch.load_model_config(str(tmp_path / "imp" / "model_config.json"))
    params = export_torch.restore_params(tmp_path / "imp" / "params", m)
    wd = tmp_path / "wd"
    ck = ocp.StandardCheckpointer()
    ck.save(wd / "checkpoints" / "7" / "state",
            {"params": params, "opt_state": {"mu": np.ones(3, np.float32)}, "step": np.int32(7)})
    ck.wait_until_finished()
    (wd / "config.json").write_text(json.dumps({"model": m.to_dict()}))
    export_torch.main([str(wd), "--format", "hf", "--out", str(tmp_path / "exp2")])
    got2 = load_file(tmp_path / "exp2" / "model.safetensors")
    assert all(np.array_equal(ref[k], got2[k]) for k in ref)


# ------------------------------------------------------------------------------ parity pitfalls
def test_wrong_activation_or_eps_breaks_parity_and_is_refused(hf_tiny, torch_mod):
    """The parity test above would fail with QuickGELU <-> GELU or eps 1e-6, and the importer
    refuses a config that disagrees with the checkpoint on either."""
    model, d = hf_tiny
    src = import_torch.load_source(str(d))
    params, m, _ = import_torch.import_source(src)
    images, tokens = _inputs(m)
    ref = _hf_forward(torch_mod, model, images, tokens)
    assert _max_diff(_jax_forward(m, params, images, tokens), ref) <= TOL
    wrong_act = _max_diff(_jax_forward(_cfg(TINY, act="gelu"), params, images, tokens), ref)
    wrong_eps = _max_diff(_jax_forward(_cfg(TINY, ln_eps=1e-6), params, images, tokens), ref)
    assert wrong_act > 100 * TOL, wrong_act
    assert wrong_eps > 10 * TOL, wrong_eps
    with pytest.raises(mapping.InteropError, match="act mismatch"):
        import_torch.import_source(src, _cfg(TINY, act="gelu"))
    with pytest.raises(mapping.InteropError, match="ln_eps mismatch"):
        import_torch.import_source(src, _cfg(TINY, ln_eps=1e-6))


def test_config_shape_mismatch_names_first_key(hf_tiny, capsys, tmp_path):
    _, d = hf_tiny
    cfg = tmp_path / "m.json"
    cfg.write_text(_cfg({**TINY, "text_width": 128}).to_json())
    err = _assert_error_exit(
        capsys, lambda: import_torch.main([str(d), "--config", str(cfg), "--out",
                                           str(tmp_path / "o")]), tmp_path / "o",
        "shape mismatch at text_model.embeddings.token_embedding.weight")
    assert "(49408, 64)" in err and "(49408, 128)" in err


def test_unknown_and_missing_keys_are_listed(oc_tiny, torch_mod, tmp_path):
    from safetensors.numpy import save_file

    model, _ = oc_tiny
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd["visual.extra_head.weight"] = np.zeros((2, 2), np.float32)
    del sd["ln_final.bias"]
    save_file(sd, str(tmp_path / "x.safetensors"))
    src = import_torch.load_source(str(tmp_path / "x.safetensors"))
    with pytest.raises(mapping.InteropError) as e:
        import_torch.import_source(src, _cfg(TINY))
    assert "missing keys: ln_final.bias" in str(e.value)
    assert "unknown keys: visual.extra_head.weight" in str(e.value)


# ------------------------------------------------------------------------------ resize
def test_resize_matches_torch_bicubic_and_hf_interpolation(hf_tiny, torch_mod, capsys, tmp_path):
    model, d = hf_tiny
    m48 = _cfg({**TINY, "image_size": 48})
    cfg = tmp_path / "m48.json"
    cfg.write_text(m48.to_json())
    out = tmp_path / "o"
    _assert_error_exit(capsys, lambda: import_torch.main([str(d), "--config", str(cfg), "--out",
                                                          str(out)]), out, "--allow_resize")
    import_torch.main([str(d), "--config", str(cfg), "--out", str(out), "--allow_resize"])
    params = export_torch.restore_params(out / "params", m48)
    pos = np.asarray(params["visual"]["positional_embedding"])
    src = model.vision_model.embeddings.position_embedding.weight.detach()
    grid = src[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = torch_mod.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic",
                                               align_corners=False)
    np.testing.assert_allclose(pos[1:], want.permute(0, 2, 3, 1).reshape(36, -1).numpy(),
                               atol=1e-6)
    np.testing.assert_array_equal(pos[0], src[0].numpy())  # class slot kept
    images, tokens = _inputs(m48, seed=5)
    diff = _max_diff(_jax_forward(m48, params, images, tokens),
                     _hf_forward(torch_mod, model, images, tokens, interpolate_pos_encoding=True))
    assert diff <= TOL, diff


# ------------------------------------------------------------------------------ bad inputs
def test_truncated_file_cli_subprocess(hf_tiny, tmp_path):
    _, d = hf_tiny
    data = (d / "model.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "umg_jax.interop.import_torch", str(bad), "--out",
                        str(out), "--act", "gelu"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated" in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_truncated_pt(oc_tiny, capsys, tmp_path):
    _, path = oc_tiny
    data = path.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: len(data) // 3])
    _assert_error_exit(capsys, lambda: import_torch.main([str(bad), "--out", str(tmp_path / "o"),
                                                          "--act", "gelu"]),
                       tmp_path / "o", "truncated")


def test_resnet_state_dict_refused(capsys, tmp_path):
    from safetensors.numpy import save_file

    z = np.zeros((4, 4), np.float32)
    sd = {"visual.conv1.weight": np.zeros((32, 3, 3, 3), np.float32),
          "visual.layer1.0.conv1.weight": np.zeros((8, 32, 1, 1), np.float32),
          "visual.attnpool.positional_embedding": z, "token_embedding.weight": z}
    save_file(sd, str(tmp_path / "rn50.safetensors"))
    _assert_error_exit(capsys, lambda: import_torch.main([str(tmp_path / "rn50.safetensors"),
                                                          "--out", str(tmp_path / "o"),
                                                          "--act", "quick_gelu"]),
                       tmp_path / "o", "ResNet CLIP")


# ------------------------------------------------------------------------------ portability
def _siglip_import(tmp_path, spm_model):
    """A tiny big_vision SigLIP import dir (its SentencePiece model copied in), via the CLI."""
    from test_big_vision import TINY as BV
    from test_big_vision import siglip_weights

    np.savez(tmp_path / "s.npz", **siglip_weights(BV))
    out = tmp_path / "first_place" / "imp"
    import_torch.main([str(tmp_path / "s.npz"), "--out", str(out), "--tokenizer", spm_model])
    return out


def _moved(src, dst):
    """``shutil.move``; the old parent is removed, so nothing can be read from there any more."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dst)
    shutil.rmtree(src.parent)
    return dst


def _check_loads_and_exports(d, spm_model, tmp_path, name):
    """``umg_jax.load`` tokenizes with ``d``'s own copy of the SentencePiece model and export
    reads ``d``: the path-dependent parts of using a moved directory."""
    import umg_jax
    from umg_jax.data.tokenizer import SentencePieceTokenizer

    model = umg_jax.load(str(d))
    assert model.config.text.tokenizer == str(d / "tokenizer.model")
    texts = ["a photo of a cat", "red car"]
    ref = SentencePieceTokenizer(spm_model, model.config.text.context_length, 1)(texts)
    np.testing.assert_array_equal(model.tokenize(texts), ref)
    assert np.isfinite(model.embed_text(texts)).all()
    export_torch.main([str(d), "--format", "hf", "--out", str(tmp_path / f"exp_{name}")])
    assert (tmp_path / f"exp_{name}" / "model.safetensors").is_file()
    return model


def _siglip_run_config(model_cfg):
    """configs/tiny.py training ``model_cfg`` (a SigLIP: sigmoid loss)."""
    from umg_jax import config_lib

    config = config_lib.load_config(str(ROOT / "configs/tiny.py"))
    config.model = model_cfg
    config.loss.kind = "sigmoid"
    config.batch_size = 8
    return config


def _check_init_from(d, model_cfg):
    """What training's ``init.checkpoint`` does with ``d`` before the first step: the config
    checks (same model, same tokenizer by content) and the params restore."""
    from umg_jax import checkpoint, config_checks

    config = _siglip_run_config(model_cfg)
    config.init.checkpoint = str(d)
    config_checks.validate(config, 8)
    src, _ = checkpoint.locate(str(d))
    abstract = clip.abstract_params(model_cfg)
    restored = checkpoint.restore_params_only(src, abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)


def test_moved_import_dir_and_workdir_load_init_and_export(tmp_path, spm_model):
    """An import dir and a workdir, each moved to another folder after it was written (the old
    folder gone): ``umg_jax.load``, export and training's ``init.checkpoint`` use the copy of the
    tokenizer they hold. Import dirs written with an absolute path still load. (A real training
    run from a moved import dir, its workdir moved too: tests/test_train.py.)"""
    from safetensors.numpy import load_file

    import umg_jax
    from umg_jax import checkpoint, train

    first = _siglip_import(tmp_path, spm_model)
    stored = json.loads((first / "model_config.json").read_text())["text"]["tokenizer"]
    assert stored == "tokenizer.model"  # relative: nothing names the first place
    imp = _moved(first, tmp_path / "second_place" / "imp")
    model = _check_loads_and_exports(imp, spm_model, tmp_path, "imp")
    _check_init_from(imp, model.config)

    # A workdir as training writes it: config.json (tokenizer copied in) + a step checkpoint.
    wd = tmp_path / "first_run" / "wd"
    wd.mkdir(parents=True)
    train._write_config(_siglip_run_config(model.config), str(wd))
    assert json.loads((wd / "config.json").read_text())["model"]["text"]["tokenizer"] == \
        "tokenizer.model"
    with checkpoint.Checkpointer(wd, every_steps=1, keep=1, async_save=False) as ck:
        ck.save(3, {"params": model.params, "step": np.int32(3)})
    wd = _moved(wd, tmp_path / "second_run" / "wd")
    _check_loads_and_exports(wd, spm_model, tmp_path, "wd")
    _check_init_from(wd, model.config)
    a, b = (load_file(tmp_path / f"exp_{n}" / "model.safetensors") for n in ("imp", "wd"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # An import dir written before paths were relative: an absolute path that still exists is
    # used as is; one that no longer exists falls back to the copy inside the directory.
    cfg = json.loads((imp / "model_config.json").read_text())
    for old, want in ((spm_model, spm_model),
                      (str(first / "tokenizer.model"), str(imp / "tokenizer.model"))):
        cfg["text"]["tokenizer"] = old
        (imp / "model_config.json").write_text(json.dumps(cfg))
        assert umg_jax.load(str(imp)).config.text.tokenizer == want
