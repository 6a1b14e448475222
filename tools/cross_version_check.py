#!/usr/bin/env python
"""A converted folder written under one transformers release generates the same greedy tokens under another.

CI (`.ci/run`) runs `write` in one venv and `check` in the others: a Hub user's transformers is rarely the one the
folder was converted with, and the folder carries its own copy of our code.

  python tools/cross_version_check.py write WORKDIR   # convert a synthetic original checkpoint (SPEC §4 layout)
                                                      # with conversion/convert_mlmamba_original.py into
                                                      # WORKDIR/model-<release>, and record its greedy tokens there
  python tools/cross_version_check.py check WORKDIR   # load every WORKDIR/model-* with its own code and compare its
                                                      # greedy tokens and first-step logits with what was recorded

Generation runs in a fresh process with HF_HUB_OFFLINE=1 that never imports this repository's package: only the
folder's code (loaded by `trust_remote_code`) exists for it. Exits non-zero, naming the folder, on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16

GENERATE = """
import json, sys, torch, transformers
from transformers import AutoModelForImageTextToText
folder, prompt, pixels = sys.argv[1], json.loads(sys.argv[2]), torch.tensor(json.loads(sys.argv[3]))
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert "modeling_mlmamba" not in sys.modules, "the repository's package was imported"
out = model.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels, max_new_tokens={new_tokens},
                     do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
print(json.dumps({{"transformers": transformers.__version__, "tokens": out.sequences[0, len(prompt):].tolist(),
                  "first_logits": out.logits[0][0].tolist()}}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("action", choices=("write", "check"))
    parser.add_argument("workdir", type=Path)
    return parser.parse_args(argv)


def prompt_and_pixels() -> tuple[list[int], list]:
    sys.path.insert(0, str(REPO))
    from tests import test_conversion_fixtures as fx

    return fx.prompt_ids([5, 17, 33, 9, 41]), fx.tiny_pixel_values().tolist()


def greedy(folder: Path, scratch: Path) -> dict:
    """Greedy tokens of `folder` in a process that knows only the folder's own code."""
    prompt, pixels = prompt_and_pixels()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": str(scratch / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", GENERATE.format(new_tokens=NEW_TOKENS), str(folder), json.dumps(prompt),
         json.dumps(pixels)],
        cwd=scratch, env=env, capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        sys.exit(f"{folder}: generation failed under this transformers:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write(workdir: Path) -> None:
    import torch
    import transformers

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "conversion"))
    import convert_mlmamba_original
    from tests import test_conversion_fixtures as fx

    scratch = workdir / f"inputs-{transformers.__version__}"
    folder = workdir / f"model-{transformers.__version__}"
    if folder.exists():
        sys.exit(f"{folder} exists: give write a new WORKDIR")
    scratch.mkdir(parents=True)
    checkpoint = scratch / "latest-checkpoint.pt"
    torch.save(fx.original_mlmamba_checkpoint(), checkpoint)
    towers = fx.save_tiny_towers(scratch / "towers")
    tokenizer = fx.save_tiny_tokenizer(scratch / "tokenizer")
    convert_mlmamba_original.main([
        "--checkpoint", str(checkpoint), "--output", str(folder), "--towers", *towers, "--image-size", "32",
        "--tokenizer", tokenizer, "--dtype", "float32", "--image-token-id", "127", "--chunk-size", "8",
    ])
    record = greedy(folder, scratch)
    (workdir / f"tokens-{transformers.__version__}.json").write_text(json.dumps(record) + "\n")
    print(f"wrote {folder} (transformers {transformers.__version__}): greedy tokens {record['tokens']}")


def check(workdir: Path) -> None:
    import torch
    import transformers

    folders = sorted(workdir.glob("model-*"))
    if not folders:
        sys.exit(f"no model-* folders in {workdir}: run `write` first")
    scratch = workdir / f"check-{transformers.__version__}"
    scratch.mkdir(exist_ok=True)
    failures = []
    for folder in folders:
        written_with = folder.name.removeprefix("model-")
        recorded = json.loads((workdir / f"tokens-{written_with}.json").read_text())
        got = greedy(folder, scratch)
        same_tokens = got["tokens"] == recorded["tokens"]
        close = torch.allclose(torch.tensor(got["first_logits"]), torch.tensor(recorded["first_logits"]),
                               atol=1e-4, rtol=1e-4)
        status = "ok" if same_tokens and close else "DIFFERENT"
        print(f"{status}: folder written with transformers {written_with}, generated under "
              f"{transformers.__version__}: tokens {got['tokens']}" + ("" if same_tokens else
                                                                      f" (recorded {recorded['tokens']})"))
        if status != "ok":
            failures.append(folder.name)
    if failures:
        sys.exit(f"greedy generation differs across transformers releases for {failures}")


def main(argv=None) -> None:
    args = parse_args(argv)
    (write if args.action == "write" else check)(args.workdir)


if __name__ == "__main__":
    main()
