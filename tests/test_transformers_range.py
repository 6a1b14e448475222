"""The supported transformers range: one clear error outside it, the cache under the installed release's name inside.

The suite as a whole runs on every release CI tests (`.ci/run`: the oldest supported, the lock, the newest on PyPI);
these tests pin what differs between releases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from modeling_mlmamba import transformers_compat as hf
from tests.tiny import image_prompt_ids, tiny_model

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path, pythonpath: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, "HF_MODULES_CACHE": str(cwd / "modules")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("installed", ["5.17.0", "5.9.1", "6.0.0", "6.1.0.dev0"])
def test_a_transformers_outside_the_range_gets_one_clear_error_at_import(installed, tmp_path):
    """As a user with that release installed sees it: importing the package raises ImportError naming the installed
    release and the supported range (the release is faked before the import; nothing else of it is used)."""
    result = _run(f"""
        import transformers
        transformers.__version__ = {installed!r}
        try:
            import modeling_mlmamba
        except ImportError as error:
            print("ERROR:", error)
        else:
            print("imported")
    """, tmp_path, str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.strip().splitlines()[-1]
    expected = (f"ERROR: ML-Mamba (modeling_mlmamba) supports transformers>=5.18.0,<6, but transformers {installed} "
                f'is installed. Install a supported release, e.g. `pip install "transformers>=5.18.0,<6"`.')
    assert out == expected


def test_remote_code_of_a_saved_folder_refuses_an_unsupported_transformers_clearly(tmp_path):
    """The same check in a saved folder's own code (what a Hub user runs), in a process without the package."""
    folder = tmp_path / "model"
    tiny_model(seed=3).save_pretrained(folder)
    assert (folder / "transformers_compat.py").is_file()  # save_pretrained copied it with the model's code
    result = _run(f"""
        import transformers
        transformers.__version__ = "5.16.1"
        from transformers import AutoModelForImageTextToText
        try:
            AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True)
        except ImportError as error:
            print("ERROR:", error)
    """, tmp_path, "")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "supports transformers>=5.18.0,<6, but transformers 5.16.1 is installed" in result.stdout


def test_the_installed_release_is_inside_the_range_the_package_declares():
    """pyproject.toml's requirement and the import check state the same range."""
    text = (REPO / "pyproject.toml").read_text()
    assert '"transformers' + hf.supported_range().replace(".0,", ",") + '"' in text
    assert hf.TRANSFORMERS_RELEASE == hf.check_transformers_version(transformers.__version__)


def test_forward_returns_the_cache_under_the_installed_releases_name_and_takes_either_name():
    """generate() reads the cache back from outputs by the release's name (`cache` from 5.24, `cache_params`
    before): a forward that answered under the other name would decode every step without its state."""
    model = tiny_model(seed=4)
    ids = image_prompt_ids(model.config, [5, 6, 7])
    pv = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pv, use_cache=True)
        expected_name = "cache" if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 24) \
            else "cache_params"
        assert expected_name in out.keys() and out[expected_name] is out.cache
        state = [t.clone() for t in hf.layer_states(out.cache.layers[0])]
        step = torch.tensor([[9]])
        # the same step through either name continues the same state (compared on two copies of the cache)
        by_new = model(input_ids=step, cache=out.cache, use_cache=True).logits
        again = model(input_ids=ids, pixel_values=pv, use_cache=True).cache
        by_old = model(input_ids=step, cache_params=again, use_cache=True).logits
        fresh = model(input_ids=step, use_cache=True).logits  # no state: what a dropped cache would decode
    assert torch.equal(by_new, by_old)
    assert not torch.allclose(by_new, fresh)
    assert not torch.equal(hf.layer_states(out.cache.layers[0])[1], state[1])  # the step moved the state on
    with pytest.raises(ValueError, match="Pass the cache once"):
        model(input_ids=step, cache=out.cache, cache_params=again)
