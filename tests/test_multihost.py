"""Two processes x 4 CPU devices (gloo collectives on localhost) give the same UMG loss, metrics
and gradients as one process x 8 devices."""

import os
import subprocess
import sys

import loss_case
import numpy as np
import pytest


def test_two_processes_match_one(tmp_path):
    import jax
    import ml_collections as mlc
    import portpicker

    from umg_jax import sharding

    if jax.device_count() != 8:
        pytest.skip("needs the 8 fake devices of tests/conftest.py")
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    script = os.path.join(os.path.dirname(__file__), "loss_case.py")
    outs = [str(tmp_path / f"p{i}.npz") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, script, str(port), str(i), outs[i]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]

    for out in outs:  # both hosts trim their text columns to the same lengths
        np.testing.assert_array_equal(np.load(out)["agree_max"], [6, 9])
    mesh = sharding.make_mesh(mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    for kind in ("softmax", "sigmoid"):
        outputs, batch = loss_case.make_case(0, 16, kind)
        (total, metrics), grads = loss_case.loss_and_grads(outputs, batch,
                                                           loss_case.loss_cfg(kind), mesh)
        ref = {"total": total, **{f"m_{k}": v for k, v in metrics.items()}}
        for k, v in jax.tree_util.tree_leaves_with_path(grads):
            ref["g_" + sharding.path_str(k)] = v
        for out in outs:
            got = np.load(out)
            assert sorted(k for k in got.files if k.startswith(kind + "/")) == sorted(
                f"{kind}/{k}" for k in ref)
            for k, v in ref.items():
                np.testing.assert_allclose(got[f"{kind}/{k}"], np.asarray(v), atol=1e-5,
                                           rtol=1e-5, err_msg=f"{kind}/{k}")
