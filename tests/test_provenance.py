"""umg_jax/provenance.py: what a recorded result says about how it was made."""

import subprocess

from umg_jax import provenance


def test_commit_is_the_checkout_the_run_started_from(monkeypatch):
    """A long run that ends after a new commit names the commit it started from, and says the
    checkout moved (``git_at_end``)."""
    head = subprocess.run(["git", "-C", str(provenance.ROOT), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    p = provenance.provenance(["x.py", "--flag"])
    assert p["command"] == "python x.py --flag"
    assert p["git_commit"] == provenance._AT_START[0]
    if head:  # a checkout (not an installed wheel)
        assert len(p["git_commit"]) == 40
    monkeypatch.setattr(provenance, "_AT_START", ("0" * 40, False))
    p = provenance.provenance(["x.py"])
    assert (p["git_commit"], p["git_dirty"]) == ("0" * 40, False)
    if head:
        assert p["git_at_end"]["commit"] == head
    assert p["machine"]["cores"] and "T" in p["date"]
